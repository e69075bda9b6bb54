"""Capacity-driven elastic training with real pods (issue 15 item 4): on the real node (kubelet, containerd, runc),
an elastic ``policy: Auto`` TrainingJob of real trainer pods (torchrun, the digits CNN, checkpoints on a shared
local-path claim) whose CPU request lets exactly K=2 of its pods fit on the node. The operator (installed with
Helm from the built image) grows it 1→2 while its pods get scheduled, asks for a third that the real scheduler
cannot place (Insufficient cpu), shrinks back to 2 after ``scaleDownGraceSeconds`` without a gang restart (the
third pod never ran), and the torchrun rendezvous trains on with a world of 2 until the job succeeds.

The CPU request is computed from the node's allocatable CPU minus what its pods already request, after the pods
of earlier tests have gone, so the test holds on any machine the real node runs on.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from typing import Any

import pytest
from e2e_util import wait_for
from node_util import LOCAL_PATH_CLASS, get, install_operator, restricted_namespace

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800), pytest.mark.usefixtures("e2e_cluster")]

NAME = "elastic-real"
FITS = 2  # K: the pods the node holds at the computed request (2 <= K < maxNodes)
MAX_NODES = 4
GRACE = 10  # spec.elastic.scaleDownGraceSeconds
INTERVAL = 5  # spec.checkpoint.intervalSteps


@pytest.fixture(scope="module")
def elastic_ns(real_node, kubectl) -> Iterator[str]:
    yield from restricted_namespace(kubectl, "aiaas-elastic")


@pytest.fixture(scope="module")
def operator_release(images, elastic_ns, helm, tmp_path_factory) -> Iterator[str]:
    yield from install_operator(helm, tmp_path_factory.mktemp("values"), elastic_ns, "aiaas-elastic",
                                images["aiaas-operator"])


# ----------------------------------------------------------------------------------------- node capacity
def millicpu(q: str) -> int:
    return int(q[:-1]) if q.endswith("m") else round(float(q) * 1000)


def _pod_cpu(pod: dict[str, Any]) -> int:
    """What the scheduler counts for a pod: its containers' CPU requests (or the largest init container's)."""
    def req(c: dict[str, Any]) -> int:
        return millicpu(((c.get("resources") or {}).get("requests") or {}).get("cpu", "0"))

    spec = pod["spec"]
    overhead = millicpu((spec.get("overhead") or {}).get("cpu", "0"))
    return max(sum(map(req, spec["containers"])), max(map(req, spec.get("initContainers") or []), default=0)) \
        + overhead


def free_cpu(kubectl, node: str) -> tuple[int, int, int]:
    """(allocatable, requested, free) millicpu of ``node``, once no pod on it is terminating (a terminating
    pod's request frees up later and would let one pod more fit)."""
    def settled() -> list[dict[str, Any]] | None:
        items = (get(kubectl, None, "pods", "-A", "--field-selector", f"spec.nodeName={node}") or {})["items"]
        live = [p for p in items if p["status"].get("phase") not in ("Succeeded", "Failed")]
        return None if any(p["metadata"].get("deletionTimestamp") for p in live) else live

    live = wait_for(settled, timeout=300, interval=2, what=f"no terminating pods on {node}")
    allocatable = millicpu(get(kubectl, None, "node", node)["status"]["allocatable"]["cpu"])
    requested = sum(_pod_cpu(p) for p in live)
    return allocatable, requested, allocatable - requested


# ------------------------------------------------------------------------------------------------ the job
def elastic_job(cpu_m: int) -> dict[str, Any]:
    return {
        "apiVersion": "aiaas.dev/v1alpha1", "kind": "TrainingJob", "metadata": {"name": NAME},
        "spec": {
            "trainer": {"model": {"architecture": "cnn"}, "dataset": {"kind": "digits"},
                        # 48 splits over every world of 1..4 ranks; ~30 steps an epoch (a minute or two on 2 CPUs)
                        "hyperparameters": {"epochs": 8, "batchSize": 48, "seed": 11}},
            "topology": {"nodes": 1, "nprocPerNode": 1,
                         "resources": {"requests": {"cpu": f"{cpu_m}m", "memory": "512Mi"},
                                       "limits": {"memory": "2Gi"}}},
            "elastic": {"minNodes": 1, "maxNodes": MAX_NODES, "policy": "Auto", "scaleDownGraceSeconds": GRACE,
                        "scaleUpRetrySeconds": 3600},  # no second probe of the full node during the test
            "checkpoint": {"intervalSteps": INTERVAL, "keepLast": 2},
            "storage": {"size": "1Gi", "storageClassName": LOCAL_PATH_CLASS},
            "runPolicy": {"backoffLimit": 2},
        },
    }


def _events(kubectl, ns: str, name: str, reason: str) -> list[dict[str, Any]]:
    items = (get(kubectl, ns, "events", "--field-selector", f"involvedObject.name={name},reason={reason}")
             or {}).get("items", [])
    return sorted(items, key=lambda e: e.get("eventTime") or e.get("lastTimestamp") or "")


def _when(event: dict[str, Any]) -> float:
    from datetime import datetime

    stamp = event.get("eventTime") or event.get("lastTimestamp") or event.get("firstTimestamp")
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def _watch(kubectl, ns: str, timeout: float) -> dict[str, Any]:
    """Poll the job until it ends: the StatefulSet's replicas as they changed, the elastic reasons, and every
    pod's log (by pod uid: a gang restart's new pods are new logs; torchrun restarts its workers in the same
    container, so one log holds every rendezvous of its pod)."""
    replicas: list[int] = []
    reasons: list[str] = []
    logs: dict[str, str] = {}
    status: dict[str, Any] = {}
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        status = (get(kubectl, ns, "trainingjob", NAME) or {}).get("status") or {}
        reason = (status.get("elastic") or {}).get("reason")
        if reason and (not reasons or reasons[-1] != reason):
            reasons.append(reason)
        sts = get(kubectl, ns, "statefulset", NAME)
        if sts is not None and (not replicas or replicas[-1] != sts["spec"]["replicas"]):
            replicas.append(sts["spec"]["replicas"])
        for pod in (get(kubectl, ns, "pods", "-l", f"aiaas.dev/job-name={NAME}") or {}).get("items", []):
            if not pod["spec"].get("nodeName"):
                continue
            out = kubectl("logs", pod["metadata"]["name"], namespace=ns, check=False)
            uid = pod["metadata"]["uid"]
            if out.returncode == 0 and len(out.stdout) >= len(logs.get(uid, "")):
                logs[uid] = out.stdout
        if status.get("phase") in ("Succeeded", "Failed"):
            return {"status": status, "replicas": replicas, "reasons": reasons, "logs": list(logs.values())}
        time.sleep(1)
    raise AssertionError(f"{NAME} did not finish in {timeout:.0f}s: {json.dumps(status)}\n"
                         f"{kubectl('describe', 'pods', namespace=ns, check=False).stdout[-4000:]}")


def _resumes(log: str) -> list[int]:
    """The steps one pod's trainer resumed from. Every (re)start of rank 0 in this pod after the training had
    passed two checkpoints must resume from one (a re-formed rendezvous does not start from scratch)."""
    passed, must_resume, resumed = 0, False, []
    for line in log.splitlines():
        if re.search(r"\| world \d+ = data", line):
            must_resume = passed >= 2 * INTERVAL
        elif m := re.search(r"resumed from checkpoint step (\d+)", line):
            resumed.append(int(m.group(1)))
            must_resume = False
        elif m := re.search(r" step (\d+)/\d+ ", line):
            assert not must_resume, f"the trainer restarted after step {passed} without resuming:\n{log[-4000:]}"
            passed = int(m.group(1))
    return resumed


def _last_step(log: str) -> int:
    steps = re.findall(r" step (\d+)/\d+ ", log)
    return int(steps[-1]) if steps else -1


# ---------------------------------------------------------------------------------------------- the test
def test_auto_job_grows_while_pods_fit_then_shrinks_to_what_the_real_node_holds(operator_release, real_node,
                                                                                  elastic_ns, kubectl) -> None:
    node = real_node["metadata"]["name"]
    allocatable, requested, free = free_cpu(kubectl, node)
    cpu_m = int(free / (FITS + 0.5))  # FITS pods fit, FITS + 1 do not
    assert cpu_m >= 100, f"the real node has too little free CPU for this test: {allocatable}m, {requested}m requested"
    assert FITS * cpu_m <= free < (FITS + 1) * cpu_m and FITS < MAX_NODES
    print(f"node {node}: {allocatable}m allocatable, {requested}m requested; pods request {cpu_m}m: "
          f"{FITS} fit in {free}m")

    t0 = time.time()
    kubectl("apply", "-f", "-", input=json.dumps(elastic_job(cpu_m)), namespace=elastic_ns)
    seen = _watch(kubectl, elastic_ns, timeout=540)
    took = time.time() - t0
    status = seen["status"]
    resized = _events(kubectl, elastic_ns, NAME, "Resized")
    timeline = [f"+{_when(e) - t0:.0f}s {e['message']}" for e in resized]
    print(f"{NAME}: {status.get('phase')} after {took:.0f}s; StatefulSet replicas {seen['replicas']}; "
          f"elastic reasons {seen['reasons']}; restarts {status.get('restartCount', 0)}")
    print("\n".join(timeline))
    assert status["phase"] == "Succeeded", (status, timeline, [log[-3000:] for log in seen["logs"]])

    # the operator grew the job while its pods got scheduled, then asked for one pod the node could not hold
    messages = [e["message"] for e in resized]
    assert len(messages) == 2, timeline
    assert messages[0] == f"grew 1→2: pod {NAME}-1 scheduled on node {node}", timeline
    assert messages[1].startswith(f"shrank 3→{FITS}: pod {NAME}-2 unschedulable for "), timeline
    assert "Insufficient cpu" in messages[1], timeline  # the real scheduler's words
    waited = int(messages[1].split("unschedulable for ")[1].split("s:")[0])
    assert waited >= GRACE, timeline
    assert "restarting the gang" not in messages[1], timeline  # the third pod never ran: nothing to move
    assert _when(resized[1]) - _when(resized[0]) >= GRACE - 1, timeline  # conditions: whole seconds
    pending = _events(kubectl, elastic_ns, f"{NAME}-2", "FailedScheduling")  # the real scheduler's Events
    assert pending and "Insufficient cpu" in pending[0]["message"], pending
    asked = [r for r in seen["replicas"] if r]  # the StatefulSet goes to 0 when the job ends
    assert max(asked) == FITS + 1 and asked[-1] == FITS, seen["replicas"]
    assert asked.index(FITS + 1) < len(asked) - 1, seen["replicas"]  # asked for 3, then back to FITS

    # it ended at what fits, never below minNodes, and no gang restart was needed to resize
    elastic = status["elastic"]
    assert elastic["currentNodes"] == FITS and elastic["desiredNodes"] == FITS, elastic
    assert elastic["reason"] == "ScaledDown" and elastic["message"] == messages[1], elastic
    assert status.get("resizeCount", 0) == 0, status

    # the real torchrun rendezvous trained with a world of FITS to the end, resuming where it restarted
    final = max(seen["logs"], key=_last_step)  # rank 0's pod at the end (the pods may go before "done")
    worlds = [int(w) for w in re.findall(r"\| world (\d+) = data", final)]
    assert worlds and worlds[-1] == FITS, (worlds, final[-4000:])
    resumed = [step for log in seen["logs"] for step in _resumes(log)]
    total = int(re.findall(r"(\d+) steps in all", final)[-1])
    assert status["progress"]["step"] == total, (status, final[-2000:])
    print(f"rank 0's worlds {worlds}; resumed from checkpoint steps {resumed}; {total} steps")
