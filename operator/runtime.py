"""The controller runtime, written once for every kind: watch caches, the keyed queue, resync, backoff,
error-to-status, status patching, applying children and Events. What to do is decided by the reconcilers
(:mod:`.reconciler`); this module only carries their results out through :mod:`.k8s`.

Level-triggered, like a controller-runtime manager: every reconcile looks at the whole observed state, so a
missed event, an operator restart or a duplicate event changes nothing. Watch events (on the event loop) update
the caches and queue the owning resource; reconciles of one resource never overlap (the queue coalesces bursts),
different resources run in parallel on a thread pool (the Kubernetes client is synchronous). Every cache access
goes through :class:`Store`, under one lock. Nothing here knows a kind by name.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import hashlib
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Any

from . import api
from .k8s import Kube, KubeError
from .metrics import Health, OperatorMetrics
from .reconciler import (
    REASON_INVALID_SPEC,
    REASON_NAME_CONFLICT,
    REASON_RECONCILE_ERROR,
    Body,
    ChildWatch,
    InvalidSpec,
    Key,
    Reconciler,
    Result,
    Snapshot,
    controlled_by,
    name_conflict,
    slim_resource,
)
from .settings import OperatorSettings
from .status import Event, name_conflict_status

log = logging.getLogger("aiaas.operator")

Clock = Callable[[], datetime]
Ref = tuple[str, Key]  # (kind, key) of a watched resource
MAX_BACKOFF_SECONDS = 300.0
PROBE_CONCURRENCY = 16


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


# ------------------------------------------------------------------------------------------ pure helpers
def manifests_hash(manifests: Iterable[Any]) -> str:
    return hashlib.sha256(json.dumps(list(manifests), sort_keys=True, default=repr).encode()).hexdigest()


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


def _version(body: Body) -> str:
    return str((body.get("metadata") or {}).get("resourceVersion", ""))


def newer(a: Body | None, b: Body) -> bool:
    """Is ``b`` at least as new as ``a`` (by resourceVersion, when both are numbers)?"""
    if a is None:
        return True
    ra, rb = _version(a), _version(b)
    if ra.isdigit() and rb.isdigit():
        return int(rb) >= int(ra)
    return True


def same_version(a: Body | None, b: Body) -> bool:
    """Are both the same stored version of an object (equal, non-empty resourceVersions)?"""
    return a is not None and bool(_version(b)) and _version(a) == _version(b)


def same_but_version(a: Body, b: Body) -> bool:
    """Are two slim bodies equal apart from their resourceVersion?"""
    meta_a, meta_b = dict(a.get("metadata") or {}), dict(b.get("metadata") or {})
    meta_a.pop("resourceVersion", None)
    meta_b.pop("resourceVersion", None)
    return meta_a == meta_b and {k: v for k, v in a.items() if k != "metadata"} == \
        {k: v for k, v in b.items() if k != "metadata"}


def same_object(cached: Body | None, body: Body) -> bool:
    """Is ``body`` (e.g. a DELETED event) about the cached object, not a recreated namesake (a StatefulSet pod
    is recreated under the same name, and a watch may deliver the old one's deletion after the new one's
    creation)?"""
    if cached is None:
        return True
    return (cached.get("metadata") or {}).get("uid") == (body.get("metadata") or {}).get("uid")


def fresh(snap: Snapshot) -> bool:
    """Never reconciled (no status yet): its children most likely do not exist yet."""
    return not snap.body.get("status")


def key_of(body: Body) -> Key:
    meta = body.get("metadata") or {}
    return meta.get("namespace", ""), meta.get("name", "")


def _condition_message(status: Body, type_: str) -> str | None:
    """The message of the condition ``type_`` if it is True (None otherwise)."""
    c = next((c for c in status.get("conditions") or [] if c.get("type") == type_), None)
    return str(c.get("message")) if c and c.get("status") == "True" else None


# ------------------------------------------------------------------------------------------------- store
class Store:
    """The watch caches, thread-safe: resources by kind and key, children by kind, owner and name, who
    refers to whom, and fresh probe answers. Writers keep the newest version; a deletion of an older
    namesake is ignored."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._resources: dict[str, dict[Key, Body]] = {}
        self._children: dict[str, dict[Key, dict[str, Body]]] = {}
        self._refers_to: dict[Ref, tuple[Ref, ...]] = {}
        self._referred_by: dict[Ref, set[Ref]] = {}
        self._probes: dict[Ref, Any] = {}

    def put(self, kind: str, body: Body, refers_to: tuple[Ref, ...] = ()) -> bool:
        """Cache ``body`` if it is at least as new as the cached one. True if that changed the cache: not for
        an older version, nor for the watch's echo of a version already stored (our own status patch)."""
        key = key_of(body)
        with self._lock:
            objs = self._resources.setdefault(kind, {})
            cached = objs.get(key)
            if not newer(cached, body) or same_version(cached, body):
                return False
            objs[key] = body
            self._set_refs((kind, key), refers_to)
            return True

    def remove(self, kind: str, body: Body) -> bool:
        key = key_of(body)
        with self._lock:
            objs = self._resources.setdefault(kind, {})
            if not same_object(objs.get(key), body):
                return False  # a late event of an older namesake
            objs.pop(key, None)
            self._set_refs((kind, key), ())
            self._probes.pop((kind, key), None)
            return True

    def _set_refs(self, ref: Ref, refers_to: tuple[Ref, ...]) -> None:
        for old in self._refers_to.pop(ref, ()):
            self._referred_by.get(old, set()).discard(ref)
        if refers_to:
            self._refers_to[ref] = refers_to
            for target in refers_to:
                self._referred_by.setdefault(target, set()).add(ref)

    def put_child(self, kind: str, owner: Key, body: Body) -> bool:
        """Cache a (slim) child if it is at least as new as the cached one. True if what a reconciler reads
        changed: a new version that differs only in its resourceVersion (a pod's binding, most status updates
        of a StatefulSet, once slimmed) changes nothing."""
        name = (body.get("metadata") or {}).get("name", "")
        with self._lock:
            named = self._children.setdefault(kind, {}).setdefault(owner, {})
            cached = named.get(name)
            if not newer(cached, body):
                return False
            named[name] = body
            return cached is None or not same_but_version(cached, body)

    def remove_child(self, kind: str, owner: Key, body: Body) -> None:
        name = (body.get("metadata") or {}).get("name", "")
        with self._lock:
            by_owner = self._children.setdefault(kind, {})
            named = by_owner.get(owner, {})
            if same_object(named.get(name), body):
                named.pop(name, None)
            if not named:
                by_owner.pop(owner, None)

    def set_probe(self, ref: Ref, value: Any) -> None:
        with self._lock:
            self._probes[ref] = value

    def get(self, kind: str, key: Key) -> Body | None:
        with self._lock:
            return self._resources.get(kind, {}).get(key)

    def items(self, kind: str) -> list[tuple[Key, Body]]:
        with self._lock:
            return list(self._resources.get(kind, {}).items())

    def referred_by(self, ref: Ref) -> list[Ref]:
        with self._lock:
            return list(self._referred_by.get(ref, ()))

    def snapshot(self, rec: Reconciler, key: Key, now: datetime) -> Snapshot | None:
        """Everything one reconcile of ``key`` may read, at once; consumes a fresh probe answer."""
        with self._lock:
            body = self._resources.get(rec.kind, {}).get(key)
            if body is None:
                return None
            children = {w.kind: tuple(self._children.get(w.kind, {}).get(key, {}).values()) for w in rec.children}
            related = {r: self._resources.get(r[0], {}).get(r[1]) for r in self._refers_to.get((rec.kind, key), ())}
            probe = self._probes.pop((rec.kind, key), None)
        return Snapshot(key=key, body=body, children=children, related=related, probe=probe, now=now)


# ------------------------------------------------------------------------------------------------- queue
@dataclass
class _KeyState:
    dirty: bool = False  # asked for a run since its last run started
    waiting: bool = False  # in a lane
    running: bool = False


class KeyedQueue:
    """Per-key serialised, coalescing work queue on an event loop; at most ``workers`` runs at a time on the
    thread pool ``executor``. Keys wait in two FIFO lanes and idle workers take from the first one first:
    ``first(key)`` puts a key there (a resource never reconciled yet, so a new job is not queued behind the
    follow-up reconciles of every older one). Call every method on the loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, executor: concurrent.futures.Executor,
                 work: Callable[[Any], float | None], workers: int,
                 first: Callable[[Any], bool] = lambda key: False) -> None:
        self.loop, self.executor, self.work, self.workers, self.first = loop, executor, work, workers, first
        self.state: dict[Hashable, _KeyState] = {}
        self.timers: dict[Hashable, tuple[float, asyncio.TimerHandle]] = {}
        self.lanes: tuple[deque[Hashable], deque[Hashable]] = (deque(), deque())
        self.running = 0

    def enqueue(self, key: Hashable) -> None:
        """Runs ``work(key)`` soon; bursts collapse into one more run."""
        st = self.state.setdefault(key, _KeyState())
        st.dirty = True
        if not st.waiting and not st.running:
            self._wait(key, st)
            self._dispatch()

    def later(self, key: Hashable, delay: float) -> None:
        """Run again after ``delay`` seconds (the earliest request wins)."""
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

    def forget(self, key: Hashable) -> None:
        t = self.timers.pop(key, None)
        if t is not None:
            t[1].cancel()

    def _wait(self, key: Hashable, st: _KeyState) -> None:
        st.waiting = True
        self.lanes[0 if self.first(key) else 1].append(key)

    def _dispatch(self) -> None:
        while self.running < self.workers and (self.lanes[0] or self.lanes[1]):
            key = (self.lanes[0] or self.lanes[1]).popleft()
            st = self.state[key]
            st.waiting, st.dirty, st.running = False, False, True
            self.running += 1
            try:
                future = self.loop.run_in_executor(self.executor, self.work, key)
            except RuntimeError:  # the executor was shut down: the operator is stopping
                self.running -= 1
                self.state.pop(key, None)
                continue
            future.add_done_callback(functools.partial(self._done, key, st))

    def _done(self, key: Hashable, st: _KeyState, future: asyncio.Future[float | None]) -> None:
        self.running -= 1
        st.running = False
        if future.cancelled() or future.exception() is not None:
            if not future.cancelled():
                log.error("reconcile of %s raised", key, exc_info=future.exception())
        elif future.result() is not None:
            self.later(key, future.result())  # type: ignore[arg-type]
        if st.dirty:  # enqueued while it ran: to the back of its lane
            self._wait(key, st)
        else:
            self.state.pop(key, None)
        self._dispatch()


# ----------------------------------------------------------------------------------------------- runtime
class Runtime:
    """Runs the reconcilers: caches, queue, resync, and carrying out each :class:`.reconciler.Result`."""

    def __init__(self, settings: OperatorSettings, kube: Kube, reconcilers: Iterable[Reconciler],
                 metrics: OperatorMetrics | None = None, health: Health | None = None, clock: Clock = utcnow) -> None:
        self.settings, self.kube, self.clock = settings, kube, clock
        self.reconcilers: dict[str, Reconciler] = {r.kind: r for r in reconcilers}
        self.metrics = metrics or OperatorMetrics()
        self.health = health or Health()
        self.store = Store()
        self._applied: dict[Ref, Hashable] = {}  # key or hash of what was last applied, written only by the ref's reconcile
        self._child_uids: dict[Ref, dict[tuple[str, str], str]] = {}  # (kind, name) -> UID of what we applied, likewise
        self._started: dict[Ref, tuple[Hashable, frozenset[str]]] = {}  # a fresh resource's first pass: key, kinds
        self._failures: dict[Ref, int] = {}  # consecutive failed reconciles, likewise
        # shared objects (kind, namespace, name) -> when we last applied them (monotonic), each under a lock of
        # its own (made under _shared_lock): the first worker applies it, the others wait for that, not write it
        self._shared_applied: dict[tuple[str, str, str], float] = {}
        self._shared_locks: dict[tuple[str, str, str], threading.Lock] = {}
        self._shared_lock = threading.Lock()
        self._executor = concurrent.futures.ThreadPoolExecutor(settings.workers, thread_name_prefix="reconcile")
        self._events = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="events")  # keeps their order
        # Probes reach endpoints that users run: on threads of their own, so a slow one never holds a reconcile.
        self._probe_pool = concurrent.futures.ThreadPoolExecutor(PROBE_CONCURRENCY, thread_name_prefix="probe")
        self._probing: set[Ref] = set()  # probes in flight (touched on the loop only)
        self._queue: KeyedQueue | None = None
        self._resync_task: asyncio.Task[None] | None = None

    # -------------------------------------------------------------------------------------------- wiring
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._queue = KeyedQueue(loop, self._executor, self.reconcile, self.settings.workers,
                                 first=self._first_pass_due)
        self._resync_task = loop.create_task(self._resync_loop())

    def _first_pass_due(self, ref: Ref) -> bool:
        """Queue ahead of everything else: a resource none of whose children were applied yet."""
        return ref not in self._applied and ref not in self._started

    async def stop(self) -> None:
        if self._resync_task is not None:
            self._resync_task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._probe_pool.shutdown(wait=False, cancel_futures=True)
        self._events.shutdown(wait=False)

    def enqueue(self, ref: Ref) -> None:
        if self._queue is not None:
            self._queue.enqueue(ref)

    def phases(self, kind: str) -> dict[str, str]:
        """Each resource's phase by namespace/name, for the phase gauges."""
        rec = self.reconcilers[kind]
        return {f"{ns}/{name}": rec.phase(body) for (ns, name), body in self.store.items(kind)}

    # ------------------------------------------------------------------------------ watch events (loop)
    def observe(self, kind: str, event_type: str | None, body: Body) -> None:
        """A watch event of a reconciled resource."""
        rec, ref = self.reconcilers[kind], (kind, key_of(body))
        if event_type == "DELETED":
            if self.store.remove(kind, body):
                self._applied.pop(ref, None)
                self._child_uids.pop(ref, None)
                self._started.pop(ref, None)
                self._failures.pop(ref, None)
                if self._queue is not None:
                    self._queue.forget(ref)
        elif self.store.put(kind, slim_resource(body), rec.references(body)):
            self.enqueue(ref)
        else:
            return  # an echo of what we stored or an older version: nothing to look at again
        for dependent in self.store.referred_by(ref):
            self.enqueue(dependent)

    def observe_child(self, owner_kind: str, watch: ChildWatch, event_type: str | None, body: Body) -> None:
        """A watch event of a child: update the owner's cache and reconcile the owner."""
        meta = body.get("metadata") or {}
        owner_name = (meta.get("labels") or {}).get(watch.owner_label)
        if not owner_name:
            return
        owner = (meta.get("namespace", ""), owner_name)
        if event_type == "DELETED":
            self.store.remove_child(watch.kind, owner, body)
        elif not self.store.put_child(watch.kind, owner, watch.slim(body)):
            return  # nothing the owner's reconciler reads has changed
        self.enqueue((owner_kind, owner))

    # ----------------------------------------------------------------------------------- work (threads)
    def reconcile(self, ref: Ref) -> float | None:
        """One reconcile (on a worker thread). Returns 'look again in N s'. Every error goes to the
        resource's status; a failed reconcile is retried with exponential backoff."""
        kind, key = ref
        rec = self.reconcilers[kind]
        snap = self.store.snapshot(rec, key, self.clock())
        if snap is None or (snap.body.get("metadata") or {}).get("deletionTimestamp"):
            return None
        t0 = time.perf_counter()
        try:
            delay = self._carry_out(rec, snap, rec.reconcile(snap))
            self._failures.pop(ref, None)
            return delay
        except InvalidSpec as err:
            self._failures.pop(ref, None)
            self._write_error(rec, snap, REASON_INVALID_SPEC, str(err))
            return None
        except Exception as err:  # noqa: BLE001 - every error goes to status, then we retry
            n = self._failures.get(ref, 0)
            self._failures[ref] = n + 1
            self.metrics.reconcile_errors.labels(kind).inc()
            message = str(err) if isinstance(err, KubeError) else f"{type(err).__name__}: {err}"
            log.warning("reconcile of %s %s/%s failed: %s", kind, key[0], key[1], message)
            self._write_error(rec, snap, REASON_RECONCILE_ERROR, f"reconcile failed (will retry): {message}")
            return min(self.settings.retry_seconds * 2 ** n, MAX_BACKOFF_SECONDS)
        finally:
            self.metrics.reconcile_duration.labels(kind).observe(time.perf_counter() - t0)

    def _carry_out(self, rec: Reconciler, snap: Snapshot, result: Result) -> float | None:
        """Children, then status (a restart generation is recorded before pods go for it), then the rest."""
        if self._start(rec, snap, result):
            return 0.0  # the rest in a second pass, behind the first passes of other fresh resources
        conflicts = [message for _, message in self._apply_children(rec, snap, result)]
        old = snap.body.get("status") or {}
        meta = snap.body.get("metadata") or {}
        status = name_conflict_status(result.status, conflicts, REASON_NAME_CONFLICT, self.clock(),
                                      meta.get("generation"))
        if self._write_status(rec, snap, status):
            rec.count(self.metrics, old, result)
        events = list(result.events)
        if conflicts and _condition_message(old, REASON_NAME_CONFLICT) != _condition_message(status,
                                                                                             REASON_NAME_CONFLICT):
            events.append(Event("Warning", REASON_NAME_CONFLICT, "; ".join(conflicts)))
        self._post_events(snap.body, events)
        ns, name = snap.key
        if result.delete_self:
            log.info("%s %s/%s finished: deleting it (ttlSecondsAfterFinished)", rec.kind, ns, name)
            self.kube.delete(api.API_VERSION, rec.kind, ns, name, uid=meta.get("uid"))
            return None
        if result.evict:
            log.info("%s %s/%s: deleting %s", rec.kind, ns, name, ", ".join(r.name for r in result.evict))
            uids = self._child_uids.get((rec.kind, snap.key), {})
            for r in result.evict:
                self.kube.delete(r.api_version, r.kind, ns, r.name)
                uids.pop((r.kind, r.name), None)  # a child of that name made later is a new object
        if conflicts:  # look again: the user may remove the object that is in the way
            return min(result.requeue_after or self.settings.resync_seconds, self.settings.resync_seconds)
        return result.requeue_after

    def _start(self, rec: Reconciler, snap: Snapshot, result: Result) -> bool:
        """A fresh resource's first pass: apply only the children its pods need to start (all but
        ``result.later_kinds``) and stop there (True). Its second pass does the rest: the later children, the
        status, the events. The queue runs first passes before anything else, so under a burst of new
        resources every one of them gets its pods going before any gets its Service and status: one round
        trip or two each instead of four or more. Not for a resource that has a status, deletes something, or
        has nothing to leave for later."""
        ref = (rec.kind, snap.key)
        urgent = tuple(c for c in result.children if c["kind"] not in result.later_kinds)
        if (not fresh(snap) or not self._first_pass_due(ref) or result.delete_self or result.evict
                or len(urgent) == len(result.children)):
            return False
        key = self._children_key(result)
        conflicts = self._apply_children(rec, snap, replace(result, children=urgent, absent=(),
                                                            children_key=("first pass", key)))
        self._applied.pop(ref, None)  # what _apply_children recorded was the first pass only
        self._started[ref] = (key, frozenset(c["kind"] for c in urgent) - {kind for kind, _ in conflicts})
        return not conflicts  # a name conflict: the full pass now reports it (and tries that child again)

    def _apply_shared(self, shared: tuple[Body, ...]) -> None:
        """Before children are applied: each shared object not applied in the last resync period (so one deleted
        by hand comes back within a period; a steady resource applies nothing, so writes none). A failure raises
        before any child is applied: no pod goes without what it relies on."""
        for manifest in shared:
            meta = manifest["metadata"]
            ref = (manifest["kind"], meta.get("namespace", ""), meta["name"])
            with self._shared_lock:
                lock = self._shared_locks.setdefault(ref, threading.Lock())
            with lock:  # a burst of new jobs in a namespace: one apply, the rest wait for it
                last = self._shared_applied.get(ref)
                if last is not None and time.monotonic() - last < self.settings.resync_seconds:
                    continue
                self.kube.apply(manifest)
                self._shared_applied[ref] = time.monotonic()

    @staticmethod
    def _children_key(result: Result) -> Hashable:
        if result.children_key is not None:
            return result.children_key
        return manifests_hash([*result.children, *(repr(a) for a in result.absent)])

    def _apply_children(self, rec: Reconciler, snap: Snapshot, result: Result) -> list[tuple[str, str]]:
        """Apply what the reconciler wants, unless it is what was last applied and nothing drifted. A child
        whose name is taken by an object this resource does not control is neither applied (adopted) nor
        deleted: the conflicts are returned, and everything is tried again next time."""
        ref = (rec.kind, snap.key)
        applied = self._children_key(result)
        if self._applied.get(ref) == applied and not result.drifted:
            return []
        self._apply_shared(result.shared)
        started_key, started_kinds = self._started.pop(ref, (None, frozenset()))
        if started_key == applied:  # the first pass applied these, from the same plan
            result = replace(result, children=tuple(
                c for c in result.children if c["kind"] not in started_kinds))
        owner_uid = (snap.body.get("metadata") or {}).get("uid")
        watched = {w.kind: w for w in rec.children}
        uids = self._child_uids.setdefault(ref, {})
        new = fresh(snap)
        conflicts: list[tuple[str, str]] = []  # (kind, what is in the way)
        for manifest in result.children:
            child_id = (manifest["kind"], manifest["metadata"]["name"])
            ours, stored = self._apply_child(snap, manifest, owner_uid, child_id[0] in watched, uids.get(child_id),
                                             new)
            if not ours:
                uids.pop(child_id, None)
                conflicts.append((child_id[0], name_conflict(stored, rec.kind)))
                continue
            if uid := (stored.get("metadata") or {}).get("uid"):
                uids[child_id] = uid
            child = watched.get(manifest["kind"])
            if child is not None and stored:
                self.store.put_child(child.kind, snap.key, child.slim(stored))
        for absent in result.absent:
            uids.pop((absent.kind, absent.name), None)
            existing = self.kube.get(absent.api_version, absent.kind, snap.key[0], absent.name)
            if existing is not None and controlled_by(existing, owner_uid):
                self.kube.delete(absent.api_version, absent.kind, snap.key[0], absent.name,
                                 uid=(existing.get("metadata") or {}).get("uid"))
        if conflicts:
            log.warning("%s %s/%s: %s", rec.kind, *snap.key, "; ".join(message for _, message in conflicts))
        else:
            self._applied[ref] = applied
        return conflicts

    def _apply_child(self, snap: Snapshot, manifest: Body, owner_uid: str | None, watched: bool,
                     known_uid: str | None, fresh: bool) -> tuple[bool, Body]:
        """Apply one child: ``(True, what the API server stored)``, or ``(False, the object in the way)`` when
        its name is held by an object this resource does not control. No apply can write an object that is not
        ours: an update names the UID of the object it expects (the one applied last time, or the one the watch
        cache shows under our control), and a first apply of a fresh resource's child may only create. Either
        needs no read; when there is neither, or the API server refuses (gone, replaced, already there: 409,
        422), the name's holder is read and judged, and a name read free is still only created."""
        kind, name = manifest["kind"], manifest["metadata"]["name"]
        cached = snap.child(kind, name) if watched else None
        expected = known_uid or ((cached.get("metadata") or {}).get("uid")
                                 if cached is not None and controlled_by(cached, owner_uid) else None)
        if expected or fresh:
            try:
                return True, self.kube.apply(manifest, uid=expected, create_only=not expected)
            except KubeError as err:
                if err.status not in (409, 422):
                    raise
        existing = self.kube.get(manifest["apiVersion"], kind, snap.key[0], name)
        if existing is None:  # free when read: still only create (someone may take the name meanwhile)
            return True, self.kube.apply(manifest, create_only=True)
        if not controlled_by(existing, owner_uid):
            return False, existing
        return True, self.kube.apply(manifest, uid=(existing.get("metadata") or {}).get("uid"))

    def _write_status(self, rec: Reconciler, snap: Snapshot, new: Body) -> bool:
        """Patch the status if it changed (True); cache what the API server stored."""
        patch = status_patch(snap.body.get("status") or {}, new, self.clock())
        if patch is None:
            return False
        stored = self.kube.patch_status(api.API_VERSION, rec.kind, snap.key[0], snap.key[1], patch)
        if stored:
            self.store.put(rec.kind, slim_resource(stored), rec.references(stored))
        return True

    def _write_error(self, rec: Reconciler, snap: Snapshot, reason: str, message: str) -> None:
        old = snap.body.get("status") or {}
        generation = (snap.body.get("metadata") or {}).get("generation")
        try:
            if self._write_status(rec, snap, rec.error_status(old, reason, message, self.clock(), generation)) \
                    and old.get("reason") != reason:
                self._post_events(snap.body, (Event("Warning", reason, message),))
        except KubeError as err:
            log.warning("could not write the error into %s %s/%s status: %s", rec.kind, *snap.key, err)

    def _post_events(self, body: Body, events: Iterable[Event]) -> None:
        """Events go out on their own thread: they never delay a reconcile, and their order is kept."""
        todo = list(events)

        def post() -> None:
            for e in todo:
                self.kube.post_event(body, e.type, e.reason, e.message)

        if todo:
            self._events.submit(post)

    # -------------------------------------------------------------------------------------------- resync
    async def _resync_loop(self) -> None:
        while True:
            self.health.heartbeat()
            try:
                await asyncio.sleep(self.settings.resync_seconds)
                self.health.heartbeat()
                await self.resync()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the timer must survive anything
                log.exception("resync failed")

    async def resync(self) -> None:
        """Queue everything that wants a periodic look, and start its probe (e.g. progress) unless one is still
        running. Never waits for a probe: a probe's answer queues its resource again when it comes."""
        due = [(rec, key) for rec in self.reconcilers.values()
               for key, body in self.store.items(rec.kind) if rec.needs_resync(body)]
        loop = asyncio.get_running_loop()
        for rec, key in due:
            ref = (rec.kind, key)
            if ref not in self._probing:
                self._probing.add(ref)
                loop.create_task(self._probe(loop, rec, key))
            self.enqueue(ref)

    async def _probe(self, loop: asyncio.AbstractEventLoop, rec: Reconciler, key: Key) -> None:
        ref = (rec.kind, key)
        try:
            snap = self.store.snapshot(rec, key, self.clock())
            if snap is None:
                return
            value = await loop.run_in_executor(self._probe_pool, rec.probe, snap)
            if value is not None:
                self.store.set_probe(ref, value)
                self.enqueue(ref)
        except Exception:  # noqa: BLE001 - a probe is best effort
            log.exception("probe of %s %s/%s failed", rec.kind, *key)
        finally:
            self._probing.discard(ref)
