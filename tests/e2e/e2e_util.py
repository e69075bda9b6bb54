"""Small helpers shared by the e2e tests (importable as ``e2e_util``).

Nothing here knows about the local harness (hack/cluster.sh): the tests run
against any cluster reachable with the kubeconfig the fixtures set up.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
# AIAAS_E2E_CRDS_DIR: test another set of CRDs (e.g. a candidate fix) than crds/.
CRDS_DIR = Path(os.environ.get("AIAAS_E2E_CRDS_DIR") or REPO_ROOT / "crds")
EXAMPLES_DIR = REPO_ROOT / "examples"

T = TypeVar("T")


class KubectlError(subprocess.CalledProcessError):
    """A failed kubectl call; str() shows the command, stdout and stderr."""

    def __str__(self) -> str:
        cmd = " ".join(self.cmd) if isinstance(self.cmd, (list, tuple)) else str(self.cmd)
        return (
            f"command failed with exit code {self.returncode}: {cmd}\n"
            f"--- stdout ---\n{self.stdout or ''}\n--- stderr ---\n{self.stderr or ''}"
        )


def run(
    cmd: Sequence[str],
    *,
    check: bool = True,
    input: str | None = None,
    timeout: float = 120,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        list(cmd), input=input, capture_output=True, text=True, timeout=timeout, env=env
    )
    if check and proc.returncode != 0:
        raise KubectlError(proc.returncode, list(cmd), proc.stdout, proc.stderr)
    return proc


def wait_for(
    predicate: Callable[[], T],
    *,
    timeout: float = 60,
    interval: float = 0.5,
    what: str = "condition",
) -> T:
    """Poll ``predicate`` until it returns a truthy value; return that value.

    Exceptions raised by the predicate count as "not yet"; the last one is
    reported if the timeout expires.
    """
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    last_val: Any = None
    while True:
        try:
            last_val = predicate()
            if last_val:
                return last_val
        except Exception as exc:  # noqa: BLE001 - polling
            last_exc = exc
        if time.monotonic() >= deadline:
            detail = f"; last error: {last_exc!r}" if last_exc else f"; last value: {last_val!r}"
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}{detail}")
        time.sleep(interval)


def load_yaml_docs(path: Path | str) -> list[dict[str, Any]]:
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def crd_docs() -> list[dict[str, Any]]:
    """All CustomResourceDefinition documents in crds/."""
    docs: list[dict[str, Any]] = []
    for p in sorted(CRDS_DIR.glob("*.y*ml")):
        docs += [d for d in load_yaml_docs(p) if d.get("kind") == "CustomResourceDefinition"]
    return docs


def example_files() -> list[Path]:
    return sorted(p for p in EXAMPLES_DIR.glob("*.y*ml") if p.is_file())
