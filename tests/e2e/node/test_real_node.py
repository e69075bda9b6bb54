"""The local cluster's real node runs real containers: logs, cluster DNS,
Services, volumes that store data, restarts by the kubelet.

Pods get there through namespace annotations (fixture ``node_ns``), the way
aiaas tests steer their pods; they run the test image of hack/node/nodetest.
"""

from __future__ import annotations

import json
import subprocess

import pytest
from e2e_util import REPO_ROOT, wait_for
from node_util import (
    LOCAL_PATH_CLASS,
    REAL_NODE_LABEL,
    apply,
    get_pod,
    logs,
    pod,
    responses,
    wait_phase,
    wait_ready,
)

pytestmark = pytest.mark.e2e

NODE_ADDRESS = "10.244.0.1"  # hack/node/node.sh NODE_IP, on the pods' bridge aiaas-cni0


def test_node_is_ready_with_an_address_on_its_own_interface(real_node, k8s_cluster):
    addresses = {a["type"]: a["address"] for a in real_node["status"]["addresses"]}
    assert addresses.get("InternalIP") == NODE_ADDRESS, addresses
    taints = real_node["spec"].get("taints", [])
    assert {"key": REAL_NODE_LABEL, "value": "true", "effect": "NoSchedule"} in taints, taints
    if k8s_cluster.local:
        out = subprocess.run(["ip", "-o", "addr", "show", "dev", "aiaas-cni0"], capture_output=True, text=True)
        assert f"inet {NODE_ADDRESS}/24" in out.stdout, out


def test_pod_runs_to_completion_and_shows_its_logs(node_ns, kubectl, real_node):
    apply(kubectl, node_ns, pod("hello", ["echo", "hello from the real node"]))
    p = wait_phase(kubectl, node_ns, "hello", {"Succeeded"})
    assert p["spec"]["nodeName"] == real_node["metadata"]["name"]
    assert p["status"]["podIP"].startswith("10.244.0."), p["status"]
    assert logs(kubectl, node_ns, "hello").strip() == "hello from the real node"


def _server(name: str, **spec) -> dict:
    return pod(name, ["serve", "8080"], labels={"app": "echo"}, port=8080, restart="Always", **spec)


def _service(name: str, *, headless: bool) -> dict:
    spec: dict = {"selector": {"app": "echo"}, "ports": [{"port": 80 if not headless else 8080, "targetPort": 8080}]}
    if headless:
        spec["clusterIP"] = "None"
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name}, "spec": spec}


def test_pod_reaches_another_pod_by_its_headless_service_dns_name(node_ns, kubectl):
    # hostname + subdomain: the DNS record a StatefulSet pod gets (<job>-0.<job>.<ns>.svc...).
    apply(kubectl, node_ns, _service("echo", headless=True), _server("echo-0", hostname="echo-0", subdomain="echo"))
    wait_ready(kubectl, node_ns, "echo-0")
    urls = [
        f"http://echo-0.echo.{node_ns}.svc.cluster.local:8080/",
        "http://echo-0.echo:8080/",  # through the search path of the pod's resolv.conf
        f"http://echo.{node_ns}.svc:8080/",
    ]
    apply(kubectl, node_ns, pod("client", ["get", *urls]))
    wait_phase(kubectl, node_ns, "client", {"Succeeded"})
    assert responses(kubectl, node_ns, "client") == ["hello from echo-0"] * 3


def test_cluster_ip_service_routes_to_a_pod(node_ns, kubectl):
    apply(kubectl, node_ns, _service("web", headless=False), _server("web-backend"))
    wait_ready(kubectl, node_ns, "web-backend")
    svc = json.loads(kubectl("get", "service", "web", "-o", "json", namespace=node_ns).stdout)
    cluster_ip = svc["spec"]["clusterIP"]
    apply(kubectl, node_ns, pod("client", ["get", f"http://{cluster_ip}/", "http://web/"]))
    wait_phase(kubectl, node_ns, "client", {"Succeeded"})
    assert responses(kubectl, node_ns, "client") == ["hello from web-backend"] * 2


def test_local_path_volume_keeps_data_between_pods(node_ns, kubectl, real_node):
    pvc = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": "data"},
        "spec": {
            "storageClassName": LOCAL_PATH_CLASS,
            "accessModes": ["ReadWriteOnce"],
            "resources": {"requests": {"storage": "16Mi"}},
        },
    }
    volume = {"name": "data", "persistentVolumeClaim": {"claimName": "data"}}
    mount = {"name": "data", "mountPath": "/data"}
    apply(kubectl, node_ns, pvc, pod("writer", ["write", "/data/msg", "kept"], volumes=[volume], mounts=[mount]))
    wait_phase(kubectl, node_ns, "writer", {"Succeeded"}, timeout=240)
    claim = json.loads(kubectl("get", "pvc", "data", "-o", "json", namespace=node_ns).stdout)
    assert claim["status"]["phase"] == "Bound", claim["status"]
    pv = json.loads(kubectl("get", "pv", claim["spec"]["volumeName"], "-o", "json").stdout)
    terms = pv["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"]
    assert real_node["metadata"]["name"] in json.dumps(terms), terms

    apply(kubectl, node_ns, pod("reader", ["cat", "/data/msg"], volumes=[volume], mounts=[mount]))
    wait_phase(kubectl, node_ns, "reader", {"Succeeded"})
    assert logs(kubectl, node_ns, "reader") == "kept"


def test_killed_container_is_restarted_by_the_kubelet(node_ns, kubectl, k8s_cluster):
    if not k8s_cluster.local:
        pytest.skip("kills the container through the local real node's containerd (hack/cluster.sh ctr)")
    apply(kubectl, node_ns, pod("sleeper", ["sleep"], restart="Always"))
    p = wait_phase(kubectl, node_ns, "sleeper", {"Running"})
    container_id = p["status"]["containerStatuses"][0]["containerID"].removeprefix("containerd://")
    subprocess.run(
        [str(REPO_ROOT / "hack" / "cluster.sh"), "ctr", "-n", "k8s.io", "tasks", "kill", "-s", "SIGKILL", container_id],
        check=True, capture_output=True, text=True, timeout=60,
    )

    def restarted() -> bool:
        status = get_pod(kubectl, node_ns, "sleeper")["status"]["containerStatuses"][0]
        return status["restartCount"] >= 1 and "running" in status["state"]

    wait_for(restarted, timeout=120, interval=1, what="the killed container to run again")
    last = get_pod(kubectl, node_ns, "sleeper")["status"]["containerStatuses"][0]["lastState"]["terminated"]
    assert last["exitCode"] == 137, last  # 128 + SIGKILL
