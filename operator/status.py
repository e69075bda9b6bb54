"""The TrainingJob lifecycle as one pure function: job + observed children + clock -> new status and actions.

Nothing here talks to the API server. :func:`evaluate` is given the job (with its previous status), the
StatefulSet and pods the operator observed, and ``now``; it returns the new status together with what the
handler must do (StatefulSet size, pods to delete, whether to delete the job) and the Events to post. The
handler writes the status only when it differs from the stored one.

Phases: Created -> Running -> (Restarting -> Running)* -> Succeeded | Failed, and Suspended in between.

Gang restarts are level-triggered. ``status.restartCount`` is the restart *generation*; the operator stamps it
on the pod template (annotation ``aiaas.dev/restart-count``). Pods of another generation are stale: they are
deleted and never counted, so a restart survives an operator crash at any point and is never done twice.

Completion on a StatefulSet. A StatefulSet only allows ``restartPolicy: Always``, so a trainer that finished is
restarted by the kubelet; its outcome survives in ``lastState.terminated`` (or ``state.terminated`` until the
restart) as the JSON termination message the trainer writes (``outcome``, ``reason``, ``message``, ``step``).
The job has Succeeded when every current-generation worker reported ``Succeeded`` (``--success-policy
AllWorkers``, the default; at least minNodes of them for an elastic job) or rank 0 did (``Rank0``). Without a
JSON message the exit code decides: 0 success, 78 permanent, 143 preempted, anything else retryable; OOMKilled
is retryable and named as such. ``PermanentError`` (or exit code 78) fails the job at once.

cleanPodPolicy, as it can work with a StatefulSet (there is no such thing as a finished pod that stays):

* ``Running`` (default): scale the StatefulSet to 0 when the job finishes, so no pod restarts and holds its
  GPUs. The StatefulSet (at 0) and the headless Service stay, the outcome of the pods is kept in the status,
  its conditions and the Events; logs live on in the cluster's log pipeline.
* ``All``: the same, and the headless Service is deleted too.
* ``None``: keep the pods for inspection (``kubectl logs --previous``, ``kubectl exec``): the StatefulSet keeps
  its size, the kubelet keeps restarting the trainer (which resumes from the final checkpoint and exits again,
  backing off), and the pods keep their GPUs until the job is deleted (or ``ttlSecondsAfterFinished``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from aiaas.contract import launch

from . import api
from .render.trainingjob import artifact_uri

TRAINER_CONTAINER = "trainer"
TERMINAL = (api.Phase.succeeded.value, api.Phase.failed.value)
IMAGE_PULL_REASONS = ("ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull")
CONTAINER_CONFIG_REASONS = ("CreateContainerConfigError", "CreateContainerError", "RunContainerError")

# Outcomes written by the trainer into the termination message (see trainer/termination.py).
OUTCOME_SUCCEEDED = "Succeeded"
OUTCOME_PERMANENT = "PermanentError"
OUTCOME_RETRYABLE = "RetryableError"
OUTCOME_PREEMPTED = "Preempted"

# Reasons (CamelCase, as in Kubeflow/Kubernetes conditions).
REASON_CREATED = "Created"
REASON_RUNNING = "Running"
REASON_SUCCEEDED = "Succeeded"
REASON_BACKOFF = "BackoffLimitExceeded"
REASON_DEADLINE = "DeadlineExceeded"
REASON_PERMANENT = "PermanentError"
REASON_SUSPENDED = "Suspended"
REASON_RESUMED = "Resumed"
REASON_UNSCHEDULABLE = "Unschedulable"
REASON_WAITING = "WaitingForPods"
REASON_NOT_READY = "PodsNotReady"
REASON_RECOVERED = "Recovered"
REASON_RECONCILE_ERROR = "ReconcileError"
REASON_INVALID_SPEC = "InvalidSpec"


# --------------------------------------------------------------------------------------------- time
def rfc3339(t: datetime) -> str:
    return t.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(s: str | None) -> datetime | None:
    if not s:
        return None
    try:
        return datetime.fromisoformat(s.replace("Z", "+00:00"))
    except ValueError:
        return None


# ------------------------------------------------------------------------------------------- conditions
def set_condition(conditions: list[api.Condition], type_: str, status: str, reason: str, message: str,
                  now: datetime, generation: int | None) -> list[api.Condition]:
    """Conditions with ``type_`` set; lastTransitionTime moves only when the status flips."""
    out: list[api.Condition] = []
    found = False
    for c in conditions:
        if c.type != type_:
            out.append(c)
            continue
        found = True
        ltt = c.last_transition_time if c.status == status and c.last_transition_time else rfc3339(now)
        out.append(api.Condition(type=type_, status=status, reason=reason, message=message,  # type: ignore[arg-type]
                                 last_transition_time=ltt, observed_generation=generation))
    if not found:
        out.append(api.Condition(type=type_, status=status, reason=reason, message=message,  # type: ignore[arg-type]
                                 last_transition_time=rfc3339(now), observed_generation=generation))
    return out


def get_condition(conditions: list[api.Condition], type_: str) -> api.Condition | None:
    return next((c for c in conditions if c.type == type_), None)


# ------------------------------------------------------------------------------------------------ pods
@dataclass(frozen=True)
class Termination:
    """How a trainer container ended, from its termination message (JSON outcome) and exit code."""

    exit_code: int
    reason: str  # the kubelet's reason: Completed, Error, OOMKilled, ...
    outcome: str  # Succeeded, PermanentError, RetryableError, Preempted
    trainer_reason: str | None
    message: str
    step: int | None
    artifact: str | None
    finished_at: str | None

    @property
    def succeeded(self) -> bool:
        return self.outcome == OUTCOME_SUCCEEDED

    @property
    def permanent(self) -> bool:
        return self.outcome == OUTCOME_PERMANENT


def parse_termination(term: dict[str, Any]) -> Termination:
    exit_code = int(term.get("exitCode", 0) or 0)
    kubelet_reason = str(term.get("reason") or ("Completed" if exit_code == 0 else "Error"))
    raw = str(term.get("message") or "").strip()
    data: dict[str, Any] = {}
    if raw.startswith("{"):
        try:
            parsed = json.loads(raw.splitlines()[0] if "\n" in raw else raw)
            data = parsed if isinstance(parsed, dict) else {}
        except ValueError:
            data = {}
    outcome = str(data.get("outcome") or "")
    if outcome not in (OUTCOME_SUCCEEDED, OUTCOME_PERMANENT, OUTCOME_RETRYABLE, OUTCOME_PREEMPTED):
        if exit_code == launch.EXIT_SUCCESS:
            outcome = OUTCOME_SUCCEEDED
        elif exit_code == launch.EXIT_PERMANENT:
            outcome = OUTCOME_PERMANENT
        elif exit_code == launch.EXIT_PREEMPTED:
            outcome = OUTCOME_PREEMPTED
        else:
            outcome = OUTCOME_RETRYABLE
    elif exit_code == launch.EXIT_PERMANENT and outcome == OUTCOME_RETRYABLE:
        outcome = OUTCOME_PERMANENT  # exit code 78 is permanent, whatever a peer wrote
    if kubelet_reason == "OOMKilled" and outcome == OUTCOME_SUCCEEDED:
        outcome = OUTCOME_RETRYABLE
    message = str(data.get("message") or (raw if not data else "")).strip()
    step = data.get("step")
    return Termination(
        exit_code=exit_code,
        reason=kubelet_reason,
        outcome=outcome,
        trainer_reason=str(data["reason"]) if data.get("reason") else None,
        message=message[-1000:],
        step=int(step) if isinstance(step, int | float) else None,
        artifact=str(data["artifact"]) if data.get("artifact") else None,
        finished_at=term.get("finishedAt"),
    )


@dataclass(frozen=True)
class PodView:
    """What the lifecycle needs to know about one worker pod."""

    name: str
    ordinal: int
    generation: int  # the restart generation stamped on the pod
    terminating: bool
    phase: str
    ready: bool
    unschedulable: str | None  # the scheduler's message
    waiting_reason: str | None
    waiting_message: str
    image: str
    termination: Termination | None
    pod_ip: str | None


def _ordinal(pod: dict[str, Any]) -> int:
    meta = pod.get("metadata", {})
    idx = (meta.get("labels") or {}).get(launch.POD_INDEX_LABEL)
    if idx is not None and str(idx).isdigit():
        return int(idx)
    try:
        return launch.node_rank_from_pod_name(meta.get("name", ""))
    except ValueError:
        return -1


def pod_view(pod: dict[str, Any]) -> PodView:
    meta = pod.get("metadata") or {}
    status = pod.get("status") or {}
    spec = pod.get("spec") or {}
    ann = meta.get("annotations") or {}
    try:
        generation = int(ann.get(launch.ANNOTATION_RESTART, "0"))
    except ValueError:
        generation = 0
    conditions = {c.get("type"): c for c in status.get("conditions") or []}
    ready = (conditions.get("Ready") or {}).get("status") == "True"
    sched = conditions.get("PodScheduled") or {}
    unschedulable = None
    if sched.get("status") == "False":
        unschedulable = str(sched.get("message") or sched.get("reason") or "Unschedulable")
    statuses = status.get("containerStatuses") or []
    cs = next((c for c in statuses if c.get("name") == TRAINER_CONTAINER), statuses[0] if statuses else {})
    containers = spec.get("containers") or []
    image = next((c.get("image", "") for c in containers if c.get("name") == TRAINER_CONTAINER),
                 containers[0].get("image", "") if containers else "")
    state = cs.get("state") or {}
    last = cs.get("lastState") or {}
    term = state.get("terminated") or last.get("terminated")
    waiting = state.get("waiting") or {}
    return PodView(
        name=meta.get("name", ""),
        ordinal=_ordinal(pod),
        generation=generation,
        terminating=bool(meta.get("deletionTimestamp")),
        phase=status.get("phase") or "Pending",
        ready=ready,
        unschedulable=unschedulable,
        waiting_reason=waiting.get("reason"),
        waiting_message=str(waiting.get("message") or ""),
        image=cs.get("image") or image,
        termination=parse_termination(term) if term else None,
        pod_ip=status.get("podIP"),
    )


# --------------------------------------------------------------------------------------------- result
@dataclass(frozen=True)
class Event:
    type: str  # Normal or Warning
    reason: str
    message: str


@dataclass(frozen=True)
class Observed:
    """The children as the operator saw them. ``progress`` is a fresh scrape of rank 0, if one was made."""

    statefulset: dict[str, Any] | None = None
    pods: list[dict[str, Any]] = field(default_factory=list)
    progress: api.Progress | None = None


@dataclass
class Evaluation:
    status: api.TrainingJobStatus
    replicas: int  # desired StatefulSet size
    stale_pods: list[str] = field(default_factory=list)  # pods of another restart generation: delete them
    delete_job: bool = False  # ttlSecondsAfterFinished has passed
    keep_service: bool = True  # False: delete the headless Service (cleanPodPolicy All, finished)
    events: list[Event] = field(default_factory=list)
    requeue_after: float | None = None  # look again after this many seconds (deadline, TTL)
    # Set on the transition to Running (not after a restart): seconds from creation to Running.
    time_to_running: float | None = None

    @property
    def terminal(self) -> bool:
        return self.status.phase in TERMINAL


def status_dict(status: api.TrainingJobStatus | None) -> dict[str, Any]:
    return status.dump() if status is not None else {}


def _pct(step: int, total: int) -> str:
    return f"{step}/{total} ({100 * step // total if total else 0}%)"


def progress_summary(p: api.Progress) -> str | None:
    if p.step is not None and p.total_steps:
        return _pct(p.step, p.total_steps)
    if p.step is not None:
        return f"step {p.step}"
    return None


def merge_progress(old: api.Progress | None, new: api.Progress | None, now: datetime) -> api.Progress | None:
    """The new reading, with a summary; ``updated`` only moves when a value changed (no status churn)."""
    if new is None:
        return old
    new = new.model_copy(update={"summary": new.summary or progress_summary(new), "updated": None})
    if old is not None and old.model_copy(update={"updated": None}) == new:
        return old
    return new.model_copy(update={"updated": rfc3339(now)})


def _camel_word(s: str | None) -> bool:
    return bool(s) and re.fullmatch(r"[A-Z][A-Za-z0-9]*", s or "") is not None


def describe_termination(p: PodView) -> str:
    t = p.termination
    assert t is not None
    what = f"pod {p.name} (node rank {p.ordinal}): trainer "
    if t.reason == "OOMKilled":
        what += "was OOMKilled (exit code 137): it ran out of memory; raise spec.topology.resources.limits.memory"
    else:
        what += f"exited with code {t.exit_code} ({t.trainer_reason or t.reason})"
    if t.message:
        what += f": {t.message}"
    return what


def failure_reason(t: Termination) -> str:
    if t.reason == "OOMKilled":
        return "OOMKilled"
    if _camel_word(t.trainer_reason):
        return str(t.trainer_reason)
    return REASON_PERMANENT if t.permanent else (t.outcome if _camel_word(t.outcome) else "Error")


def diagnose(pods: list[PodView], expected: int) -> tuple[str, str]:
    """Why the pods are not all ready, in words: the scheduler's reason, image pulls, container errors."""
    for p in pods:
        if p.unschedulable:
            return REASON_UNSCHEDULABLE, f"pod {p.name} cannot be scheduled: {p.unschedulable}"
    for p in pods:
        if p.waiting_reason in IMAGE_PULL_REASONS:
            msg = f"pod {p.name} cannot pull image {p.image!r} ({p.waiting_reason})"
            return p.waiting_reason or "ImagePullBackOff", msg + (f": {p.waiting_message}" if p.waiting_message else "")
    for p in pods:
        if p.waiting_reason in CONTAINER_CONFIG_REASONS:
            msg = f"pod {p.name} cannot start its trainer ({p.waiting_reason})"
            return p.waiting_reason or "Error", msg + (f": {p.waiting_message}" if p.waiting_message else "")
    ready = sum(p.ready for p in pods)
    if len(pods) < expected:
        return REASON_WAITING, f"{len(pods)}/{expected} pods exist, {ready} ready"
    waiting = [p.name for p in pods if not p.ready]
    return REASON_NOT_READY, f"{ready}/{expected} pods ready; waiting for {', '.join(waiting[:5])}"


# ------------------------------------------------------------------------------------------- evaluate
def evaluate(job: api.TrainingJob, observed: Observed, now: datetime, *,
             success_policy: str = "AllWorkers") -> Evaluation:
    """The next status of ``job`` and what to do about it. Pure."""
    prev = job.status or api.TrainingJobStatus()
    st = prev.model_copy(deep=True)
    spec = job.spec
    gen = job.metadata.generation
    nodes = spec.topology.nodes
    rp = spec.run_policy
    restart_gen = prev.restart_count or 0
    events: list[Event] = []
    st.observed_generation = gen
    st.restart_count = restart_gen
    st.progress = merge_progress(prev.progress, observed.progress, now)

    views = [pod_view(p) for p in observed.pods]
    live = [p for p in views if not p.terminating]
    current = sorted((p for p in live if p.generation == restart_gen), key=lambda p: p.ordinal)
    stale = [p.name for p in live if p.generation != restart_gen]

    def conds(type_: api.ConditionType, status: str, reason: str, message: str) -> None:
        st.conditions = set_condition(st.conditions, type_.value, status, reason, message, now, gen)

    def transition(phase: api.Phase, reason: str, message: str, event_type: str = "Normal") -> None:
        if prev.phase != phase.value or (prev.reason != reason and event_type == "Warning"):
            events.append(Event(event_type, reason, message))
        st.phase = phase
        st.reason = reason
        st.message = message

    def counts() -> None:
        st.active_replicas = sum(p.phase == "Running" for p in current)
        st.ready_replicas = sum(p.ready for p in current)

    # ---- finished: sticky; only clean-up and TTL are left
    if prev.phase in TERMINAL:
        counts()
        keep = rp.clean_pod_policy == api.CleanPodPolicy.none.value
        ev = Evaluation(st, replicas=nodes if keep else 0, stale_pods=[],
                        keep_service=rp.clean_pod_policy != api.CleanPodPolicy.all.value)
        st.replicas = ev.replicas
        done = parse_time(prev.completion_time)
        if rp.ttl_seconds_after_finished is not None and done is not None:
            left = (done - now).total_seconds() + rp.ttl_seconds_after_finished
            if left <= 0:
                ev.delete_job = True
            else:
                ev.requeue_after = left
        return ev

    # ---- suspended (Kueue admission, or a user pausing the job)
    if spec.suspend:
        msg = "spec.suspend is true: the pods are scaled to zero and checkpoints kept; set it to false to resume"
        transition(api.Phase.suspended, REASON_SUSPENDED, msg)
        conds(api.ConditionType.suspended, "True", REASON_SUSPENDED, msg)
        conds(api.ConditionType.running, "False", REASON_SUSPENDED, msg)
        st.replicas = 0
        counts()
        return Evaluation(st, replicas=0, stale_pods=[], events=events)

    if prev.phase == api.Phase.suspended.value:
        msg = "spec.suspend is false: the pods are recreated and resume from the last checkpoint"
        events.append(Event("Normal", REASON_RESUMED, msg))
        conds(api.ConditionType.suspended, "False", REASON_RESUMED, msg)
        st.start_time = rfc3339(now)  # as a Kubernetes Job: the deadline counts from the resume
    if st.start_time is None:
        st.start_time = rfc3339(now)
    if get_condition(st.conditions, api.ConditionType.created.value) is None:
        conds(api.ConditionType.created, "True", REASON_CREATED,
              f"headless Service and StatefulSet {job.metadata.name} created for {nodes} node(s)")
    st.replicas = nodes
    counts()
    ready = st.ready_replicas or 0

    def finish(phase: api.Phase, reason: str, message: str) -> Evaluation:
        failed = phase == api.Phase.failed
        transition(phase, reason, message, "Warning" if failed else "Normal")
        ctype = api.ConditionType.failed if failed else api.ConditionType.succeeded
        conds(ctype, "True", reason, message)
        conds(api.ConditionType.running, "False", reason, message)
        if get_condition(st.conditions, api.ConditionType.restarting.value) is not None:
            conds(api.ConditionType.restarting, "False", reason, message)
        st.completion_time = rfc3339(now)
        keep = rp.clean_pod_policy == api.CleanPodPolicy.none.value
        ev = Evaluation(st, replicas=nodes if keep else 0, stale_pods=[], events=events,
                        keep_service=rp.clean_pod_policy != api.CleanPodPolicy.all.value)
        if rp.ttl_seconds_after_finished is not None:
            ev.requeue_after = float(rp.ttl_seconds_after_finished)
            if rp.ttl_seconds_after_finished == 0:
                ev.delete_job = True
        return ev

    # ---- deadline
    requeue: float | None = None
    started = parse_time(st.start_time)
    if rp.active_deadline_seconds is not None and started is not None:
        left = (started - now).total_seconds() + rp.active_deadline_seconds
        if left <= 0:
            return finish(api.Phase.failed, REASON_DEADLINE,
                          f"the job ran longer than activeDeadlineSeconds ({rp.active_deadline_seconds}s)")
        requeue = left

    finished = [p for p in current if p.termination is not None]
    st.succeeded_replicas = sum(p.termination is not None and p.termination.succeeded for p in current)
    st.failed_replicas = sum(p.termination is not None and not p.termination.succeeded for p in current)

    # ---- permanent failure: fail at once
    permanent = [p for p in finished if p.termination and p.termination.permanent]
    if permanent:
        p = permanent[0]
        assert p.termination is not None
        return finish(api.Phase.failed, failure_reason(p.termination),
                      describe_termination(p) + "; the error is permanent, so the job is not restarted")

    # ---- success
    by_rank = {p.ordinal: p for p in current}
    expected = spec.elastic.min_nodes if spec.elastic else nodes
    if success_policy == "Rank0":
        finished_ok = 0 in by_rank and by_rank[0].termination is not None and by_rank[0].termination.succeeded
    else:
        finished_ok = len(current) >= expected and all(p.termination is not None and p.termination.succeeded
                                                       for p in current)
    if finished_ok:
        rank0 = by_rank.get(0) or current[0]
        step = rank0.termination.step if rank0.termination else None
        uri = artifact_uri(job)
        st.artifact = api.Artifact(uri=uri, version=str(step) if step is not None else None)
        if st.progress is not None and step is not None:
            st.progress = st.progress.model_copy(update={"step": step})
            st.progress = st.progress.model_copy(update={"summary": progress_summary(st.progress)})
        at = f" at step {step}" if step is not None else ""
        return finish(api.Phase.succeeded, REASON_SUCCEEDED, f"training finished{at}; the model is at {uri}")

    # ---- retryable failure: restart the whole gang from the last checkpoint, up to backoffLimit
    failed = [p for p in finished if p.termination and not p.termination.succeeded]
    if failed:
        p = failed[0]
        assert p.termination is not None
        what = describe_termination(p)
        if restart_gen >= rp.backoff_limit:
            return finish(api.Phase.failed, REASON_BACKOFF,
                          f"{what}; the gang was restarted {restart_gen} time(s), backoffLimit is {rp.backoff_limit}")
        st.restart_count = restart_gen + 1
        reason = failure_reason(p.termination)
        msg = (f"{what}; restarting all {nodes} pod(s) from the last checkpoint "
               f"(restart {st.restart_count} of backoffLimit {rp.backoff_limit})")
        st.phase = api.Phase.restarting
        st.reason, st.message = reason, msg
        events.append(Event("Warning", "Restarting", msg))
        conds(api.ConditionType.restarting, "True", reason, msg)
        conds(api.ConditionType.running, "False", reason, msg)
        st.ready_replicas = 0
        st.succeeded_replicas = st.failed_replicas = 0
        return Evaluation(st, replicas=nodes, stale_pods=[p.name for p in live], events=events,
                          requeue_after=requeue)

    # ---- running, or why not
    required = spec.elastic.min_nodes if spec.elastic else nodes
    ev = Evaluation(st, replicas=nodes, stale_pods=stale, events=events, requeue_after=requeue)
    if ready >= required and len(current) >= required:
        msg = f"{ready}/{nodes} pod(s) ready and training"
        first = prev.phase != api.Phase.running.value
        transition(api.Phase.running, REASON_RUNNING, msg)
        conds(api.ConditionType.running, "True", REASON_RUNNING, msg)
        if get_condition(st.conditions, api.ConditionType.restarting.value) is not None:
            conds(api.ConditionType.restarting, "False", REASON_RECOVERED,
                  f"all pods are back after restart {restart_gen}")
        if first and restart_gen == 0 and prev.phase in (None, api.Phase.created.value, api.Phase.pending.value):
            created = parse_time(str(job.metadata.model_extra.get("creationTimestamp") or "")
                                 if job.metadata.model_extra else None)
            if created is not None:
                ev.time_to_running = max(0.0, (now - created).total_seconds())
        return ev

    reason, msg = diagnose(current, nodes)
    warn = reason not in (REASON_WAITING, REASON_NOT_READY)
    conds(api.ConditionType.running, "False", reason, msg)
    if prev.phase == api.Phase.restarting.value:
        st.phase, st.reason, st.message = api.Phase.restarting, reason, msg
        if warn and prev.reason != reason:
            events.append(Event("Warning", reason, msg))
    elif prev.phase == api.Phase.running.value:
        st.reason, st.message = reason, msg
        if warn and prev.reason != reason:
            events.append(Event("Warning", reason, msg))
    else:
        if prev.phase not in (api.Phase.created.value, api.Phase.suspended.value):
            events.append(Event("Normal", REASON_CREATED,
                                f"created headless Service and StatefulSet {job.metadata.name} ({nodes} pod(s))"))
        if warn and prev.reason != reason:
            events.append(Event("Warning", reason, msg))
        st.phase, st.reason, st.message = api.Phase.created, (reason if warn else REASON_CREATED), msg
    return ev


def error_status(prev: dict[str, Any], reason: str, message: str, now: datetime,
                 generation: int | None) -> dict[str, Any]:
    """The stored status with a reconcile error written into it (phase unchanged), as a wire dict."""
    try:
        status = api.TrainingJobStatus.model_validate(prev or {})
    except ValueError:
        status = api.TrainingJobStatus()
    status.reason = reason
    status.message = message
    if status.phase is None:
        status.phase = api.Phase.pending
    status.conditions = set_condition(status.conditions, api.ConditionType.running.value, "False", reason,
                                      message, now, generation)
    return status.dump()
