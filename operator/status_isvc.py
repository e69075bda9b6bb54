"""InferenceService status as a pure function: service + its TrainingJobs (if any) + its Deployments -> status.

With ``spec.canary`` the status shows both versions (``stable``, ``canary``: model, replicas asked for and
ready) and a CanaryReady condition; the service is Ready while any version answers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from . import api
from .render.inferenceservice import (
    TRACK_CANARY,
    ServicePlan,
    Track,
    deployment_names,
    grpc_address,
    service_url,
    tracks,
)
from .status import Event, get_condition, set_condition

PHASE_WAITING = "WaitingForModel"
PHASE_DEPLOYING = "Deploying"
PHASE_READY = "Ready"
PHASE_FAILED = "Failed"

REASON_STORAGE_URI = "StorageUri"
REASON_JOB_SUCCEEDED = "TrainingJobSucceeded"
REASON_WAITING_FOR_JOB = "WaitingForTrainingJob"
REASON_JOB_NOT_FOUND = "TrainingJobNotFound"
REASON_JOB_FAILED = "TrainingJobFailed"
REASON_NOT_SERVABLE = "ArtifactNotServable"
REASON_DEADLINE = "ProgressDeadlineExceeded"
REASON_CANARY_READY = "CanaryReady"
REASON_CANARY_IDLE = "NoTraffic"
REASON_CANARY_PROMOTED = "CanaryPromoted"
REASON_CANARY_REMOVED = "CanaryRolledBack"

Body = dict[str, Any]


@dataclass(frozen=True)
class ModelResolution:
    ready: bool
    reason: str
    message: str
    source: str
    uri: str | None = None
    version: str | None = None
    failed: bool = False  # waiting cannot help

    def served(self) -> api.ServedModel:
        return api.ServedModel(source=self.source, uri=self.uri if self.ready else None,
                               version=self.version if self.ready else None)


def resolve_source(m: api.ModelSource, namespace: str, job: Body | None, where: str = "spec.model"
                   ) -> ModelResolution:
    """Where a model comes from: its ``storageUri`` or a Succeeded TrainingJob's artifact."""
    if m.storage_uri:
        return ModelResolution(True, REASON_STORAGE_URI, f"serving {m.storage_uri}", m.storage_uri, m.storage_uri)
    name = m.training_job or ""
    source = f"trainingjob/{name}"
    if job is None:
        return ModelResolution(False, REASON_JOB_NOT_FOUND,
                               f"TrainingJob {name} does not exist in namespace {namespace}; create it or fix "
                               f"{where}.trainingJob", source)
    status = job.get("status") or {}
    phase = status.get("phase") or "Pending"
    if phase == api.Phase.failed.value:
        why = f" ({status.get('reason')}: {status.get('message')})" if status.get("reason") else ""
        return ModelResolution(False, REASON_JOB_FAILED, f"TrainingJob {name} failed{why}; there is no model to "
                               "serve", source, failed=True)
    if phase != api.Phase.succeeded.value:
        progress = (status.get("progress") or {}).get("summary")
        extra = f", progress {progress}" if progress else ""
        return ModelResolution(False, REASON_WAITING_FOR_JOB,
                               f"waiting for TrainingJob {name} to succeed (phase {phase}{extra})", source)
    artifact = status.get("artifact") or {}
    uri = artifact.get("uri")
    version = artifact.get("version")
    if not uri or not str(uri).startswith("pvc://"):
        return ModelResolution(False, REASON_NOT_SERVABLE,
                               f"TrainingJob {name} succeeded but its model stayed inside its pods ({uri}); give "
                               "the job spec.storage (size or claimName) so the artifact lands on a volume, and "
                               "train again", source, uri, version, failed=True)
    return ModelResolution(True, REASON_JOB_SUCCEEDED, f"serving the model of TrainingJob {name} from {uri}",
                           source, uri, version)


def resolve_model(svc: api.InferenceService, job: Body | None) -> ModelResolution:
    return resolve_source(svc.spec.model, svc.metadata.namespace or "default", job)


@dataclass
class ServiceEvaluation:
    status: api.InferenceServiceStatus
    storage_uri: str | None  # what to render the stable Deployment with (None: no Deployment)
    canary_storage_uri: str | None = None  # the canary's (None: no canary Deployment)
    events: list[Event] = field(default_factory=list)

    @property
    def plan(self) -> ServicePlan:
        return ServicePlan(storage_uri=self.storage_uri, canary_storage_uri=self.canary_storage_uri)


@dataclass(frozen=True)
class TrackState:
    """A version as observed: what was asked for, what its Deployment says."""

    asked: int
    ready: int
    deadline_exceeded: str | None  # the Deployment's message when its progress deadline passed

    @staticmethod
    def of(track: Track | None, deployment: Body | None) -> TrackState:
        if track is None:
            return TrackState(0, 0, None)
        spec, status = (deployment or {}).get("spec") or {}, (deployment or {}).get("status") or {}
        observed = spec.get("replicas")
        asked = int(observed) if track.max_replicas is not None and observed is not None else track.replicas
        progressing: Body = next((c for c in status.get("conditions") or [] if c.get("type") == "Progressing"), {})
        late = progressing.get("message", "replicas do not become ready") \
            if progressing.get("reason") == REASON_DEADLINE else None
        return TrackState(asked, int(status.get("readyReplicas") or 0), late)


def _share(part: int, total: int, fallback: int) -> int:
    return (100 * part + total // 2) // total if total else fallback


def evaluate_service(svc: api.InferenceService, job: Body | None, deployment: Body | None, now: datetime,
                     canary_job: Body | None = None, canary_deployment: Body | None = None) -> ServiceEvaluation:
    """The status, the model locations to render and the Events. ``job``/``canary_job``: the TrainingJobs named
    by spec.model / spec.canary.model (if they name one); the Deployments as observed (None: not there)."""
    prev = svc.status or api.InferenceServiceStatus()
    st = prev.model_copy(deep=True)
    gen = svc.metadata.generation
    st.observed_generation = gen
    st.url, st.grpc_address = service_url(svc), grpc_address(svc)
    res = resolve_model(svc, job)
    st.model = res.served()
    canary = svc.spec.canary
    cres = resolve_source(canary.model, svc.metadata.namespace or "default", canary_job, "spec.canary.model") \
        if canary else None
    ev = ServiceEvaluation(st, res.uri if res.ready else None,
                           cres.uri if cres is not None and cres.ready and res.ready else None)
    planned = {t.track: t for t in tracks(svc, ev.plan)}
    stable = TrackState.of(planned.get("stable"), deployment)
    canary_state = TrackState.of(planned.get(TRACK_CANARY), canary_deployment)

    def cond(t: api.ServiceConditionType, ok: bool, reason: str, message: str) -> None:
        st.conditions = set_condition(st.conditions, t.value, "True" if ok else "False", reason, message, now, gen)

    cond(api.ServiceConditionType.model_ready, res.ready, res.reason, res.message)
    st.replicas = stable.asked + canary_state.asked if res.ready else svc.spec.total_replicas
    st.ready_replicas = stable.ready + canary_state.ready if res.ready else 0
    if not res.ready:
        cond(api.ServiceConditionType.predictor_ready, False, res.reason, res.message)
        phase, reason, message = (PHASE_FAILED if res.failed else PHASE_WAITING), res.reason, res.message
    else:
        phase, reason, message = _predictor_phase(svc, deployment, stable, st.replicas, st.ready_replicas)
        cond(api.ServiceConditionType.predictor_ready, phase == PHASE_READY, reason, message)
    cond(api.ServiceConditionType.ready, phase == PHASE_READY, reason, message)
    if prev.phase != phase or (prev.reason != reason and phase == PHASE_FAILED):
        ev.events.append(Event("Warning" if phase == PHASE_FAILED else "Normal", reason, message))
    st.phase, st.reason, st.message = phase, reason, message
    _canary_status(svc, ev, prev, cres, stable, canary_state, now)
    return ev


def _predictor_phase(svc: api.InferenceService, deployment: Body | None, stable: TrackState, asked: int,
                     ready: int) -> tuple[str, str, str]:
    name = svc.metadata.name
    if deployment is None:
        return PHASE_DEPLOYING, "Deploying", f"creating Deployment {name}"
    if stable.deadline_exceeded is not None:
        return PHASE_FAILED, REASON_DEADLINE, f"Deployment {name}: {stable.deadline_exceeded}"
    if asked == 0:
        return PHASE_DEPLOYING, "ScaledToZero", "spec.replicas is 0"
    if ready >= 1:
        return PHASE_READY, "PredictorReady", f"{ready}/{asked} replica(s) ready at {service_url(svc)}"
    return PHASE_DEPLOYING, "ReplicasNotReady", f"0/{asked} replica(s) ready"


def _canary_status(svc: api.InferenceService, ev: ServiceEvaluation, prev: api.InferenceServiceStatus,
                   cres: ModelResolution | None, stable: TrackState, canary: TrackState, now: datetime) -> None:
    """status.stable, status.canary and CanaryReady (all gone without spec.canary), and their Events."""
    st, spec = ev.status, svc.spec.canary
    ctype = api.ServiceConditionType.canary_ready.value
    old = get_condition(prev.conditions, ctype)
    if spec is None or cres is None:
        st.stable = st.canary = None
        st.conditions = [c for c in st.conditions if c.type != ctype]
        if prev.canary is not None and prev.canary.model is not None:
            promoted = prev.canary.model.source == (st.model.source if st.model else None)
            reason = REASON_CANARY_PROMOTED if promoted else REASON_CANARY_REMOVED
            what = "promoted: it is the stable version now" if promoted else "removed: the stable version serves all"
            ev.events.append(Event("Normal", reason, f"canary {prev.canary.model.source} {what}"))
        return
    total = stable.asked + canary.asked
    pct = spec.traffic_percent
    st.stable = api.TrackStatus(model=st.model, traffic_percent=_share(stable.asked, total, 100 - pct),
                                replicas=stable.asked, ready_replicas=stable.ready)
    st.canary = api.TrackStatus(model=cres.served(), traffic_percent=_share(canary.asked, total, pct),
                                replicas=canary.asked, ready_replicas=canary.ready)
    name = deployment_names(svc)[1]
    if not cres.ready:
        ok, reason, message = False, cres.reason, f"canary: {cres.message}"
    elif ev.canary_storage_uri is None:
        ok, reason, message = False, "WaitingForStable", "the canary starts once the stable version has its model"
    elif canary.deadline_exceeded is not None:
        ok, reason, message = False, REASON_DEADLINE, f"Deployment {name}: {canary.deadline_exceeded}"
    elif canary.asked == 0:
        ok, reason, message = True, REASON_CANARY_IDLE, "spec.canary.trafficPercent is 0: no canary replicas"
    elif canary.ready >= 1:
        ok, reason = True, REASON_CANARY_READY
        message = f"{canary.ready}/{canary.asked} canary replica(s) of {cres.source} ready, {pct}% asked"
    else:
        ok, reason, message = False, "ReplicasNotReady", f"0/{canary.asked} canary replica(s) ready"
    st.conditions = set_condition(st.conditions, ctype, "True" if ok else "False", reason, message, now,
                                  svc.metadata.generation)
    if old is None or old.reason != reason:
        failed = cres.failed or reason == REASON_DEADLINE
        ev.events.append(Event("Warning" if failed else "Normal", reason, message))
