"""The InferenceService reconciler: snapshot -> :func:`.status_isvc.evaluate_service` -> a
:class:`.render.ServicePlan` -> result. Pure. Children: the Deployments of the stable and the canary version (by
the inferenceservice label); it refers to the TrainingJobs named in ``spec.model.trainingJob`` and
``spec.canary.model.trainingJob``, so their changes reconcile it too.

What the spec no longer asks for goes: the canary Deployment (observed), the HorizontalPodAutoscalers and the
NetworkPolicy (deleting one that is not there is a no-op). A stable Deployment made by an operator before
versions existed (its selector lacks ``aiaas.dev/track``; selectors are immutable) is deleted and re-created.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime
from typing import ClassVar

from aiaas.contract import launch

from . import api
from .metrics import OperatorMetrics
from .reconcile_trainingjob import KIND as TRAININGJOB
from .reconciler import Body, ChildWatch, Key, ObjectRef, Result, Snapshot, parse, slim_workload
from .render import RenderSettings, render_inferenceservice
from .render.inferenceservice import deployment_names
from .status import error_status
from .status_isvc import PHASE_FAILED, PHASE_WAITING, evaluate_service

KIND = "InferenceService"
DEPLOYMENT = ("apps/v1", "Deployment")
HPA = ("autoscaling/v2", "HorizontalPodAutoscaler")
NETWORK_POLICY = ("networking.k8s.io/v1", "NetworkPolicy")


def slim_deployment(body: Body) -> Body:
    """A Deployment as the reconciler reads it: :func:`slim_workload` and its selector."""
    out = slim_workload(body)
    out["spec"]["selector"] = (body.get("spec") or {}).get("selector") or {}
    return out


def training_jobs(body: Body) -> tuple[str, ...]:
    """The TrainingJobs a service body names (spec.model, then spec.canary.model)."""
    spec = body.get("spec") or {}
    names = ((spec.get("model") or {}).get("trainingJob"), (((spec.get("canary") or {}).get("model") or {})
                                                            .get("trainingJob")))
    return tuple(dict.fromkeys(str(n) for n in names if n))


def _unversioned(deployment: Body | None) -> bool:
    labels = (((deployment or {}).get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
    return deployment is not None and launch.LABEL_TRACK not in labels


def _gone(svc: api.InferenceService, rendered: list[Body], canary: Body | None) -> list[ObjectRef]:
    """Children the spec no longer asks for: the canary Deployment (when there is one), HPAs, NetworkPolicy."""
    names = {(m["kind"], m["metadata"]["name"]) for m in rendered}
    stable_name, canary_name = deployment_names(svc)
    gone = [ObjectRef(*DEPLOYMENT, canary_name)] if canary is not None and (
        "Deployment", canary_name) not in names else []
    candidates = [(*HPA, stable_name), (*HPA, canary_name), (*NETWORK_POLICY, stable_name)]
    return gone + [ObjectRef(v, k, n) for v, k, n in candidates if (k, n) not in names]


@dataclass(frozen=True)
class InferenceServiceReconciler:
    render_settings: RenderSettings

    kind: ClassVar[str] = KIND
    plural: ClassVar[str] = "inferenceservices"
    children: ClassVar[tuple[ChildWatch, ...]] = (
        ChildWatch(*DEPLOYMENT, "deployments", launch.LABEL_ISVC, slim_deployment),)

    def phase(self, body: Body) -> str:
        return str((body.get("status") or {}).get("phase") or PHASE_WAITING)

    def references(self, body: Body) -> tuple[tuple[str, Key], ...]:
        ns = (body.get("metadata") or {}).get("namespace", "")
        return tuple((TRAININGJOB, (ns, job)) for job in training_jobs(body))

    def needs_resync(self, body: Body) -> bool:
        return True

    def probe(self, snap: Snapshot) -> None:
        return None

    def reconcile(self, snap: Snapshot) -> Result:
        svc: api.InferenceService = parse(api.InferenceService, snap.body)

        def job(m: api.ModelSource | None) -> Body | None:
            name = m.training_job if m else None
            return snap.related.get((TRAININGJOB, (snap.key[0], name))) if name else None

        stable_name, canary_name = deployment_names(svc)
        stable, canary = snap.child("Deployment", stable_name), snap.child("Deployment", canary_name)
        ev = evaluate_service(svc, job(svc.spec.model), stable, snap.now,
                              job(svc.spec.canary.model if svc.spec.canary else None), canary)
        rendered = render_inferenceservice(svc, self.render_settings, replace(ev.plan, hpa_owns_replicas=True))
        recreate = _unversioned(stable) and any(m["kind"] == "Deployment" and m["metadata"]["name"] == stable_name
                                                for m in rendered)
        children = tuple(m for m in rendered if not (recreate and m["kind"] == "Deployment"
                                                     and m["metadata"]["name"] == stable_name))
        absent = ([ObjectRef(*DEPLOYMENT, stable_name)] if recreate else []) + _gone(svc, rendered, canary)
        drifted = any(m["kind"] == "Deployment" and snap.child("Deployment", m["metadata"]["name"]) is None
                      for m in children)
        return Result(status=ev.status.dump(), children=children, absent=tuple(absent), drifted=drifted,
                      events=tuple(ev.events))

    def error_status(self, old: Body, reason: str, message: str, now: datetime, generation: int | None) -> Body:
        return error_status(api.InferenceServiceStatus, old, reason, message, now, generation,
                            default_phase=PHASE_FAILED, condition=api.ServiceConditionType.ready.value)

    def count(self, metrics: OperatorMetrics, old: Body, result: Result) -> None:
        return None
