"""The TrainingJob reconciler: snapshot -> :func:`.status.evaluate` -> a :class:`.render.JobPlan` -> result.

Pure apart from :meth:`TrainingJobReconciler.probe` (the resync's progress scrape of rank 0, run by the
runtime on a worker thread). Children: the workers (a StatefulSet and its pods, or a one-node job's bare pod,
:func:`.render.trainingjob.workload_kind`), watched by the job-name label, and the headless Service.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime
from typing import ClassVar

from aiaas.contract import launch

from . import api
from .metrics import OperatorMetrics
from .reconciler import (
    Body,
    ChildWatch,
    Key,
    ObjectRef,
    Result,
    Snapshot,
    controlled_by,
    parse,
    slim_pod,
    slim_workload,
)
from .render import JobPlan, RenderSettings, render_trainingjob
from .render.trainingjob import CHILD_KINDS, WORKLOAD_KINDS, isolation_policy, later_kinds, workload_kind
from .status import TERMINAL, Evaluation, Observed, error_status, evaluate, pod_view
from .status_progress import Fetch, http_fetch, scrape

KIND = "TrainingJob"


def _slim_job_pod(pod: Body) -> Body:
    return slim_pod(pod, (launch.ANNOTATION_RESTART,))


def owned_workers(snap: Snapshot) -> tuple[Body | None, list[Body]]:
    """The job's StatefulSet and its worker pods (the StatefulSet's, or the job's own bare ones): only what
    the job controls (owner UIDs), never what merely carries the job's labels (anyone who may create a pod
    can set those)."""
    job_uid = (snap.body.get("metadata") or {}).get("uid")
    sts = next((s for s in snap.children.get("StatefulSet", ())
                if (s.get("metadata") or {}).get("name") == snap.key[1] and controlled_by(s, job_uid)), None)
    sts_uid = (sts.get("metadata") or {}).get("uid") if sts else None
    return sts, [p for p in snap.children.get("Pod", ())
                 if controlled_by(p, sts_uid) or (job_uid and controlled_by(p, job_uid))]


@dataclass(frozen=True)
class BarePods:
    """What a job whose workers are bare pods does about them (the StatefulSet controller's work otherwise)."""

    missing: tuple[int, ...]  # ordinals below the size with no pod of that name, live or going: create them
    beyond: tuple[str, ...]  # live pods past the size (finished, suspended): Result.absent
    failed: tuple[str, ...]  # live pods the kubelet evicted (phase Failed; restartPolicy Always fails no other
    # way): deleted, so that a new one is made


def bare_pods(job: api.TrainingJob, ev: Evaluation, pods: list[Body]) -> BarePods:
    """A pod's spec cannot change, so only missing ordinals are created; a finished job creates none."""
    views = [pod_view(p) for p in pods]
    taken = {v.name for v in views}
    keep = {launch.worker_pod_name(job.metadata.name, i) for i in range(ev.replicas)}
    live = [v for v in views if not v.terminating]
    return BarePods(
        missing=tuple(i for i in range(0 if ev.terminal else ev.replicas)
                      if launch.worker_pod_name(job.metadata.name, i) not in taken),
        beyond=tuple(v.name for v in live if v.name not in keep),
        failed=tuple(v.name for v in live if v.phase == "Failed"),
    )


@dataclass(frozen=True)
class TrainingJobReconciler:
    render_settings: RenderSettings
    success_policy: str = "AllWorkers"
    metrics_url_template: str = ""  # rank 0's metrics URL ("": no progress scraping)
    scrape_timeout_seconds: float = 2.0
    fetch: Fetch = http_fetch

    kind: ClassVar[str] = KIND
    plural: ClassVar[str] = "trainingjobs"
    children: ClassVar[tuple[ChildWatch, ...]] = (
        ChildWatch("apps/v1", "StatefulSet", "statefulsets", launch.LABEL_JOB, slim_workload),
        ChildWatch("v1", "Pod", "pods", launch.LABEL_JOB, _slim_job_pod),
    )

    def phase(self, body: Body) -> str:
        return str((body.get("status") or {}).get("phase") or api.Phase.pending.value)

    def references(self, body: Body) -> tuple[tuple[str, Key], ...]:
        return ()

    def needs_resync(self, body: Body) -> bool:
        return (body.get("status") or {}).get("phase") not in TERMINAL

    # ------------------------------------------------------------------------------------------- probe
    def metrics_url(self, snap: Snapshot) -> str | None:
        """Rank 0's metrics URL for a running job (None: not running, or no live rank-0 pod with an IP)."""
        status = snap.body.get("status") or {}
        if not self.metrics_url_template or status.get("phase") != api.Phase.running.value:
            return None
        restart = int(status.get("restartCount") or 0)
        for pod in owned_workers(snap)[1]:
            v = pod_view(pod)
            if v.ordinal == 0 and v.generation == restart and not v.terminating and v.pod_ip:
                return self.metrics_url_template.format(pod_ip=v.pod_ip, port=launch.METRICS_PORT, pod=v.name,
                                                        namespace=snap.key[0], job=snap.key[1])
        return None

    def probe(self, snap: Snapshot) -> api.Progress | None:
        url = self.metrics_url(snap)
        return scrape(url, self.scrape_timeout_seconds, self.fetch) if url else None

    # ----------------------------------------------------------------------------------------- reconcile
    def reconcile(self, snap: Snapshot) -> Result:
        job: api.TrainingJob = parse(api.TrainingJob, snap.body)
        sts, pods = owned_workers(snap)
        ev = evaluate(job, Observed(pods=pods, progress=snap.probe), snap.now, success_policy=self.success_policy)
        # the workload stays what it is; a fresh job gets its workload_kind
        workload = "StatefulSet" if sts is not None else ("Pod" if pods else workload_kind(job))
        bare = bare_pods(job, ev, pods) if workload == "Pod" else BarePods((), (), ())
        plan = self.plan(ev, workload, bare.missing)
        children, absent = self.children_of(job, ev, plan, bare.beyond)
        if workload == "StatefulSet":
            drifted = sts is None or (sts.get("spec") or {}).get("replicas") != ev.replicas
        else:
            drifted = bool(bare.missing)  # a pod the job wants is missing
        return Result(
            status=ev.status.dump(),
            children=tuple(children),
            absent=absent,
            drifted=drifted and not ev.delete_job,
            events=tuple(ev.events),
            delete_self=ev.delete_job,
            evict=tuple(ObjectRef("v1", "Pod", p) for p in dict.fromkeys([*ev.stale_pods, *bare.failed])),
            requeue_after=ev.requeue_after,
            time_to_running=ev.time_to_running,
            # which bare pods are missing is drift, not a new plan: the pod's appearance re-applies nothing
            children_key=(job.metadata.uid, job.metadata.generation, replace(plan, pods=None), absent,
                          ev.delete_job),
            later_kinds=later_kinds(workload),
            shared=self.shared(snap.key[0]) if children else (),
        )

    def shared(self, namespace: str) -> tuple[Body, ...]:
        """The namespace's isolation policy, which every job's pods rely on before their own policy exists."""
        policy = isolation_policy(namespace, self.render_settings)
        return (policy,) if policy else ()

    @staticmethod
    def plan(ev: Evaluation, workload: str, missing: tuple[int, ...]) -> JobPlan:
        """A finished job only scales its StatefulSet (what was cleaned up is never recreated: no bare pod
        either); cleanPodPolicy All removes the headless Service. Bare pods: only the ``missing`` ordinals."""
        kinds: tuple[str, ...] = WORKLOAD_KINDS if ev.terminal else CHILD_KINDS
        if not ev.keep_service:
            kinds = tuple(k for k in kinds if k != "Service")
        memory = ev.status.memory or api.MemoryStatus()
        return JobPlan(replicas=ev.replicas, restart_generation=ev.status.restart_count or 0, children=kinds,
                       memory_request=memory.request, memory_limit=memory.limit, workload=workload,
                       pods=missing if workload == "Pod" else None)

    def children_of(self, job: api.TrainingJob, ev: Evaluation, plan: JobPlan, beyond: tuple[str, ...]
                    ) -> tuple[list[Body], tuple[ObjectRef, ...]]:
        """What ``plan`` renders, and what must be gone (the headless Service under cleanPodPolicy All, bare
        pods ``beyond`` the size); a job about to be deleted wants nothing."""
        if ev.delete_job:
            return [], ()
        absent = [] if ev.keep_service else [ObjectRef("v1", "Service", launch.headless_service_name(job.metadata.name))]
        absent += [ObjectRef("v1", "Pod", name) for name in beyond]
        return render_trainingjob(job, self.render_settings, plan), tuple(absent)

    def error_status(self, old: Body, reason: str, message: str, now: datetime, generation: int | None) -> Body:
        return error_status(api.TrainingJobStatus, old, reason, message, now, generation,
                            default_phase=api.Phase.pending.value, condition=api.ConditionType.running.value)

    def count(self, metrics: OperatorMetrics, old: Body, result: Result) -> None:
        before, after = old.get("phase"), result.status.get("phase")
        if before in (None, api.Phase.pending.value) and after != api.Phase.pending.value:
            metrics.jobs_created.inc()
        if int(result.status.get("restartCount") or 0) > int(old.get("restartCount") or 0):
            metrics.jobs_restarted.inc()
        if before != after:
            if after == api.Phase.succeeded.value:
                metrics.jobs_succeeded.inc()
            elif after == api.Phase.failed.value:
                metrics.jobs_failed.labels(result.status.get("reason") or "Unknown").inc()
        if result.time_to_running is not None:
            metrics.time_to_running.observe(result.time_to_running)

