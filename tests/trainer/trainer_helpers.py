"""Helpers for the trainer tests: run real ``torchrun`` / ``python -m aiaas.trainer`` processes on CPU.

(A module with its own name, not ``conftest``, so test modules can import it unambiguously.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiaas.contract.launch import ENV_CONFIG, ENV_TERMINATION_LOG

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


@dataclass
class Run:
    rc: int
    log: str
    outcome: dict[str, Any] | None
    dir: Path
    config: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def artifact(self) -> Path:
        return self.dir / "artifact"

    @property
    def checkpoints(self) -> Path:
        return self.dir / "checkpoints"

    def metrics(self) -> dict[str, Any]:
        return json.loads((self.artifact / "metrics.json").read_text())


def job_config(run_dir: Path, **overrides: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "jobName": run_dir.name,
        "checkpointDir": str(run_dir / "checkpoints"),
        "artifactDir": str(run_dir / "artifact"),
        "metricsPort": 0,
        "logIntervalSteps": 20,
    }
    for k, v in overrides.items():
        cfg[k] = v
    return cfg


def trainer_command(nproc: int) -> list[str]:
    if nproc == 0:  # a plain process, no torchrun
        return [sys.executable, "-m", "aiaas.trainer"]
    return [*TORCHRUN, "--nnodes=1", f"--nproc-per-node={nproc}", "--rdzv-backend=c10d",
            "--rdzv-endpoint=127.0.0.1:0", "--max-restarts=0", "-m", "aiaas.trainer"]


def start(run_dir: Path, cfg: dict[str, Any], nproc: int, extra_env: dict[str, str] | None = None
          ) -> tuple[subprocess.Popen[bytes], Path]:
    run_dir.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(extra_env or {})
    env[ENV_CONFIG] = json.dumps(cfg)
    env[ENV_TERMINATION_LOG] = str(run_dir / "termination-log")
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONSAFEPATH"] = "1"  # never the repo root on sys.path: operator/ would shadow the stdlib's operator
    log = run_dir / "output.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(trainer_command(nproc), env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=run_dir)
    return proc, log


def finish(proc: subprocess.Popen[bytes], run_dir: Path, cfg: dict[str, Any], timeout: float, t0: float) -> Run:
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log = (run_dir / "output.log").read_text()[-4000:]
        raise AssertionError(f"trainer did not finish in {timeout}s:\n{log}") from None
    term = run_dir / "termination-log"
    outcome = json.loads(term.read_text()) if term.exists() and term.read_text().strip() else None
    return Run(rc, (run_dir / "output.log").read_text(), outcome, run_dir, cfg, time.monotonic() - t0)


def train(run_dir: Path, nproc: int = 1, timeout: float = 300, extra_env: dict[str, str] | None = None,
          **overrides: Any) -> Run:
    """Run the trainer to the end (``nproc`` 0: plain ``python -m aiaas.trainer``; else torchrun)."""
    cfg = job_config(run_dir, **overrides)
    t0 = time.monotonic()
    proc, _ = start(run_dir, cfg, nproc, extra_env)
    return finish(proc, run_dir, cfg, timeout, t0)


def worker_pids(torchrun_pid: int) -> list[int]:
    """The trainer processes torchrun started (its children running aiaas.trainer)."""
    pids = []
    for task in Path(f"/proc/{torchrun_pid}/task").iterdir():
        children = (task / "children").read_text().split()
        pids.extend(int(c) for c in children)
    out = []
    for pid in pids:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"aiaas.trainer" in cmd or b"torch.distributed" in cmd or b"python" in cmd:
            out.append(pid)
    return sorted(out)


def worker_rank(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for item in env:
        if item.startswith(b"RANK="):
            return int(item[5:])
    return None


WORDS = ["the", "model", "reads", "a", "line", "of", "text", "and", "learns", "which", "character", "comes",
         "next", "so", "that", "it", "can", "write", "more", "lines", "like", "while", "ranks", "share", "work",
         "agree", "on", "every", "step", "way"]


def write_text(path: Path, chars: int = 6000, seed: int = 0) -> Path:
    """A deterministic text file of sentences over a small vocabulary (no download)."""
    import random

    rng = random.Random(seed)
    out: list[str] = []
    size = 0
    while size < chars:
        sentence = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))).capitalize() + ". "
        out.append(sentence)
        size += len(sentence)
    path.write_text("".join(out)[:chars])
    return path


def logged_losses(log: str) -> dict[int, float]:
    """{step: training loss} from rank 0's progress lines."""
    import re

    return {int(m.group(1)): float(m.group(2))
            for m in re.finditer(r"step (\d+)/\d+ \(\d+%\) loss ([\d.]+)", log)}
