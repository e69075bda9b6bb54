"""``aiaas run`` keeps its hands off what it does not own, and leaves no pod behind.

* a volume's ``subPath`` that climbs out of the volume (``..``, absolute) is refused before anything runs;
* checkpoints outside the run directory (a ``--mount``ed or hostPath volume) are never deleted to "start over";
* SIGTERM to `aiaas run` stops every pod (as Ctrl-C does), and when `aiaas run` is killed outright its pods get
  SIGTERM from the kernel instead of running on as orphans.

Real processes throughout: the pods run a small torch-free script (your own command, ``spec.trainer.command``)
that records its pid and how it ended.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from aiaas.contract.launch import CHECKPOINT_DIR, EXIT_PERMANENT, EXIT_PREEMPTED
from aiaas.operator import api
from aiaas.operator.local import LocalPlanError, plan

# a pod that says it started, then waits; SIGTERM makes it write how it ended and exit as a stopped trainer does
WAITER = """
import os, signal, sys, time
out = os.environ["OUT_DIR"]
name = os.environ["POD_NAME"]
def stop(signum, frame):
    with open(os.path.join(out, name + ".stopped"), "w") as f:
        f.write(str(signum))
    sys.exit(143)
signal.signal(signal.SIGTERM, stop)
with open(os.path.join(out, name + ".pid"), "w") as f:
    f.write(str(os.getpid()))
while True:
    time.sleep(0.1)
"""


def job(name: str, mounts: list[dict] | None = None, volumes: list[dict] | None = None) -> dict:
    return {
        "apiVersion": "aiaas.dev/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": name},
        "spec": {
            "trainer": {
                "command": ["python", "/code/waiter.py"],
                "env": [{"name": "OUT_DIR", "value": "/out"}],
                "volumes": [{"name": "code", "emptyDir": {}}, {"name": "out", "emptyDir": {}}, *(volumes or [])],
                "volumeMounts": [{"name": "code", "mountPath": "/code"}, {"name": "out", "mountPath": "/out"},
                                 *(mounts or [])],
            },
            "topology": {"nodes": 2, "nprocPerNode": 1},
            "runPolicy": {"backoffLimit": 0},
        },
    }


def start(tmp_path: Path, spec: dict, *extra: str) -> tuple[subprocess.Popen[str], Path]:
    code, out = tmp_path / "code", tmp_path / "out"
    code.mkdir(exist_ok=True)
    out.mkdir(exist_ok=True)
    (code / "waiter.py").write_text(WAITER)
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    proc = subprocess.Popen(
        [sys.executable, "-m", "aiaas.operator.cli", "run", "-f", str(tmp_path / "job.yaml"), "--metrics-port", "0",
         "--plain", "--mount", f"code={code}", "--mount", f"out={out}", *extra],
        cwd=tmp_path, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        env=dict(os.environ, PYTHONSAFEPATH="1", PYTHONNOUSERSITE="1"))
    return proc, out


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def wait_for_pods(proc: subprocess.Popen[str], out: Path, name: str) -> list[int]:
    pid_files = [out / f"{name}-{i}.pid" for i in range(2)]
    deadline = time.monotonic() + 60
    while not all(f.exists() and f.read_text() for f in pid_files):
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "the pods did not start"
        time.sleep(0.05)
    return [int(f.read_text()) for f in pid_files]


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [p for p in pids if alive(p)]


def test_sub_path_that_leaves_its_volume_is_refused(tmp_path: Path) -> None:
    for sub_path in ("../../..", "/etc", "a/../../b"):
        spec = job("escape", mounts=[{"name": "data", "mountPath": "/data", "subPath": sub_path}],
                   volumes=[{"name": "data", "emptyDir": {}}])
        with pytest.raises(LocalPlanError, match=r"subPath .* must be a relative path without '\.\.'"):
            plan(api.TrainingJob.model_validate(spec), tmp_path / "run")
    ok = job("inside", mounts=[{"name": "data", "mountPath": "/data", "subPath": "a/b"}],
             volumes=[{"name": "data", "emptyDir": {}}])
    p = plan(api.TrainingJob.model_validate(ok), tmp_path / "run")
    assert p.volumes["/data"] == tmp_path / "run" / "volumes" / "data" / "a" / "b"


def test_sub_path_escape_fails_the_run_before_anything_starts(tmp_path: Path) -> None:
    spec = job("escape", mounts=[{"name": "data", "mountPath": "/data", "subPath": "../.."}],
               volumes=[{"name": "data", "emptyDir": {}}])
    proc, out = start(tmp_path, spec)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_PERMANENT, output
    assert "volume data: subPath '../..' must be a relative path" in output
    assert not list(out.glob("*.pid"))


def test_checkpoints_outside_the_run_directory_are_never_deleted(tmp_path: Path) -> None:
    storage = tmp_path / "my-storage"
    kept = storage / "escape-ckpt" / Path(CHECKPOINT_DIR).relative_to("/var/run/aiaas") / "step-00000010"
    kept.mkdir(parents=True)
    (kept / "model.pt").write_text("weights")
    spec = job("escape-ckpt")
    proc, _ = start(tmp_path, spec, "--mount", f"storage={storage / 'escape-ckpt'}")
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_PERMANENT, output
    assert "lies outside the run directory" in output and "--resume" in output
    assert (kept / "model.pt").read_text() == "weights"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_signal_to_aiaas_run_stops_every_pod(tmp_path: Path, sig: signal.Signals) -> None:
    proc, out = start(tmp_path, job("stop-me"))
    pids = wait_for_pods(proc, out, "stop-me")
    proc.send_signal(sig)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_PREEMPTED, output[-3000:]
    assert f"stopping stop-me on {sig.name}" in output
    assert wait_gone(pids, 10) == []
    assert all((out / f"stop-me-{i}.stopped").read_text() == str(int(signal.SIGTERM)) for i in range(2))


def test_pods_stop_when_aiaas_run_is_killed(tmp_path: Path) -> None:
    proc, out = start(tmp_path, job("orphans"))
    pids = wait_for_pods(proc, out, "orphans")
    proc.kill()
    proc.communicate(timeout=30)
    left = wait_gone(pids, 15)
    for pid in left:  # do not leave them behind if the test fails
        os.kill(pid, signal.SIGKILL)
    assert left == [], "pods kept running after aiaas run was killed"
    assert all((out / f"orphans-{i}.stopped").read_text() == str(int(signal.SIGTERM)) for i in range(2))
