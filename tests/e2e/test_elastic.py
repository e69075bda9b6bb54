"""Automatic resource adjustment on a real control plane (issue 15 item 4): an elastic ``policy: Auto`` job grows
to maxNodes while its new pods get scheduled, shrinks when a node is cordoned and drained, never below minNodes;
an OOM kill raises the pods' memory up to spec.autoscaling.memory.max, and fails naming the field without it.

kwok plays the kubelet, as in test_operator.py. The elastic test brings its own two kwok GPU nodes (4
nvidia.com/gpu each, labelled and tainted for this test's namespace only), so cordoning and draining them
touches nothing else in the cluster; they are deleted at the end. The OOM kill is the kwok stage
hack/kwok/stages/pod-container-exit.yaml with ``fake.aiaas.dev/reason: OOMKilled`` and exit code 137: the
container status the kubelet reports after the kernel's OOM killer (``lastState.terminated.reason``).
"""

# ruff: noqa: F811 - pytest fixtures imported from test_operator are parameters here
from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from e2e_util import wait_for
from test_operator import (  # noqa: F401 - fixtures
    EXIT_ANNOTATION,
    apply,
    events,
    get,
    job_status,
    operator,
    pods,
    progress_endpoint,
    ready_pods,
    sts_replicas,
    trainingjob,
    wait_phase,
)

from aiaas.contract import launch

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240), pytest.mark.usefixtures("e2e_cluster")]

POOL_LABEL = "aiaas.dev/e2e-pool"
GRACE = 3  # spec.elastic.scaleDownGraceSeconds


def _node(name: str, pool: str, gpus: int) -> dict[str, Any]:
    res = {"cpu": "32", "memory": "256Gi", "pods": "110", "nvidia.com/gpu": str(gpus)}
    return {
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
                     "labels": {"type": "kwok", "kubernetes.io/hostname": name, POOL_LABEL: pool}},
        "spec": {"taints": [{"key": POOL_LABEL, "value": pool, "effect": "NoSchedule"}]},
        "status": {"allocatable": res, "capacity": res},
    }


@pytest.fixture
def pool(kubectl, namespace) -> Iterator[list[str]]:
    """Two kwok nodes of 4 GPUs that only this test's pods may use (label + taint named after the namespace)."""
    names = [f"{namespace[:50]}-{s}" for s in ("a", "b")]
    for n in names:
        kubectl("apply", "-f", "-", input=json.dumps(_node(n, namespace, 4)))
    wait_for(lambda: all(_node_ready(kubectl, n) for n in names), timeout=60, what="pool nodes Ready")
    try:
        yield names
    finally:
        for n in names:
            kubectl("delete", "node", n, "--ignore-not-found", "--wait=false", check=False)


def _node_ready(kubectl, name: str) -> bool:
    node = json.loads(kubectl("get", "node", name, "-o", "json").stdout)
    return any(c["type"] == "Ready" and c["status"] == "True" for c in node["status"].get("conditions") or [])


def drain(kubectl, node: str) -> None:
    kubectl("cordon", node)
    kubectl("drain", node, "--ignore-daemonsets", "--delete-emptydir-data", "--force", "--timeout=60s",
            timeout=90)


def elastic_job(name: str, pool_name: str) -> dict[str, Any]:
    job = trainingjob(name, nodes=2, elastic={"minNodes": 2, "maxNodes": 4, "policy": "Auto",
                                              "scaleDownGraceSeconds": GRACE, "scaleUpRetrySeconds": 600})
    job["spec"]["trainer"]["hyperparameters"]["batchSize"] = 48  # splits over 2..4 data-parallel ranks
    job["spec"]["topology"]["resources"]["limits"] = {"nvidia.com/gpu": 2}
    job["spec"]["scheduling"] = {"nodeSelector": {POOL_LABEL: pool_name},
                                 "tolerations": [{"key": POOL_LABEL, "operator": "Equal", "value": pool_name,
                                                  "effect": "NoSchedule"}]}
    return job


def resized(kubectl, namespace: str, name: str) -> list[str]:
    """The Resized Events' messages, oldest first (the operator stamps eventTime in microseconds)."""
    return [e["message"] for e in sorted(events(kubectl, namespace, name), key=lambda e: e.get("eventTime") or "")
            if e["reason"] == "Resized"]


def node_of(kubectl, namespace: str, job: str) -> dict[str, str]:
    return {p["metadata"]["name"]: p["spec"].get("nodeName", "") for p in pods(kubectl, namespace, job)}


# -------------------------------------------------------------------------------------------------- tests
def test_auto_job_grows_to_max_nodes_shrinks_when_a_node_is_drained_never_below_min_nodes(
        kubectl, namespace, operator, pool):
    op = operator()
    apply(kubectl, namespace, elastic_job("stretch", namespace))
    # free capacity (2 nodes x 4 GPUs, 2 GPUs a pod): 2 -> 3 -> 4 = maxNodes, one scheduled pod at a time
    st = wait_for(lambda: ((s := job_status(kubectl, namespace, "stretch")).get("elastic") or {}).get("reason")
                  == "ScaledUp" and s["elastic"]["desiredNodes"] == 4 and s, timeout=60, what="grown to 4")
    assert st["elastic"]["currentNodes"] == 4 and st["replicas"] == 4 and sts_replicas(kubectl, namespace,
                                                                                        "stretch") == 4
    ready_pods(kubectl, namespace, "stretch", 4)
    wait_phase(kubectl, namespace, "stretch", "Running", op=op)
    table = kubectl("get", "trainingjob", "stretch", "-n", namespace).stdout.split("\n")  # the Size column
    assert dict(zip(table[0].split(), table[1].split(), strict=False))["SIZE"] == "4", table
    grew = resized(kubectl, namespace, "stretch")
    assert [g.split(":")[0] for g in grew] == ["grew 2→3", "grew 3→4"], grew
    assert "pod stretch-2 scheduled on node" in grew[0] and "pod stretch-3 scheduled on node" in grew[1]
    time.sleep(2)  # at maxNodes it asks for no more
    assert sts_replicas(kubectl, namespace, "stretch") == 4

    # cordon and drain one node: its two pods come back unschedulable; after the grace the job shrinks to 2
    on_b = sorted(p for p, n in node_of(kubectl, namespace, "stretch").items() if n == pool[1])
    assert len(on_b) == 2, node_of(kubectl, namespace, "stretch")
    drain(kubectl, pool[1])
    st = wait_for(lambda: ((s := job_status(kubectl, namespace, "stretch")).get("elastic") or {}).get("reason")
                  == "ScaledDown" and s, timeout=40, what="shrunk")
    assert st["elastic"]["desiredNodes"] == 2 and st["replicas"] == 2
    wait_for(lambda: sts_replicas(kubectl, namespace, "stretch") == 2, timeout=15, what="StatefulSet at 2")
    shrank = resized(kubectl, namespace, "stretch")[-1]
    assert shrank.startswith("shrank 4→2: pod stretch-") and "unschedulable for" in shrank, shrank
    assert "node(s) were unschedulable" in shrank, shrank  # the scheduler's own words
    assert any(p in shrank for p in on_b), (shrank, on_b)
    assert st["elastic"]["message"] == shrank
    # the gang comes back at 2 on the node that is left (a restart from the checkpoint if pods had to move)
    ready = ready_pods(kubectl, namespace, "stretch", 2)
    assert {p["spec"]["nodeName"] for p in ready} == {pool[0]}
    st = wait_phase(kubectl, namespace, "stretch", "Running", op=op)
    restarts = st["restartCount"]
    assert st.get("resizeCount", 0) == restarts  # a resize is not a failure: backoffLimit untouched

    # drain the other node too: nothing fits, but the job stays at minNodes and says why
    drain(kubectl, pool[0])
    st = wait_for(lambda: (s := job_status(kubectl, namespace, "stretch")).get("reason") == "Unschedulable" and s,
                  timeout=30, what="reason Unschedulable")
    time.sleep(GRACE + 3)  # well past the grace
    st = job_status(kubectl, namespace, "stretch")
    assert st["replicas"] == 2 and st["elastic"]["desiredNodes"] == 2 and sts_replicas(kubectl, namespace,
                                                                                        "stretch") == 2
    assert st["reason"] == "Unschedulable" and "node(s) were unschedulable" in st["message"], st
    assert st["restartCount"] == restarts and len(resized(kubectl, namespace, "stretch")) == 3


def oom(kubectl, namespace: str, pod: str) -> None:
    """The kernel's OOM killer as the kubelet reports it: exit code 137, reason OOMKilled."""
    kubectl("annotate", "pod", pod, "--overwrite", f"{EXIT_ANNOTATION}=137", "fake.aiaas.dev/reason=OOMKilled",
            "fake.aiaas.dev/delay=100ms", namespace=namespace)


def memory_of(pod: dict[str, Any]) -> dict[str, str]:
    res = next(c for c in pod["spec"]["containers"] if c["name"] == launch.TRAINER_CONTAINER)["resources"]
    return {"request": res["requests"]["memory"], "limit": res["limits"]["memory"]}


def test_an_oom_kill_raises_memory_up_to_the_ceiling_then_fails_naming_the_field(kubectl, namespace, operator):
    op = operator()
    job = trainingjob("hungry", nodes=2, autoscaling={"memory": {"factor": 2, "max": "512Mi"}})
    job["spec"]["topology"]["resources"]["limits"] = {"memory": "256Mi"}
    apply(kubectl, namespace, job)
    wait_phase(kubectl, namespace, "hungry", "Running", op=op)
    ready_pods(kubectl, namespace, "hungry", 2)
    oom(kubectl, namespace, "hungry-1")
    st = wait_for(lambda: (s := job_status(kubectl, namespace, "hungry")).get("resizeCount") == 1 and s,
                  timeout=30, what="memory raised")
    assert st["memory"]["limit"] == "512Mi" and st["memory"]["request"] == "256Mi" and st["restartCount"] == 1
    assert "pod hungry-1 was OOMKilled" in st["memory"]["message"]
    [raised] = resized(kubectl, namespace, "hungry")
    assert "raised memory limit 256Mi→512Mi, request 128Mi→256Mi: pod hungry-1 was OOMKilled" in raised, raised
    # the whole gang comes back with the new memory, from the checkpoint (restart generation 1)
    again = wait_for(lambda: (ps := ready_pods(kubectl, namespace, "hungry", 2)) and all(
        p["metadata"]["annotations"][launch.ANNOTATION_RESTART] == "1" for p in ps) and ps, timeout=30,
        what="the gang at restart generation 1")
    assert [memory_of(p) for p in again] == [{"request": "256Mi", "limit": "512Mi"}] * 2
    sts = get(kubectl, namespace, "statefulset", "hungry")
    assert sts is not None and memory_of(sts["spec"]["template"])["limit"] == "512Mi"
    wait_phase(kubectl, namespace, "hungry", "Running", op=op)
    # killed again at the ceiling: no bigger size is allowed, so the job fails and names the field
    oom(kubectl, namespace, "hungry-0")
    st = wait_phase(kubectl, namespace, "hungry", "Failed", op=op)
    assert st["reason"] == "OOMKilled" and st["restartCount"] == 1
    assert "already at spec.autoscaling.memory.max (512Mi); raise spec.autoscaling.memory.max" in st["message"]


def test_an_oom_kill_without_memory_autoscaling_fails_naming_the_field(kubectl, namespace, operator):
    op = operator()
    job = trainingjob("tight")
    job["spec"]["topology"]["resources"]["limits"] = {"memory": "256Mi"}
    apply(kubectl, namespace, job)
    wait_phase(kubectl, namespace, "tight", "Running", op=op)
    ready_pods(kubectl, namespace, "tight", 1)
    oom(kubectl, namespace, "tight-0")
    st = wait_phase(kubectl, namespace, "tight", "Failed", op=op)
    assert st["reason"] == "OOMKilled" and st["restartCount"] == 0
    assert "set spec.autoscaling.memory.max" in st["message"] and "(now 256Mi)" in st["message"], st["message"]
