"""aiaas as a user runs it: the operator installed with Helm from the built image, TrainingJobs and an
InferenceService in real containers on the real node (kubelet, containerd, runc, CNI, CoreDNS, kube-proxy,
local-path volumes), under the restricted Pod Security Standard.

One namespace for the module, steered to the real node by its annotations (no pod spec is edited) and
enforcing `restricted`; one operator release watching it. Images come from `make images` and are loaded into
the node's containerd with `hack/cluster.sh load-images`.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from e2e_util import wait_for
from node_util import get, install_operator, restricted_namespace

REPO = Path(__file__).resolve().parents[3]
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1500)]
SMALL = {"requests": {"cpu": "250m", "memory": "512Mi"}, "limits": {"memory": "2Gi"}}


def apply(kubectl, ns: str, doc: dict[str, Any] | str) -> None:
    text = doc if isinstance(doc, str) else json.dumps(doc)
    kubectl("apply", "-f", "-", input=text, namespace=ns)


@pytest.fixture(scope="module")
def jobs_ns(real_node, kubectl) -> Iterator[str]:
    yield from restricted_namespace(kubectl, "aiaas-work")


@pytest.fixture(scope="module")
def operator_release(images, jobs_ns, helm, tmp_path_factory) -> Iterator[dict[str, str]]:
    """`helm install` of charts/aiaas with the built operator image (the chart's default), its pods on the real
    node."""
    for release in install_operator(helm, tmp_path_factory.mktemp("values"), jobs_ns, "aiaas-operator"):
        yield {"namespace": jobs_ns, "release": release}


def _pods(kubectl, ns: str, selector: str) -> list[dict[str, Any]]:
    return (get(kubectl, ns, "pods", "-l", selector) or {}).get("items", [])


def _ready(pod: dict[str, Any]) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions", []))


def test_operator_pods_run_on_the_real_node_and_one_leads(operator_release, real_node, kubectl) -> None:
    ns, release = operator_release["namespace"], operator_release["release"]
    pods = _pods(kubectl, ns, f"app.kubernetes.io/instance={release}")
    assert len(pods) == 2 and all(_ready(p) for p in pods)  # the real readiness and liveness probes passed
    assert {p["spec"]["nodeName"] for p in pods} == {real_node["metadata"]["name"]}
    names = {p["metadata"]["name"] for p in pods}
    lease = wait_for(lambda: (get(kubectl, ns, "lease", release) or {}).get("spec", {}).get("holderIdentity"),
                     timeout=120, what="a leader")
    assert any(lease.startswith(n) for n in names), (lease, names)


def _job(kubectl, ns: str, name: str) -> dict[str, Any]:
    return get(kubectl, ns, "trainingjob", name) or {}


def _wait_phase(kubectl, ns: str, name: str, phases: set[str], timeout: float) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        job = _job(kubectl, ns, name)
        phase = job.get("status", {}).get("phase")
        if phase == "Failed" and "Failed" not in phases:
            raise AssertionError(f"{name} failed: {job['status']}")
        return job if phase in phases else None

    return wait_for(reached, timeout=timeout, interval=2, what=f"{name} to be {phases}")


def _follow_logs(kubectl, ns: str, pod: str, until: Any, timeout: float) -> str:
    """`kubectl logs` of a pod, read repeatedly until `until()` holds (the pod goes away when the job ends)."""
    seen = ""
    end = time.monotonic() + timeout
    while time.monotonic() < end and not until():
        r = kubectl("logs", pod, namespace=ns, check=False)
        if r.returncode == 0 and len(r.stdout) >= len(seen):
            seen = r.stdout
        time.sleep(2)
    return seen


def test_example_01_trains_in_a_real_pod(operator_release, jobs_ns, kubectl) -> None:
    kubectl("apply", "-f", str(REPO / "examples" / "01-cnn-digits.yaml"), namespace=jobs_ns)
    t0 = time.monotonic()
    logs = _follow_logs(kubectl, jobs_ns, "cnn-digits-0",
                        lambda: _job(kubectl, jobs_ns, "cnn-digits").get("status", {}).get("phase") in
                        ("Succeeded", "Failed"), timeout=900)
    job = _wait_phase(kubectl, jobs_ns, "cnn-digits", {"Succeeded"}, timeout=60)
    took = time.monotonic() - t0
    status = job["status"]
    assert status["progress"]["metric"] >= 0.95, status
    assert status.get("artifact", {}).get("uri"), status
    # the trainer's progress lines, as `kubectl logs` showed them while the pod ran
    assert "step 10/528 (" in logs and "samples/s" in logs and "eval after epoch" in logs, logs[-2000:]
    assert get(kubectl, jobs_ns, "statefulset", "cnn-digits") is None  # one node: a bare pod, no StatefulSet
    wait_for(lambda: get(kubectl, jobs_ns, "pod", "cnn-digits-0") is None, timeout=60,
             what="the finished pod deleted (cleanPodPolicy Running)")
    print(f"examples/01 on the real node: apply -> Succeeded in {took:.0f}s")


def _two_pod_job(name: str, image: str) -> dict[str, Any]:  # noqa: ARG001 - the operator's default image
    return {
        "apiVersion": "aiaas.dev/v1alpha1", "kind": "TrainingJob", "metadata": {"name": name},
        "spec": {"trainer": {"model": {"architecture": "cnn"}, "dataset": {"kind": "digits"},
                             "hyperparameters": {"epochs": 2, "batchSize": 64, "seed": 3}},
                 "topology": {"nodes": 2, "nprocPerNode": 1, "resources": SMALL}},
    }


def test_two_pods_rendezvous_over_the_pod_network(operator_release, images, jobs_ns, kubectl) -> None:
    apply(kubectl, jobs_ns, _two_pod_job("ddp-two", images["aiaas-trainer"]))
    sts = wait_for(lambda: get(kubectl, jobs_ns, "statefulset", "ddp-two"), timeout=120, what="the StatefulSet")
    args = sts["spec"]["template"]["spec"]["containers"][0]["args"]
    endpoint = next(a for a in args if a.startswith("--rdzv-endpoint="))
    assert endpoint.split("=", 1)[1].startswith("ddp-two-0."), endpoint  # pod 0's name behind the headless Service
    pods = wait_for(lambda: (lambda ps: ps if len(ps) == 2 else None)(
        [p for p in _pods(kubectl, jobs_ns, "aiaas.dev/job-name=ddp-two") if p["status"].get("podIP")]),
        timeout=300, what="two pods with pod IPs")
    assert len({p["status"]["podIP"] for p in pods}) == 2  # two network namespaces: rendezvous crosses the bridge
    job = _wait_phase(kubectl, jobs_ns, "ddp-two", {"Succeeded"}, timeout=900)
    assert job["status"].get("succeededReplicas") == 2, job["status"]


@pytest.fixture(scope="module")
def resumed_job(operator_release, images, jobs_ns, kubectl, tmp_path_factory) -> dict[str, Any]:
    """A job with a local-path volume whose container is SIGKILLed mid-run; Prometheus scrapes it first."""
    name = "resume-me"
    apply(kubectl, jobs_ns, {
        "apiVersion": "aiaas.dev/v1alpha1", "kind": "TrainingJob", "metadata": {"name": name},
        "spec": {"trainer": {"model": {"architecture": "cnn"}, "dataset": {"kind": "digits"},
                             "hyperparameters": {"epochs": 90, "batchSize": 32, "seed": 5}},
                 "topology": {"nodes": 1, "nprocPerNode": 1, "resources": SMALL},
                 "checkpoint": {"intervalSteps": 25, "keepLast": 2},
                 "storage": {"size": "1Gi", "storageClassName": "local-path"}}})
    # rank 0's own log says how far it is (a fast machine can finish between two of the operator's scrapes)
    def step_and_total() -> tuple[int, int] | None:
        out = kubectl("logs", f"{name}-0", namespace=jobs_ns, check=False).stdout
        steps = re.findall(r" step (\d+)/(\d+) ", out)
        done, total = (int(steps[-1][0]), int(steps[-1][1])) if steps else (0, 0)
        return (done, total) if done >= 100 else None

    _, total = wait_for(step_and_total, timeout=900, interval=1, what=f"{name} to pass step 100")
    scraped = _prometheus_scrapes(kubectl, operator_release, jobs_ns, f"{name}-0", tmp_path_factory.mktemp("prom"))
    # SIGKILL the running container through the node's containerd: the trainer gets no chance to checkpoint
    pod = get(kubectl, jobs_ns, "pod", f"{name}-0")
    container_id = pod["status"]["containerStatuses"][0]["containerID"].split("://", 1)[1]
    killed = subprocess.run([str(REPO / "hack" / "cluster.sh"), "ctr", "-n", "k8s.io", "tasks", "kill", "-s", "SIGKILL",
                             container_id], capture_output=True, text=True, timeout=60, check=False)
    assert killed.returncode == 0, killed.stderr
    # the operator restarts the gang (restartCount 1); read the new pod's log while it runs
    wait_for(lambda: (_job(kubectl, jobs_ns, name).get("status") or {}).get("restartCount", 0) >= 1,
             timeout=300, interval=1, what="the operator to restart the gang")
    wait_for(lambda: (get(kubectl, jobs_ns, "pod", f"{name}-0") or {}).get("metadata", {}).get("uid") not in
             (None, pod["metadata"]["uid"]), timeout=300, what="the gang's new pod")
    logs = _follow_logs(kubectl, jobs_ns, f"{name}-0", lambda: _job(kubectl, jobs_ns, name).get(
        "status", {}).get("phase") in ("Succeeded", "Failed"), timeout=900)
    done = _wait_phase(kubectl, jobs_ns, name, {"Succeeded"}, timeout=60)
    return {"name": name, "total": total, "status": done["status"], "scraped": scraped, "logs": logs}


def _prometheus_scrapes(kubectl, release, ns: str, pod: str, workdir: Path) -> dict[str, float]:
    """A real Prometheus (Debian's) on the host scrapes the operator pod and the training pod by pod IP."""
    prometheus = shutil.which("prometheus")
    if not prometheus:
        pytest.fail("prometheus not installed (hack/setup.sh --test installs Debian's package)")
    op = [p for p in _pods(kubectl, release["namespace"], f"app.kubernetes.io/instance={release['release']}")][0]
    trainer = get(kubectl, ns, "pod", pod)
    targets = {"operator": f"{op['status']['podIP']}:8080", "trainer": f"{trainer['status']['podIP']}:9090"}
    (workdir / "prometheus.yml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s"},
        "scrape_configs": [{"job_name": k, "static_configs": [{"targets": [v]}]} for k, v in targets.items()]}))
    port = _free_port()
    proc = subprocess.Popen([prometheus, f"--config.file={workdir / 'prometheus.yml'}",
                             f"--storage.tsdb.path={workdir / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def both_up() -> dict[str, float] | None:
            url = f"http://127.0.0.1:{port}/api/v1/query?query=up"
            result = json.loads(urllib.request.urlopen(url, timeout=5).read())["data"]["result"]
            up = {r["metric"]["job"]: float(r["value"][1]) for r in result}
            return up if up.get("operator") == 1 and up.get("trainer") == 1 else None

        return wait_for(both_up, timeout=60, interval=1, what="Prometheus to scrape both pods")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_prometheus_scraped_operator_and_trainer_pods(resumed_job) -> None:
    assert resumed_job["scraped"] == {"operator": 1.0, "trainer": 1.0}


def test_killed_pod_resumes_from_its_checkpoint(resumed_job, jobs_ns, kubectl) -> None:
    status = resumed_job["status"]
    assert status.get("restartCount", 0) >= 1, status
    assert status["progress"]["step"] == resumed_job["total"], status  # the same step count as an uninterrupted run
    resumed = [int(w) for line in resumed_job["logs"].splitlines() if "resumed from checkpoint step" in line
               for w in [line.split("resumed from checkpoint step ")[1].split()[0]]]
    assert resumed and resumed[0] >= 25, resumed_job["logs"][-3000:]  # from the volume, not from scratch


def test_inferenceservice_serves_the_job_in_a_real_pod(resumed_job, images, jobs_ns, kubectl) -> None:
    apply(kubectl, jobs_ns, {"apiVersion": "aiaas.dev/v1alpha1", "kind": "InferenceService",
                             "metadata": {"name": "digits"},
                             "spec": {"model": {"trainingJob": resumed_job["name"]}, "resources": SMALL}})
    wait_for(lambda: (get(kubectl, jobs_ns, "deployment", "digits") or {}).get("status", {}).get("readyReplicas"),
             timeout=600, interval=2, what="the model server to be Ready (its probes)")
    body = json.dumps({"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": DIGIT_ZERO}]})
    client = {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "client"},
        "spec": {"restartPolicy": "Never", "securityContext": {"runAsNonRoot": True, "runAsUser": 1000,
                                                               "seccompProfile": {"type": "RuntimeDefault"}},
                 "containers": [{"name": "client", "image": images["aiaas-trainer"], "imagePullPolicy": "IfNotPresent",
                                 "command": ["python", "-c", CLIENT,
                                             f"http://digits.{jobs_ns}.svc/v2/models/digits/infer", body],
                                 "securityContext": {"allowPrivilegeEscalation": False,
                                                     "capabilities": {"drop": ["ALL"]}}}]}}
    apply(kubectl, jobs_ns, client)
    wait_for(lambda: (get(kubectl, jobs_ns, "pod", "client") or {}).get("status", {}).get("phase") in
             ("Succeeded", "Failed"), timeout=300, interval=2, what="the client pod to finish")
    answer = json.loads(kubectl("logs", "client", namespace=jobs_ns).stdout.strip().splitlines()[-1])
    predicted = next(o for o in answer["outputs"] if o["name"] == "predicted_class")
    assert predicted["data"] == [0], answer


CLIENT = ("import sys, urllib.request\n"
          "req = urllib.request.Request(sys.argv[1], data=sys.argv[2].encode(), "
          "headers={'content-type': 'application/json'})\n"
          "print(urllib.request.urlopen(req, timeout=30).read().decode())\n")
DIGIT_ZERO = [0, 0, 5, 13, 9, 1, 0, 0, 0, 0, 13, 15, 10, 15, 5, 0, 0, 3, 15, 2, 0, 11, 8, 0, 0, 4, 12, 0, 0, 8, 8, 0,
              0, 5, 8, 0, 0, 9, 8, 0, 0, 4, 11, 0, 1, 12, 7, 0, 0, 2, 14, 5, 10, 12, 0, 0, 0, 0, 6, 13, 10, 0, 0, 0]


# Which version answered: every response names it (model_version: the training step the artifact was exported at,
# as the job's status.artifact.version says).
# The client: first asks until both versions have answered (the Service's endpoints are in kube-proxy's rules:
# a pod that became Ready last may be missing from them for seconds), then counts the versions of 200 answers.
COUNT_VERSIONS = ("import collections, json, sys, time, urllib.request\n"
                  "def ask():\n"
                  "    req = urllib.request.Request(sys.argv[1], data=sys.argv[2].encode(),"
                  " headers={'content-type': 'application/json'})\n"
                  "    return json.loads(urllib.request.urlopen(req, timeout=30).read())['model_version']\n"
                  "deadline, answered = time.monotonic() + 120, set()\n"
                  "while len(answered) < 2 and time.monotonic() < deadline:\n"
                  "    answered.add(ask())\n"
                  "print(json.dumps(collections.Counter(ask() for _ in range(200))))\n")


def test_canary_at_50_percent_splits_real_traffic(resumed_job, images, jobs_ns, kubectl) -> None:
    """Two versions behind one Service: of 200 requests from a pod, each version answers 30-70 % (counted once
    both have answered through the Service)."""
    apply(kubectl, jobs_ns, {
        "apiVersion": "aiaas.dev/v1alpha1", "kind": "TrainingJob", "metadata": {"name": "canary-src"},
        "spec": {"trainer": {"model": {"architecture": "cnn"}, "dataset": {"kind": "digits"},
                             "hyperparameters": {"epochs": 2, "batchSize": 32, "seed": 9}},
                 "topology": {"nodes": 1, "nprocPerNode": 1, "resources": SMALL},
                 "storage": {"size": "1Gi", "storageClassName": "local-path"}}})
    _wait_phase(kubectl, jobs_ns, "canary-src", {"Succeeded"}, timeout=900)
    apply(kubectl, jobs_ns, {
        "apiVersion": "aiaas.dev/v1alpha1", "kind": "InferenceService", "metadata": {"name": "rollout"},
        "spec": {"model": {"trainingJob": resumed_job["name"], "name": "digits"},
                 "canary": {"model": {"trainingJob": "canary-src", "name": "digits"}, "trafficPercent": 50},
                 "replicas": 2, "resources": SMALL}})

    def both_ready() -> bool:
        status = (get(kubectl, jobs_ns, "inferenceservice", "rollout") or {}).get("status", {})
        return all((status.get(track) or {}).get("readyReplicas") for track in ("stable", "canary"))

    wait_for(both_ready, timeout=600, interval=2, what="the stable and the canary version to be Ready")
    body = json.dumps({"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": DIGIT_ZERO}]})
    client = {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "canary-client"},
        "spec": {"restartPolicy": "Never", "securityContext": {"runAsNonRoot": True, "runAsUser": 1000,
                                                               "seccompProfile": {"type": "RuntimeDefault"}},
                 "containers": [{"name": "client", "image": images["aiaas-trainer"], "imagePullPolicy": "IfNotPresent",
                                 "command": ["python", "-c", COUNT_VERSIONS,
                                             f"http://rollout.{jobs_ns}.svc/v2/models/digits/infer", body],
                                 "securityContext": {"allowPrivilegeEscalation": False,
                                                     "capabilities": {"drop": ["ALL"]}}}]}}
    apply(kubectl, jobs_ns, client)
    wait_for(lambda: (get(kubectl, jobs_ns, "pod", "canary-client") or {}).get("status", {}).get("phase") in
             ("Succeeded", "Failed"), timeout=300, interval=2, what="the client pod to finish")
    seen = json.loads(kubectl("logs", "canary-client", namespace=jobs_ns).stdout.strip().splitlines()[-1])
    versions = {str(_job(kubectl, jobs_ns, job)["status"]["artifact"]["version"]) for job in (resumed_job["name"],
                                                                                             "canary-src")}
    assert len(versions) == 2, versions  # 90 epochs against 2: the steps differ
    assert set(seen) == versions and sum(seen.values()) == 200, (seen, versions)  # both versions answered
    assert all(60 <= n <= 140 for n in seen.values()), seen  # each 30-70 %
    print(f"canary at 50 %: {seen}")


def test_operator_pods_never_restarted(operator_release, kubectl) -> None:
    """After minutes of work, neither the leader nor the standby was restarted by its liveness probe."""
    pods = _pods(kubectl, operator_release["namespace"], f"app.kubernetes.io/instance={operator_release['release']}")
    restarts = {p["metadata"]["name"]: p["status"]["containerStatuses"][0]["restartCount"] for p in pods}
    assert restarts and set(restarts.values()) == {0}, restarts
    assert all(_ready(p) for p in pods)
