"""InferenceService status as a pure function: service + its TrainingJob (if any) + Deployment -> status."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from . import api
from .render.inferenceservice import service_url
from .status import Event, set_condition

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


@dataclass(frozen=True)
class ModelResolution:
    ready: bool
    reason: str
    message: str
    source: str
    uri: str | None = None
    version: str | None = None
    failed: bool = False  # waiting cannot help


def resolve_model(svc: api.InferenceService, job: dict[str, Any] | None) -> ModelResolution:
    """Where the model comes from: ``spec.model.storageUri`` or a Succeeded TrainingJob's artifact."""
    m = svc.spec.model
    if m.storage_uri:
        return ModelResolution(True, REASON_STORAGE_URI, f"serving {m.storage_uri}", m.storage_uri, m.storage_uri)
    name = m.training_job or ""
    source = f"trainingjob/{name}"
    ns = svc.metadata.namespace or "default"
    if job is None:
        return ModelResolution(False, REASON_JOB_NOT_FOUND,
                               f"TrainingJob {name} does not exist in namespace {ns}; create it or fix "
                               "spec.model.trainingJob", source)
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


@dataclass
class ServiceEvaluation:
    status: api.InferenceServiceStatus
    storage_uri: str | None  # what to render the Deployment with (None: Service only)
    events: list[Event] = field(default_factory=list)


def evaluate_service(svc: api.InferenceService, job: dict[str, Any] | None, deployment: dict[str, Any] | None,
                     now: datetime) -> ServiceEvaluation:
    prev = svc.status or api.InferenceServiceStatus()
    st = prev.model_copy(deep=True)
    gen = svc.metadata.generation
    st.observed_generation = gen
    st.url = service_url(svc)
    res = resolve_model(svc, job)
    st.model = api.ServedModel(source=res.source, uri=res.uri if res.ready else None,
                               version=res.version if res.ready else None)

    def cond(t: api.ServiceConditionType, ok: bool, reason: str, message: str) -> None:
        st.conditions = set_condition(st.conditions, t.value, "True" if ok else "False", reason, message, now, gen)

    cond(api.ServiceConditionType.model_ready, res.ready, res.reason, res.message)
    desired = svc.spec.min_replicas if svc.spec.min_replicas is not None else svc.spec.replicas
    st.replicas = desired
    if not res.ready:
        st.ready_replicas = 0
        cond(api.ServiceConditionType.predictor_ready, False, res.reason, res.message)
        phase, reason, message = (PHASE_FAILED if res.failed else PHASE_WAITING), res.reason, res.message
    else:
        dstatus = (deployment or {}).get("status") or {}
        ready = int(dstatus.get("readyReplicas") or 0)
        st.ready_replicas = ready
        dconds = {c.get("type"): c for c in dstatus.get("conditions") or []}
        progressing = dconds.get("Progressing") or {}
        if deployment is None:
            phase, reason, message = PHASE_DEPLOYING, "Deploying", f"creating Deployment {svc.metadata.name}"
        elif progressing.get("reason") == "ProgressDeadlineExceeded":
            phase, reason = PHASE_FAILED, "ProgressDeadlineExceeded"
            message = f"Deployment {svc.metadata.name}: {progressing.get('message', 'replicas do not become ready')}"
        elif desired == 0:
            phase, reason, message = PHASE_DEPLOYING, "ScaledToZero", "spec.replicas is 0"
        elif ready >= 1:
            phase, reason, message = PHASE_READY, "PredictorReady", f"{ready}/{desired} replica(s) ready at {st.url}"
        else:
            phase, reason, message = PHASE_DEPLOYING, "ReplicasNotReady", f"0/{desired} replica(s) ready"
        cond(api.ServiceConditionType.predictor_ready, phase == PHASE_READY, reason, message)
    cond(api.ServiceConditionType.ready, phase == PHASE_READY, reason, message)
    events: list[Event] = []
    if prev.phase != phase or (prev.reason != reason and phase == PHASE_FAILED):
        events.append(Event("Warning" if phase == PHASE_FAILED else "Normal", reason, message))
    st.phase, st.reason, st.message = phase, reason, message
    return ServiceEvaluation(st, res.uri if res.ready else None, events)
