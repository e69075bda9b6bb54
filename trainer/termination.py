"""The outcome of a training process, as the operator reads it.

torchrun turns any worker failure into its own exit code 1, so the pod's exit code alone cannot tell a bad
config from a crash. Every worker therefore writes a one-line JSON outcome to the Kubernetes termination log
(``AIAAS_TERMINATION_LOG``, else ``/dev/termination-log`` when writable), which the kubelet puts into the
container status as ``state.terminated.message``::

    {"outcome": "PermanentError", "reason": "InvalidConfig", "message": "...", "exitCode": 78,
     "rank": 1, "step": 120, "artifact": null}

Several workers share a pod and a file, so an outcome only replaces a strictly less severe one already
there (PermanentError > RetryableError > Preempted > Succeeded): the first worker to fail (usually the root
cause) wins over peers that fail after it ("connection closed by peer") or that torchrun then stops with
SIGTERM. The file must start empty (the kubelet gives each container a fresh one; ``aiaas run`` too). The worker's own exit code is one of the contract's
``EXIT_*`` codes (torchrun reports it in its error summary; a plain ``python -m aiaas.trainer`` exits with it).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiaas.contract.launch import ENV_TERMINATION_LOG, TERMINATION_LOG
from aiaas.contract.outcome import (  # noqa: F401 - re-exported: the trainer's modules name outcomes from here
    EXIT_CODES,
    PERMANENT,
    PREEMPTED,
    RETRYABLE,
    SEVERITY,
    SUCCEEDED,
    read_outcome,
)

MAX_MESSAGE = 3500  # the kubelet keeps 4096 bytes of the termination log


@dataclass
class Outcome:
    outcome: str
    reason: str
    message: str
    rank: int | None = None
    step: int | None = None
    artifact: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.outcome]

    def to_json(self) -> dict[str, Any]:
        return {
            "outcome": self.outcome,
            "reason": self.reason,
            "message": self.message[:MAX_MESSAGE],
            "exitCode": self.exit_code,
            "rank": self.rank,
            "step": self.step,
            "artifact": self.artifact,
            **self.extra,
        }


def termination_log_path() -> Path | None:
    """Where to write the outcome: ``$AIAAS_TERMINATION_LOG``, else ``/dev/termination-log`` if writable."""
    env = os.environ.get(ENV_TERMINATION_LOG)
    if env:
        return Path(env)
    p = Path(TERMINATION_LOG)
    if p.exists() and os.access(p, os.W_OK):
        return p
    return None


def write_outcome(outcome: Outcome, path: Path | None = None) -> Path | None:
    """Write ``outcome`` unless a more severe one is already there. Returns the path written (or None)."""
    path = path or termination_log_path()
    if path is None:
        return None
    try:
        current = read_outcome(path)
        if current and SEVERITY.get(current.get("outcome", ""), -1) >= SEVERITY[outcome.outcome]:
            return None
        data = json.dumps(outcome.to_json(), separators=(",", ":")) + "\n"
        if path.parent.is_dir() and not str(path).startswith("/dev/"):
            tmp = path.with_name(f".{path.name}.{os.getpid()}")
            tmp.write_text(data)
            os.replace(tmp, path)
        else:
            path.write_text(data)
        return path
    except OSError:
        return None
