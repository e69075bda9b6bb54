"""The TrainingJob lifecycle (operator/status.py) from recorded pod states, one transition at a time.

The pod dicts below are shaped like what the kubelet reports (restartPolicy Always, so a finished trainer shows
up in ``lastState.terminated`` while the container waits in CrashLoopBackOff), and the scheduler's
``PodScheduled=False`` condition for a pod that fits nowhere.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from aiaas.contract import launch
from aiaas.contract import metrics as m
from aiaas.operator import api
from aiaas.operator.status import (
    Evaluation,
    Observed,
    error_status,
    evaluate,
    merge_progress,
    parse_termination,
    rfc3339,
    set_condition,
)
from aiaas.operator.status_progress import parse_progress, scrape

T0 = datetime(2026, 5, 1, 12, 0, 0, tzinfo=timezone.utc)
IMAGE = "localhost/aiaas-trainer:0.1.0"


# ------------------------------------------------------------------------------------------- recorded pods
def _pod(name: str, gen: int = 0, *, phase: str = "Running", ready: bool = True,
         container: dict[str, Any] | None = None, conditions: list[dict[str, Any]] | None = None,
         deleting: bool = False, ip: str | None = "10.244.1.7") -> dict[str, Any]:
    ordinal = name.rsplit("-", 1)[1]
    meta: dict[str, Any] = {
        "name": name,
        "namespace": "ml",
        "uid": f"uid-{name}-{gen}",
        "labels": {launch.LABEL_JOB: name.rsplit("-", 1)[0], launch.POD_INDEX_LABEL: ordinal,
                   "statefulset.kubernetes.io/pod-name": name},
        "annotations": {launch.ANNOTATION_RESTART: str(gen), launch.ANNOTATION_CONFIG_HASH: "81e7923606164c1b"},
        "ownerReferences": [{"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "lenet", "controller": True}],
    }
    if deleting:
        meta["deletionTimestamp"] = rfc3339(T0)
    status: dict[str, Any] = {"phase": phase, "qosClass": "Burstable"}
    if conditions is None:
        conditions = [
            {"type": "PodScheduled", "status": "True", "lastTransitionTime": rfc3339(T0)},
            {"type": "Initialized", "status": "True", "lastTransitionTime": rfc3339(T0)},
            {"type": "ContainersReady", "status": str(ready), "lastTransitionTime": rfc3339(T0)},
            {"type": "Ready", "status": str(ready), "lastTransitionTime": rfc3339(T0)},
        ]
    status["conditions"] = conditions
    if phase != "Pending" or container is not None:
        status["containerStatuses"] = [container or {
            "name": "trainer", "image": IMAGE, "imageID": "", "ready": ready, "restartCount": 0, "started": True,
            "state": {"running": {"startedAt": rfc3339(T0)}},
        }]
    if ip and phase == "Running":
        status["podIP"] = ip
        status["podIPs"] = [{"ip": ip}]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta,
            "spec": {"restartPolicy": "Always", "containers": [{"name": "trainer", "image": IMAGE}]},
            "status": status}


def running(name: str, gen: int = 0) -> dict[str, Any]:
    return _pod(name, gen)


def starting(name: str, gen: int = 0) -> dict[str, Any]:
    return _pod(name, gen, ready=False, container={
        "name": "trainer", "image": IMAGE, "ready": False, "restartCount": 0, "started": False,
        "state": {"waiting": {"reason": "ContainerCreating"}}})


def unschedulable(name: str, gen: int = 0) -> dict[str, Any]:
    msg = ("0/4 nodes are available: 2 Insufficient nvidia.com/gpu, 2 node(s) had untolerated taint "
           "{nvidia.com/gpu: present}. preemption: 0/4 nodes are available: 4 No preemption victims found for "
           "incoming pod.")
    return _pod(name, gen, phase="Pending", ready=False, ip=None, conditions=[
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": msg,
         "lastTransitionTime": rfc3339(T0)}])


def image_pull_backoff(name: str, gen: int = 0) -> dict[str, Any]:
    return _pod(name, gen, phase="Pending", ready=False, container={
        "name": "trainer", "image": "localhost/aiaas-trainer:typo", "ready": False, "restartCount": 0,
        "state": {"waiting": {"reason": "ImagePullBackOff",
                              "message": 'Back-off pulling image "localhost/aiaas-trainer:typo"'}}})


def exited(name: str, exit_code: int, message: str | dict[str, Any] = "", gen: int = 0, reason: str | None = None,
           restarted: bool = True) -> dict[str, Any]:
    """The trainer exited; with restartPolicy Always the kubelet keeps it in lastState and backs off."""
    msg = json.dumps(message) if isinstance(message, dict) else message
    term = {"exitCode": exit_code, "reason": reason or ("Completed" if exit_code == 0 else "Error"),
            "message": msg, "startedAt": rfc3339(T0), "finishedAt": rfc3339(T0 + timedelta(minutes=5)),
            "containerID": "containerd://abc"}
    container: dict[str, Any] = {"name": "trainer", "image": IMAGE, "ready": False, "started": False}
    if restarted:
        container |= {"restartCount": 1, "lastState": {"terminated": term},
                      "state": {"waiting": {"reason": "CrashLoopBackOff",
                                            "message": f"back-off 10s restarting failed container=trainer pod={name}"}}}
    else:
        container |= {"restartCount": 0, "state": {"terminated": term}}
    return _pod(name, gen, ready=False, container=container)


def outcome(kind: str, reason: str, message: str, step: int | None = None) -> dict[str, Any]:
    codes = {"Succeeded": 0, "PermanentError": 78, "RetryableError": 1, "Preempted": 143}
    return {"outcome": kind, "reason": reason, "message": message, "exitCode": codes[kind], "rank": 0,
            "step": step, "artifact": "/var/run/aiaas/artifacts" if kind == "Succeeded" else None}


SUCCESS = outcome("Succeeded", "Completed", "trained 500 steps", step=500)


# ---------------------------------------------------------------------------------------------- helpers
def job(nodes: int = 2, status: dict[str, Any] | None = None, **spec: Any) -> api.TrainingJob:
    body: dict[str, Any] = {
        "apiVersion": api.API_VERSION, "kind": "TrainingJob",
        "metadata": {"name": "lenet", "namespace": "ml", "uid": "1234", "generation": 1,
                     "creationTimestamp": rfc3339(T0 - timedelta(seconds=4))},
        "spec": {"topology": {"nodes": nodes}, **spec},
    }
    if status is not None:
        body["status"] = status
    return api.TrainingJob.model_validate(body)


def step(j: api.TrainingJob, pods: list[dict[str, Any]], now: datetime = T0, **kw: Any) -> Evaluation:
    return evaluate(j, Observed(pods=pods, progress=kw.pop("progress", None)), now, **kw)


def then(j: api.TrainingJob, ev: Evaluation) -> api.TrainingJob:
    """The job as the next reconcile sees it: the new status stored."""
    return j.model_copy(update={"status": api.TrainingJobStatus.model_validate(ev.status.dump())})


def cond(ev: Evaluation, type_: str) -> api.Condition:
    c = next((c for c in ev.status.conditions if c.type == type_), None)
    assert c is not None, f"no {type_} condition in {ev.status.conditions}"
    return c


def reasons(ev: Evaluation) -> list[str]:
    return [e.reason for e in ev.events]


def running_job(nodes: int = 2, **spec: Any) -> api.TrainingJob:
    j = job(nodes, **spec)
    return then(j, step(j, [running(f"lenet-{i}") for i in range(nodes)]))


# -------------------------------------------------------------------------------------------- transitions
def test_new_job_is_created_and_waits_for_pods():
    ev = step(job(), [])
    assert ev.status.phase == "Created" and ev.status.reason == "Created"
    assert cond(ev, "Created").status == "True"
    assert cond(ev, "Running").status == "False" and cond(ev, "Running").reason == "WaitingForPods"
    assert ev.status.message == "0/2 pods exist, 0 ready"
    assert ev.status.start_time == rfc3339(T0) and ev.status.observed_generation == 1
    assert ev.replicas == 2 and ev.status.restart_count == 0
    assert reasons(ev) == ["Created"]


def test_created_to_running_when_every_pod_is_ready():
    j = job()
    j = then(j, step(j, [running("lenet-0"), starting("lenet-1")]))
    assert j.status and j.status.phase == "Created" and j.status.reason == "Created"
    assert j.status.message == "1/2 pods ready; waiting for lenet-1"
    ev = step(j, [running("lenet-0"), running("lenet-1")], now=T0 + timedelta(seconds=2))
    assert ev.status.phase == "Running" and ev.status.ready_replicas == 2 and ev.status.active_replicas == 2
    assert cond(ev, "Running").status == "True"
    assert reasons(ev) == ["Running"]
    assert ev.time_to_running == pytest.approx(6.0)  # created 4 s before T0


def test_a_job_whose_pods_are_ready_at_the_first_look_gets_both_events():
    """The Created event goes with the Created condition: a job that is Running at its first status pass (its
    pods were quick) still gets it, before Running (an e2e test once found it missing)."""
    ev = step(job(), [running("lenet-0"), running("lenet-1")])
    assert ev.status.phase == "Running" and cond(ev, "Created").status == "True"
    assert reasons(ev) == ["Created", "Running"]


def test_steady_state_produces_no_change_and_no_events():
    j = running_job()
    ev = step(j, [running("lenet-0"), running("lenet-1")], now=T0 + timedelta(minutes=3))
    assert ev.status.dump() == j.status.dump() if j.status else False
    assert ev.events == [] and ev.stale_pods == []


def test_retryable_failure_restarts_the_whole_gang():
    j = running_job()
    crash = outcome("RetryableError", "NCCLTimeout", "Watchdog caught collective operation timeout", step=40)
    ev = step(j, [running("lenet-0"), exited("lenet-1", 1, crash)])
    assert ev.status.phase == "Restarting" and ev.status.restart_count == 1
    assert ev.status.reason == "NCCLTimeout"
    assert "lenet-1 (node rank 1)" in ev.status.message and "collective operation timeout" in ev.status.message
    assert "restart 1 of backoffLimit 3" in ev.status.message
    assert sorted(ev.stale_pods) == ["lenet-0", "lenet-1"], "every pod goes, torchrun restarts as one"
    assert cond(ev, "Restarting").status == "True" and cond(ev, "Running").status == "False"
    assert [(e.type, e.reason) for e in ev.events] == [("Warning", "Restarting")]


def test_after_a_restart_old_generation_pods_are_stale_and_new_ones_bring_it_back():
    j = running_job()
    j = then(j, step(j, [running("lenet-0"), exited("lenet-1", 1, "Traceback ...")]))
    # the StatefulSet recreated lenet-0 already; lenet-1 (old generation) is still terminating
    ev = step(j, [running("lenet-0", gen=1), _pod("lenet-1", 0, deleting=True)])
    assert ev.status.phase == "Restarting" and ev.stale_pods == []
    assert ev.status.ready_replicas == 1
    j = then(j, ev)
    ev = step(j, [running("lenet-0", gen=1), running("lenet-1", gen=1)])
    assert ev.status.phase == "Running" and ev.status.restart_count == 1
    assert cond(ev, "Restarting").status == "False" and cond(ev, "Restarting").reason == "Recovered"
    assert reasons(ev) == ["Running"]
    assert ev.time_to_running is None, "time to Running is measured once, not after restarts"


def test_a_pod_of_an_older_generation_that_reappears_is_deleted():
    j = running_job()
    j = then(j, step(j, [exited("lenet-0", 1, "boom"), running("lenet-1")]))
    ev = step(j, [running("lenet-0", gen=1), running("lenet-1", gen=0)])
    assert ev.stale_pods == ["lenet-1"]
    assert ev.status.phase == "Restarting"


def test_backoff_limit_exhausted_fails():
    j = running_job(runPolicy={"backoffLimit": 1})
    j = then(j, step(j, [exited("lenet-0", 1, "boom"), running("lenet-1")]))
    j = then(j, step(j, [running("lenet-0", 1), running("lenet-1", 1)]))
    assert j.status and j.status.phase == "Running"
    ev = step(j, [exited("lenet-0", 1, "boom again", gen=1), running("lenet-1", 1)])
    assert ev.status.phase == "Failed" and ev.status.reason == "BackoffLimitExceeded"
    assert "restarted 1 time(s), backoffLimit is 1" in ev.status.message
    assert ev.replicas == 0 and ev.status.completion_time == rfc3339(T0)
    assert cond(ev, "Failed").status == "True" and cond(ev, "Restarting").status == "False"
    assert [(e.type, e.reason) for e in ev.events] == [("Warning", "BackoffLimitExceeded")]


def test_permanent_error_from_the_termination_message_fails_at_once():
    j = running_job()
    bad = outcome("PermanentError", "DatasetNotFound", "no such file: /data/mnist.npz; set spec.trainer.dataset.path")
    ev = step(j, [running("lenet-0"), exited("lenet-1", 78, bad)])
    assert ev.status.phase == "Failed" and ev.status.reason == "DatasetNotFound"
    assert ev.status.restart_count == 0
    assert "/data/mnist.npz" in ev.status.message and "permanent" in ev.status.message
    assert ev.replicas == 0


def test_exit_code_78_without_a_message_is_permanent():
    ev = step(running_job(), [running("lenet-0"), exited("lenet-1", 78, "ValueError: bad config\n")])
    assert ev.status.phase == "Failed" and ev.status.reason == "PermanentError"
    assert "ValueError: bad config" in ev.status.message


def test_oomkilled_without_memory_autoscaling_fails_and_names_the_field_to_set():
    """Retrying at the same size would be killed again: fail, and say which field lets the operator raise it."""
    ev = step(running_job(), [exited("lenet-0", 137, "", reason="OOMKilled"), running("lenet-1")])
    assert ev.status.phase == "Failed" and ev.status.reason == "OOMKilled"
    assert "OOMKilled" in ev.status.message and "spec.autoscaling.memory.max" in ev.status.message
    assert "limits.memory" in ev.status.message and ev.status.restart_count == 0


def test_every_worker_succeeded_marks_succeeded_with_the_artifact():
    j = running_job(storage={"claimName": "models"})
    ev = step(j, [exited("lenet-0", 0, SUCCESS), exited("lenet-1", 0, SUCCESS)])
    assert ev.status.phase == "Succeeded" and ev.status.reason == "Succeeded"
    assert ev.status.artifact == api.Artifact(uri="pvc://models/lenet/artifacts", version="500")
    assert ev.status.succeeded_replicas == 2 and ev.status.completion_time == rfc3339(T0)
    assert cond(ev, "Succeeded").status == "True" and cond(ev, "Running").status == "False"
    assert ev.replicas == 0, "finished pods must not restart and hold GPUs"
    assert ev.keep_service and reasons(ev) == ["Succeeded"]


def test_one_worker_done_is_not_success_for_all_workers_but_is_for_rank0_policy():
    j = running_job()
    pods = [exited("lenet-0", 0, SUCCESS), running("lenet-1")]
    assert step(j, pods).status.phase == "Running"
    assert step(j, pods, success_policy="Rank0").status.phase == "Succeeded"


def test_exit_0_without_a_termination_message_counts_as_success():
    ev = step(running_job(nodes=1), [exited("lenet-0", 0, "", restarted=False)])
    assert ev.status.phase == "Succeeded" and ev.status.artifact
    assert ev.status.artifact.uri == "file:///var/run/aiaas/artifacts" and ev.status.artifact.version is None


@pytest.mark.parametrize(("policy", "replicas", "keep_service"),
                         [("Running", 0, True), ("All", 0, False), ("None", 2, True)])
def test_clean_pod_policy_on_finish(policy, replicas, keep_service):
    j = running_job(runPolicy={"cleanPodPolicy": policy})
    ev = step(j, [exited("lenet-0", 0, SUCCESS), exited("lenet-1", 0, SUCCESS)])
    assert ev.status.phase == "Succeeded"
    assert (ev.replicas, ev.keep_service) == (replicas, keep_service)
    later = step(then(j, ev), [], now=T0 + timedelta(minutes=1))
    assert (later.replicas, later.keep_service) == (replicas, keep_service)


def test_unschedulable_pod_names_the_schedulers_reason():
    j = job(nodes=1, topology={"nodes": 1, "resources": {"limits": {"nvidia.com/gpu": 16}}})
    ev = step(j, [unschedulable("lenet-0")])
    assert ev.status.phase == "Created" and ev.status.reason == "Unschedulable"
    assert "lenet-0 cannot be scheduled" in ev.status.message
    assert "2 Insufficient nvidia.com/gpu" in ev.status.message
    assert cond(ev, "Running").reason == "Unschedulable"
    assert [(e.type, e.reason) for e in ev.events] == [("Normal", "Created"), ("Warning", "Unschedulable")]
    again = step(then(j, ev), [unschedulable("lenet-0")])
    assert again.events == [], "one event per reason, not one per reconcile"


def test_image_pull_failure_names_the_image():
    ev = step(job(nodes=1), [image_pull_backoff("lenet-0")])
    assert ev.status.reason == "ImagePullBackOff"
    assert "localhost/aiaas-trainer:typo" in ev.status.message and "Back-off pulling" in ev.status.message


def test_running_job_losing_a_pod_stays_running_and_says_why():
    ev = step(running_job(), [running("lenet-0"), unschedulable("lenet-1")])
    assert ev.status.phase == "Running" and ev.status.reason == "Unschedulable"
    assert cond(ev, "Running").status == "False"


def test_active_deadline():
    j = running_job(runPolicy={"activeDeadlineSeconds": 60})
    pods = [running("lenet-0"), running("lenet-1")]
    ev = step(j, pods, now=T0 + timedelta(seconds=45))
    assert ev.status.phase == "Running" and ev.requeue_after == pytest.approx(15)
    ev = step(j, pods, now=T0 + timedelta(seconds=60))
    assert ev.status.phase == "Failed" and ev.status.reason == "DeadlineExceeded"
    assert "activeDeadlineSeconds (60s)" in ev.status.message and ev.replicas == 0


def test_ttl_after_finished_deletes_the_job_later():
    j = running_job(runPolicy={"ttlSecondsAfterFinished": 30})
    ev = step(j, [exited("lenet-0", 0, SUCCESS), exited("lenet-1", 0, SUCCESS)])
    assert ev.requeue_after == 30 and not ev.delete_job
    j = then(j, ev)
    assert step(j, [], now=T0 + timedelta(seconds=20)).requeue_after == pytest.approx(10)
    assert step(j, [], now=T0 + timedelta(seconds=30)).delete_job


def test_finished_is_final():
    j = running_job()
    j = then(j, step(j, [exited("lenet-0", 0, SUCCESS), exited("lenet-1", 0, SUCCESS)]))
    ev = step(j, [exited("lenet-0", 1, "restarted container crashed"), running("lenet-1")],
              now=T0 + timedelta(minutes=5))
    assert ev.status.phase == "Succeeded" and ev.events == [] and ev.status.restart_count == 0


def test_suspend_scales_to_zero_and_resume_continues():
    j = running_job()
    j = j.model_copy(update={"spec": j.spec.model_copy(update={"suspend": True})})
    ev = step(j, [running("lenet-0"), running("lenet-1")], now=T0 + timedelta(seconds=10))
    assert ev.status.phase == "Suspended" and ev.replicas == 0 and ev.stale_pods == []
    assert cond(ev, "Suspended").status == "True" and cond(ev, "Running").status == "False"
    assert reasons(ev) == ["Suspended"]
    j = then(j, ev)
    j = j.model_copy(update={"spec": j.spec.model_copy(update={"suspend": False})})
    ev = step(j, [], now=T0 + timedelta(minutes=10))
    assert ev.status.phase == "Created" and ev.replicas == 2
    assert cond(ev, "Suspended").status == "False" and cond(ev, "Suspended").reason == "Resumed"
    assert ev.status.start_time == rfc3339(T0 + timedelta(minutes=10)), "the deadline counts from the resume"
    assert "Resumed" in reasons(ev)
    j = then(j, ev)
    ev = step(j, [running("lenet-0"), running("lenet-1")], now=T0 + timedelta(minutes=11))
    assert ev.status.phase == "Running" and ev.status.restart_count == 0


def test_created_suspended_never_starts_pods():
    ev = step(job(suspend=True), [])
    assert ev.status.phase == "Suspended" and ev.replicas == 0 and ev.status.start_time is None


def test_elastic_job_runs_with_min_nodes_ready():
    j = job(nodes=4, elastic={"minNodes": 2, "maxNodes": 4})
    ev = step(j, [running("lenet-0"), running("lenet-1"), unschedulable("lenet-2"), starting("lenet-3")])
    assert ev.status.phase == "Running" and ev.replicas == 4 and ev.status.ready_replicas == 2


def test_progress_is_merged_without_churn():
    j = running_job()
    pods = [running("lenet-0"), running("lenet-1")]
    p = api.Progress(epoch=1, step=120, total_steps=500, loss=0.43, metric=0.8, samples_per_second=900.0)
    ev = step(j, pods, progress=p)
    assert ev.status.progress and ev.status.progress.summary == "120/500 (24%)"
    assert ev.status.progress.updated == rfc3339(T0)
    j = then(j, ev)
    ev2 = step(j, pods, now=T0 + timedelta(seconds=10), progress=p)
    assert ev2.status.dump() == ev.status.dump(), "same reading: no status write"
    ev3 = step(j, pods, now=T0 + timedelta(seconds=10), progress=p.model_copy(update={"step": 130}))
    assert ev3.status.progress and ev3.status.progress.updated == rfc3339(T0 + timedelta(seconds=10))
    assert merge_progress(None, None, T0) is None


def test_conditions_keep_their_transition_time_while_unchanged():
    c = set_condition([], "Running", "True", "Running", "ok", T0, 1)
    c = set_condition(c, "Running", "True", "Running", "still ok", T0 + timedelta(hours=1), 1)
    assert c[0].last_transition_time == rfc3339(T0) and c[0].message == "still ok"
    c = set_condition(c, "Running", "False", "Unschedulable", "gone", T0 + timedelta(hours=2), 2)
    assert c[0].last_transition_time == rfc3339(T0 + timedelta(hours=2)) and c[0].observed_generation == 2


def test_reconcile_errors_reach_status_without_changing_the_phase():
    out = error_status(api.TrainingJobStatus, {"phase": "Running", "restartCount": 1}, "ReconcileError",
                       "reconcile failed (will retry): statefulsets.apps is forbidden", T0, 3,
                       default_phase="Pending", condition="Running")
    assert out["phase"] == "Running" and out["reason"] == "ReconcileError" and out["restartCount"] == 1
    assert "forbidden" in out["message"]
    assert [c["reason"] for c in out["conditions"] if c["type"] == "Running"] == ["ReconcileError"]


@pytest.mark.parametrize(("term", "expected"), [
    ({"exitCode": 0, "reason": "Completed", "message": json.dumps(SUCCESS)}, ("Succeeded", 500)),
    ({"exitCode": 1, "reason": "Error", "message": "Traceback (most recent call last):\n..."}, ("RetryableError", None)),
    ({"exitCode": 78, "reason": "Error"}, ("PermanentError", None)),
    ({"exitCode": 143, "reason": "Error"}, ("Preempted", None)),
    ({"exitCode": 1, "reason": "Error", "message": json.dumps(outcome("PermanentError", "InvalidConfig", "x"))},
     ("PermanentError", None)),
    ({"exitCode": 78, "message": json.dumps(outcome("RetryableError", "Error", "peer said so"))},
     ("PermanentError", None)),
    ({"exitCode": 137, "reason": "OOMKilled", "message": ""}, ("RetryableError", None)),
])
def test_termination_messages(term, expected):
    t = parse_termination(term)
    assert (t.outcome, t.step) == expected


# ------------------------------------------------------------------------------------------------ progress
TRAINER_METRICS = f"""# HELP {m.TRAINER_STEP} Optimizer steps done.
# TYPE {m.TRAINER_STEP} gauge
{m.TRAINER_STEP}{{job="lenet",rank="1"}} 119.0
{m.TRAINER_STEP}{{job="lenet",rank="0"}} 120.0
# TYPE {m.TRAINER_TOTAL_STEPS} gauge
{m.TRAINER_TOTAL_STEPS}{{job="lenet",rank="0"}} 500.0
# TYPE {m.TRAINER_EPOCH} gauge
{m.TRAINER_EPOCH}{{job="lenet",rank="0"}} 2.0
# TYPE {m.TRAINER_LOSS} gauge
{m.TRAINER_LOSS}{{job="lenet",rank="0"}} 0.4321
# TYPE {m.TRAINER_ACCURACY} gauge
{m.TRAINER_ACCURACY}{{job="lenet",rank="0"}} 0.875
# TYPE {m.TRAINER_SAMPLES_PER_SECOND} gauge
{m.TRAINER_SAMPLES_PER_SECOND}{{job="lenet",rank="0"}} 1234.5
# TYPE process_cpu_seconds_total counter
process_cpu_seconds_total 3.2
"""


def test_parse_progress_reads_rank_0():
    p = parse_progress(TRAINER_METRICS)
    assert p == api.Progress(epoch=2, step=120, total_steps=500, loss=0.4321, metric=0.875,
                             samples_per_second=1234.5)
    assert parse_progress("process_cpu_seconds_total 3.2\n") is None


def test_scrape_survives_a_dead_endpoint():
    def refuse(url: str, timeout: float) -> str:
        raise ConnectionRefusedError(url)

    assert scrape("http://10.0.0.1:9090/metrics", 0.1, refuse) is None
    assert scrape("http://x/metrics", 0.1, lambda u, t: TRAINER_METRICS) is not None


def test_a_custom_command_succeeds_on_exit_0_without_a_termination_message():
    """A PyTorchJob script writes no outcome: exit code 0 on every pod is success (issue 12, item 4)."""
    j = job(3, {"phase": "Running"}, trainer={"command": ["python", "-c", "pass"]})
    ev = step(j, [exited(f"lenet-{i}", 0) for i in range(3)])
    assert ev.status.phase == "Succeeded" and ev.status.succeeded_replicas == 3
    ev = step(j, [exited("lenet-0", 0), exited("lenet-1", 1, "Traceback ... RuntimeError"), exited("lenet-2", 0)])
    assert ev.status.phase == "Restarting" and "RuntimeError" in (ev.status.message or "")


def test_success_takes_the_final_accuracy_from_the_termination_message():
    """A short job can end between two progress scrapes: status still shows its final step and accuracy."""
    final = json.dumps({"outcome": "Succeeded", "reason": "Completed", "message": "trained", "exitCode": 0,
                        "rank": 0, "step": 528, "artifact": "/var/run/aiaas/artifacts", "accuracy": 0.9777})
    ev = step(running_job(), [exited("lenet-0", 0, final), exited("lenet-1", 0, final)])
    assert ev.status.phase == "Succeeded"
    assert ev.status.progress is not None
    assert (ev.status.progress.step, ev.status.progress.metric) == (528, 0.9777)
