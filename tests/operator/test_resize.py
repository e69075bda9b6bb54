"""Automatic resource adjustment (operator/resize.py and how operator/status.py and the renderer use it): an
elastic ``policy: Auto`` job grows while new pods get scheduled and shrinks when they stay unschedulable; an
OOM kill raises the memory by a factor up to a ceiling, or fails naming the field. Recorded pod states, no
cluster."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from test_status import SUCCESS, T0, _pod, exited, job, running, step, then, unschedulable

from aiaas.operator import api
from aiaas.operator.reconcile_trainingjob import TrainingJobReconciler
from aiaas.operator.reconciler import Snapshot
from aiaas.operator.render import RenderSettings
from aiaas.operator.resize import format_bytes, plan_memory, quantity_bytes
from aiaas.operator.status import rfc3339

CORDONED = "0/3 nodes are available: 1 node(s) were unschedulable, 2 Insufficient nvidia.com/gpu."


def auto(nodes: int = 2, lo: int = 1, hi: int = 4, **spec: Any) -> api.TrainingJob:
    return job(nodes, elastic={"minNodes": lo, "maxNodes": hi, "policy": "Auto", "scaleDownGraceSeconds": 30,
                               "scaleUpRetrySeconds": 300}, **spec)


def on(name: str, node: str, gen: int = 0) -> dict[str, Any]:
    p = running(name, gen)
    p["spec"]["nodeName"] = node
    return p


def stuck(name: str, since: Any = T0, msg: str | None = None, gen: int = 0) -> dict[str, Any]:
    p = unschedulable(name, gen)
    cond = p["status"]["conditions"][0]
    cond["lastTransitionTime"] = rfc3339(since)
    if msg:
        cond["message"] = msg
    return p


def pending_scheduled(name: str, node: str) -> dict[str, Any]:
    p = _pod(name, phase="Pending", ready=False, ip=None, conditions=[
        {"type": "PodScheduled", "status": "True", "lastTransitionTime": rfc3339(T0)}])
    p["spec"]["nodeName"] = node
    return p


def pods(n: int, gen: int = 0) -> list[dict[str, Any]]:
    return [on(f"lenet-{i}", f"gpu-{i}", gen) for i in range(n)]


# --------------------------------------------------------------------------------------------------- grow
def test_an_auto_job_asks_for_one_pod_more_while_every_pod_is_scheduled():
    ev = step(auto(2), pods(2))
    assert ev.replicas == 3 and ev.status.replicas == 3
    e = ev.status.elastic
    assert e is not None and (e.desired_nodes, e.current_nodes, e.reason) == (3, 2, "ScalingUp")
    assert ev.events == [] or all(x.reason != "Resized" for x in ev.events)  # nothing grew yet


def test_the_new_pod_scheduled_means_grown_with_an_event_naming_it():
    j = then(auto(2), step(auto(2), pods(2)))
    ev = step(j, pods(2) + [pending_scheduled("lenet-2", "gpu-9")], now=T0 + timedelta(seconds=3))
    e = ev.status.elastic
    assert e is not None and (e.desired_nodes, e.current_nodes, e.reason) == (3, 3, "ScaledUp")
    resized = [x for x in ev.events if x.reason == "Resized"]
    assert [x.message for x in resized] == ["grew 2→3: pod lenet-2 scheduled on node gpu-9"]
    assert ev.stale_pods == [] and ev.status.restart_count == 0  # torchrun re-forms; no gang restart


def test_growth_stops_at_max_nodes():
    j = auto(4, hi=4)
    ev = step(then(j, step(j, pods(4))), pods(4))
    assert ev.replicas == 4 and ev.status.elastic and ev.status.elastic.reason != "ScalingUp"


def test_a_fixed_elastic_job_keeps_its_size():
    j = job(2, elastic={"minNodes": 1, "maxNodes": 4})
    ev = step(j, pods(2))
    assert ev.replicas == 2 and ev.status.elastic is None


# ------------------------------------------------------------------------------------------------- shrink
def grown_to_3() -> api.TrainingJob:
    j = then(auto(2), step(auto(2), pods(2)))
    return then(j, step(j, pods(3)))


def test_a_pod_added_to_grow_that_stays_unschedulable_shrinks_back_after_the_grace_without_a_restart():
    j = then(auto(2), step(auto(2), pods(2)))  # asks for 3
    early = step(j, pods(2) + [stuck("lenet-2")], now=T0 + timedelta(seconds=29))
    assert early.replicas == 3 and early.requeue_after == pytest.approx(1.0)  # the grace runs out in 1 s
    ev = step(j, pods(2) + [stuck("lenet-2")], now=T0 + timedelta(seconds=30))
    assert ev.replicas == 2 and ev.stale_pods == [] and ev.status.restart_count == 0
    e = ev.status.elastic
    assert e is not None and (e.desired_nodes, e.reason) == (2, "ScaledDown")
    [resized] = [x for x in ev.events if x.reason == "Resized"]
    assert resized.message.startswith("shrank 3→2: pod lenet-2 unschedulable for 30s: 0/4 nodes are available")


def test_after_a_shrink_it_tries_to_grow_again_only_after_the_retry_interval():
    j = then(auto(2), step(auto(2), pods(2)))
    j = then(j, step(j, pods(2) + [stuck("lenet-2")], now=T0 + timedelta(seconds=30)))
    soon = step(j, pods(2), now=T0 + timedelta(seconds=60))
    assert soon.replicas == 2 and soon.requeue_after == pytest.approx(270.0)
    later = step(j, pods(2), now=T0 + timedelta(seconds=330))
    assert later.replicas == 3 and later.status.elastic and later.status.elastic.reason == "ScalingUp"


def test_a_drained_node_shrinks_the_job_and_restarts_the_gang_from_its_checkpoint():
    """kubectl cordon + drain: pod 1's replacement fits nowhere; a StatefulSet removes pod 2, so the gang
    restarts at 2 pods (a new restart generation), and the restart does not count against backoffLimit."""
    j = grown_to_3()
    ev = step(j, [on("lenet-0", "gpu-0"), stuck("lenet-1", msg=CORDONED), on("lenet-2", "gpu-2")],
              now=T0 + timedelta(seconds=45))
    assert ev.replicas == 2 and ev.status.restart_count == 1 and ev.status.resize_count == 1
    assert sorted(ev.stale_pods) == ["lenet-0", "lenet-1", "lenet-2"]
    assert ev.status.phase == "Restarting" and ev.status.reason == "ScaledDown"
    [resized] = [x for x in ev.events if x.reason == "Resized"]
    assert resized.message == (f"shrank 3→2: pod lenet-1 unschedulable for 45s: {CORDONED}; restarting the gang "
                               "from the last checkpoint")
    # the next generation runs at 2; a failure afterwards still has the whole backoffLimit
    j = then(j, ev)
    j = then(j, step(j, pods(2, gen=1), now=T0 + timedelta(seconds=50)))
    assert j.status and j.status.phase == "Running" and j.status.replicas == 2
    failed = step(j, [exited("lenet-0", 1, "boom", gen=1), on("lenet-1", "gpu-1", gen=1)],
                  now=T0 + timedelta(seconds=60))
    assert failed.status.phase == "Restarting" and "restart 1 of backoffLimit 3" in failed.status.message


def test_never_below_min_nodes():
    j = grown_to_3()
    j = j.model_copy(update={"spec": j.spec.model_copy(update={"elastic": j.spec.elastic.model_copy(
        update={"min_nodes": 3})})}) if j.spec.elastic else j
    ev = step(j, [on("lenet-0", "gpu-0"), stuck("lenet-1", msg=CORDONED), on("lenet-2", "gpu-2")],
              now=T0 + timedelta(seconds=300))
    assert ev.replicas == 3 and ev.status.restart_count == 0
    assert ev.status.reason == "Unschedulable" and CORDONED in (ev.status.message or "")


def test_shrinks_only_to_min_nodes_when_fewer_fit():
    j = auto(3, lo=2, hi=4, trainer={"hyperparameters": {"batchSize": 48}})
    ev = step(j, [on("lenet-0", "gpu-0"), stuck("lenet-1"), stuck("lenet-2")], now=T0 + timedelta(seconds=31))
    assert ev.replicas == 2 and ev.status.restart_count == 1  # pod 1 stays and is not scheduled: restart


def test_a_pod_added_to_grow_that_never_got_a_node_does_not_hold_up_success():
    j = then(auto(2), step(auto(2), pods(2)))  # asks for 3
    ev = step(j, [exited("lenet-0", 0, SUCCESS), exited("lenet-1", 0, SUCCESS), stuck("lenet-2")])
    assert ev.status.phase == "Succeeded"


# ------------------------------------------------------------------------------------------------- memory
def test_quantities():
    assert quantity_bytes("512Mi") == 512 * 2**20 and quantity_bytes("1G") == 10**9
    assert quantity_bytes("1.5Gi") == 3 * 2**29 and quantity_bytes(1048576) == 2**20
    assert quantity_bytes("1e3") == 1000
    assert format_bytes(2**30) == "1Gi" and format_bytes(768 * 2**20) == "768Mi" and format_bytes(10**9) == "954Mi"
    with pytest.raises(ValueError, match="not a Kubernetes quantity"):
        quantity_bytes("lots")


def oom_job(**memory: Any) -> api.TrainingJob:
    return job(2, topology={"nodes": 2, "resources": {"requests": {"memory": "256Mi"}, "limits": {"memory": "512Mi"}}},
               autoscaling={"memory": memory})


def test_an_oom_kill_raises_memory_by_the_factor_and_restarts_the_gang():
    j = oom_job(factor=1.5, max="2Gi")
    j = then(j, step(j, [running("lenet-0"), running("lenet-1")]))
    ev = step(j, [exited("lenet-0", 137, "", reason="OOMKilled"), running("lenet-1")])
    assert ev.status.phase == "Restarting" and ev.status.reason == "OOMKilled"
    assert ev.status.memory and (ev.status.memory.request, ev.status.memory.limit) == ("384Mi", "768Mi")
    assert ev.status.restart_count == 1 and ev.status.resize_count == 1
    assert sorted(ev.stale_pods) == ["lenet-0", "lenet-1"]
    [resized] = [x for x in ev.events if x.reason == "Resized"]
    assert "raised memory limit 512Mi→768Mi, request 256Mi→384Mi: pod lenet-0 was OOMKilled" in resized.message


def test_the_raise_is_capped_at_max_and_an_oom_kill_at_max_fails_naming_the_field():
    j = oom_job(factor=2, max="768Mi")
    j = then(j, step(j, [running("lenet-0"), running("lenet-1")]))
    j = then(j, step(j, [exited("lenet-0", 137, "", reason="OOMKilled"), running("lenet-1")]))
    assert j.status and j.status.memory and j.status.memory.limit == "768Mi"  # 1Gi capped at max
    assert j.status.memory.request == "512Mi"
    j = then(j, step(j, [running("lenet-0", 1), running("lenet-1", 1)]))
    ev = step(j, [exited("lenet-0", 137, "", reason="OOMKilled", gen=1), running("lenet-1", 1)])
    assert ev.status.phase == "Failed" and ev.status.reason == "OOMKilled"
    assert "already at spec.autoscaling.memory.max (768Mi); raise spec.autoscaling.memory.max" in (
        ev.status.message or "")


def test_the_raised_memory_reaches_the_rendered_pods():
    rec = TrainingJobReconciler(RenderSettings())
    j = oom_job(factor=2, max="4Gi")
    j = then(j, step(j, [running("lenet-0"), running("lenet-1")]))
    body = j.model_dump(by_alias=True, exclude_none=True)
    body["metadata"]["uid"] = "u1"
    sts = {"apiVersion": "apps/v1", "kind": "StatefulSet", "spec": {"replicas": 2},
           "metadata": {"name": "lenet", "namespace": "ml", "uid": "s1", "ownerReferences": [
               {"apiVersion": api.API_VERSION, "kind": "TrainingJob", "name": "lenet", "uid": "u1",
                "controller": True}]}}
    oom = exited("lenet-0", 137, "", reason="OOMKilled")
    for p in (oom, running("lenet-1")):
        p["metadata"]["ownerReferences"][0]["uid"] = "s1"
    snap = Snapshot(key=("ml", "lenet"), body=body, children={"StatefulSet": (sts,), "Pod": (oom,)},
                    related={}, probe=None, now=T0)
    result = rec.reconcile(snap)
    [statefulset] = [c for c in result.children if c["kind"] == "StatefulSet"]
    container = statefulset["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["memory"] == "1Gi"
    assert container["resources"]["requests"]["memory"] == "512Mi"
    assert result.status["memory"]["limit"] == "1Gi" and result.status["resizeCount"] == 1


def test_plan_memory_without_a_ceiling_names_the_field():
    j = job(2, topology={"nodes": 2, "resources": {"limits": {"memory": "1Gi"}}})
    d = plan_memory(j, "lenet-0", T0)
    assert d.status is None and d.failure and "spec.autoscaling.memory.max" in d.failure and "(now 1Gi)" in d.failure


def test_memory_autoscaling_needs_a_memory_to_start_from():
    with pytest.raises(ValueError, match="set spec.topology.resources.limits.memory"):
        job(2, autoscaling={"memory": {"max": "4Gi"}})
