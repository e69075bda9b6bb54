"""Automatic resource adjustment of a TrainingJob, as pure decisions: how many pods an elastic job with
``policy: Auto`` should have (:func:`plan_nodes`), and how much memory its pods get after an OOM kill
(:func:`plan_memory`). No I/O, no clock: the pods, the previous decision (from the status) and ``now`` come in,
a decision comes out; :mod:`.status` writes it into the status and the renderer draws it.

Elastic Auto (capacity-driven, like a cluster autoscaler turned around): the job starts at
``spec.topology.nodes``; while every pod it asks for is scheduled and it is below ``maxNodes``, it asks for one
pod more (``ScalingUp``); once that pod is scheduled it has grown (``ScaledUp``). When a pod stays unschedulable
for ``scaleDownGraceSeconds`` (no capacity, or its node was cordoned and drained), the job shrinks to the pods
that are scheduled, never below ``minNodes`` (``ScaledDown``); it tries to grow again ``scaleUpRetrySeconds``
later. A StatefulSet removes its highest ordinals, so a shrink that removes a running pod, or keeps one that is
not scheduled, restarts the gang from the last checkpoint at the new size; dropping a pod that never ran (a
failed grow) needs no restart.

Memory after an OOM kill: request and limit times ``spec.autoscaling.memory.factor``, capped at its ``max``;
at the cap, or without ``spec.autoscaling.memory``, the job fails with a message naming the field to set.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Protocol

from . import api

SCALING_UP = "ScalingUp"
SCALED_UP = "ScaledUp"
SCALED_DOWN = "ScaledDown"
MEMORY_FIELD = "spec.autoscaling.memory"

_SUFFIX = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
           "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60, "m": 0}
_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+|[KMGTPE]i|[kMGTPEm])?$")


# --------------------------------------------------------------------------------------------- quantities
def quantity_bytes(q: int | str) -> int:
    """A Kubernetes memory quantity in bytes (rounded up): 512Mi, 1G, 1.5Gi, 1e9, 1048576."""
    m = _QUANTITY.match(str(q).strip())
    if not m:
        raise ValueError(f"{q!r} is not a Kubernetes quantity (e.g. 512Mi, 2Gi)")
    number, suffix = float(m.group(1)), m.group(2) or ""
    if suffix[:1] in ("e", "E"):
        return math.ceil(number * 10 ** int(suffix[1:]))
    if suffix == "m":
        return math.ceil(number / 1000)
    return math.ceil(number * _SUFFIX[suffix])


def format_bytes(n: int) -> str:
    """Bytes as the shortest binary quantity that holds them: 1Gi, 768Mi (rounded up to a MiB)."""
    mib = math.ceil(n / 2**20)
    return f"{mib // 1024}Gi" if mib % 1024 == 0 else f"{mib}Mi"


def _rfc3339(t: datetime) -> str:
    return t.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_time(s: str | None) -> datetime | None:
    try:
        return datetime.fromisoformat(s.replace("Z", "+00:00")) if s else None
    except ValueError:
        return None


# ------------------------------------------------------------------------------------------------ elastic
class Seat(Protocol):
    """What sizing reads of a pod (:class:`.status.PodView` has it)."""

    @property
    def name(self) -> str: ...
    @property
    def ordinal(self) -> int: ...
    @property
    def scheduled(self) -> bool: ...
    @property
    def node_name(self) -> str | None: ...
    @property
    def unschedulable(self) -> str | None: ...
    @property
    def unschedulable_since(self) -> str | None: ...


@dataclass(frozen=True)
class NodesDecision:
    """The size an elastic Auto job should have now, and what to say about it."""

    desired: int
    status: api.ElasticStatus
    event: str | None = None  # a Resized Event's message, when the size changed
    restart: bool = False  # restart the gang at ``desired`` (a shrink that removes or moves a running pod)


def start_size(elastic: api.Elastic, nodes: int, prev: api.ElasticStatus | None) -> int:
    """The size asked for before this decision: the last one, or spec.topology.nodes; within the bounds."""
    size = prev.desired_nodes if prev is not None and prev.desired_nodes else nodes
    return max(elastic.min_nodes, min(elastic.max_nodes, size))


def _stuck(p: Seat, now: datetime, grace: int) -> float | None:
    """Seconds ``p`` has been unschedulable, if at least ``grace``."""
    since = _parse_time(p.unschedulable_since)
    if p.unschedulable is None or since is None:
        return None
    waited = (now - since).total_seconds()
    return waited if waited >= grace else None


def plan_nodes(elastic: api.Elastic, nodes: int, prev: api.ElasticStatus | None, pods: list[Seat],
               now: datetime) -> NodesDecision:
    """Grow by one while every pod is scheduled, shrink to what is scheduled when a pod is stuck. ``pods``:
    the live pods of the current restart generation."""
    size = start_size(elastic, nodes, prev)
    seats = sorted((p for p in pods if 0 <= p.ordinal < size), key=lambda p: p.ordinal)
    scheduled = [p for p in seats if p.scheduled]
    last = prev or api.ElasticStatus()
    base = last.model_copy(update={"desired_nodes": size, "current_nodes": len(scheduled)})
    stuck = [(p, s) for p in seats if (s := _stuck(p, now, elastic.scale_down_grace_seconds)) is not None]
    if stuck:
        return _shrink(elastic, size, seats, scheduled, stuck[0], base, now)
    if last.reason == SCALING_UP and len(scheduled) == size == len(seats):
        newest = seats[-1]
        where = f" on node {newest.node_name}" if newest.node_name else ""
        msg = f"grew {size - 1}→{size}: pod {newest.name} scheduled{where}"
        status = base.model_copy(update={"reason": SCALED_UP, "message": msg, "last_resize_time": _rfc3339(now)})
        return NodesDecision(size, status, event=msg)
    if size < elastic.max_nodes and len(scheduled) == size == len(seats) and _may_grow(elastic, last, now):
        msg = f"all {size} pod(s) scheduled: asking for {size + 1} (maxNodes {elastic.max_nodes})"
        return NodesDecision(size + 1, base.model_copy(update={"desired_nodes": size + 1, "reason": SCALING_UP,
                                                               "message": msg}))
    return NodesDecision(size, base)


def _may_grow(elastic: api.Elastic, last: api.ElasticStatus, now: datetime) -> bool:
    if last.reason != SCALED_DOWN:
        return True
    when = _parse_time(last.last_resize_time)
    return when is None or (now - when).total_seconds() >= elastic.scale_up_retry_seconds


def _shrink(elastic: api.Elastic, size: int, seats: list[Seat], scheduled: list[Seat],
            stuck: tuple[Seat, float], base: api.ElasticStatus, now: datetime) -> NodesDecision:
    """Shrink to the scheduled pods (at least minNodes); restart the gang if the StatefulSet's scale-down
    would remove a running pod or keep one that is not scheduled."""
    new = max(elastic.min_nodes, len(scheduled))
    if new >= size:
        return NodesDecision(size, base)  # at minNodes: wait for capacity (the status says Unschedulable)
    pod, waited = stuck
    restart = any(p.scheduled for p in seats if p.ordinal >= new) or any(
        not p.scheduled for p in seats if p.ordinal < new)
    msg = f"shrank {size}→{new}: pod {pod.name} unschedulable for {int(waited)}s: {pod.unschedulable}"
    if restart:
        msg += "; restarting the gang from the last checkpoint"
    status = base.model_copy(update={"desired_nodes": new, "reason": SCALED_DOWN, "message": msg,
                                     "last_resize_time": _rfc3339(now)})
    return NodesDecision(new, status, event=msg, restart=restart)


# ------------------------------------------------------------------------------------------------- memory
@dataclass(frozen=True)
class MemoryDecision:
    """After an OOM kill: the new memory (``status``), or why the job fails (``failure``)."""

    status: api.MemoryStatus | None = None
    failure: str | None = None


def current_memory(job: api.TrainingJob) -> tuple[str | None, str | None]:
    """The memory request and limit the pods have now: the last raise, or spec.topology.resources."""
    st = job.status.memory if job.status is not None else None
    res = job.spec.topology.resources
    request = st.request if st is not None and st.request else res.requests.get("memory")
    limit = st.limit if st is not None and st.limit else res.limits.get("memory")
    return (str(request) if request is not None else None), (str(limit) if limit is not None else None)


def plan_memory(job: api.TrainingJob, pod_name: str, now: datetime) -> MemoryDecision:
    """Pod ``pod_name`` was OOMKilled: raise every pod's memory by the factor up to the ceiling, or fail."""
    policy = job.spec.autoscaling.memory
    request, limit = current_memory(job)
    if policy is None:
        return MemoryDecision(failure=(
            f"set {MEMORY_FIELD}.max (and optionally .factor) to let the operator raise the memory after an OOM "
            f"kill and restart from the last checkpoint, or raise spec.topology.resources.limits.memory"
            f"{f' (now {limit})' if limit else ''}"))
    ceiling = quantity_bytes(policy.max)
    top = limit or request
    if top is None:
        return MemoryDecision(failure="set spec.topology.resources.limits.memory: the operator raises a memory "
                                      "it knows")
    if quantity_bytes(top) >= ceiling:
        return MemoryDecision(failure=(
            f"the memory limit is already at {MEMORY_FIELD}.max ({policy.max}); raise {MEMORY_FIELD}.max"))
    new_limit = format_bytes(min(ceiling, math.ceil(quantity_bytes(limit) * policy.factor))) if limit else None
    new_request = None
    if request is not None:
        new_request = format_bytes(min(ceiling, math.ceil(quantity_bytes(request) * policy.factor)))
    changes = [f"{what} {old}→{new}" for what, old, new in (("limit", limit, new_limit),
                                                             ("request", request, new_request)) if new]
    msg = f"raised memory {', '.join(changes)}: pod {pod_name} was OOMKilled (factor {policy.factor:g}, " \
          f"max {policy.max})"
    return MemoryDecision(status=api.MemoryStatus(request=new_request, limit=new_limit, message=msg,
                                                  last_resize_time=_rfc3339(now)))
