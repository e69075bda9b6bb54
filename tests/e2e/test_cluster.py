"""The e2e cluster behaves like a real one: controllers, scheduler, RBAC, tokens.

These tests guard the test environment itself (hack/cluster.sh, or any cluster
given with AIAAS_E2E_USE_EXISTING=1): if they fail, failures elsewhere in
tests/e2e are about the cluster, not about aiaas.
"""

from __future__ import annotations

import json

import pytest
from e2e_util import wait_for

pytestmark = pytest.mark.e2e

PAUSE_IMAGE = "registry.k8s.io/pause:3.10"


def _pods(kubectl, namespace: str, selector: str) -> list[dict]:
    out = kubectl("get", "pods", "-l", selector, "-o", "json", namespace=namespace).stdout
    return json.loads(out)["items"]


def _gpu_nodes(kubectl) -> list[dict]:
    nodes = json.loads(kubectl("get", "nodes", "-o", "json").stdout)["items"]
    return [n for n in nodes if int(n["status"].get("allocatable", {}).get("nvidia.com/gpu", "0")) > 0]


def _ready(pod: dict) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions", []))


def test_server_version(kubectl):
    info = json.loads(kubectl("version", "-o", "json").stdout)
    server = info["serverVersion"]
    assert int(server["major"]) == 1 and int(server["minor"].rstrip("+")) >= 30, server


def test_nodes_ready(kubectl):
    nodes = json.loads(kubectl("get", "nodes", "-o", "json").stdout)["items"]
    assert nodes, "the cluster has no nodes"
    schedulable = [
        n
        for n in nodes
        if not n["spec"].get("unschedulable")
        and any(c["type"] == "Ready" and c["status"] == "True" for c in n["status"]["conditions"])
    ]
    assert schedulable, "no Ready, schedulable node"


def test_statefulset_creates_pods_and_gc_deletes_them(kubectl, namespace):
    """StatefulSet controller + scheduler + (fake) kubelet, then ownerReference GC."""
    manifest = {
        "apiVersion": "v1",
        "kind": "List",
        "items": [
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": "web"},
                "spec": {"clusterIP": "None", "selector": {"app": "web"}, "ports": [{"port": 80}]},
            },
            {
                "apiVersion": "apps/v1",
                "kind": "StatefulSet",
                "metadata": {"name": "web"},
                "spec": {
                    "serviceName": "web",
                    "replicas": 2,
                    "podManagementPolicy": "Parallel",
                    "selector": {"matchLabels": {"app": "web"}},
                    "template": {
                        "metadata": {"labels": {"app": "web"}},
                        "spec": {
                            "containers": [
                                {
                                    "name": "c",
                                    "image": PAUSE_IMAGE,
                                    "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}},
                                }
                            ]
                        },
                    },
                },
            },
        ],
    }
    kubectl("apply", "-f", "-", input=json.dumps(manifest), namespace=namespace)
    pods = wait_for(
        lambda: (p := _pods(kubectl, namespace, "app=web")) and len(p) == 2 and all(_ready(x) for x in p) and p,
        timeout=120,
        what="2 ready StatefulSet pods",
    )
    assert sorted(p["metadata"]["name"] for p in pods) == ["web-0", "web-1"]
    for p in pods:
        assert p["spec"]["nodeName"], "pod was not scheduled"
        assert p["metadata"]["ownerReferences"][0]["kind"] == "StatefulSet"

    kubectl("delete", "statefulset", "web", "--cascade=background", namespace=namespace)
    wait_for(lambda: not _pods(kubectl, namespace, "app=web"), timeout=120, what="GC to delete the pods")


def test_deployment_creates_replicaset_and_pods(kubectl, namespace):
    kubectl("create", "deployment", "d", f"--image={PAUSE_IMAGE}", "--replicas=2", namespace=namespace)
    kubectl("rollout", "status", "deployment/d", "--timeout=120s", namespace=namespace, timeout=150)
    rs = json.loads(kubectl("get", "replicasets", "-l", "app=d", "-o", "json", namespace=namespace).stdout)["items"]
    assert len(rs) == 1 and rs[0]["status"]["readyReplicas"] == 2


def test_rbac_is_enforced(kubectl, namespace):
    """A fresh service account may not read secrets; RBAC grants it."""
    sa = f"system:serviceaccount:{namespace}:default"
    res = kubectl("auth", "can-i", "list", "secrets", f"--as={sa}", namespace=namespace, check=False)
    assert res.stdout.strip() == "no", res.stdout + res.stderr
    kubectl("create", "role", "reader", "--verb=list", "--resource=secrets", namespace=namespace)
    kubectl("create", "rolebinding", "reader", "--role=reader", f"--serviceaccount={namespace}:default", namespace=namespace)
    wait_for(
        lambda: kubectl("auth", "can-i", "list", "secrets", f"--as={sa}", namespace=namespace, check=False).stdout.strip()
        == "yes",
        timeout=30,
        what="the RoleBinding to take effect",
    )


def test_service_account_tokens(kubectl, namespace):
    """Service-account signing keys are configured: tokens are issued and accepted."""
    token = kubectl("create", "token", "default", "--duration=10m", namespace=namespace).stdout.strip()
    assert token.count(".") == 2, "not a JWT"
    review = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {"token": token}}
    out = json.loads(kubectl("create", "-o", "json", "-f", "-", input=json.dumps(review)).stdout)
    assert out["status"]["authenticated"] is True
    assert out["status"]["user"]["username"] == f"system:serviceaccount:{namespace}:default"


def _gpu_pod(name: str, gpus: int) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"gpu-test": "true"}},
        "spec": {
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "containers": [
                {
                    "name": "c",
                    "image": PAUSE_IMAGE,
                    "resources": {"limits": {"nvidia.com/gpu": str(gpus)}},
                }
            ],
        },
    }


def test_gpu_pods_are_scheduled_on_gpu_nodes(kubectl, namespace):
    gpu_nodes = _gpu_nodes(kubectl)
    if not gpu_nodes:
        pytest.skip("no node advertises nvidia.com/gpu")
    names = {n["metadata"]["name"] for n in gpu_nodes}
    for i in range(3):
        kubectl("apply", "-f", "-", input=json.dumps(_gpu_pod(f"g{i}", 1)), namespace=namespace)
    pods = wait_for(
        lambda: (p := _pods(kubectl, namespace, "gpu-test=true")) and all(x["spec"].get("nodeName") for x in p) and p,
        timeout=60,
        what="GPU pods to be scheduled",
    )
    assert {p["spec"]["nodeName"] for p in pods} <= names


def test_unsatisfiable_gpu_request_stays_pending(kubectl, namespace):
    gpu_nodes = _gpu_nodes(kubectl)
    if not gpu_nodes:
        pytest.skip("no node advertises nvidia.com/gpu")
    too_many = max(int(n["status"]["allocatable"]["nvidia.com/gpu"]) for n in gpu_nodes) + 1
    kubectl("apply", "-f", "-", input=json.dumps(_gpu_pod("huge", too_many)), namespace=namespace)

    def unschedulable():
        pod = json.loads(kubectl("get", "pod", "huge", "-o", "json", namespace=namespace).stdout)
        cond = [c for c in pod["status"].get("conditions", []) if c["type"] == "PodScheduled"]
        return cond and cond[0]["status"] == "False" and cond[0].get("reason") == "Unschedulable" and (pod, cond[0])

    pod, cond = wait_for(unschedulable, timeout=60, what="PodScheduled=False/Unschedulable")
    assert pod["status"]["phase"] == "Pending"
    assert "Insufficient nvidia.com/gpu" in cond["message"], cond["message"]
