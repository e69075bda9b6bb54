"""The built wheel (not the editable install) is complete and works where it is installed.

The editable install the tests use reads the source tree, so it cannot notice a module the wheel leaves out
(a hand-written package list once left out ``aiaas.operator.render``). Here the wheel is built with pip, its
module list is compared with the source tree, and it is installed into brand-new venvs from the locked
wheelhouse (``hack/images.sh wheelhouse``, the same wheels the images install):

- with the ``operator`` extra only: ``aiaas --version``, ``render``, ``crds`` and the operator's handlers
  import, and torch is absent;
- with the ``trainer`` and ``server`` extras: ``aiaas run`` trains a tiny job and ``aiaas serve`` serves it.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
SAFE_ENV = {**os.environ, "PYTHONSAFEPATH": "1", "PYTHONNOUSERSITE": "1"}


def run(*argv: str | Path, cwd: Path | None = None, timeout: float = 900) -> str:
    done = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout,
                          cwd=cwd or Path("/"), env=SAFE_ENV, check=False)
    assert done.returncode == 0, f"{argv} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def package_dirs(repo: Path) -> dict[str, str]:
    """setup.py's PACKAGE_DIRS, read without running setup.py."""
    tree = ast.parse((repo / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "PACKAGE_DIRS":
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py has no PACKAGE_DIRS")


@pytest.fixture(scope="module")
def wheel(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel of the tracked source tree. Built from a copy: setuptools reuses a build/ folder in the tree,
    and a stale one once smuggled a deleted module into the wheel."""
    out, src = tmp_path_factory.mktemp("wheel"), tmp_path_factory.mktemp("src") / "aiaas"
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=repo, capture_output=True, check=True).stdout
    for name in filter(None, tracked.decode().split("\0")):
        if (repo / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(repo / name, src / name)
    run(sys.executable, "-I", "-m", "pip", "wheel", "-q", "--no-deps", "--no-cache-dir", "-w", out, src)
    [built] = out.glob("aiaas-*.whl")
    return built


@pytest.fixture(scope="module")
def wheelhouse(repo: Path) -> Path:
    return Path(run(repo / "hack" / "images.sh", "wheelhouse", timeout=3600).strip())


def venv_with(wheel: Path, extras: str, wheelhouse: Path, repo: Path, where: Path) -> Path:
    run(sys.executable, "-I", "-m", "venv", where)
    run(where / "bin" / "python", "-I", "-m", "pip", "install", "-q", "--no-index", "--find-links", wheelhouse,
        "-c", repo / "constraints.txt", f"{wheel}[{extras}]", timeout=1800)
    return where / "bin"


def test_wheel_holds_every_module_of_the_source_tree(wheel: Path, repo: Path) -> None:
    in_wheel = {n for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".py")}
    in_tree = set()
    for package, folder in package_dirs(repo).items():
        for path in (repo / folder).rglob("*.py"):
            in_tree.add("/".join([*package.split("."), *path.relative_to(repo / folder).parts]))
    assert in_tree - in_wheel == set(), "modules missing from the wheel"
    assert in_wheel - in_tree == set(), "modules in the wheel that the source tree does not have"
    assert "aiaas/operator/render/trainingjob.py" in in_wheel
    assert not any(n.startswith(("tests/", "bench/", "hack/")) for n in in_wheel)


def test_operator_extra_works_without_torch(wheel: Path, wheelhouse: Path, repo: Path, tmp_path: Path) -> None:
    bin_dir = venv_with(wheel, "operator", wheelhouse, repo, tmp_path / "venv")
    assert run(bin_dir / "aiaas", "--version").strip() == f"aiaas {_version(repo)}"
    rendered = run(bin_dir / "aiaas", "render", "-f", repo / "examples" / "01-cnn-digits.yaml")
    assert "kind: Pod" in rendered and "torchrun" in rendered  # one node: a bare pod
    assert "kind: CustomResourceDefinition" in run(bin_dir / "aiaas", "crds")
    run(bin_dir / "python", "-I", "-c", "import aiaas.operator.main, aiaas.operator.runtime, aiaas.operator.watch")
    no_torch = subprocess.run([bin_dir / "python", "-I", "-c", "import torch"], capture_output=True, text=True,
                              cwd="/", check=False)
    assert no_torch.returncode != 0 and "No module named 'torch'" in no_torch.stderr


TINY_JOB = """
apiVersion: aiaas.dev/v1alpha1
kind: TrainingJob
metadata: {name: wheel-tiny}
spec:
  trainer:
    model: {architecture: cnn}
    dataset: {kind: digits}
    hyperparameters: {epochs: 2, batchSize: 64, learningRate: 0.003, seed: 1}
  topology: {nodes: 1, nprocPerNode: 1}
"""


def test_trainer_and_server_extras_train_and_serve(wheel: Path, wheelhouse: Path, repo: Path, tmp_path: Path) -> None:
    bin_dir = venv_with(wheel, "trainer,server", wheelhouse, repo, tmp_path / "venv")
    (tmp_path / "job.yaml").write_text(TINY_JOB)
    out = run(bin_dir / "aiaas", "run", "-f", tmp_path / "job.yaml", "--run-dir", tmp_path / "run",
              "--metrics-port", "0", cwd=tmp_path)
    assert "wheel-tiny succeeded" in out, out
    artifact = tmp_path / "run" / "volumes" / "storage" / "artifacts"
    assert (artifact / "DONE").exists(), out
    port = _free_port()
    server = subprocess.Popen([bin_dir / "aiaas", "serve", "--model", artifact, "--host", "127.0.0.1",
                               "--port", str(port)], cwd=tmp_path, env=SAFE_ENV,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        meta = _get_json(f"http://127.0.0.1:{port}/v2/models/wheel-tiny", deadline=120)
        assert meta["name"] == "wheel-tiny"
    finally:
        server.terminate()
        server.wait(timeout=60)


def _version(repo: Path) -> str:
    import re

    return re.search(r'^__version__ = "([^"]+)"', (repo / "aiaas" / "__init__.py").read_text(), re.M).group(1)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get_json(url: str, deadline: float) -> dict:
    end = time.monotonic() + deadline
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return json.loads(r.read())
        except OSError:
            if time.monotonic() > end:
                raise
            time.sleep(0.5)
