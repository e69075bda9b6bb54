"""``aiaas run`` with your own command (a Kubeflow PyTorchJob script, run unchanged) and without torch.

Real processes throughout: the scripts are real gloo all_reduce programs written into a temporary directory and
mounted with ``--mount``; "without torch" is a real interpreter (a fresh venv) that holds only what the
operator side of aiaas imports, so ``import torch`` fails there exactly as on a machine without the extra.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from aiaas.contract.launch import EXIT_PERMANENT
from aiaas.operator.local import TRAINER_INSTALL

REPO = Path(__file__).resolve().parents[2]

# a training script written for a Kubeflow PyTorchJob: env:// rendezvous from MASTER_ADDR/MASTER_PORT/WORLD_SIZE/
# RANK (set per pod, or by torchrun for its workers from the PET_* variables)
ALL_REDUCE = """
import os, sys
import torch
import torch.distributed as dist
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
total = torch.tensor([float(rank + 1)])
dist.all_reduce(total)
print(f"rank {rank}/{world} sum {total.item():.0f} nnodes {os.environ.get('PET_NNODES')}", flush=True)
if rank == 0:
    with open(os.path.join(os.environ["OUT_DIR"], "sum.txt"), "w") as f:
        f.write(f"{total.item():.0f}")
dist.destroy_process_group()
code = int(os.environ.get("FAIL_CODE", "0"))
if code:
    print(f"rank {rank}: giving up with code {code}", file=sys.stderr, flush=True)
sys.exit(code)
"""


def job(name: str, command: list[str], backoff_limit: int = 3, nodes: int = 2, **env: str) -> dict:
    return {
        "apiVersion": "aiaas.dev/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": name},
        "spec": {
            "trainer": {
                "command": command,
                "env": [{"name": k, "value": v} for k, v in {"OUT_DIR": "/var/run/aiaas", **env}.items()],
                "volumes": [{"name": "code", "emptyDir": {}}],
                "volumeMounts": [{"name": "code", "mountPath": "/code"}],
            },
            "topology": {"nodes": nodes, "nprocPerNode": 1},
            "runPolicy": {"backoffLimit": backoff_limit},
        },
    }


def aiaas_run(tmp_path: Path, spec: dict, python: str = sys.executable, timeout: float = 300
              ) -> subprocess.CompletedProcess[str]:
    code = tmp_path / "code"
    code.mkdir(exist_ok=True)
    (code / "train.py").write_text(ALL_REDUCE)
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    return subprocess.run([python, "-m", "aiaas.operator.cli", "run", "-f", str(tmp_path / "job.yaml"),
                           "--mount", f"code={code}", "--metrics-port", "0"],
                          cwd=tmp_path, text=True, capture_output=True, timeout=timeout, check=False,
                          env=dict(os.environ, PYTHONSAFEPATH="1", PYTHONNOUSERSITE="1"))


@pytest.mark.slow
@pytest.mark.parametrize("command", [["python", "/code/train.py"], ["torchrun", "/code/train.py"]],
                         ids=["python-per-pod", "torchrun-pet-env"])
def test_kubeflow_script_runs_unchanged_and_succeeds_on_exit_0(tmp_path: Path, command: list[str]) -> None:
    done = aiaas_run(tmp_path, job("kf-script", command))
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    assert "rank 0/2 sum 3 nnodes 2" in out and "rank 1/2 sum 3 nnodes 2" in out
    assert "kf-script succeeded" in out and "all 2 pod(s) exited 0" in out
    storage = tmp_path / "runs" / "kf-script" / "volumes" / "storage"
    assert f"volume /var/run/aiaas: {storage}" in out and f"volume /code: {tmp_path / 'code'}" in out
    assert (storage / "sum.txt").read_text() == "3"
    assert "restarting" not in out and "Failed" not in out


@pytest.mark.slow
def test_one_process_torchrun_script_runs_as_torchruns_worker_would(tmp_path: Path) -> None:
    """One node with one process: the runner starts the worker itself, with torchrun's worker environment."""
    done = aiaas_run(tmp_path, job("kf-single", ["torchrun", "/code/train.py"], nodes=1))
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    assert "rank 0/1 sum 1 nnodes 1" in out and "kf-single succeeded" in out
    assert "torch.distributed.run" not in out


@pytest.mark.slow
def test_failing_script_fails_with_its_exit_code_and_log_tail(tmp_path: Path) -> None:
    done = aiaas_run(tmp_path, job("kf-fails", ["python", "/code/train.py"], backoff_limit=1, FAIL_CODE="3"))
    assert done.returncode == 3, (done.stdout + done.stderr)[-4000:]
    assert "restarting kf-fails (1/1)" in done.stdout  # exit 3 is retryable, as for the operator
    assert "last lines of kf-fails-" in done.stderr and "giving up with code 3" in done.stderr
    assert "RetryableError" in done.stderr and "exited with code 3" in done.stderr


# ------------------------------------------------------------------------------------------ without torch
def _module_paths(names: list[str]) -> list[Path]:
    out = []
    for name in names:
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.origin, name
        origin = Path(spec.origin)
        out.append(origin.parent if spec.submodule_search_locations else origin)
    return out


@pytest.fixture(scope="module")
def python_without_torch(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A fresh venv holding only what ``aiaas run`` itself imports (the operator side: pydantic, yaml, aiaas)."""
    where = tmp_path_factory.mktemp("no-torch")
    subprocess.run([sys.executable, "-I", "-m", "venv", "--without-pip", str(where)], check=True)
    [site] = where.glob("lib/python*/site-packages")
    listing = ("import sys, aiaas.operator.cli, aiaas.operator.local; print(' '.join(sorted({m.split('.')[0] for m, v"
               " in sys.modules.items() if 'site-packages' in (getattr(v, '__file__', None) or '')})))")
    needed = subprocess.run([sys.executable, "-c", listing], capture_output=True, text=True, check=True,
                            env=dict(os.environ, PYTHONSAFEPATH="1")).stdout.split()
    assert "torch" not in needed
    for path in _module_paths([n for n in needed if not n.startswith(("aiaas", "__editable__"))]):
        (site / path.name).symlink_to(path)
    aiaas_spec = importlib.util.find_spec("aiaas")
    assert aiaas_spec is not None and aiaas_spec.origin
    finders = [n for n in needed if n.startswith("__editable___aiaas")]
    if finders:  # an editable install: its finder module and the .pth that installs it
        [finder] = _module_paths(finders)
        (site / finder.name).symlink_to(finder)
        for pth in finder.parent.glob("__editable__.aiaas-*.pth"):
            (site / pth.name).symlink_to(pth)
    else:
        (site / "aiaas").symlink_to(Path(aiaas_spec.origin).parent)
    python = str(where / "bin" / "python")
    probe = subprocess.run([python, "-c", "import aiaas.operator.local; import torch"], capture_output=True,
                           text=True, cwd="/", check=False, env=dict(os.environ, PYTHONSAFEPATH="1"))
    assert "No module named 'torch'" in probe.stderr, probe.stderr
    return python


def test_run_without_torch_says_what_to_install_once(tmp_path: Path, python_without_torch: str) -> None:
    done = subprocess.run([python_without_torch, "-m", "aiaas.operator.cli", "run", "-f",
                           str(REPO / "examples" / "01-cnn-digits.yaml"), "--metrics-port", "0"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False,
                          env=dict(os.environ, PYTHONSAFEPATH="1"))
    out = done.stdout + done.stderr
    assert done.returncode == EXIT_PERMANENT, out
    assert out.count(TRAINER_INSTALL) == 1 and "No module named 'torch'" in out
    assert "restarting" not in out and not (tmp_path / "runs" / "cnn-digits" / "pods").exists()  # nothing started


def test_own_command_without_torch_is_not_restarted(tmp_path: Path, python_without_torch: str) -> None:
    done = aiaas_run(tmp_path, job("kf-no-torch", ["python", "/code/train.py"]), python=python_without_torch)
    out = done.stdout + done.stderr
    assert done.returncode == EXIT_PERMANENT, out[-4000:]
    assert out.count(TRAINER_INSTALL) == 1 and "PermanentError" in out
    assert "restarting" not in out
