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
SIGTERM. The read-compare-write runs under an exclusive ``flock`` (on ``.<name>.lock`` beside the file, or on
the file itself where it cannot be replaced, as the kubelet's bind-mounted ``/dev/termination-log``), and the
new content replaces the old in one step (temp file + rename) where the directory allows it, so concurrent
workers never interleave. The kubelet keeps only :data:`MAX_BYTES` bytes of the file: the message is cut by
*encoded* bytes (on a character boundary, marked with ``...``) until the whole JSON line fits, so the operator
always reads valid JSON (a broken one would make a permanent error look retryable). The file must start
empty (the kubelet gives each container a fresh one; ``aiaas run`` too). The worker's own exit code is one of
the contract's ``EXIT_*`` codes (torchrun reports it in its error summary; a plain ``python -m aiaas.trainer``
exits with it).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
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

MAX_BYTES = 4096  # the kubelet keeps this many bytes of the termination log
ELLIPSIS = "..."


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
            "message": self.message,
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


def encode_outcome(outcome: Outcome, limit: int = MAX_BYTES) -> bytes:
    """``outcome`` as one JSON line of at most ``limit`` UTF-8 bytes: the longest prefix of the message (cut on
    a character boundary, marked with ``...``) that fits once JSON-escaped."""
    doc = outcome.to_json()

    def encode(message: str) -> bytes:
        doc["message"] = message
        return (json.dumps(doc, separators=(",", ":"), ensure_ascii=False) + "\n").encode()

    data = encode(outcome.message)
    if len(data) <= limit:
        return data
    raw = outcome.message.encode()
    lo, hi = 0, len(raw)  # the longest prefix of `lo` bytes fits; binary search on the encoded size
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(encode(raw[:mid].decode("utf-8", errors="ignore") + ELLIPSIS)) <= limit:
            lo = mid
        else:
            hi = mid - 1
    data = encode(raw[:lo].decode("utf-8", errors="ignore") + ELLIPSIS)
    if len(data) > limit:
        raise ValueError(f"the outcome's fields other than its message exceed {limit} bytes: {doc}")
    return data


def _replaceable(path: Path) -> bool:
    """Whether ``path`` can be replaced by a rename (not a bind-mounted file such as /dev/termination-log)."""
    return not str(path).startswith("/dev/") and os.access(path.parent, os.W_OK)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock shared by every worker writing ``path`` (a rename replaces the file's inode, so the
    lock is then taken on a sibling file that stays)."""
    lock_path = path.with_name(f".{path.name}.lock") if _replaceable(path) else path
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _replace(path: Path, data: bytes) -> None:
    if _replaceable(path):
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    else:
        with open(path, "r+b") as f:
            f.truncate(0)
            f.write(data)


def write_outcome(outcome: Outcome, path: Path | None = None) -> Path | None:
    """Write ``outcome`` unless a more severe one is already there. Returns the path written (or None)."""
    path = path or termination_log_path()
    if path is None:
        return None
    data = encode_outcome(outcome)
    try:
        with _locked(path):
            current = read_outcome(path)
            if current and SEVERITY.get(current.get("outcome", ""), -1) >= SEVERITY[outcome.outcome]:
                return None
            _replace(path, data)
        return path
    except OSError:
        return None
