"""InferenceService status (operator/status_isvc.py) and the operator's other pure helpers."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from aiaas.contract import launch
from aiaas.operator import api
from aiaas.operator.reconciler import parse
from aiaas.operator.render import (
    JobPlan,
    RenderSettings,
    ServicePlan,
    render_inferenceservice,
    render_trainingjob,
)
from aiaas.operator.runtime import manifests_hash, newer, status_patch
from aiaas.operator.status_isvc import evaluate_service

T0 = datetime(2026, 5, 1, 12, 0, 0, tzinfo=timezone.utc)


def isvc(**model: Any) -> api.InferenceService:
    return api.InferenceService.model_validate({
        "apiVersion": api.API_VERSION, "kind": "InferenceService",
        "metadata": {"name": "digits", "namespace": "ml", "uid": "u1", "generation": 1},
        "spec": {"model": model or {"trainingJob": "lenet"}},
    })


def tj(phase: str, **status: Any) -> dict[str, Any]:
    return {"metadata": {"name": "lenet", "namespace": "ml"}, "status": {"phase": phase, **status}}


def deployment(ready: int, replicas: int = 1) -> dict[str, Any]:
    return {"metadata": {"name": "digits"}, "spec": {"replicas": replicas},
            "status": {"replicas": replicas, "readyReplicas": ready, "conditions": [
                {"type": "Available", "status": "True" if ready else "False"},
                {"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable"}]}}


def cond(st: api.InferenceServiceStatus, t: str) -> api.Condition:
    return next(c for c in st.conditions if c.type == t)


def test_waits_for_a_running_trainingjob():
    ev = evaluate_service(isvc(), tj("Running", progress={"summary": "120/500 (24%)"}), None, T0)
    st = ev.status
    assert st.phase == "WaitingForModel" and ev.storage_uri is None
    mr = cond(st, "ModelReady")
    assert (mr.status, mr.reason) == ("False", "WaitingForTrainingJob")
    assert mr.message == "waiting for TrainingJob lenet to succeed (phase Running, progress 120/500 (24%))"
    assert cond(st, "Ready").status == "False" and cond(st, "PredictorReady").status == "False"
    assert st.url == "http://digits.ml.svc/v2/models/digits"
    assert st.model == api.ServedModel(source="trainingjob/lenet")
    assert [e.reason for e in ev.events] == ["WaitingForTrainingJob"]


def test_missing_and_failed_jobs_say_so():
    st = evaluate_service(isvc(), None, None, T0).status
    assert st.reason == "TrainingJobNotFound" and "does not exist in namespace ml" in (st.message or "")
    st = evaluate_service(isvc(), tj("Failed", reason="BackoffLimitExceeded", message="x"), None, T0).status
    assert st.phase == "Failed" and st.reason == "TrainingJobFailed" and "BackoffLimitExceeded" in (st.message or "")


def test_succeeded_job_is_served_from_its_artifact():
    job = tj("Succeeded", artifact={"uri": "pvc://models/lenet/artifacts", "version": "500"})
    ev = evaluate_service(isvc(), job, None, T0)
    assert ev.storage_uri == "pvc://models/lenet/artifacts" and ev.status.phase == "Deploying"
    assert cond(ev.status, "ModelReady").status == "True"
    assert ev.status.model == api.ServedModel(source="trainingjob/lenet", uri="pvc://models/lenet/artifacts",
                                              version="500")
    ready = evaluate_service(isvc(), job, deployment(1), T0).status
    assert ready.phase == "Ready" and ready.ready_replicas == 1
    assert all(cond(ready, t).status == "True" for t in ("Ready", "PredictorReady", "ModelReady"))


def test_an_artifact_inside_the_pods_cannot_be_served():
    ev = evaluate_service(isvc(), tj("Succeeded", artifact={"uri": "file:///var/run/aiaas/artifacts"}), None, T0)
    assert ev.status.phase == "Failed" and ev.status.reason == "ArtifactNotServable" and ev.storage_uri is None
    assert "spec.storage" in (ev.status.message or "")


def test_storage_uri_needs_no_job():
    ev = evaluate_service(isvc(storageUri="pvc://models/v3"), None, deployment(0), T0)
    assert ev.storage_uri == "pvc://models/v3" and ev.status.phase == "Deploying"
    assert ev.status.reason == "ReplicasNotReady"


def test_hpa_owns_the_deployment_replicas():
    svc = api.InferenceService.model_validate({
        "apiVersion": api.API_VERSION, "kind": "InferenceService", "metadata": {"name": "d", "namespace": "ml"},
        "spec": {"model": {"storageUri": "pvc://m/x"}, "minReplicas": 1, "maxReplicas": 3}})
    out = render_inferenceservice(svc, RenderSettings(), ServicePlan(hpa_owns_replicas=True))
    dep = next(m for m in out if m["kind"] == "Deployment")
    assert "replicas" not in dep["spec"]
    fixed = render_inferenceservice(isvc(storageUri="pvc://m/x"), RenderSettings())
    assert render_inferenceservice(isvc(storageUri="pvc://m/x"), RenderSettings(),
                                   ServicePlan(hpa_owns_replicas=True)) == fixed, "no HPA: the replicas stay ours"


def test_restart_generation_is_stamped_on_the_pod_template():
    job = api.TrainingJob.model_validate({"apiVersion": api.API_VERSION, "kind": "TrainingJob",
                                          "metadata": {"name": "lenet", "namespace": "ml", "uid": "u"}})
    out = render_trainingjob(job, RenderSettings(), JobPlan(restart_generation=3))
    pod = next(m for m in out if m["kind"] == "Pod")  # a one-node job's bare pod
    assert pod["metadata"]["annotations"][launch.ANNOTATION_RESTART] == "3"
    sts = render_trainingjob(job, RenderSettings(), JobPlan(restart_generation=3, workload="StatefulSet"))
    assert next(m for m in sts if m["kind"] == "StatefulSet")["spec"]["template"]["metadata"]["annotations"][
        launch.ANNOTATION_RESTART] == "3"
    assert manifests_hash(out) != manifests_hash(render_trainingjob(job, RenderSettings(),
                                                                    JobPlan(restart_generation=4)))
    assert launch.ANNOTATION_RESTART not in str(render_trainingjob(job, RenderSettings())), "no plan: as written"


def test_status_patch_only_on_change_and_removes_fields():
    old = {"phase": "Running", "reason": "Running", "lastReconcileTime": "2026-01-01T00:00:00Z", "artifact": {}}
    assert status_patch(old, {"phase": "Running", "reason": "Running", "artifact": {}}, T0) is None
    patch = status_patch(old, {"phase": "Failed", "reason": "DeadlineExceeded"}, T0)
    assert patch == {"phase": "Failed", "reason": "DeadlineExceeded", "artifact": None,
                     "lastReconcileTime": "2026-05-01T12:00:00Z"}


def test_cache_keeps_the_newer_resource_version():
    assert newer(None, {"metadata": {"resourceVersion": "5"}})
    assert not newer({"metadata": {"resourceVersion": "7"}}, {"metadata": {"resourceVersion": "5"}})
    assert newer({"metadata": {"resourceVersion": "7"}}, {"metadata": {"resourceVersion": "12"}})


def test_an_unreadable_status_does_not_block_the_job():
    body = {"apiVersion": api.API_VERSION, "kind": "TrainingJob", "metadata": {"name": "x", "namespace": "ml"},
            "spec": {}, "status": {"phase": "Running", "fromTheFuture": True}}
    job = parse(api.TrainingJob, body)
    assert job.status is None and job.metadata.name == "x"
