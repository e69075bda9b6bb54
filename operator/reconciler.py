"""What a reconciler is: the pure contract between :mod:`.runtime` and one reconciler per kind.

The runtime hands a reconciler an immutable :class:`Snapshot` (the resource, its observed children, the
resources it refers to, the clock) and gets back a :class:`Result`: the children it wants applied, the ones it
wants gone, the status, the Events, what to delete after the status is written and when to look again. A
reconciler never does I/O, never reads a cache and never edits a rendered manifest; the next kind of resource is
a new reconciler and a renderer. Also here: the slim projections the caches keep (only the fields a reconciler
reads). No kubernetes, no kopf.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from pydantic import ValidationError

from aiaas.contract.errors import one_line

from . import api
from .metrics import OperatorMetrics
from .status import Event

Key = tuple[str, str]  # (namespace, name)
Body = dict[str, Any]

REASON_RECONCILE_ERROR = "ReconcileError"
REASON_INVALID_SPEC = "InvalidSpec"


class InvalidSpec(Exception):
    """The resource cannot be read: the message says what is wrong and how to fix it (no retry helps)."""


@dataclass(frozen=True)
class ObjectRef:
    api_version: str
    kind: str
    name: str


@dataclass(frozen=True)
class ChildWatch:
    """A kind of child object the runtime watches and caches per owner. ``owner_label`` on the child holds
    the owner's name (same namespace); ``slim`` keeps only what the reconciler reads."""

    api_version: str
    kind: str
    plural: str
    owner_label: str
    slim: Callable[[Body], Body]

    @property
    def group(self) -> str:
        return self.api_version.rpartition("/")[0]

    @property
    def version(self) -> str:
        return self.api_version.rpartition("/")[2]


@dataclass(frozen=True)
class Snapshot:
    """Everything a reconcile may look at, taken at once under the cache lock."""

    key: Key
    body: Body  # the resource as last seen (metadata, spec, status)
    children: Mapping[str, tuple[Body, ...]]  # child kind -> the observed children of this resource
    related: Mapping[tuple[str, Key], Body | None]  # the resources it refers to (by kind and key), as last seen
    probe: Any  # the last resync probe's answer (e.g. training progress), if a fresh one is there
    now: datetime

    def child(self, kind: str, name: str) -> Body | None:
        return next((c for c in self.children.get(kind, ()) if (c.get("metadata") or {}).get("name") == name), None)


@dataclass(frozen=True)
class Result:
    """What a reconcile wants. The runtime carries it out in this order: apply ``children`` and delete
    ``absent`` (skipped when identical to the last time and not ``drifted``), write ``status``, post
    ``events``, delete the resource itself (``delete_self``), delete ``evict``; then look again after
    ``requeue_after`` seconds. Before any children, the ``shared`` objects (unless applied recently). For a fresh
    resource (no status yet) the children of the ``later_kinds`` and everything after them wait until every
    fresh resource got its other children (see the runtime)."""

    status: Body
    children: tuple[Body, ...] = ()
    absent: tuple[ObjectRef, ...] = ()
    drifted: bool = False  # the cluster differs from what was last applied: apply even if unchanged
    events: tuple[Event, ...] = ()
    delete_self: bool = False
    evict: tuple[ObjectRef, ...] = ()
    requeue_after: float | None = None
    time_to_running: float | None = None  # for the metric, on the first transition to Running
    # Everything ``children`` and ``absent`` were rendered from, if the reconciler can name it cheaply: the
    # runtime compares it with the last applied one instead of hashing the manifests. None: hash them.
    children_key: Hashable | None = None
    later_kinds: tuple[str, ...] = ()  # children that starting the pods does not need (the headless Service)
    # Objects of the namespace that the children rely on and no resource owns (the namespace's isolation
    # NetworkPolicy): applied before any child, again at most once per resync period per operator process.
    shared: tuple[Body, ...] = ()


class Reconciler(Protocol):
    """One kind of resource. Everything but :meth:`probe` is pure."""

    @property
    def kind(self) -> str:
        """The resource's kind (aiaas.dev/v1alpha1)."""

    @property
    def plural(self) -> str:
        """Its plural resource name, for the watch."""

    @property
    def children(self) -> tuple[ChildWatch, ...]:
        """The kinds of children to watch and cache for it."""

    def phase(self, body: Body) -> str:
        """The phase shown in metrics (the stored one, or the kind's first)."""

    def references(self, body: Body) -> tuple[tuple[str, Key], ...]:
        """Other resources (kind, key) whose changes concern this one."""

    def needs_resync(self, body: Body) -> bool:
        """Should the periodic resync look at it again (an unfinished job: deadlines, progress)?"""

    def probe(self, snap: Snapshot) -> Any:
        """At resync: something to fetch from outside the API server (may do I/O); None: nothing."""

    def reconcile(self, snap: Snapshot) -> Result:
        """What the resource and its children should be now. Raises :class:`InvalidSpec`."""

    def error_status(self, old: Body, reason: str, message: str, now: datetime, generation: int | None) -> Body:
        """The stored status with a reconcile error written into it."""

    def count(self, metrics: OperatorMetrics, old: Body, result: Result) -> None:
        """Count what the written status changed (counters of this kind)."""


# ------------------------------------------------------------------------------------------------ parsing
def parse(model: type[api.TrainingJob] | type[api.InferenceService], body: Body) -> Any:
    """The resource as an API model; a status this version cannot read is dropped rather than fatal. A spec
    that does not validate raises :class:`InvalidSpec` with one message naming every field."""
    data = {k: body[k] for k in ("apiVersion", "kind", "metadata", "spec", "status") if k in body}
    try:
        return model.model_validate(data)
    except ValidationError as err:
        if "status" not in data:
            raise InvalidSpec(f"the spec is invalid: {one_line(err)}; fix it with kubectl edit") from None
    data.pop("status")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise InvalidSpec(f"the spec is invalid: {one_line(err)}; fix it with kubectl edit") from None


# ------------------------------------------------------------------------------------------------ ownership
REASON_NAME_CONFLICT = "NameConflict"


def controller_uid(body: Body) -> str | None:
    """The UID of the object's controller (the ownerReference with controller=true), if it has one."""
    refs = (body.get("metadata") or {}).get("ownerReferences") or []
    return next((str(r.get("uid")) for r in refs if r.get("controller") and r.get("uid")), None)


def controlled_by(body: Body, owner_uid: str | None) -> bool:
    """Is ``body`` controlled by the object with ``owner_uid``? Labels prove nothing: anyone can set them."""
    return bool(owner_uid) and controller_uid(body) == owner_uid


def name_conflict(existing: Body, owner_kind: str) -> str:
    """What to tell the user when a child's name is taken by an object this resource does not control."""
    meta = existing.get("metadata") or {}
    owner = next((r for r in meta.get("ownerReferences") or [] if r.get("controller")), None)
    held = f"controlled by {owner.get('kind')} {owner.get('name')}" if owner else "not controlled by aiaas"
    return (f"{existing.get('kind')} {meta.get('name')} already exists and is {held}: the operator neither adopts "
            f"nor deletes it; delete or rename that object, or give this {owner_kind} another name")


# ------------------------------------------------------------------------------------------------ slimming
_META = ("name", "namespace", "uid", "resourceVersion", "generation", "creationTimestamp", "deletionTimestamp",
         "labels")


def slim_meta(meta: Body, annotations: tuple[str, ...] = ()) -> Body:
    """Identity, labels, the listed annotations, and the controller owner reference (who controls it)."""
    out = {k: meta[k] for k in _META if k in meta}
    owner = next((r for r in meta.get("ownerReferences") or [] if r.get("controller")), None)
    if owner is not None:
        out["ownerReferences"] = [{k: owner[k] for k in ("apiVersion", "kind", "name", "uid", "controller")
                                   if k in owner}]
    kept = {k: v for k, v in (meta.get("annotations") or {}).items() if k in annotations}
    if kept:
        out["annotations"] = kept
    return out


def slim_resource(body: Body) -> Body:
    """One of our own resources: all of it but managedFields and kubectl's last-applied copy."""
    meta = dict(body.get("metadata") or {})
    meta.pop("managedFields", None)
    ann = meta.get("annotations")
    if ann and "kubectl.kubernetes.io/last-applied-configuration" in ann:
        meta["annotations"] = {k: v for k, v in ann.items() if k != "kubectl.kubernetes.io/last-applied-configuration"}
    return {**body, "metadata": meta}


def slim_workload(body: Body) -> Body:
    """A StatefulSet or Deployment: identity, spec.replicas, status."""
    return {"apiVersion": body.get("apiVersion"), "kind": body.get("kind"),
            "metadata": slim_meta(body.get("metadata") or {}),
            "spec": {"replicas": (body.get("spec") or {}).get("replicas")}, "status": body.get("status") or {}}


def slim_pod(pod: Body, annotations: tuple[str, ...] = ()) -> Body:
    """A pod: identity, the listed annotations, container names and images, its node, phase, conditions,
    container statuses and IP."""
    spec, status = pod.get("spec") or {}, pod.get("status") or {}
    return {
        "metadata": slim_meta(pod.get("metadata") or {}, annotations),
        "spec": {"containers": [{"name": c.get("name"), "image": c.get("image")} for c in spec.get("containers") or []],
                 **({"nodeName": spec["nodeName"]} if spec.get("nodeName") else {})},
        "status": {k: status[k] for k in ("phase", "conditions", "containerStatuses", "podIP") if k in status},
    }
