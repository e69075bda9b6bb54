"""The chart's RBAC really suffices, and grants nothing more than it should.

The chart is installed into the real control plane; then `aiaas operator` runs as a local process that
authenticates with a token of the chart's ServiceAccount (TokenRequest API), with the flags the chart's
Deployment passes. It must reconcile TrainingJobs end to end (children, status, leader election Lease, gang
restart, completion, TTL deletion) and an InferenceService, without a single Forbidden in its log; and the
ServiceAccount must not be able to read Secrets.

The Python Kubernetes client ignores a kubeconfig's impersonation fields (``as``), so the operator gets a real
ServiceAccount token instead: the API server authorises it exactly as it would the in-cluster pod.
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "deploy"))
from deploy_util import (  # noqa: E402
    CHART,
    Process,
    free_port,
    http_get,
    service_account_kubeconfig,
    wait_until,
    write_values,
)

from aiaas.contract import launch  # noqa: E402

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(420)]

EXIT_ANNOTATION = "fake.aiaas.dev/exit-code"  # hack/kwok/stages/pod-container-exit.yaml
MESSAGE_ANNOTATION = "fake.aiaas.dev/message"
SUCCEEDED = {"outcome": "Succeeded", "reason": "Completed", "message": "training finished", "step": 500,
             "artifact": "/var/run/aiaas/artifacts"}
RETRYABLE = {"outcome": "RetryableError", "reason": "NCCLTimeout", "message": "collective timed out"}


def trainingjob(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "aiaas.dev/v1alpha1", "kind": "TrainingJob", "metadata": {"name": name},
        "spec": {
            "trainer": {"model": {"architecture": "cnn"}, "dataset": {"kind": "digits"},
                        "hyperparameters": {"epochs": 1, "batchSize": 32}},
            "topology": {"nodes": 2, "nprocPerNode": 1, "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}}},
            **spec,
        },
    }


def inferenceservice(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "aiaas.dev/v1alpha1", "kind": "InferenceService", "metadata": {"name": name},
        "spec": {"model": {"storageUri": "pvc://models/digits/artifacts"}, "minReplicas": 1, "maxReplicas": 2,
                 "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}}},
    }


@pytest.fixture
def trainer_metrics() -> Iterator[str]:
    """Rank 0's metrics endpoint, served from the trainer's own registry on loopback (kwok pod IPs are fake)."""
    from prometheus_client import start_http_server

    from aiaas.trainer.metrics import TrainerMetrics

    m = TrainerMetrics("rbac", 0, None)
    m.step.set(120)
    m.total_steps.set(500)
    m.loss.set(0.43)
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=m.registry)
    try:
        yield f"http://127.0.0.1:{port}/metrics"
    finally:
        server.shutdown()
        thread.join(timeout=5)


def get_json(kubectl, namespace: str, *what: str) -> dict[str, Any] | None:
    r = kubectl("get", *what, "-o", "json", namespace=namespace, check=False)
    return json.loads(r.stdout) if r.returncode == 0 else None


def status(kubectl, namespace: str, kind: str, name: str) -> dict[str, Any]:
    return (get_json(kubectl, namespace, kind, name) or {}).get("status") or {}


def can_i(kubectl, sa: str, *args: str) -> bool:
    r = kubectl("auth", "can-i", *args, f"--as={sa}", check=False)
    assert r.stdout.strip() in ("yes", "no"), r.stdout + r.stderr
    return r.stdout.strip() == "yes"


def install(helm, namespace: str, tmp_path: Path, values: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Install the chart; return the release name and the operator Deployment it created."""
    release = f"aiaas-rbac-{uuid.uuid4().hex[:6]}"  # cluster-scoped names must not collide between runs
    helm("install", release, str(CHART), "--namespace", namespace, "--skip-crds",
         "--values", str(write_values(tmp_path, values)), timeout=180)
    manifest = helm("get", "manifest", release, "--namespace", namespace).stdout
    dep = next(d for d in yaml.safe_load_all(manifest) if d and d["kind"] == "Deployment")
    return release, dep


def start_operator(kubectl, e2e_cluster, namespace: str, release: str, dep: dict[str, Any], tmp_path: Path,
                   metrics_url: str, drop_args: tuple[str, ...] = (), extra: tuple[str, ...] = ()) -> Process:
    sa = dep["spec"]["template"]["spec"]["serviceAccountName"]
    token = kubectl("create", "token", sa, "--duration=1h", namespace=namespace).stdout.strip()
    kubeconfig = service_account_kubeconfig(e2e_cluster.kubeconfig, token, tmp_path / "sa.kubeconfig")
    container = dep["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["aiaas", "operator"]
    port = free_port()
    args = [a for a in container["args"] if a not in drop_args]
    cmd = [sys.executable, "-m", "aiaas.operator", "operator", *args, *extra,
           "--metrics-host=127.0.0.1", f"--metrics-port={port}", "--resync-seconds=1", "--retry-seconds=0.5",
           f"--metrics-url-template={metrics_url}"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_SERVICE")}
    env |= {"KUBECONFIG": str(kubeconfig), "POD_NAMESPACE": namespace, "POD_NAME": f"{release}-local",
            "PYTHONUNBUFFERED": "1"}
    op = Process(cmd, tmp_path / "operator.log", env=env)
    wait_until(lambda: http_get(f"http://127.0.0.1:{port}/readyz")[0] == 200 or not op.alive(), timeout=60,
               what="the operator to lead and be ready")
    assert op.alive(), op.log()
    return op


def exercise(kubectl, namespace: str, op: Process, lease: str) -> None:
    """Everything the operator does, through the ServiceAccount's permissions."""
    # leader election: the Lease in the operator's namespace
    holder = wait_until(lambda: (get_json(kubectl, namespace, "lease", lease) or {}).get("spec", {}).get("holderIdentity"),
                        timeout=20, what=f"Lease {lease}")
    assert holder

    # a TrainingJob: Service + StatefulSet created, status written, events posted
    kubectl("apply", "-f", "-", input=json.dumps(trainingjob("rbac", runPolicy={"ttlSecondsAfterFinished": 1})),
            namespace=namespace)
    wait_until(lambda: status(kubectl, namespace, "trainingjob", "rbac").get("phase") == "Running", timeout=60,
               what="TrainingJob rbac Running")
    sts = get_json(kubectl, namespace, "statefulset", "rbac")
    assert sts and sts["spec"]["replicas"] == 2
    assert get_json(kubectl, namespace, "service", launch.headless_service_name("rbac"))
    # gang restart: a retryable failure of one rank makes the operator delete the gang's pods
    kubectl("annotate", "pod", "rbac-1", "--overwrite", f"{EXIT_ANNOTATION}=1",
            f"{MESSAGE_ANNOTATION}={json.dumps(RETRYABLE)}", "fake.aiaas.dev/delay=100ms", namespace=namespace)
    wait_until(lambda: status(kubectl, namespace, "trainingjob", "rbac").get("restartCount") == 1, timeout=60,
               what="the gang restart")
    wait_until(lambda: status(kubectl, namespace, "trainingjob", "rbac").get("phase") == "Running", timeout=60,
               what="TrainingJob rbac Running again")

    # completion: scale down, delete the headless Service, then the TTL deletes the job itself
    def ready_pods() -> list[str]:
        pods = (get_json(kubectl, namespace, "pods", "-l", f"{launch.LABEL_JOB}=rbac") or {}).get("items", [])
        return [p["metadata"]["name"] for p in pods if not p["metadata"].get("deletionTimestamp") and any(
            c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", []))]

    pods = wait_until(lambda: (p := ready_pods()) and len(p) == 2 and p, timeout=60, what="2 ready pods")
    for pod in pods:
        kubectl("annotate", "pod", pod, "--overwrite", f"{EXIT_ANNOTATION}=0",
                f"{MESSAGE_ANNOTATION}={json.dumps(SUCCEEDED)}", "fake.aiaas.dev/delay=100ms", namespace=namespace)
    wait_until(lambda: get_json(kubectl, namespace, "trainingjob", "rbac") is None, timeout=60,
               what="TrainingJob rbac to succeed and be deleted after its TTL")

    # a one-node TrainingJob: its bare pod created by the operator, deleted and made again by a gang restart,
    # deleted when the job finished
    solo = trainingjob("solo", runPolicy={"ttlSecondsAfterFinished": 1})
    solo["spec"]["topology"]["nodes"] = 1
    kubectl("apply", "-f", "-", input=json.dumps(solo), namespace=namespace)
    wait_until(lambda: status(kubectl, namespace, "trainingjob", "solo").get("phase") == "Running", timeout=60,
               what="TrainingJob solo Running")
    assert get_json(kubectl, namespace, "pod", "solo-0")["metadata"]["ownerReferences"][0]["kind"] == "TrainingJob"
    assert get_json(kubectl, namespace, "statefulset", "solo") is None
    kubectl("annotate", "pod", "solo-0", "--overwrite", f"{EXIT_ANNOTATION}=1",
            f"{MESSAGE_ANNOTATION}={json.dumps(RETRYABLE)}", "fake.aiaas.dev/delay=100ms", namespace=namespace)
    wait_until(lambda: (s := status(kubectl, namespace, "trainingjob", "solo")).get("restartCount") == 1
               and s.get("phase") == "Running", timeout=60, what="solo restarted and Running again")
    kubectl("annotate", "pod", "solo-0", "--overwrite", f"{EXIT_ANNOTATION}=0",
            f"{MESSAGE_ANNOTATION}={json.dumps(SUCCEEDED)}", "fake.aiaas.dev/delay=100ms", namespace=namespace)
    wait_until(lambda: get_json(kubectl, namespace, "trainingjob", "solo") is None, timeout=60,
               what="TrainingJob solo to succeed and be deleted after its TTL")

    # an InferenceService: Deployment + Service + HPA, status written
    kubectl("apply", "-f", "-", input=json.dumps(inferenceservice("digits")), namespace=namespace)
    wait_until(lambda: get_json(kubectl, namespace, "deployment", "digits"), timeout=60, what="Deployment digits")
    wait_until(lambda: get_json(kubectl, namespace, "hpa", "digits"), timeout=30, what="HPA digits")
    assert get_json(kubectl, namespace, "service", "digits")
    wait_until(lambda: status(kubectl, namespace, "inferenceservice", "digits").get("phase"), timeout=60,
               what="InferenceService status")

    assert op.alive(), op.log()
    log = op.log(200_000)
    assert "Forbidden" not in log and "forbidden" not in log and " 403" not in log, log[-6000:]


def test_cluster_wide_rbac_suffices_and_denies_secrets(kubectl, helm, namespace, e2e_cluster, tmp_path,
                                                       trainer_metrics):
    release, dep = install(helm, namespace, tmp_path, {"replicaCount": 1})
    sa = f"system:serviceaccount:{namespace}:{dep['spec']['template']['spec']['serviceAccountName']}"
    try:
        # no Secrets (nor ConfigMaps): the operator needs neither
        for verb in ("get", "list", "watch"):
            assert not can_i(kubectl, sa, verb, "secrets", "-n", namespace)
            assert not can_i(kubectl, sa, verb, "secrets", "--all-namespaces")
        assert not can_i(kubectl, sa, "get", "configmaps", "-n", namespace)
        assert can_i(kubectl, sa, "create", "pods", "-n", namespace)  # a one-node job's pod
        assert not can_i(kubectl, sa, "update", "pods", "-n", namespace)
        assert not can_i(kubectl, sa, "update", "statefulsets", "-n", namespace)  # apply = patch, never PUT
        assert not can_i(kubectl, sa, "delete", "statefulsets", "-n", namespace)  # a job's StatefulSet is GC'd
        # an InferenceService's canary Deployment, HPAs and NetworkPolicy go when its spec drops them
        assert can_i(kubectl, sa, "delete", "deployments", "-n", namespace)
        assert not can_i(kubectl, sa, "create", "clusterroles")
        # the cluster-wide watches of the default install
        for resource in ("trainingjobs.aiaas.dev", "inferenceservices.aiaas.dev", "pods", "statefulsets.apps",
                         "deployments.apps"):
            assert can_i(kubectl, sa, "watch", resource, "--all-namespaces"), resource
        # the Lease only in the release namespace
        assert can_i(kubectl, sa, "update", "leases.coordination.k8s.io", "-n", namespace)
        assert not can_i(kubectl, sa, "update", "leases.coordination.k8s.io", "-n", "kube-system")

        # The operator itself, with the chart's flags. Other tests' operators share this cluster, so this one
        # watches only its namespace: --all-namespaces gives way to --namespace (the ClusterRole covers both).
        op = start_operator(kubectl, e2e_cluster, namespace, release, dep, tmp_path, trainer_metrics,
                               drop_args=("--all-namespaces",), extra=(f"--namespace={namespace}",))
        try:
            exercise(kubectl, namespace, op, lease=release)
        finally:
            op.stop()
    finally:
        helm("uninstall", release, "--namespace", namespace, "--wait", timeout=120)
    assert kubectl("get", "clusterrole", release, check=False).returncode != 0


def test_namespaced_rbac_suffices(kubectl, helm, namespace, e2e_cluster, tmp_path, trainer_metrics):
    """operator.watchNamespaces: only Roles in the watched namespace, and the operator works with them."""
    release, dep = install(helm, namespace, tmp_path, {"replicaCount": 1, "rbac": {"aggregateToDefaultRoles": False},
                                                       "operator": {"watchNamespaces": [namespace]}})
    sa = f"system:serviceaccount:{namespace}:{dep['spec']['template']['spec']['serviceAccountName']}"
    try:
        assert kubectl("get", "clusterrole", release, check=False).returncode != 0
        assert not can_i(kubectl, sa, "list", "trainingjobs.aiaas.dev", "--all-namespaces")
        assert not can_i(kubectl, sa, "list", "pods", "-n", "default")
        assert can_i(kubectl, sa, "list", "trainingjobs.aiaas.dev", "-n", namespace)
        assert not can_i(kubectl, sa, "get", "secrets", "-n", namespace)
        args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
        assert f"--namespace={namespace}" in args and "--all-namespaces" not in args
        op = start_operator(kubectl, e2e_cluster, namespace, release, dep, tmp_path, trainer_metrics)
        try:
            exercise(kubectl, namespace, op, lease=release)
        finally:
            op.stop()
    finally:
        helm("uninstall", release, "--namespace", namespace, "--wait", timeout=120)
