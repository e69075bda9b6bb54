"""The InferenceService reconciler: snapshot -> :func:`.status_isvc.evaluate_service` -> a
:class:`.render.ServicePlan` -> result. Pure. Children: the Deployment (by the inferenceservice label); it
refers to the TrainingJob named in ``spec.model.trainingJob``, so that job's changes reconcile it too.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import ClassVar

from aiaas.contract import launch

from . import api
from .metrics import OperatorMetrics
from .reconcile_trainingjob import KIND as TRAININGJOB
from .reconciler import Body, ChildWatch, Key, Result, Snapshot, parse, slim_workload
from .render import RenderSettings, ServicePlan, render_inferenceservice
from .status import error_status
from .status_isvc import PHASE_FAILED, PHASE_WAITING, evaluate_service

KIND = "InferenceService"


@dataclass(frozen=True)
class InferenceServiceReconciler:
    render_settings: RenderSettings

    kind: ClassVar[str] = KIND
    plural: ClassVar[str] = "inferenceservices"
    children: ClassVar[tuple[ChildWatch, ...]] = (ChildWatch("apps/v1", "Deployment", "deployments", launch.LABEL_ISVC, slim_workload),)

    def phase(self, body: Body) -> str:
        return str((body.get("status") or {}).get("phase") or PHASE_WAITING)

    def references(self, body: Body) -> tuple[tuple[str, Key], ...]:
        job = (((body.get("spec") or {}).get("model") or {}).get("trainingJob"))
        ns = (body.get("metadata") or {}).get("namespace", "")
        return ((TRAININGJOB, (ns, str(job))),) if job else ()

    def needs_resync(self, body: Body) -> bool:
        return True

    def probe(self, snap: Snapshot) -> None:
        return None

    def reconcile(self, snap: Snapshot) -> Result:
        svc: api.InferenceService = parse(api.InferenceService, snap.body)
        job = snap.related.get((TRAININGJOB, (snap.key[0], svc.spec.model.training_job or ""))) \
            if svc.spec.model.training_job else None
        deployment = snap.child("Deployment", snap.key[1])
        ev = evaluate_service(svc, job, deployment, snap.now)
        children = render_inferenceservice(svc, self.render_settings,
                                           ServicePlan(storage_uri=ev.storage_uri, hpa_owns_replicas=True))
        wants_deployment = any(m["kind"] == "Deployment" for m in children)
        return Result(status=ev.status.dump(), children=tuple(children),
                      drifted=wants_deployment and deployment is None, events=tuple(ev.events))

    def error_status(self, old: Body, reason: str, message: str, now: datetime, generation: int | None) -> Body:
        return error_status(api.InferenceServiceStatus, old, reason, message, now, generation,
                            default_phase=PHASE_FAILED, condition=api.ServiceConditionType.ready.value)

    def count(self, metrics: OperatorMetrics, old: Body, result: Result) -> None:
        return None
