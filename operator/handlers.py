"""kopf handlers: thin. Watch events fill in-memory caches and queue a reconcile; a reconcile is
parse -> evaluate (pure, :mod:`.status`) -> patch status if changed -> render (pure) -> apply (:mod:`.k8s`).

Level-triggered, like a controller-runtime reconciler: every reconcile looks at the whole observed state, so a
missed event, an operator restart or a duplicate event changes nothing. kopf is used for its watches only
(``on.event``), so it never writes annotations, finalizers or status fields of its own into our resources.
Reconciles of one resource never overlap (a per-key queue coalesces bursts of events); different resources
run in parallel on a small thread pool (the Kubernetes client is synchronous).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, cast

import kopf
from pydantic import ValidationError

from aiaas.contract import launch

from . import api
from .k8s import Kube, KubeError
from .metrics import Health, OperatorMetrics
from .render import render_inferenceservice, render_trainingjob
from .settings import OperatorSettings
from .status import (
    REASON_INVALID_SPEC,
    REASON_RECONCILE_ERROR,
    TERMINAL,
    Evaluation,
    Observed,
    error_status,
    evaluate,
    pod_view,
)
from .status_isvc import evaluate_service
from .status_progress import http_fetch, scrape

log = logging.getLogger("aiaas.operator")

Key = tuple[str, str]  # (namespace, name)
Body = dict[str, Any]
Clock = Callable[[], datetime]


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


# ------------------------------------------------------------------------------------------ pure helpers
def parse(model: type[api.TrainingJob] | type[api.InferenceService], body: Body) -> Any:
    """The resource as an API model; a status this version cannot read is dropped rather than fatal."""
    data = {k: body[k] for k in ("apiVersion", "kind", "metadata", "spec", "status") if k in body}
    try:
        return model.model_validate(data)
    except ValidationError:
        if "status" not in data:
            raise
        data.pop("status")
        return model.model_validate(data)


def validation_message(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e.get("loc", ()))
        msg = str(e.get("msg", "")).removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def stamp_restart(manifests: list[Body], restart_count: int) -> list[Body]:
    """Mark the pod template with the restart generation (pods of an older one are stale)."""
    out = copy.deepcopy(manifests)
    for m in out:
        if m["kind"] == "StatefulSet":
            meta = m["spec"]["template"].setdefault("metadata", {})
            meta.setdefault("annotations", {})[launch.ANNOTATION_RESTART] = str(restart_count)
    return out


def without_hpa_replicas(manifests: list[Body]) -> list[Body]:
    """With an HPA, the Deployment's replicas belong to the HPA: leave them out of our apply."""
    if not any(m["kind"] == "HorizontalPodAutoscaler" for m in manifests):
        return manifests
    out = copy.deepcopy(manifests)
    for m in out:
        if m["kind"] == "Deployment":
            m["spec"].pop("replicas", None)
    return out


def manifests_hash(manifests: list[Body]) -> str:
    return hashlib.sha256(json.dumps(manifests, sort_keys=True).encode()).hexdigest()


def status_patch(old: Body, new: Body, now: datetime) -> Body | None:
    """The merge patch turning ``old`` into ``new`` (None: nothing changed but the reconcile time)."""
    old_cmp = {k: v for k, v in old.items() if k != "lastReconcileTime"}
    new_cmp = {k: v for k, v in new.items() if k != "lastReconcileTime"}
    if old_cmp == new_cmp:
        return None
    patch: Body = dict(new_cmp)
    for k in old_cmp:
        if k not in new_cmp:
            patch[k] = None
    patch["lastReconcileTime"] = now.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return patch


def newer(a: Body | None, b: Body) -> bool:
    """Is ``b`` at least as new as ``a`` (by resourceVersion, when both are numbers)?"""
    if a is None:
        return True
    ra = str((a.get("metadata") or {}).get("resourceVersion", ""))
    rb = str((b.get("metadata") or {}).get("resourceVersion", ""))
    if ra.isdigit() and rb.isdigit():
        return int(rb) >= int(ra)
    return True


def same_object(cached: Body | None, body: Body) -> bool:
    """Is ``body`` (e.g. a DELETED event) about the cached object, not a recreated namesake (a StatefulSet pod
    is recreated under the same name, and kopf may deliver the old one's deletion after the new one's creation)?"""
    if cached is None:
        return True
    return (cached.get("metadata") or {}).get("uid") == (body.get("metadata") or {}).get("uid")


# ------------------------------------------------------------------------------------------------- queue
@dataclass
class _KeyState:
    dirty: bool = False
    running: bool = False


class KeyedQueue:
    """Per-key serialised, coalescing work queue on an event loop; work runs on a thread pool."""

    def __init__(self, loop: asyncio.AbstractEventLoop, executor: concurrent.futures.Executor,
                 work: Callable[[Key], float | None]) -> None:
        self.loop, self.executor, self.work = loop, executor, work
        self.state: dict[Key, _KeyState] = {}
        self.timers: dict[Key, tuple[float, asyncio.TimerHandle]] = {}

    def enqueue(self, key: Key) -> None:
        """Call on the loop. Runs ``work(key)`` soon; bursts collapse into one more run."""
        st = self.state.setdefault(key, _KeyState())
        st.dirty = True
        if not st.running:
            st.running = True
            self.loop.create_task(self._run(key, st))

    def enqueue_threadsafe(self, key: Key) -> None:
        self.loop.call_soon_threadsafe(self.enqueue, key)

    def later(self, key: Key, delay: float) -> None:
        """Call on the loop. Run again after ``delay`` seconds (the earliest request wins)."""
        when = self.loop.time() + max(0.0, delay)
        current = self.timers.get(key)
        if current is not None and current[0] <= when:
            return
        if current is not None:
            current[1].cancel()

        def fire() -> None:
            self.timers.pop(key, None)
            self.enqueue(key)

        self.timers[key] = (when, self.loop.call_at(when, fire))

    def later_threadsafe(self, key: Key, delay: float) -> None:
        self.loop.call_soon_threadsafe(self.later, key, delay)

    def forget(self, key: Key) -> None:
        t = self.timers.pop(key, None)
        if t is not None:
            t[1].cancel()

    async def _run(self, key: Key, st: _KeyState) -> None:
        try:
            while st.dirty:
                st.dirty = False
                delay = await self.loop.run_in_executor(self.executor, self.work, key)
                if delay is not None:
                    self.later(key, delay)
        finally:
            st.running = False
            if not st.dirty:
                self.state.pop(key, None)
            else:  # enqueued while the last run was finishing
                self.enqueue(key)


# ---------------------------------------------------------------------------------------------- controller
class Controller:
    """Caches of watched objects and the two reconcilers. Handlers only call :meth:`observe_*`."""

    def __init__(self, settings: OperatorSettings, kube: Kube, metrics: OperatorMetrics | None = None,
                 health: Health | None = None, clock: Clock = utcnow, workers: int = 8) -> None:
        self.settings = settings
        self.kube = kube
        self.metrics = metrics or OperatorMetrics()
        self.health = health or Health()
        self.clock = clock
        self.jobs: dict[Key, Body] = {}
        self.pods: dict[Key, dict[str, Body]] = {}  # (ns, job) -> pod name -> pod
        self.statefulsets: dict[Key, Body] = {}
        self.services: dict[Key, Body] = {}  # InferenceServices
        self.deployments: dict[Key, Body] = {}  # (ns, isvc) -> Deployment
        self.applied: dict[tuple[str, Key], str] = {}  # (kind, key) -> hash of what was last applied
        self.progress: dict[Key, api.Progress] = {}  # fresh scrapes, consumed by the next reconcile
        self.failures: dict[tuple[str, Key], int] = {}
        self.job_phases: dict[Key, str] = {}
        self.service_phases: dict[Key, str] = {}
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="reconcile")
        self.event_executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="events")
        self.job_queue: KeyedQueue | None = None
        self.service_queue: KeyedQueue | None = None
        self._resync_task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------------------------------ wiring
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.job_queue = KeyedQueue(loop, self.executor, self.reconcile_job)
        self.service_queue = KeyedQueue(loop, self.executor, self.reconcile_service)
        self._resync_task = loop.create_task(self._resync_loop())

    async def stop(self) -> None:
        if self._resync_task is not None:
            self._resync_task.cancel()
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.event_executor.shutdown(wait=False)

    def _enqueue_job(self, key: Key) -> None:
        if self.job_queue is not None:
            self.job_queue.enqueue(key)

    def _enqueue_service(self, key: Key) -> None:
        if self.service_queue is not None:
            self.service_queue.enqueue(key)

    # ------------------------------------------------------------------------------ watch events (loop)
    def observe_job(self, event_type: str | None, body: Body) -> None:
        key = _key(body)
        if event_type == "DELETED":
            if not same_object(self.jobs.get(key), body):
                return  # a late event of an older namesake
            self.jobs.pop(key, None)
            self.job_phases.pop(key, None)
            self.progress.pop(key, None)
            self.applied.pop(("TrainingJob", key), None)
            self.failures.pop(("TrainingJob", key), None)
            if self.job_queue is not None:
                self.job_queue.forget(key)
        else:
            if newer(self.jobs.get(key), body):
                self.jobs[key] = body
                self.job_phases[key] = str((body.get("status") or {}).get("phase") or "Pending")
            self._enqueue_job(key)
        for skey, svc in list(self.services.items()):
            if skey[0] == key[0] and ((svc.get("spec") or {}).get("model") or {}).get("trainingJob") == key[1]:
                self._enqueue_service(skey)

    def observe_pod(self, event_type: str | None, body: Body) -> None:
        meta = body.get("metadata") or {}
        job = (meta.get("labels") or {}).get(launch.LABEL_JOB)
        if not job:
            return
        key = (meta.get("namespace", ""), job)
        pods = self.pods.setdefault(key, {})
        if event_type == "DELETED":
            if same_object(pods.get(meta.get("name", "")), body):
                pods.pop(meta.get("name", ""), None)
            if not pods:
                self.pods.pop(key, None)
        elif newer(pods.get(meta.get("name", "")), body):
            pods[meta.get("name", "")] = body
        self._enqueue_job(key)

    def observe_statefulset(self, event_type: str | None, body: Body) -> None:
        meta = body.get("metadata") or {}
        job = (meta.get("labels") or {}).get(launch.LABEL_JOB)
        if not job:
            return
        key = (meta.get("namespace", ""), job)
        if event_type == "DELETED":
            if same_object(self.statefulsets.get(key), body):
                self.statefulsets.pop(key, None)
        elif newer(self.statefulsets.get(key), body):
            self.statefulsets[key] = body
        self._enqueue_job(key)

    def observe_service(self, event_type: str | None, body: Body) -> None:
        key = _key(body)
        if event_type == "DELETED":
            if not same_object(self.services.get(key), body):
                return
            self.services.pop(key, None)
            self.service_phases.pop(key, None)
            self.applied.pop(("InferenceService", key), None)
            if self.service_queue is not None:
                self.service_queue.forget(key)
            return
        if newer(self.services.get(key), body):
            self.services[key] = body
            self.service_phases[key] = str((body.get("status") or {}).get("phase") or "WaitingForModel")
        self._enqueue_service(key)

    def observe_deployment(self, event_type: str | None, body: Body) -> None:
        meta = body.get("metadata") or {}
        name = (meta.get("labels") or {}).get(launch.LABEL_ISVC)
        if not name:
            return
        key = (meta.get("namespace", ""), name)
        if event_type == "DELETED":
            if same_object(self.deployments.get(key), body):
                self.deployments.pop(key, None)
        elif newer(self.deployments.get(key), body):
            self.deployments[key] = body
        self._enqueue_service(key)

    # ------------------------------------------------------------------------------------------ timer
    async def _resync_loop(self) -> None:
        loop = asyncio.get_running_loop()
        sem = asyncio.Semaphore(16)

        async def one(k: Key) -> None:
            async with sem:
                p = await loop.run_in_executor(self.executor, self.scrape_job, k)
                if p is not None:
                    self.progress[k] = p

        while True:
            self.health.heartbeat()
            try:
                await asyncio.sleep(self.settings.resync_seconds)
                self.health.heartbeat()
                running = [k for k, b in self.jobs.items()
                           if (b.get("status") or {}).get("phase") == api.Phase.running.value]
                if self.settings.metrics_url_template and running:
                    await asyncio.gather(*(one(k) for k in running), return_exceptions=True)
                for key, body in list(self.jobs.items()):
                    if (body.get("status") or {}).get("phase") not in TERMINAL:
                        self._enqueue_job(key)
                for key in list(self.services):
                    self._enqueue_service(key)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the timer must survive anything
                log.exception("resync failed")

    def metrics_url(self, key: Key) -> str | None:
        """Rank 0's metrics URL for a running job (None: no live rank-0 pod with an IP)."""
        body = self.jobs.get(key)
        if body is None:
            return None
        restart = int((body.get("status") or {}).get("restartCount") or 0)
        for pod in (self.pods.get(key) or {}).values():
            v = pod_view(pod)
            if v.ordinal == 0 and v.generation == restart and not v.terminating and v.pod_ip:
                return self.settings.metrics_url(pod_ip=v.pod_ip, pod=v.name, namespace=key[0], job=key[1])
        return None

    def scrape_job(self, key: Key) -> api.Progress | None:
        url = self.metrics_url(key)
        if url is None:
            return None
        return scrape(url, self.settings.scrape_timeout_seconds, http_fetch)

    # -------------------------------------------------------------------------------- TrainingJob
    def reconcile_job(self, key: Key) -> float | None:
        """One reconcile of a TrainingJob (runs on a worker thread). Returns 'look again in N s'."""
        body = self.jobs.get(key)
        if body is None or (body.get("metadata") or {}).get("deletionTimestamp"):
            return None
        t0 = time.perf_counter()
        fkey = ("TrainingJob", key)
        try:
            delay = self._reconcile_job(key, body)
            self.failures.pop(fkey, None)
            return delay
        except Exception as err:  # noqa: BLE001 - every error goes to status, then we retry
            n = self.failures.get(fkey, 0)
            self.failures[fkey] = n + 1
            self.metrics.reconcile_errors.labels("TrainingJob").inc()
            message = str(err) if isinstance(err, KubeError) else f"{type(err).__name__}: {err}"
            log.warning("reconcile of TrainingJob %s/%s failed: %s", key[0], key[1], message)
            self._write_error(key, body, REASON_RECONCILE_ERROR, f"reconcile failed (will retry): {message}")
            return min(self.settings.retry_seconds * 2 ** n, 300.0)
        finally:
            self.metrics.reconcile_duration.labels("TrainingJob").observe(time.perf_counter() - t0)

    def _write_error(self, key: Key, body: Body, reason: str, message: str) -> None:
        old = body.get("status") or {}
        new = error_status(old, reason, message, self.clock(), (body.get("metadata") or {}).get("generation"))
        patch = status_patch(old, new, self.clock())
        if patch is None:
            return
        try:
            stored = self.kube.patch_status(api.API_VERSION, "TrainingJob", key[0], key[1], patch)
            self._cache_job(key, stored)
            if old.get("reason") != reason:
                self.kube.post_event(body, "Warning", reason, message)
        except KubeError as err:
            log.warning("could not write the error into %s/%s status: %s", key[0], key[1], err)

    def _cache_job(self, key: Key, stored: Body) -> None:
        if stored and newer(self.jobs.get(key), stored):
            self.jobs[key] = stored
            self.job_phases[key] = str((stored.get("status") or {}).get("phase") or "Pending")

    def _reconcile_job(self, key: Key, body: Body) -> float | None:
        ns, name = key
        try:
            job: api.TrainingJob = parse(api.TrainingJob, body)
        except ValidationError as err:
            self._write_error(key, body, REASON_INVALID_SPEC,
                              f"the spec is invalid: {validation_message(err)}; fix it with kubectl edit")
            return None
        now = self.clock()
        observed = Observed(statefulset=self.statefulsets.get(key), pods=list((self.pods.get(key) or {}).values()),
                            progress=self.progress.pop(key, None))
        ev = evaluate(job, observed, now, success_policy=self.settings.success_policy)
        old = body.get("status") or {}

        # 1. children: render (pure) and apply when what we want differs from what we last applied
        if not ev.delete_job:
            self._apply_children(key, job, ev)

        # 2. status, before any pod is deleted: a restart generation is recorded before pods go for it
        patch = status_patch(old, ev.status.dump(), now)
        if patch is not None:
            stored = self.kube.patch_status(api.API_VERSION, "TrainingJob", ns, name, patch)
            self._cache_job(key, stored)
            self._count(old, ev)
        self._post_events(body, ev.events)

        if ev.delete_job:
            log.info("TrainingJob %s/%s finished %ss ago: deleting it (ttlSecondsAfterFinished)", ns, name,
                     job.spec.run_policy.ttl_seconds_after_finished)
            self.kube.delete(api.API_VERSION, "TrainingJob", ns, name, uid=job.metadata.uid)
            return None

        # 3. stale pods (an older restart generation): delete, the StatefulSet recreates them
        if ev.stale_pods:
            live = {n for n, p in (self.pods.get(key) or {}).items()
                    if not (p.get("metadata") or {}).get("deletionTimestamp")}
            todo = [p for p in ev.stale_pods if p in live]
            if todo:
                log.info("TrainingJob %s/%s: deleting pods of an older restart generation: %s", ns, name, todo)
                self.kube.delete_pods(ns, todo)
        return ev.requeue_after

    def _post_events(self, body: Body, events: list[Any]) -> None:
        """Events go out on their own small pool: they never delay a reconcile, and their order is kept."""
        def post() -> None:
            for e in events:
                self.kube.post_event(body, e.type, e.reason, e.message)

        if events:
            self.event_executor.submit(post)

    def _apply_children(self, key: Key, job: api.TrainingJob, ev: Evaluation) -> None:
        manifests = stamp_restart(render_trainingjob(job, self.settings.render, replicas=ev.replicas),
                                  ev.status.restart_count or 0)
        if not ev.keep_service:
            manifests = [m for m in manifests if m["kind"] != "Service"]
        if ev.terminal:  # finished: only scale the StatefulSet; never recreate what was cleaned up
            manifests = [m for m in manifests if m["kind"] == "StatefulSet"]
        digest = manifests_hash(manifests) + (":nosvc" if not ev.keep_service else "")
        sts = self.statefulsets.get(key)
        drifted = sts is None or (sts.get("spec") or {}).get("replicas") != ev.replicas
        if self.applied.get(("TrainingJob", key)) == digest and not drifted:
            return
        for m in manifests:
            stored = self.kube.apply(m)
            if m["kind"] == "StatefulSet" and stored and newer(self.statefulsets.get(key), stored):
                self.statefulsets[key] = stored
        if not ev.keep_service:
            self.kube.delete("v1", "Service", key[0], key[1])
        self.applied[("TrainingJob", key)] = digest

    def _count(self, old: Body, ev: Evaluation) -> None:
        m = self.metrics
        before, after = old.get("phase"), ev.status.phase
        if before in (None, api.Phase.pending.value) and after != api.Phase.pending.value:
            m.jobs_created.inc()
        if (ev.status.restart_count or 0) > int(old.get("restartCount") or 0):
            m.jobs_restarted.inc()
        if before != after:
            if after == api.Phase.succeeded.value:
                m.jobs_succeeded.inc()
            elif after == api.Phase.failed.value:
                m.jobs_failed.labels(ev.status.reason or "Unknown").inc()
        if ev.time_to_running is not None:
            m.time_to_running.observe(ev.time_to_running)

    # ---------------------------------------------------------------------------- InferenceService
    def reconcile_service(self, key: Key) -> float | None:
        body = self.services.get(key)
        if body is None or (body.get("metadata") or {}).get("deletionTimestamp"):
            return None
        t0 = time.perf_counter()
        fkey = ("InferenceService", key)
        try:
            self._reconcile_service(key, body)
            self.failures.pop(fkey, None)
            return None
        except Exception as err:  # noqa: BLE001
            n = self.failures.get(fkey, 0)
            self.failures[fkey] = n + 1
            self.metrics.reconcile_errors.labels("InferenceService").inc()
            message = str(err) if isinstance(err, KubeError) else f"{type(err).__name__}: {err}"
            log.warning("reconcile of InferenceService %s/%s failed: %s", key[0], key[1], message)
            self._write_service_error(key, body, REASON_RECONCILE_ERROR, f"reconcile failed (will retry): {message}")
            return min(self.settings.retry_seconds * 2 ** n, 300.0)
        finally:
            self.metrics.reconcile_duration.labels("InferenceService").observe(time.perf_counter() - t0)

    def _write_service_error(self, key: Key, body: Body, reason: str, message: str) -> None:
        old = body.get("status") or {}
        new = dict(old) | {"reason": reason, "message": message, "phase": old.get("phase") or "Failed"}
        patch = status_patch(old, new, self.clock())
        if patch is None:
            return
        try:
            stored = self.kube.patch_status(api.API_VERSION, "InferenceService", key[0], key[1], patch)
            if stored and newer(self.services.get(key), stored):
                self.services[key] = stored
            if old.get("reason") != reason:
                self.kube.post_event(body, "Warning", reason, message)
        except KubeError as err:
            log.warning("could not write the error into %s/%s status: %s", key[0], key[1], err)

    def _reconcile_service(self, key: Key, body: Body) -> None:
        ns, name = key
        try:
            svc: api.InferenceService = parse(api.InferenceService, body)
        except ValidationError as err:
            self._write_service_error(key, body, REASON_INVALID_SPEC, f"the spec is invalid: {validation_message(err)}")
            return
        job = self.jobs.get((ns, svc.spec.model.training_job)) if svc.spec.model.training_job else None
        now = self.clock()
        ev = evaluate_service(svc, job, self.deployments.get(key), now)
        manifests = without_hpa_replicas(render_inferenceservice(svc, self.settings.render, ev.storage_uri))
        digest = manifests_hash(manifests)
        wants_deployment = any(m["kind"] == "Deployment" for m in manifests)
        drifted = wants_deployment and key not in self.deployments
        if self.applied.get(("InferenceService", key)) != digest or drifted:
            for m in manifests:
                self.kube.apply(m)
            self.applied[("InferenceService", key)] = digest
        old = body.get("status") or {}
        patch = status_patch(old, ev.status.dump(), now)
        if patch is not None:
            stored = self.kube.patch_status(api.API_VERSION, "InferenceService", ns, name, patch)
            if stored and newer(self.services.get(key), stored):
                self.services[key] = stored
                self.service_phases[key] = str((stored.get("status") or {}).get("phase") or "")
        self._post_events(body, ev.events)


def _key(body: Body) -> Key:
    meta = body.get("metadata") or {}
    return meta.get("namespace", ""), meta.get("name", "")


# --------------------------------------------------------------------------------------------- kopf
def register(registry: kopf.OperatorRegistry, ctl: Controller) -> None:
    """Attach the handlers to ``registry``: watches only; all decisions live in :class:`Controller`."""
    group, version = api.GROUP, api.VERSION

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        return kopf.login_via_client(**kwargs)  # in-cluster token or the kubeconfig, as the kubernetes client

    @kopf.on.startup(registry=registry)
    async def startup(**_: Any) -> None:
        ctl.start(asyncio.get_running_loop())
        ctl.health.ready = True

    @kopf.on.cleanup(registry=registry)
    async def cleanup(**_: Any) -> None:
        ctl.health.ready = False
        await ctl.stop()

    @kopf.on.event(group, version, "trainingjobs", registry=registry)
    async def trainingjob_event(event: kopf.RawEvent, **_: Any) -> None:
        ctl.observe_job(event.get("type"), cast(Body, event["object"]))

    @kopf.on.event("", "v1", "pods", labels={launch.LABEL_JOB: kopf.PRESENT}, registry=registry)
    async def pod_event(event: kopf.RawEvent, **_: Any) -> None:
        ctl.observe_pod(event.get("type"), cast(Body, event["object"]))

    @kopf.on.event("apps", "v1", "statefulsets", labels={launch.LABEL_JOB: kopf.PRESENT}, registry=registry)
    async def statefulset_event(event: kopf.RawEvent, **_: Any) -> None:
        ctl.observe_statefulset(event.get("type"), cast(Body, event["object"]))

    @kopf.on.event(group, version, "inferenceservices", registry=registry)
    async def inferenceservice_event(event: kopf.RawEvent, **_: Any) -> None:
        ctl.observe_service(event.get("type"), cast(Body, event["object"]))

    @kopf.on.event("apps", "v1", "deployments", labels={launch.LABEL_ISVC: kopf.PRESENT}, registry=registry)
    async def deployment_event(event: kopf.RawEvent, **_: Any) -> None:
        ctl.observe_deployment(event.get("type"), cast(Body, event["object"]))
