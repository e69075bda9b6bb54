"""The TrainingJob lifecycle as one pure function: job + observed children + clock -> new status and actions.

Nothing here talks to the API server. :func:`evaluate` is given the job (with its previous status), the worker
pods the operator observed (a StatefulSet's, or a one-node job's bare pod: the same template, the same rules),
and ``now``; it returns the new status together with what the reconciler must do (the number of workers, pods
to delete, whether to delete the job) and the Events to post. The runtime writes the status only when it
differs from the stored one.

Phases: Created -> Running -> (Restarting -> Running)* -> Succeeded | Failed, and Suspended in between.

Gang restarts are level-triggered. ``status.restartCount`` is the restart *generation*; the operator stamps it
on the pod template (annotation ``aiaas.dev/restart-count``). Pods of another generation are stale: they are
deleted and never counted, so a restart survives an operator crash at any point and is never done twice.

Completion. A StatefulSet only allows ``restartPolicy: Always`` (a bare worker pod keeps it, so both behave
alike), so a trainer that finished is restarted by the kubelet; its outcome survives in ``lastState.terminated``
(or ``state.terminated`` until the restart) as the JSON termination message the trainer writes (``outcome``,
``reason``, ``message``, ``step``). The job has Succeeded when every current-generation worker reported
``Succeeded`` (``--success-policy AllWorkers``, the default; at least minNodes of them for an elastic job) or rank 0 did (``Rank0``). Without a
JSON message the exit code decides: 0 success, 78 permanent, 143 preempted, anything else retryable; OOMKilled
is retryable and named as such. ``PermanentError`` (or exit code 78) fails the job at once.

cleanPodPolicy, as it can work with restartPolicy Always (there is no such thing as a finished pod that stays):

* ``Running`` (default): scale the workers to 0 when the job finishes (a bare pod is deleted), so no pod
  restarts and holds its GPUs. The StatefulSet (at 0) and the headless Service stay, the outcome of the pods is
  kept in the status, its conditions and the Events; logs live on in the cluster's log pipeline.
* ``All``: the same, and the headless Service is deleted too.
* ``None``: keep the pods for inspection (``kubectl logs --previous``, ``kubectl exec``): the workers keep
  their number, the kubelet keeps restarting the trainer (the run-once wrapper reports the outcome again and
  exits, backing off), and the pods keep their GPUs until the job is deleted (or ``ttlSecondsAfterFinished``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from aiaas.contract import launch
from aiaas.contract import outcome as oc

from . import api
from .render.trainingjob import artifact_uri
from .resize import SCALED_DOWN, plan_memory, plan_nodes, start_size

TERMINAL = (api.Phase.succeeded.value, api.Phase.failed.value)
IMAGE_PULL_REASONS = ("ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull")
CONTAINER_CONFIG_REASONS = ("CreateContainerConfigError", "CreateContainerError", "RunContainerError")

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
REASON_RESIZED = "Resized"


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
    accuracy: float | None = None  # the built-in trainer's final held-out accuracy

    @property
    def succeeded(self) -> bool:
        return self.outcome == oc.SUCCEEDED

    @property
    def permanent(self) -> bool:
        return self.outcome == oc.PERMANENT


def parse_termination(term: dict[str, Any]) -> Termination:
    exit_code = int(term.get("exitCode", 0) or 0)
    kubelet_reason = str(term.get("reason") or ("Completed" if exit_code == 0 else "Error"))
    raw = str(term.get("message") or "").strip()
    data = oc.parse_message(raw)
    outcome = oc.classify(data.get("outcome"), exit_code)
    if kubelet_reason == "OOMKilled" and outcome == oc.SUCCEEDED:
        outcome = oc.RETRYABLE
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
        accuracy=float(data["accuracy"]) if isinstance(data.get("accuracy"), int | float) else None,
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
    unschedulable_since: str | None  # when PodScheduled turned False (RFC 3339)
    scheduled: bool  # PodScheduled is True
    node_name: str | None
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
    cs = next((c for c in statuses if c.get("name") == launch.TRAINER_CONTAINER), statuses[0] if statuses else {})
    containers = spec.get("containers") or []
    image = next((c.get("image", "") for c in containers if c.get("name") == launch.TRAINER_CONTAINER),
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
        unschedulable_since=sched.get("lastTransitionTime") if unschedulable else None,
        scheduled=sched.get("status") == "True",
        node_name=spec.get("nodeName"),
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
    """The worker pods as the operator saw them. ``progress`` is a fresh scrape of rank 0, if one was made."""

    pods: list[dict[str, Any]] = field(default_factory=list)
    progress: api.Progress | None = None


@dataclass
class Evaluation:
    status: api.TrainingJobStatus
    replicas: int  # the number of workers wanted
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
        what += "was OOMKilled (exit code 137): it ran out of memory"
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
@dataclass
class _Draft:
    """The status being built by one :func:`evaluate`, with the pods it is built from."""

    job: api.TrainingJob
    prev: api.TrainingJobStatus
    st: api.TrainingJobStatus
    now: datetime
    live: list[PodView]  # not being deleted
    current: list[PodView]  # live and of the current restart generation, by ordinal
    size: int  # pods asked for: spec.topology.nodes, or an elastic Auto job's current size
    events: list[Event] = field(default_factory=list)
    requeue: float | None = None

    @property
    def restart_gen(self) -> int:
        return self.prev.restart_count or 0

    @property
    def nodes(self) -> int:
        return self.size

    def condition(self, type_: api.ConditionType, status: str, reason: str, message: str) -> None:
        self.st.conditions = set_condition(self.st.conditions, type_.value, status, reason, message, self.now,
                                           self.job.metadata.generation)

    def has_condition(self, type_: api.ConditionType) -> bool:
        return get_condition(self.st.conditions, type_.value) is not None

    def set_phase(self, phase: api.Phase, reason: str, message: str) -> None:
        """The one place the phase is written."""
        self.st.phase, self.st.reason, self.st.message = phase, reason, message

    def transition(self, phase: api.Phase, reason: str, message: str, event_type: str = "Normal") -> None:
        """Set the phase; an Event when it changes (or a Warning's reason does)."""
        if self.prev.phase != phase.value or (self.prev.reason != reason and event_type == "Warning"):
            self.events.append(Event(event_type, reason, message))
        self.set_phase(phase, reason, message)

    def look_again(self, seconds: float) -> None:
        """Requeue after ``seconds`` unless something else wants an earlier look (a time already past: none)."""
        if seconds > 0:
            seconds = max(1.0, seconds)
            self.requeue = seconds if self.requeue is None else min(self.requeue, seconds)

    def warn_once(self, reason: str, message: str) -> None:
        if self.prev.reason != reason:
            self.events.append(Event("Warning", reason, message))

    def count_pods(self) -> None:
        self.st.active_replicas = sum(p.phase == "Running" for p in self.current)
        self.st.ready_replicas = sum(p.ready for p in self.current)

    def result(self, replicas: int, stale_pods: list[str] | None = None) -> Evaluation:
        return Evaluation(self.st, replicas=replicas, stale_pods=stale_pods or [], events=self.events,
                          requeue_after=self.requeue)


def evaluate(job: api.TrainingJob, observed: Observed, now: datetime, *,
             success_policy: str = "AllWorkers") -> Evaluation:
    """The next status of ``job`` and what to do about it. Pure. The steps run top to bottom; the first that
    decides the phase ends it."""
    d = _draft(job, observed, now)
    if d.prev.phase in TERMINAL:
        return _stay_finished(d)
    if job.spec.suspend:
        return _suspend(d)
    _start(d)
    deadline = _deadline_passed(d)
    if deadline is not None:
        return deadline
    _count_terminations(d)
    return (_permanent_failure(d) or _success(d, success_policy) or _restart_after_failure(d)
            or _resize_nodes(d) or _running_or_waiting(d))


def _draft(job: api.TrainingJob, observed: Observed, now: datetime) -> _Draft:
    prev = job.status or api.TrainingJobStatus()
    st = prev.model_copy(deep=True)
    restart_gen = prev.restart_count or 0
    st.observed_generation = job.metadata.generation
    st.restart_count = restart_gen
    st.progress = merge_progress(prev.progress, observed.progress, now)
    live = [v for v in (pod_view(p) for p in observed.pods) if not v.terminating]
    current = sorted((p for p in live if p.generation == restart_gen), key=lambda p: p.ordinal)
    e = job.spec.elastic
    size = start_size(e, job.spec.topology.nodes, prev.elastic) if e and e.auto else job.spec.topology.nodes
    return _Draft(job, prev, st, now, live, current, size)


def _finished_children(d: _Draft) -> Evaluation:
    """A finished job's children, by cleanPodPolicy: keep the pods (None), or scale to 0 (and drop the
    Service: All)."""
    policy = d.job.spec.run_policy.clean_pod_policy
    keep = policy == api.CleanPodPolicy.none.value
    ev = d.result(replicas=d.nodes if keep else 0)
    ev.keep_service = policy != api.CleanPodPolicy.all.value
    return ev


def _stay_finished(d: _Draft) -> Evaluation:
    """Finished is sticky: only clean-up and the TTL are left."""
    d.count_pods()
    ev = _finished_children(d)
    d.st.replicas = ev.replicas
    ttl = d.job.spec.run_policy.ttl_seconds_after_finished
    done = parse_time(d.prev.completion_time)
    if ttl is not None and done is not None:
        left = (done - d.now).total_seconds() + ttl
        if left <= 0:
            ev.delete_job = True
        else:
            ev.requeue_after = left
    return ev


def _suspend(d: _Draft) -> Evaluation:
    """Kueue admission, or a user pausing the job: scale to zero, keep the checkpoints."""
    msg = "spec.suspend is true: the pods are scaled to zero and checkpoints kept; set it to false to resume"
    d.transition(api.Phase.suspended, REASON_SUSPENDED, msg)
    d.condition(api.ConditionType.suspended, "True", REASON_SUSPENDED, msg)
    d.condition(api.ConditionType.running, "False", REASON_SUSPENDED, msg)
    d.st.replicas = 0
    d.count_pods()
    d.requeue = None
    return d.result(replicas=0)


def _start(d: _Draft) -> None:
    """An active job: resumed if it was suspended, started, its children created, its pods counted."""
    if d.prev.phase == api.Phase.suspended.value:
        msg = "spec.suspend is false: the pods are recreated and resume from the last checkpoint"
        d.events.append(Event("Normal", REASON_RESUMED, msg))
        d.condition(api.ConditionType.suspended, "False", REASON_RESUMED, msg)
        d.st.start_time = rfc3339(d.now)  # as a Kubernetes Job: the deadline counts from the resume
    if d.st.start_time is None:
        d.st.start_time = rfc3339(d.now)
    if not d.has_condition(api.ConditionType.created):
        # the event goes with the condition, once per job, also when its pods are ready at the first look
        d.condition(api.ConditionType.created, "True", REASON_CREATED,
                    f"headless Service and {d.nodes} worker pod(s) of {d.job.metadata.name} created")
        d.events.append(Event("Normal", REASON_CREATED,
                              f"created headless Service and {d.nodes} worker pod(s) of {d.job.metadata.name}"))
    d.st.replicas = d.nodes
    d.count_pods()


def _finish(d: _Draft, phase: api.Phase, reason: str, message: str) -> Evaluation:
    failed = phase == api.Phase.failed
    d.transition(phase, reason, message, "Warning" if failed else "Normal")
    d.condition(api.ConditionType.failed if failed else api.ConditionType.succeeded, "True", reason, message)
    d.condition(api.ConditionType.running, "False", reason, message)
    if d.has_condition(api.ConditionType.restarting):
        d.condition(api.ConditionType.restarting, "False", reason, message)
    d.st.completion_time = rfc3339(d.now)
    d.requeue = None
    ev = _finished_children(d)
    ttl = d.job.spec.run_policy.ttl_seconds_after_finished
    if ttl is not None:
        ev.requeue_after = float(ttl)
        ev.delete_job = ttl == 0
    return ev


def _deadline_passed(d: _Draft) -> Evaluation | None:
    """Fail the job past activeDeadlineSeconds; before it, look again when it passes."""
    limit = d.job.spec.run_policy.active_deadline_seconds
    started = parse_time(d.st.start_time)
    if limit is None or started is None:
        return None
    left = (started - d.now).total_seconds() + limit
    if left <= 0:
        return _finish(d, api.Phase.failed, REASON_DEADLINE, f"the job ran longer than activeDeadlineSeconds ({limit}s)")
    d.requeue = left
    return None


def _count_terminations(d: _Draft) -> None:
    d.st.succeeded_replicas = sum(p.termination is not None and p.termination.succeeded for p in d.current)
    d.st.failed_replicas = sum(p.termination is not None and not p.termination.succeeded for p in d.current)


def _permanent_failure(d: _Draft) -> Evaluation | None:
    """A permanent error (bad config, missing data) fails the job at once: restarting cannot help."""
    p = next((p for p in d.current if p.termination is not None and p.termination.permanent), None)
    if p is None or p.termination is None:
        return None
    return _finish(d, api.Phase.failed, failure_reason(p.termination),
                   describe_termination(p) + "; the error is permanent, so the job is not restarted")


def _success(d: _Draft, success_policy: str) -> Evaluation | None:
    """Every worker (at least minNodes of an elastic job) or rank 0 alone reported Succeeded."""
    by_rank = {p.ordinal: p for p in d.current}
    if success_policy == "Rank0":
        rank0_term = by_rank[0].termination if 0 in by_rank else None
        done = rank0_term is not None and rank0_term.succeeded
    else:
        spec = d.job.spec
        expected = spec.elastic.min_nodes if spec.elastic else d.nodes
        # an elastic job does not wait for a pod that never got a node (e.g. one added to grow)
        workers = [p for p in d.current if not (spec.elastic and p.unschedulable)]
        done = len(workers) >= expected and all(p.termination is not None and p.termination.succeeded
                                                for p in workers)
    if not done:
        return None
    rank0 = by_rank.get(0) or d.current[0]
    final = rank0.termination
    step = final.step if final else None
    uri = artifact_uri(d.job)
    d.st.artifact = api.Artifact(uri=uri, version=str(step) if step is not None else None)
    # the final numbers come from rank 0's termination message: a short job may end between two scrapes
    update = {k: v for k, v in (("step", step), ("metric", final.accuracy if final else None)) if v is not None}
    if update:
        progress = (d.st.progress or api.Progress()).model_copy(update=update)
        d.st.progress = progress.model_copy(update={"summary": progress_summary(progress)})
    at = f" at step {step}" if step is not None else ""
    return _finish(d, api.Phase.succeeded, REASON_SUCCEEDED, f"training finished{at}; the model is at {uri}")


def _restart_after_failure(d: _Draft) -> Evaluation | None:
    """A retryable failure restarts the whole gang from the last checkpoint, up to backoffLimit times; an OOM
    kill raises the memory first (spec.autoscaling.memory) or fails the job."""
    p = next((p for p in d.current if p.termination is not None and not p.termination.succeeded), None)
    if p is None or p.termination is None:
        return None
    what, limit, gen = describe_termination(p), d.job.spec.run_policy.backoff_limit, d.restart_gen
    reason = failure_reason(p.termination)
    if p.termination.reason == "OOMKilled":
        decision = plan_memory(d.job, p.name, d.now)
        if decision.failure is not None or decision.status is None:
            return _finish(d, api.Phase.failed, reason, f"{what}; {decision.failure}")
        d.st.memory = decision.status
        return _gang_restart(d, reason, f"{what}; {decision.status.message}; restarting all {d.nodes} pod(s) "
                             "from the last checkpoint", resize=True)
    failures = gen - (d.prev.resize_count or 0)  # resizes do not count against backoffLimit
    if failures >= limit:
        return _finish(d, api.Phase.failed, REASON_BACKOFF,
                       f"{what}; the gang was restarted {failures} time(s), backoffLimit is {limit}")
    msg = (f"{what}; restarting all {d.nodes} pod(s) from the last checkpoint "
           f"(restart {failures + 1} of backoffLimit {limit})")
    return _gang_restart(d, reason, msg)


def _gang_restart(d: _Draft, reason: str, msg: str, *, resize: bool = False) -> Evaluation:
    """Delete every pod and start the next restart generation (a resize does not count against backoffLimit)."""
    d.st.restart_count = d.restart_gen + 1
    if resize:
        d.st.resize_count = (d.prev.resize_count or 0) + 1
        d.events.append(Event("Normal", REASON_RESIZED, msg))
    else:
        d.events.append(Event("Warning", "Restarting", msg))
    d.set_phase(api.Phase.restarting, reason, msg)
    d.condition(api.ConditionType.restarting, "True", reason, msg)
    d.condition(api.ConditionType.running, "False", reason, msg)
    d.st.ready_replicas = 0
    d.st.succeeded_replicas = d.st.failed_replicas = 0
    d.st.replicas = d.nodes
    return d.result(replicas=d.nodes, stale_pods=[p.name for p in d.live])


def _resize_nodes(d: _Draft) -> Evaluation | None:
    """An elastic Auto job: grow or shrink (:func:`.resize.plan_nodes`); a shrink that moves running pods
    restarts the gang."""
    e = d.job.spec.elastic
    if e is None or not e.auto:
        return None
    decision = plan_nodes(e, d.job.spec.topology.nodes, d.prev.elastic, list(d.current), d.now)
    d.st.elastic = decision.status
    d.size = decision.desired
    d.st.replicas = decision.desired
    if decision.restart:
        return _gang_restart(d, SCALED_DOWN, decision.event or "", resize=True)
    if decision.event:
        d.events.append(Event("Normal", REASON_RESIZED, decision.event))
    # look again when a grace runs out or growing is allowed again: no pod event says so
    shrunk = parse_time(decision.status.last_resize_time) if decision.status.reason == SCALED_DOWN else None
    if shrunk is not None:
        d.look_again((shrunk - d.now).total_seconds() + e.scale_up_retry_seconds)
    for p in d.current:
        since = parse_time(p.unschedulable_since)
        if since is not None:
            d.look_again((since - d.now).total_seconds() + e.scale_down_grace_seconds)
    return None


def _running_or_waiting(d: _Draft) -> Evaluation:
    """Running once enough pods are ready; else the phase stays, with the reason the pods are not ready."""
    spec, nodes = d.job.spec, d.nodes
    required = spec.elastic.min_nodes if spec.elastic else nodes
    ready = d.st.ready_replicas or 0
    ev = d.result(replicas=nodes, stale_pods=[p.name for p in d.live if p.generation != d.restart_gen])
    if ready >= required and len(d.current) >= required:
        _mark_running(d, ev, ready)
        return ev
    reason, msg = diagnose(d.current, nodes)
    warn = reason not in (REASON_WAITING, REASON_NOT_READY)
    d.condition(api.ConditionType.running, "False", reason, msg)
    if d.prev.phase in (api.Phase.restarting.value, api.Phase.running.value):
        d.set_phase(api.Phase(d.prev.phase), reason, msg)
    else:
        d.set_phase(api.Phase.created, reason if warn else REASON_CREATED, msg)
    if warn:
        d.warn_once(reason, msg)
    return ev


def _mark_running(d: _Draft, ev: Evaluation, ready: int) -> None:
    msg = f"{ready}/{d.nodes} pod(s) ready and training"
    first = d.prev.phase != api.Phase.running.value
    d.transition(api.Phase.running, REASON_RUNNING, msg)
    d.condition(api.ConditionType.running, "True", REASON_RUNNING, msg)
    if d.has_condition(api.ConditionType.restarting):
        d.condition(api.ConditionType.restarting, "False", REASON_RECOVERED,
                    f"all pods are back after restart {d.restart_gen}")
    if first and d.restart_gen == 0 and d.prev.phase in (None, api.Phase.created.value, api.Phase.pending.value):
        extra = d.job.metadata.model_extra
        created = parse_time(str(extra.get("creationTimestamp") or "") if extra else None)
        if created is not None:
            ev.time_to_running = max(0.0, (d.now - created).total_seconds())


StatusModel = api.TrainingJobStatus | api.InferenceServiceStatus


def error_status(model: type[StatusModel], prev: dict[str, Any], reason: str, message: str, now: datetime,
                 generation: int | None, *, default_phase: str, condition: str) -> dict[str, Any]:
    """The stored status with an error written into it, as a wire dict: reason and message, the ``condition``
    False with them, the phase unchanged (``default_phase`` when there is none yet)."""
    try:
        status = model.model_validate(prev or {})
    except ValueError:
        status = model()
    status.reason = reason
    status.message = message
    if status.phase is None:
        status.phase = default_phase  # type: ignore[assignment]
    status.conditions = set_condition(status.conditions, condition, "False", reason, message, now, generation)
    return status.dump()


def name_conflict_status(prev: dict[str, Any], conflicts: list[str], reason: str, now: datetime,
                         generation: int | None) -> dict[str, Any]:
    """A wire status with the ``reason`` condition (e.g. NameConflict) set: True with the conflicts, or False
    once they are gone (added only if the condition was there before, so a clean resource does not get it)."""
    conditions = [api.Condition.model_validate(c) for c in prev.get("conditions") or []]
    if not conflicts and get_condition(conditions, reason) is None:
        return prev
    if conflicts:
        conditions = set_condition(conditions, reason, "True", reason, "; ".join(conflicts)[:2000], now, generation)
    else:
        conditions = set_condition(conditions, reason, "False", "Resolved", "every child is controlled by this "
                                   "resource", now, generation)
    return {**prev, "conditions": [c.dump() for c in conditions]}
