"""The images that `make images` builds, run as real containers (runc) the way their pods run them.

- the operator image starts `aiaas operator --help` as uid 65532, and torch is not importable in it;
- the trainer image runs the container that `aiaas render -f examples/01-cnn-digits.yaml` renders — its command,
  env and volumes, as uid 1000 with a read-only root filesystem — and leaves a loadable artifact (accuracy
  >= 0.95) and a Succeeded termination message;
- the same image serves that artifact with the command the InferenceService renderer writes, and answers an
  Open Inference Protocol v2 request sent from another process in the pod's network namespace;
- a build killed while it saved an archive does not block the next build.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from oci_run import Image, Mount, archives, container_process, run_in, runtime_available, stop

from aiaas.operator import api
from aiaas.operator.load import load_file
from aiaas.operator.render import render_inferenceservice, render_trainingjob
from aiaas.operator.render.settings import RenderSettings

pytestmark = [pytest.mark.images, pytest.mark.skipif(runtime_available() is not None,
                                                    reason=str(runtime_available()))]


@pytest.fixture(scope="session")
def built(repo: Path) -> dict[str, Path]:
    return archives(repo)


@pytest.fixture(scope="session")
def operator_image(built: dict[str, Path]) -> Any:
    image = Image("operator", built[f"localhost/aiaas-operator:{_version()}"]).open()
    yield image
    image.close()


@pytest.fixture(scope="session")
def trainer_image(built: dict[str, Path]) -> Any:
    image = Image("trainer", built[f"localhost/aiaas-trainer:{_version()}"]).open()
    yield image
    image.close()


def _version() -> str:
    import aiaas

    return aiaas.__version__


def _user(image: Image) -> tuple[int, int]:
    uid, gid = image.config["User"].split(":")
    return int(uid), int(gid)


def test_operator_image_runs_as_nonroot_without_torch(operator_image: Image, tmp_path: Path) -> None:
    assert _user(operator_image) == (65532, 65532)
    entry = operator_image.config["Entrypoint"]
    helped = run_in(operator_image, [*entry, "operator", "--help"], tmp_path, user=(65532, 65532))
    assert helped.returncode == 0, helped.stdout + helped.stderr
    assert "--all-namespaces" in helped.stdout
    no_torch = run_in(operator_image, ["python", "-I", "-c", "import torch"], tmp_path, user=(65532, 65532))
    assert no_torch.returncode != 0 and "No module named 'torch'" in no_torch.stderr


def _worker_container(repo: Path) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """examples/01's worker: a one-node job, so the bare pod the operator would create."""
    [loaded] = load_file(repo / "examples" / "01-cnn-digits.yaml")
    job = loaded.obj
    pod = next(m for m in render_trainingjob(job, RenderSettings()) if m["kind"] == "Pod")["spec"]
    [container] = pod["containers"]
    return job.metadata.name, container, pod


def _pod_mounts(container: dict[str, Any], pod: dict[str, Any], host_dirs: dict[str, Path]) -> list[Mount]:
    """The container's volumeMounts: emptyDirs we are given a host dir for are bind mounts, others tmpfs."""
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = []
    for m in container["volumeMounts"]:
        assert "emptyDir" in volumes[m["name"]], f"unexpected volume {volumes[m['name']]}"
        source = host_dirs.get(m["name"])
        mounts.append(Mount(m["mountPath"], str(source) if source else "", m.get("readOnly", False)))
    return mounts


def _owned_dir(path: Path, uid: int) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, uid, uid)
    return path


@pytest.fixture(scope="session")
def trained(trainer_image: Image, repo: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """examples/01's rendered container, run to completion in the trainer image."""
    work = tmp_path_factory.mktemp("trainer-image")
    uid, gid = _user(trainer_image)
    name, container, pod = _worker_container(repo)
    assert container["securityContext"].get("readOnlyRootFilesystem") is True
    assert pod["securityContext"]["runAsUser"] == uid
    # the pod's emptyDirs that outlive a container restart are host dirs here, so a second run is a restart
    volumes = {"storage": _owned_dir(work / "storage", uid), "tmp": _owned_dir(work / "tmp", uid)}
    termination = work / "termination-log"
    termination.touch()
    os.chown(termination, uid, gid)
    argv, env = container_process(container, f"{name}-0")
    # pod 0's DNS name, as rendered (the headless Service's name is the renderer's to choose)
    rendezvous_host = next(a for a in argv if a.startswith("--rdzv-endpoint=")).split("=", 1)[1].rsplit(":", 1)[0]
    mounts = _pod_mounts(container, pod, volumes)
    mounts.append(Mount(container["terminationMessagePath"], str(termination)))

    def start_container() -> subprocess.CompletedProcess[str]:
        # The pod's own network namespace (loopback only): the rendezvous name resolves to it via /etc/hosts.
        return run_in(trainer_image, argv, work, user=(uid, gid), env=env, mounts=mounts, private_network=True,
                      hostname=f"{name}-0", hosts={rendezvous_host: "127.0.0.1"}, timeout=1200)

    t0 = time.monotonic()
    done = start_container()
    return {"rc": done.returncode, "log": done.stdout + done.stderr, "storage": volumes["storage"],
            "termination": termination.read_text(), "termination_log": termination,
            "seconds": time.monotonic() - t0, "restart": start_container}


def test_trainer_image_trains_the_rendered_example(trained: dict[str, Any]) -> None:
    assert trained["rc"] == 0, trained["log"][-4000:]
    outcome = json.loads(trained["termination"])
    assert outcome["outcome"] == "Succeeded", outcome
    artifact = trained["storage"] / "artifacts"
    assert (artifact / "DONE").exists()
    metrics = json.loads((artifact / "metrics.json").read_text())
    assert metrics["accuracy"] >= 0.95, metrics
    # loadable outside the container, by the same code the model server uses
    check = subprocess.run(
        [sys.executable, "-c", "import sys; from aiaas.trainer.export import load_artifact; "
         "m, man = load_artifact(sys.argv[1]); print(man['name'])", str(artifact)],
        capture_output=True, text=True, check=False)
    assert check.returncode == 0 and check.stdout.strip() == "cnn-digits", check.stderr


def test_a_restarted_container_does_not_run_finished_work_again(trained: dict[str, Any]) -> None:
    """restartPolicy Always restarts a container that exited 0; the rendered command must not train again."""
    assert trained["rc"] == 0, trained["log"][-4000:]
    artifact = trained["storage"] / "artifacts"
    before = {p.name: p.stat().st_mtime_ns for p in artifact.iterdir()}
    trained["termination_log"].write_text("")  # the kubelet gives each container start a fresh file
    again = trained["restart"]()
    assert again.returncode == 0, again.stdout + again.stderr
    assert "already finished its work; not running it again" in again.stderr
    assert "step" not in again.stdout, again.stdout  # no training progress lines
    assert {p.name: p.stat().st_mtime_ns for p in artifact.iterdir()} == before  # the artifact is untouched
    assert json.loads(trained["termination_log"].read_text())["outcome"] == "Succeeded"  # reported again


def _server_container(model_name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    isvc = api.InferenceService.model_validate(yaml.safe_load(f"""
apiVersion: aiaas.dev/v1alpha1
kind: InferenceService
metadata: {{name: {model_name}, namespace: default}}
spec: {{model: {{storageUri: "pvc://models/artifacts"}}}}
"""))
    dep = next(m for m in render_inferenceservice(isvc, RenderSettings()) if m["kind"] == "Deployment")
    pod = dep["spec"]["template"]["spec"]
    [container] = pod["containers"]
    return container, pod


def _infer_from_pod_network(pid: int, port: int, path: str, body: dict[str, Any] | None) -> tuple[int, Any]:
    """An HTTP request from another process in the server's network namespace (like a sidecar in the pod)."""
    client = ("import json, sys, urllib.request, urllib.error\n"
              "url, body = sys.argv[1], sys.argv[2]\n"
              "req = urllib.request.Request(url, data=body.encode() if body else None,"
              " headers={'content-type': 'application/json'})\n"
              "try:\n    r = urllib.request.urlopen(req, timeout=10); print(r.status); print(r.read().decode())\n"
              "except urllib.error.HTTPError as e:\n    print(e.code); print(e.read().decode())\n")
    out = subprocess.run(["nsenter", f"--net=/proc/{pid}/ns/net", sys.executable, "-I", "-c", client,
                          f"http://127.0.0.1:{port}{path}", json.dumps(body) if body else ""],
                         capture_output=True, text=True, timeout=30, check=False)
    if out.returncode != 0:
        return 0, out.stderr
    status, text = out.stdout.split("\n", 1)
    return int(status), json.loads(text) if text.strip() else None


def test_trainer_image_serves_the_artifact(trainer_image: Image, trained: dict[str, Any], tmp_path: Path) -> None:
    assert trained["rc"] == 0, "training in the image failed (see the test above)"
    uid, gid = _user(trainer_image)
    container, pod = _server_container("cnn-digits")
    argv, env = container_process(container, "cnn-digits-0")
    port = container["ports"][0]["containerPort"]
    mounts = [Mount(m["mountPath"], str(trained["storage"] / "artifacts") if m["name"] == "model" else "",
                    m.get("readOnly", False)) for m in container["volumeMounts"]]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    proc = run_in(trainer_image, argv, tmp_path, user=(uid, gid), env=env, mounts=mounts, private_network=True,
                  detach=True)
    try:
        pid = _container_pid(proc.container_id)  # type: ignore[union-attr]
        deadline = time.monotonic() + 180
        status: int = 0
        while time.monotonic() < deadline:
            status, _ = _infer_from_pod_network(pid, port, "/v2/health/ready", None)
            if status == 200:
                break
            time.sleep(1)
        assert status == 200, "server never became ready"
        pixels = _digit_zero()
        status, answer = _infer_from_pod_network(pid, port, "/v2/models/cnn-digits/infer", {
            "inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": pixels}]})
        assert status == 200, answer
        predicted = next(o for o in answer["outputs"] if o["name"] == "predicted_class")
        assert predicted["data"] == [0]
    finally:
        log = stop(proc)  # type: ignore[arg-type]
    assert "Traceback" not in log, log[-3000:]


def test_a_save_killed_half_way_does_not_block_the_next_build(built: dict[str, Path], repo: Path) -> None:
    """Saving an image writes ``<archive>.tmp`` and renames it; a build killed meanwhile (the end of a CI job)
    leaves the ``.tmp``, and docker-archive refuses to write into an existing file: every later build of that
    image failed until someone removed it by hand."""
    archive = built[f"localhost/aiaas-operator:{_version()}"]
    half, aside = archive.with_name(archive.name + ".tmp"), archive.with_name(archive.name + ".aside")
    archive.rename(aside)
    try:
        half.write_bytes(b"the first bytes of an archive")
        build = subprocess.run([str(repo / "hack" / "images.sh"), "build"], capture_output=True, text=True,
                               timeout=1800, env={**os.environ, "AIAAS_IMAGES": "operator"})
        assert build.returncode == 0, build.stderr[-3000:]
        assert f"{archive}" in build.stdout and not half.exists()
        with tarfile.open(archive) as tar:
            assert "manifest.json" in tar.getnames()
    finally:
        half.unlink(missing_ok=True)
        if archive.exists():
            aside.unlink()
        else:
            aside.rename(archive)


def _container_pid(cid: str) -> int:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        state = subprocess.run(["runc", "state", cid], capture_output=True, text=True, check=False)
        if state.returncode == 0 and json.loads(state.stdout).get("pid"):
            return int(json.loads(state.stdout)["pid"])
        time.sleep(0.2)
    raise AssertionError(f"container {cid} did not start")


def _digit_zero() -> list[float]:
    """The first image of scikit-learn's digits (a 0), the README's example request."""
    return [0, 0, 5, 13, 9, 1, 0, 0, 0, 0, 13, 15, 10, 15, 5, 0, 0, 3, 15, 2, 0, 11, 8, 0, 0, 4, 12, 0, 0, 8, 8, 0,
            0, 5, 8, 0, 0, 9, 8, 0, 0, 4, 11, 0, 1, 12, 7, 0, 0, 2, 14, 5, 10, 12, 0, 0, 0, 0, 6, 13, 10, 0, 0, 0]
