"""``aiaas run``: the rendered pod template executed as local processes (planning, and real end-to-end runs)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from aiaas.contract.launch import EXIT_PERMANENT, EXIT_PREEMPTED
from aiaas.operator import api
from aiaas.operator.local import expand_vars, plan, single_worker
from aiaas.trainer.checkpoint import MARKER, list_checkpoints
from aiaas.trainer.export import load_artifact, read_metrics

REPO = Path(__file__).resolve().parents[2]


def two_node_job(name: str = "two-nodes", epochs: int = 4, **dataset: str) -> dict:
    return {
        "apiVersion": "aiaas.dev/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": name},
        "spec": {
            "trainer": {
                "model": {"architecture": "cnn"},
                "dataset": {"kind": "digits", **dataset},
                "hyperparameters": {"epochs": epochs, "batchSize": 32, "learningRate": 0.002},
            },
            "topology": {"nodes": 2, "nprocPerNode": 1},
            "checkpoint": {"intervalSteps": 10, "keepLast": 2},
        },
    }


def aiaas(*args: str, cwd: Path) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONSAFEPATH="1")
    return subprocess.Popen([sys.executable, "-m", "aiaas.operator.cli", *args], cwd=cwd, text=True, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def test_local_module_does_not_import_torch() -> None:
    code = "import sys, aiaas.operator.local; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_expand_vars_like_the_kubelet() -> None:
    env = {"A": "1", "B": "x"}
    assert expand_vars("--node-rank=$(A)", env) == "--node-rank=1"
    assert expand_vars("$(B)-$(C)-$$(A)", env) == "x-$(C)-$(A)"


def test_plan_of_the_data_pipeline_example(tmp_path: Path) -> None:
    doc = yaml.safe_load((REPO / "examples" / "04-cnn-data-pipeline.yaml").read_text())
    job = api.TrainingJob.model_validate(doc)
    p = plan(job, tmp_path, metrics_base=19000)
    assert [pod.name for pod in p.pods] == ["cnn-data-pipeline-0", "cnn-data-pipeline-1"]
    a, b = p.pods
    assert a.argv[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--node-rank=0" in a.argv and "--node-rank=1" in b.argv
    endpoints = {arg for pod in p.pods for arg in pod.argv if arg.startswith("--rdzv-endpoint=")}
    assert len(endpoints) == 1 and endpoints.pop().startswith("--rdzv-endpoint=127.0.0.1:")
    assert a.env["PET_NODE_RANK"] == "0" and b.env["PET_NODE_RANK"] == "1"
    assert a.env["POD_NAME"] == "cnn-data-pipeline-0" and a.env["MASTER_ADDR"] == "127.0.0.1"
    assert (a.metrics_ports, b.metrics_ports) == ([19000, 19001], [19002, 19003])
    cfg = json.loads(b.env["AIAAS_TRAINER_CONFIG"])
    assert cfg["checkpointDir"] == str(p.checkpoint_dir) and str(p.checkpoint_dir).startswith(str(tmp_path))
    assert cfg["artifactDir"].startswith(str(tmp_path)) and cfg["parallelism"]["model"] == 2
    assert a.termination_log != b.termination_log


def test_one_process_pod_starts_the_trainer_without_torchruns_agent(tmp_path: Path) -> None:
    doc = yaml.safe_load((REPO / "examples" / "01-cnn-digits.yaml").read_text())
    [pod] = plan(api.TrainingJob.model_validate(doc), tmp_path).pods
    assert pod.argv == [sys.executable, "-m", "aiaas.trainer"]
    env = pod.env
    assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"], env["LOCAL_WORLD_SIZE"]) == ("0", "0", "1", "1")
    assert env["MASTER_ADDR"] == "127.0.0.1" and env["MASTER_PORT"].isdigit()
    torchrun = [sys.executable, "-m", "torch.distributed.run"]
    # more than one process, elastic bounds, or a flag the runner does not know: torchrun stays
    assert single_worker([*torchrun, "--nnodes=1", "--nproc-per-node=2", "-m", "x"], {}) is None
    assert single_worker([*torchrun, "--nnodes=1:3", "-m", "x"], {}) is None
    assert single_worker([*torchrun, "--nnodes=1", "--log-dir=/x", "t.py"], {}) is None
    assert single_worker([*torchrun, "t.py"], {"PET_NNODES": "2"}) is None
    argv, env = single_worker([*torchrun, "--nnodes", "1", "--standalone", "t.py", "--lr=1"], {}) or ([], {})
    assert argv == [sys.executable, "t.py", "--lr=1"] and env["WORLD_SIZE"] == "1"


@pytest.mark.slow
def test_aiaas_run_two_nodes_end_to_end(tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(two_node_job(epochs=2)))
    proc = aiaas("run", "-f", str(job), "--metrics-port", "0", cwd=tmp_path)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out[-4000:]
    artifact = tmp_path / "runs" / "two-nodes" / "volumes" / "storage" / "artifacts"
    assert f"model artifact: {artifact}" in out
    assert "two-nodes-1 |" in out or "two-nodes-0 |" in out
    model, manifest = load_artifact(artifact)
    assert manifest["name"] == "two-nodes" and manifest["inputs"][0]["shape"] == [-1, 1, 8, 8]
    metrics = read_metrics(artifact)
    assert metrics["worldSize"] == 2 and metrics["steps"] == 2 * 44 and metrics["accuracy"] >= 0.8


@pytest.mark.slow
def test_aiaas_run_permanent_error_is_not_retried(tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    spec = two_node_job("bad-data", path="/nonexistent/mnist")
    spec["spec"]["trainer"]["dataset"]["kind"] = "mnist"
    spec["spec"]["runPolicy"] = {"backoffLimit": 3}
    job.write_text(yaml.safe_dump(spec))
    proc = aiaas("run", "-f", str(job), "--metrics-port", "0", cwd=tmp_path)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == EXIT_PERMANENT, out[-4000:]
    assert "PermanentError" in out and "/nonexistent/mnist does not exist" in out
    assert "restarting" not in out


@pytest.mark.slow
def test_aiaas_run_ctrl_c_checkpoints_and_resume_finishes(tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(two_node_job("stop-resume", epochs=30)))
    proc = aiaas("run", "-f", str(job), "--metrics-port", "0", cwd=tmp_path)
    ckpts = tmp_path / "runs" / "stop-resume" / "volumes" / "storage" / "checkpoints"
    deadline = time.monotonic() + 120
    while not any((p / MARKER).exists() for p in list_checkpoints(ckpts)):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, out[-4000:]
    assert "Preempted" in out and "checkpoint saved" in out
    m = re.search(r"stopped by signal 15 at step (\d+); checkpoint saved", out)
    assert m, out[-3000:]
    stopped_at = int(m.group(1))
    assert list_checkpoints(ckpts)[0].name == f"step-{stopped_at:08d}"  # the stop step got its own checkpoint
    # --resume continues from there (cut to one epoch to keep the test short: when the checkpoint is already
    # past the end, the trainer only evaluates and exports)
    job.write_text(yaml.safe_dump(two_node_job("stop-resume", epochs=1)))
    resumed = aiaas("run", "-f", str(job), "--metrics-port", "0", "--resume", cwd=tmp_path)
    out2, _ = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, out2[-4000:]
    assert f"resumed from checkpoint step {stopped_at}" in out2


def _trainer_worker_of(pod: str) -> int | None:
    """The pid of the trainer process (a torchrun worker, which has LOCAL_RANK) of local pod ``pod``."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"POD_NAME={pod}".encode() in env and any(e.startswith(b"LOCAL_RANK=") for e in env):
            return int(proc.name)
    return None


@pytest.mark.slow
def test_aiaas_run_restarts_the_gang_after_a_sigkill(tmp_path: Path) -> None:
    """A trainer killed mid-run is a retryable failure: the runner restarts both pods, which resume from the
    last checkpoint and finish with the planned number of optimizer steps."""
    job = tmp_path / "job.yaml"
    # long enough that the kill lands mid-training even when this process is starved for seconds on a busy
    # machine (with 3 epochs it once found the worker only after training had ended: no restart to see)
    job.write_text(yaml.safe_dump(two_node_job("gang-restart", epochs=8)))
    proc = aiaas("run", "-f", str(job), "--metrics-port", "0", cwd=tmp_path)
    ckpts = tmp_path / "runs" / "gang-restart" / "volumes" / "storage" / "checkpoints"
    deadline = time.monotonic() + 120
    while not any((p / MARKER).exists() for p in list_checkpoints(ckpts)):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    victim = _trainer_worker_of("gang-restart-1")
    assert victim is not None
    state = Path(f"/proc/{victim}/stat").read_text().split()[2]  # diagnostics: R/S, not Z (already exited)
    os.kill(victim, signal.SIGKILL)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out[-4000:]
    assert "restarting gang-restart from its last checkpoint (1/3)" in out, f"victim {victim} was {state}:\n{out}"
    assert re.search(r"resumed from checkpoint step \d+", out)
    metrics = read_metrics(tmp_path / "runs" / "gang-restart" / "volumes" / "storage" / "artifacts")
    assert metrics["steps"] == metrics["optimizerSteps"] == 8 * 44 and metrics["resumedFromStep"] is not None
