"""The reconcilers (operator/reconcile_*.py) from snapshots, and the runtime's store and order of work
(operator/runtime.py). No cluster: a reconciler is a pure function of its snapshot."""

from __future__ import annotations

import concurrent.futures
import json
import time
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from aiaas.contract import launch
from aiaas.contract import outcome as oc
from aiaas.operator import api
from aiaas.operator.k8s import KubeError
from aiaas.operator.reconcile_inferenceservice import InferenceServiceReconciler
from aiaas.operator.reconcile_trainingjob import TrainingJobReconciler
from aiaas.operator.reconciler import InvalidSpec, ObjectRef, Snapshot, slim_pod
from aiaas.operator.render import RenderSettings
from aiaas.operator.runtime import Runtime, Store
from aiaas.operator.settings import OperatorSettings

T0 = datetime(2026, 5, 1, 12, 0, 0, tzinfo=timezone.utc)
JOBS = TrainingJobReconciler(RenderSettings(), metrics_url_template="http://{pod_ip}:{port}/metrics")
SERVICES = InferenceServiceReconciler(RenderSettings())
ISOLATION = ("apply", f"NetworkPolicy/{launch.ISOLATION_POLICY_NAME}")  # the namespace's, applied before children


def job_body(status: dict[str, Any] | None = None, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "apiVersion": api.API_VERSION, "kind": "TrainingJob",
        "metadata": {"name": "lenet", "namespace": "ml", "uid": "u1", "generation": 1, "resourceVersion": "10"},
        "spec": {"topology": {"nodes": 2}, **spec},
    }
    if status is not None:
        body["status"] = status
    return body


def owner(kind: str, name: str, uid: str | None) -> list[dict[str, Any]]:
    return [{"apiVersion": "v1", "kind": kind, "name": name, "uid": uid, "controller": True}] if uid else []


def pod(name: str, gen: int = 0, *, exit_code: int | None = None, outcome: str | None = None,
        ip: str = "10.0.0.7", owner_uid: str | None = "s1") -> dict[str, Any]:
    cs: dict[str, Any] = {"name": launch.TRAINER_CONTAINER, "image": "img", "ready": exit_code is None,
                          "state": {"running": {}}}
    if exit_code is not None:
        msg = json.dumps({"outcome": outcome, "message": "boom", "step": 7}) if outcome else ""
        cs["state"] = {"terminated": {"exitCode": exit_code, "message": msg}}
    return {
        "metadata": {"name": name, "namespace": "ml", "uid": f"{name}-{gen}", "resourceVersion": "1",
                     "labels": {launch.LABEL_JOB: "lenet", launch.POD_INDEX_LABEL: name[-1]},
                     "annotations": {launch.ANNOTATION_RESTART: str(gen)},
                     "ownerReferences": owner("StatefulSet", "lenet", owner_uid)},
        "spec": {"containers": [{"name": launch.TRAINER_CONTAINER, "image": "img"}]},
        "status": {"phase": "Running", "podIP": ip, "containerStatuses": [cs],
                   "conditions": [{"type": "Ready", "status": str(exit_code is None)}]},
    }


def sts(replicas: int, owner_uid: str | None = "u1", uid: str = "s1") -> dict[str, Any]:
    return {"metadata": {"name": "lenet", "namespace": "ml", "uid": uid, "resourceVersion": "3",
                         "ownerReferences": owner("TrainingJob", "lenet", owner_uid)},
            "spec": {"replicas": replicas}}


def snap(body: dict[str, Any], pods: list[dict[str, Any]] = (), statefulset: dict[str, Any] | None = None,
         related: dict[Any, Any] | None = None, probe: Any = None, now: datetime = T0) -> Snapshot:
    children = {"Pod": tuple(pods), "StatefulSet": (statefulset,) if statefulset else (), "Deployment": ()}
    return Snapshot(("ml", body["metadata"]["name"]), body, children, related or {}, probe, now)


def kinds(result: Any) -> list[str]:
    return [m["kind"] for m in result.children]


def pod_template_annotations(result: Any) -> dict[str, str]:
    s = next(m for m in result.children if m["kind"] == "StatefulSet")
    return s["spec"]["template"]["metadata"]["annotations"]


# ------------------------------------------------------------------------------------------- TrainingJob
def test_a_new_job_wants_its_service_and_statefulset_stamped_with_generation_zero():
    r = JOBS.reconcile(snap(job_body()))
    assert kinds(r) == ["NetworkPolicy", "StatefulSet", "Service"] and r.absent == () and r.evict == ()
    assert pod_template_annotations(r)[launch.ANNOTATION_RESTART] == "0"
    assert r.drifted, "no StatefulSet observed yet: apply even if it was applied before"
    assert r.status["phase"] == "Created" and [e.reason for e in r.events] == ["Created"]


def test_a_matching_statefulset_is_not_drift():
    r = JOBS.reconcile(snap(job_body({"phase": "Running"}), [pod("lenet-0"), pod("lenet-1")], sts(2)))
    assert not r.drifted and r.status["phase"] == "Running"


def test_a_retryable_failure_restarts_the_gang_in_the_next_generation():
    pods = [pod("lenet-0"), pod("lenet-1", exit_code=1, outcome=oc.RETRYABLE)]
    r = JOBS.reconcile(snap(job_body({"phase": "Running"}), pods, sts(2)))
    assert r.status["phase"] == "Restarting" and r.status["restartCount"] == 1
    assert pod_template_annotations(r)[launch.ANNOTATION_RESTART] == "1"
    assert r.evict == (ObjectRef("v1", "Pod", "lenet-0"), ObjectRef("v1", "Pod", "lenet-1"))


def test_a_finished_job_only_scales_its_statefulset_and_clean_pod_policy_all_drops_the_service():
    body = job_body({"phase": "Succeeded", "completionTime": "2026-05-01T11:00:00Z"},
                    runPolicy={"cleanPodPolicy": "All"})
    r = JOBS.reconcile(snap(body, [], sts(2)))
    assert kinds(r) == ["StatefulSet"] and r.children[0]["spec"]["replicas"] == 0
    assert r.absent == (ObjectRef("v1", "Service", "lenet-workers"),) and r.drifted


def test_ttl_zero_deletes_the_job_and_wants_no_children():
    pods = [pod("lenet-0", exit_code=0, outcome=oc.SUCCEEDED), pod("lenet-1", exit_code=0, outcome=oc.SUCCEEDED)]
    r = JOBS.reconcile(snap(job_body({"phase": "Running"}, runPolicy={"ttlSecondsAfterFinished": 0}), pods, sts(2)))
    assert r.status["phase"] == "Succeeded" and r.delete_self and r.children == () and not r.drifted


# a one-node job: one bare pod the job controls itself (render.trainingjob.workload_kind)
def one_node(status: dict[str, Any] | None = None, **spec: Any) -> dict[str, Any]:
    return job_body(status, **{"topology": {"nodes": 1}, **spec})


def bare_pod(gen: int = 0, **kw: Any) -> dict[str, Any]:
    p = pod("lenet-0", gen, owner_uid=None, **kw)
    p["metadata"]["ownerReferences"] = owner("TrainingJob", "lenet", "u1")
    return p


def test_a_one_node_job_wants_a_bare_pod_which_once_there_is_never_rendered_again():
    fresh = JOBS.reconcile(snap(one_node()))
    assert kinds(fresh) == ["NetworkPolicy", "Pod", "Service"] and fresh.drifted
    worker = fresh.children[1]
    assert worker["metadata"]["name"] == "lenet-0" and worker["spec"]["subdomain"] == "lenet-workers"
    assert worker["metadata"]["annotations"][launch.ANNOTATION_RESTART] == "0"
    there = JOBS.reconcile(snap(one_node({"phase": "Running"}), [bare_pod()]))
    assert there.status["phase"] == "Running" and there.status["readyReplicas"] == 1
    assert "Pod" not in kinds(there) and not there.drifted and there.absent == ()
    assert there.children_key == JOBS.reconcile(snap(one_node({"phase": "Running"}))).children_key, \
        "a pod appearing or going is drift, not a new plan: nothing else is applied again"


def test_a_bare_pod_is_restarted_by_deleting_it_and_recreated_in_the_next_generation_once_gone():
    failed = bare_pod(exit_code=1, outcome=oc.RETRYABLE)
    r = JOBS.reconcile(snap(one_node({"phase": "Running"}), [failed]))
    assert r.status["restartCount"] == 1 and r.evict == (ObjectRef("v1", "Pod", "lenet-0"),)
    assert "Pod" not in kinds(r), "the name is still taken: the new pod waits for the old one to go"
    failed["metadata"]["deletionTimestamp"] = "2026-05-01T12:00:01Z"
    going = JOBS.reconcile(snap(one_node(r.status), [failed]))
    assert "Pod" not in kinds(going) and going.evict == () and going.absent == ()
    gone = JOBS.reconcile(snap(one_node(r.status)))
    new = next(m for m in gone.children if m["kind"] == "Pod")
    assert new["metadata"]["annotations"][launch.ANNOTATION_RESTART] == "1" and gone.drifted


def test_an_evicted_bare_pod_is_deleted_so_that_a_new_one_is_made_as_a_statefulset_would():
    evicted = bare_pod()
    evicted["status"] = {"phase": "Failed", "reason": "Evicted", "message": "The node was low on resource: memory."}
    r = JOBS.reconcile(snap(one_node({"phase": "Running"}), [evicted]))
    assert r.evict == (ObjectRef("v1", "Pod", "lenet-0"),) and r.status["restartCount"] == 0
    sts_pod = pod("lenet-0")
    sts_pod["status"]["phase"] = "Failed"
    assert JOBS.reconcile(snap(job_body({"phase": "Running"}), [sts_pod, pod("lenet-1")], sts(2))).evict == (), \
        "a StatefulSet's pods are its controller's to replace"


def test_a_finished_one_node_job_deletes_its_pod_unless_clean_pod_policy_none_keeps_it():
    done = bare_pod(exit_code=0, outcome=oc.SUCCEEDED)
    r = JOBS.reconcile(snap(one_node({"phase": "Running"}), [done]))
    assert r.status["phase"] == "Succeeded" and "Pod" not in kinds(r)
    assert r.absent == (ObjectRef("v1", "Pod", "lenet-0"),)
    kept = JOBS.reconcile(snap(one_node({"phase": "Running"}, runPolicy={"cleanPodPolicy": "None"}), [done]))
    assert kept.status["phase"] == "Succeeded" and kept.absent == () and "Pod" not in kinds(kept)
    after = JOBS.reconcile(snap(one_node({"phase": "Succeeded", "completionTime": "2026-05-01T11:00:00Z"})))
    assert "Pod" not in kinds(after), "what was cleaned up is never recreated"
    suspended = JOBS.reconcile(snap(one_node({"phase": "Running"}, suspend=True), [bare_pod()]))
    assert suspended.status["phase"] == "Suspended" and suspended.absent == (ObjectRef("v1", "Pod", "lenet-0"),)


def test_a_one_node_job_that_has_a_statefulset_keeps_it_and_a_pod_it_does_not_control_counts_for_nothing():
    r = JOBS.reconcile(snap(one_node({"phase": "Running"}), [pod("lenet-0")], sts(1)))
    assert "StatefulSet" in kinds(r) and "Pod" not in kinds(r) and r.status["readyReplicas"] == 1
    stranger = pod("lenet-0", owner_uid=None)
    stranger["metadata"]["ownerReferences"] = owner("TrainingJob", "lenet", "someone-else")
    r = JOBS.reconcile(snap(one_node({"phase": "Created"}), [stranger]))
    assert "Pod" in kinds(r) and r.status.get("readyReplicas") in (0, None), \
        "rendered anyway: the runtime reports the name conflict and never writes that pod"


def test_an_invalid_spec_names_the_field():
    with pytest.raises(InvalidSpec, match=r"spec\.topology\.nodez.*unknown field"):
        JOBS.reconcile(snap(job_body(topology={"nodez": 2})))


def test_the_probe_scrapes_rank_0_of_the_current_generation_only_while_running():
    seen: list[str] = []

    def fetch(url: str, timeout: float) -> str:
        seen.append(url)
        return "aiaas_trainer_step 5\naiaas_trainer_total_steps 10\n"

    rec = TrainingJobReconciler(RenderSettings(), metrics_url_template="http://{pod_ip}:{port}/m", fetch=fetch)
    pods = [pod("lenet-1", ip="10.0.0.9"), pod("lenet-0", ip="10.0.0.8")]
    assert rec.probe(snap(job_body({"phase": "Created"}), pods, sts(2))) is None and seen == []
    progress = rec.probe(snap(job_body({"phase": "Running"}), pods, sts(2)))
    assert seen == [f"http://10.0.0.8:{launch.METRICS_PORT}/m"] and progress is not None and progress.step == 5
    r = rec.reconcile(snap(job_body({"phase": "Running"}), [pod("lenet-0"), pod("lenet-1")], sts(2), probe=progress))
    assert r.status["progress"]["summary"] == "5/10 (50%)"


# -------------------------------------------------------------------------------------- InferenceService
def isvc_body(**spec: Any) -> dict[str, Any]:
    return {"apiVersion": api.API_VERSION, "kind": "InferenceService",
            "metadata": {"name": "digits", "namespace": "ml", "uid": "i1", "generation": 1},
            "spec": {"model": {"trainingJob": "lenet"}, **spec}}


def test_a_service_refers_to_its_training_job_and_waits_for_it():
    body = isvc_body()
    assert SERVICES.references(body) == (("TrainingJob", ("ml", "lenet")),)
    r = SERVICES.reconcile(snap(body, related={("TrainingJob", ("ml", "lenet")): job_body({"phase": "Running"})}))
    assert kinds(r) == ["Service"] and r.status["phase"] == "WaitingForModel" and not r.drifted


def test_a_succeeded_job_gets_served_and_an_hpa_owns_the_replicas():
    job = job_body({"phase": "Succeeded", "artifact": {"uri": "pvc://c/lenet/artifacts", "version": "7"}})
    r = SERVICES.reconcile(snap(isvc_body(minReplicas=1, maxReplicas=3),
                                related={("TrainingJob", ("ml", "lenet")): job}))
    assert kinds(r) == ["Service", "Deployment", "HorizontalPodAutoscaler"] and r.drifted
    dep = r.children[1]
    assert "replicas" not in dep["spec"]
    assert dep["spec"]["template"]["spec"]["containers"][0]["name"] == launch.SERVER_CONTAINER


# ----------------------------------------------------------------------------------------------- runtime
def test_the_store_keeps_the_newest_and_ignores_an_older_namesakes_deletion():
    store = Store()
    assert store.put("TrainingJob", job_body())
    older = job_body()
    older["metadata"]["resourceVersion"] = "9"
    assert not store.put("TrainingJob", older)
    store.put_child("Pod", ("ml", "lenet"), slim_pod(pod("lenet-0", gen=1)))
    store.remove_child("Pod", ("ml", "lenet"), pod("lenet-0", gen=0))  # the previous pod of that name
    s = store.snapshot(JOBS, ("ml", "lenet"), T0)
    assert s is not None and [p["metadata"]["uid"] for p in s.children["Pod"]] == ["lenet-0-1"]


def test_the_store_tells_a_change_from_an_echo_of_what_it_holds():
    store = Store()
    body = job_body()
    assert store.put("TrainingJob", body)
    assert not store.put("TrainingJob", job_body()), "the watch's echo of the stored version (our status patch)"
    newer = job_body({"phase": "Running"})
    newer["metadata"]["resourceVersion"] = str(int(body["metadata"]["resourceVersion"]) + 1)
    assert store.put("TrainingJob", newer)
    p = slim_pod(pod("lenet-0"))
    assert store.put_child("Pod", ("ml", "lenet"), p)
    bound = {**p, "metadata": {**p["metadata"], "resourceVersion": "99"}}
    assert not store.put_child("Pod", ("ml", "lenet"), bound), "a new version that slims to the same pod"
    ran = {**bound, "status": {**bound["status"], "phase": "Succeeded"},
           "metadata": {**bound["metadata"], "resourceVersion": "100"}}
    assert store.put_child("Pod", ("ml", "lenet"), ran)
    s = store.snapshot(JOBS, ("ml", "lenet"), T0)
    assert s is not None and s.children["Pod"][0]["status"]["phase"] == "Succeeded"


def test_references_find_the_dependents_and_follow_spec_changes():
    store = Store()
    body = isvc_body()
    store.put("InferenceService", body, SERVICES.references(body))
    assert store.referred_by(("TrainingJob", ("ml", "lenet"))) == [("InferenceService", ("ml", "digits"))]
    moved = isvc_body(model={"trainingJob": "other"})
    store.put("InferenceService", moved, SERVICES.references(moved))
    assert store.referred_by(("TrainingJob", ("ml", "lenet"))) == []


class RecordingKube:
    """The API server's side of a reconcile, recorded; ``fail_apply`` is the fault a real one rarely gives."""

    def __init__(self, fail_apply: str | None = None, objects: dict[tuple[str, str], dict[str, Any]] | None = None,
                 fail_name: str | None = None) -> None:
        self.calls: list[tuple[str, str]] = []
        self.fail_apply = fail_apply  # refuse every apply (403) with this message, or only those of fail_name
        self.fail_name = fail_name
        self.status: dict[str, Any] = {}
        self.objects = objects or {}  # (kind, name) -> what the API server holds
        self.applied_with_uid: list[tuple[str, str | None]] = []

    def get(self, api_version: str, kind: str, ns: str | None, name: str) -> dict[str, Any] | None:
        self.calls.append(("get", kind))
        return self.objects.get((kind, name))

    def apply(self, m: dict[str, Any], uid: str | None = None, create_only: bool = False) -> dict[str, Any]:
        """Server-side apply as the API server answers it, with its UID and create-only preconditions."""
        if self.fail_apply and self.fail_name in (None, m["metadata"]["name"]):
            raise KubeError(403, self.fail_apply)
        self.applied_with_uid.append((m["kind"], "create-only" if create_only else uid))
        key = (m["kind"], m["metadata"]["name"])
        held_uid = (self.objects.get(key) or {}).get("metadata", {}).get("uid")
        if uid is not None and uid != held_uid:
            self.calls.append(("refused", m["kind"]))
            raise KubeError(422 if held_uid else 409, f"uid mismatch: the provided object specified uid {uid}")
        if create_only and key in self.objects:
            self.calls.append(("refused", m["kind"]))
            raise KubeError(409, "the object has been modified; please apply your changes to the latest version")
        shared = m["metadata"]["name"] == launch.ISOLATION_POLICY_NAME
        self.calls.append(("apply", f"{m['kind']}/{launch.ISOLATION_POLICY_NAME}" if shared else m["kind"]))
        self.objects[key] = {**m, "metadata": {**m["metadata"], "uid": held_uid or f"{m['kind']}-{len(self.calls)}"}}
        return self.objects[key]

    def delete(self, api_version: str, kind: str, ns: str | None, name: str, **_: Any) -> bool:
        self.calls.append(("delete", f"{kind}/{name}"))
        return True

    def patch_status(self, api_version: str, kind: str, ns: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(("status", str(patch.get("phase"))))
        self.status = patch
        return {}

    def post_event(self, body: dict[str, Any], type_: str, reason: str, message: str) -> None:
        self.calls.append(("event", reason))


def runtime(kube: RecordingKube) -> Runtime:
    return Runtime(OperatorSettings(workers=2, retry_seconds=2.0), kube, [JOBS, SERVICES],  # type: ignore[arg-type]
                   clock=lambda: T0 + timedelta(seconds=1))


def test_the_runtime_applies_then_writes_status_then_deletes_stale_pods():
    kube = RecordingKube(objects={("StatefulSet", "lenet"): sts(2)})  # what the cache shows
    rt = runtime(kube)
    rt.store.put("TrainingJob", job_body({"phase": "Running"}))
    rt.store.put_child("StatefulSet", ("ml", "lenet"), sts(2))
    for p in (pod("lenet-0"), pod("lenet-1", exit_code=1, outcome=oc.RETRYABLE)):
        rt.store.put_child("Pod", ("ml", "lenet"), p)
    assert rt.reconcile(("TrainingJob", ("ml", "lenet"))) is None
    assert [c for c in kube.calls if c[0] not in ("event", "get")] == [
        ISOLATION, ("apply", "NetworkPolicy"), ("apply", "StatefulSet"), ("apply", "Service"), ("status", "Restarting"),
        ("delete", "Pod/lenet-0"), ("delete", "Pod/lenet-1")]


def test_a_cached_child_of_ours_is_not_read_again_and_unchanged_children_are_not_applied_again():
    kube = RecordingKube(objects={("StatefulSet", "lenet"): sts(2)})  # what the cache shows
    rt = runtime(kube)
    rt.store.put("TrainingJob", job_body({"phase": "Running", "restartCount": 0}))
    rt.store.put_child("StatefulSet", ("ml", "lenet"), sts(2))
    rt.reconcile(("TrainingJob", ("ml", "lenet")))
    assert ("get", "Service") in kube.calls and ("get", "StatefulSet") not in kube.calls, kube.calls
    assert ("apply", "StatefulSet") in kube.calls
    kube.calls.clear()
    rt.reconcile(("TrainingJob", ("ml", "lenet")))
    assert not [c for c in kube.calls if c[0] in ("get", "apply")], "same plan, same spec: nothing to apply"


def test_children_applied_before_are_updated_by_uid_without_a_read_and_a_namesake_is_never_written():
    kube = RecordingKube()
    rt = runtime(kube)
    rt.store.put("TrainingJob", job_body())
    rt.reconcile(("TrainingJob", ("ml", "lenet")))  # the first pass: what the pods need
    rt.reconcile(("TrainingJob", ("ml", "lenet")))  # the rest
    first = {kind: uid for kind, uid in kube.applied_with_uid}
    assert first == dict.fromkeys(("NetworkPolicy", "StatefulSet", "Service"), "create-only"), first
    assert not [c for c in kube.calls if c[0] == "get"], "a fresh job's children are created without a read"
    held = {kind: kube.objects[kind, name]["metadata"]["uid"] for kind, name in kube.objects}
    # a restart: a new plan, so everything is applied again, each naming the object it updates, with no read
    kube.calls.clear()
    kube.applied_with_uid.clear()
    rt.store.put("TrainingJob", job_body({"phase": "Running", "restartCount": 1}) | {"metadata": {
        **job_body()["metadata"], "resourceVersion": "12"}})
    rt.reconcile(("TrainingJob", ("ml", "lenet")))
    assert dict(kube.applied_with_uid) == held and not [c for c in kube.calls if c[0] == "get"], kube.calls
    # someone deleted the Service and put their own in its place: it is read, reported, and left alone
    theirs = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "lenet-workers", "uid": "theirs"}}
    kube.objects["Service", "lenet-workers"] = theirs
    kube.calls.clear()
    rt.store.put("TrainingJob", job_body({"phase": "Running", "restartCount": 2}) | {"metadata": {
        **job_body()["metadata"], "resourceVersion": "13"}})
    rt.reconcile(("TrainingJob", ("ml", "lenet")))
    assert kube.objects["Service", "lenet-workers"] is theirs
    assert ("get", "Service") in kube.calls
    assert any(c["type"] == "NameConflict" and c["status"] == "True" for c in kube.status["conditions"])


def test_a_one_node_jobs_pod_is_created_once_deleted_by_a_restart_and_created_again_only_once_gone():
    kube = RecordingKube()
    rt = runtime(kube)
    ref = ("TrainingJob", ("ml", "lenet"))
    rt.store.put("TrainingJob", one_node())
    rt.reconcile(ref)  # the first pass: the namespace's isolation policy, then the pod
    assert [c for c in kube.calls if c[0] == "apply"] == [ISOLATION, ("apply", "Pod")]
    rt.reconcile(ref)  # the rest: the job's own policy, the Service, the status
    assert [c for c in kube.calls if c[0] == "apply"] == [ISOLATION, ("apply", "Pod"), ("apply", "NetworkPolicy"),
                                                          ("apply", "Service")]
    assert ("Pod", "create-only") in kube.applied_with_uid
    created = kube.objects["Pod", "lenet-0"]
    assert created["metadata"]["ownerReferences"][0] == {**owner("TrainingJob", "lenet", "u1")[0],
                                                         "apiVersion": api.API_VERSION, "blockOwnerDeletion": True}
    # the pod failed: deleted, not applied again while its name is taken
    kube.calls.clear()
    rt.store.put("TrainingJob", one_node({"phase": "Running"}) | {"metadata": {**one_node()["metadata"],
                                                                                "resourceVersion": "11"}})
    rt.store.put_child("Pod", ("ml", "lenet"), bare_pod(exit_code=1, outcome=oc.RETRYABLE))
    rt.reconcile(ref)
    assert ("delete", "Pod/lenet-0") in kube.calls and ("apply", "Pod") not in kube.calls, kube.calls
    # gone: the next generation's pod is created, create-only (the UID of the deleted one is forgotten)
    del kube.objects["Pod", "lenet-0"]
    rt.store.remove_child("Pod", ("ml", "lenet"), bare_pod(exit_code=1, outcome=oc.RETRYABLE))
    rt.store.put("TrainingJob", one_node({"phase": "Restarting", "restartCount": 1}) | {"metadata": {
        **one_node()["metadata"], "resourceVersion": "12"}})
    kube.calls.clear()
    kube.applied_with_uid.clear()
    rt.reconcile(ref)
    assert kube.objects["Pod", "lenet-0"]["metadata"]["annotations"][launch.ANNOTATION_RESTART] == "1"
    assert ("Pod", "create-only") in kube.applied_with_uid and ("refused", "Pod") not in kube.calls, kube.calls


def test_a_fresh_job_gets_what_its_pods_need_first_and_its_service_and_status_in_a_second_pass():
    """Under a burst of new jobs every one gets its pods going before any gets its Service and status: the
    first pass applies only what the pods need and is queued ahead of second passes."""
    kube = RecordingKube()
    rt = runtime(kube)
    ref = ("TrainingJob", ("ml", "lenet"))
    rt.store.put("TrainingJob", job_body())
    assert rt.reconcile(ref) == 0.0, "the rest at once, behind other first passes"
    assert kube.calls == [ISOLATION, ("apply", "NetworkPolicy"), ("apply", "StatefulSet")], kube.calls
    assert not rt._first_pass_due(ref), "its second pass waits behind the first passes of other new jobs"
    assert rt._first_pass_due(("TrainingJob", ("ml", "another")))
    kube.calls.clear()
    rt.reconcile(ref)
    rt._events.submit(lambda: None).result()  # the events thread has posted what the pass gave it
    assert [c for c in kube.calls if c[0] != "event"] == [("apply", "Service"), ("status", "Created")], kube.calls
    assert ("event", "Created") in kube.calls, "events come with the second pass"
    kube.calls.clear()
    rt.reconcile(ref)
    rt._events.shutdown(wait=True)
    assert not [c for c in kube.calls if c[0] in ("apply", "get")], "then nothing to apply again"


def test_the_namespaces_isolation_policy_comes_before_any_child_once_per_resync_period_and_per_namespace():
    kube = RecordingKube()
    rt = runtime(kube)
    for ns, name in (("ml", "a"), ("ml", "b"), ("other", "c")):
        body = one_node()
        body["metadata"] |= {"namespace": ns, "name": name, "uid": f"u-{name}"}
        rt.store.put("TrainingJob", body)
        rt.reconcile(("TrainingJob", (ns, name)))
        assert kube.calls[-1] == ("apply", "Pod"), "the pod is created right after, its own policy later"
    assert kube.calls.count(ISOLATION) == 2, "once for each namespace, not for each job"
    kube.calls.clear()
    rt.reconcile(("TrainingJob", ("ml", "a")))  # the second pass: its policy and Service, still within the period
    assert ISOLATION not in kube.calls and ("apply", "NetworkPolicy") in kube.calls, kube.calls
    kube.calls.clear()
    rt.reconcile(("TrainingJob", ("ml", "a")))
    assert not [c for c in kube.calls if c[0] == "apply"], "a steady job writes nothing, the shared policy neither"
    again = Runtime(OperatorSettings(workers=2, resync_seconds=0.0), kube, [JOBS])  # type: ignore[arg-type]
    again.store.put("TrainingJob", one_node())
    again.reconcile(("TrainingJob", ("ml", "lenet")))
    again.reconcile(("TrainingJob", ("ml", "lenet")))
    assert kube.calls.count(ISOLATION) == 2, "applied again once the period is over (a policy deleted comes back)"


def test_a_burst_of_new_jobs_in_a_namespace_applies_the_isolation_policy_once_and_every_pod_after_it():
    class SlowIsolation(RecordingKube):
        def apply(self, m: dict[str, Any], uid: str | None = None, create_only: bool = False) -> dict[str, Any]:
            if m["metadata"]["name"] == launch.ISOLATION_POLICY_NAME:
                time.sleep(0.2)  # the round trip, long enough for every other worker to arrive meanwhile
            return super().apply(m, uid, create_only)

    kube = SlowIsolation()
    rt = Runtime(OperatorSettings(workers=4), kube, [JOBS])  # type: ignore[arg-type]
    names = [f"job-{i}" for i in range(4)]
    for name in names:
        body = one_node()
        body["metadata"] |= {"name": name, "uid": f"u-{name}"}
        rt.store.put("TrainingJob", body)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda n: rt.reconcile(("TrainingJob", ("ml", n))), names))
    applies = [c for c in kube.calls if c[0] == "apply"]
    assert applies.count(ISOLATION) == 1 and applies[0] == ISOLATION, applies
    assert applies[1:] == [("apply", "Pod")] * 4, "the others waited for it, then created their pods"


def test_no_child_is_applied_when_the_isolation_policy_cannot_be():
    kube = RecordingKube(fail_apply="networkpolicies is forbidden", fail_name=launch.ISOLATION_POLICY_NAME)
    rt = runtime(kube)
    rt.store.put("TrainingJob", one_node())
    delay = rt.reconcile(("TrainingJob", ("ml", "lenet")))
    assert not [c for c in kube.calls if c[0] == "apply"] and ("Pod", "lenet-0") not in kube.objects
    assert delay == rt.settings.retry_seconds, "retried with backoff"
    cond = next(c for c in kube.status["conditions"] if c["reason"] == "ReconcileError")
    assert "networkpolicies is forbidden" in cond["message"]
    off = Runtime(OperatorSettings(workers=2), kube, [TrainingJobReconciler(RenderSettings(network_policy=False))])
    off.store.put("TrainingJob", one_node())
    assert off.reconcile(("TrainingJob", ("ml", "lenet"))) == 0.0 and ("Pod", "lenet-0") in kube.objects, \
        "without NetworkPolicies (--no-network-policy) there is nothing shared to wait for"


def test_a_failed_reconcile_lands_in_status_and_backs_off():
    kube = RecordingKube(fail_apply="statefulsets.apps is forbidden")
    rt = runtime(kube)
    rt.store.put("TrainingJob", job_body({"phase": "Running"}))
    assert rt.reconcile(("TrainingJob", ("ml", "lenet"))) == 2.0
    assert kube.status["reason"] == "ReconcileError" and "forbidden" in kube.status["message"]
    assert kube.status["phase"] == "Running"
    rt.store.put("TrainingJob", job_body({"phase": "Running", **kube.status}) | {"metadata": {
        **job_body()["metadata"], "resourceVersion": "11"}})
    assert rt.reconcile(("TrainingJob", ("ml", "lenet"))) == 4.0, "exponential backoff"
    rt._events.shutdown(wait=True)
    assert ("event", "ReconcileError") in kube.calls


# ------------------------------------------------------------------------------- ownership (issue 12, 7 and 8)
def test_an_object_in_the_way_is_neither_adopted_nor_deleted_and_the_conflict_is_reported():
    foreign_svc = {"apiVersion": "v1", "kind": "Service",
                   "metadata": {"name": "lenet-workers", "uid": "x9",
                                "ownerReferences": owner("InferenceService", "lenet-workers", "i7")}}
    foreign_sts = {"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": {"name": "lenet", "uid": "x8"}}
    kube = RecordingKube(objects={("Service", "lenet-workers"): foreign_svc, ("StatefulSet", "lenet"): foreign_sts})
    rt = runtime(kube)
    rt.store.put("TrainingJob", job_body())
    delay = rt.reconcile(("TrainingJob", ("ml", "lenet")))
    applied = [c for c in kube.calls if c[0] in ("apply", "delete")]
    assert applied == [ISOLATION, ("apply", "NetworkPolicy")], \
        "nothing foreign is taken over; the free names are applied"
    assert kube.objects["Service", "lenet-workers"] is foreign_svc and kube.objects["StatefulSet", "lenet"] is foreign_sts
    cond = next(c for c in kube.status["conditions"] if c["type"] == "NameConflict")
    assert cond["status"] == "True" and cond["reason"] == "NameConflict"
    assert "Service lenet-workers already exists and is controlled by InferenceService" in cond["message"]
    assert "StatefulSet lenet already exists and is not controlled by aiaas" in cond["message"]
    assert delay is not None and delay <= rt.settings.resync_seconds, "looks again"
    rt._events.shutdown(wait=True)
    assert ("event", "NameConflict") in kube.calls


def test_an_absent_child_the_job_does_not_control_is_not_deleted():
    theirs = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "lenet-workers", "uid": "x9"}}
    kube = RecordingKube(objects={("Service", "lenet-workers"): theirs})
    rt = runtime(kube)
    rt.store.put("TrainingJob", job_body({"phase": "Succeeded", "completionTime": "2026-05-01T11:00:00Z"},
                                         runPolicy={"cleanPodPolicy": "All"}))
    rt.reconcile(("TrainingJob", ("ml", "lenet")))
    assert ("apply", "StatefulSet") in kube.calls and not [c for c in kube.calls if c[0] == "delete"]


def test_our_own_children_are_applied_and_a_resolved_conflict_is_cleared():
    ours = {"apiVersion": "apps/v1", "kind": "StatefulSet",
            "metadata": {"name": "lenet", "uid": "s1", "ownerReferences": owner("TrainingJob", "lenet", "u1")}}
    kube = RecordingKube(objects={("StatefulSet", "lenet"): ours})
    rt = runtime(kube)
    conflict = {"type": "NameConflict", "status": "True", "reason": "NameConflict", "message": "was in the way",
                "lastTransitionTime": "2026-05-01T11:00:00Z"}
    rt.store.put("TrainingJob", job_body({"phase": "Created", "conditions": [conflict]}))
    rt.reconcile(("TrainingJob", ("ml", "lenet")))
    assert ("apply", "Service") in kube.calls and ("apply", "StatefulSet") in kube.calls
    cond = next(c for c in kube.status["conditions"] if c["type"] == "NameConflict")
    assert cond["status"] == "False" and cond["reason"] == "Resolved"


def test_pods_with_the_jobs_labels_but_not_controlled_by_its_statefulset_count_for_nothing():
    impostors = [pod("lenet-0", exit_code=0, outcome=oc.SUCCEEDED, owner_uid=None, ip="10.6.6.6"),
                 pod("lenet-1", exit_code=78, outcome=oc.PERMANENT, owner_uid="other-sts")]
    body = job_body({"phase": "Running", "restartCount": 0})
    for policy in ("AllWorkers", "Rank0"):
        rec = TrainingJobReconciler(RenderSettings(), success_policy=policy,
                                    metrics_url_template="http://{pod_ip}:{port}/m", fetch=lambda u, t: "")
        r = rec.reconcile(snap(body, impostors, sts(2)))
        assert r.status["phase"] == "Running" and r.evict == (), policy
        assert rec.metrics_url(snap(body, impostors, sts(2))) is None
    # the same pods under the job's StatefulSet are believed
    real = [pod("lenet-0", exit_code=0, outcome=oc.SUCCEEDED), pod("lenet-1", exit_code=0, outcome=oc.SUCCEEDED)]
    assert JOBS.reconcile(snap(body, real, sts(2))).status["phase"] == "Succeeded"


def test_a_statefulset_the_job_does_not_control_hides_its_pods():
    body = job_body({"phase": "Running", "restartCount": 0})
    done = [pod("lenet-0", exit_code=0, outcome=oc.SUCCEEDED), pod("lenet-1", exit_code=0, outcome=oc.SUCCEEDED)]
    r = JOBS.reconcile(snap(body, done, sts(2, owner_uid="someone-else")))
    assert r.status["phase"] == "Running" and r.drifted
