"""InferenceService -> Deployment + Service (+ HorizontalPodAutoscaler when minReplicas < maxReplicas).

The renderer draws what a :class:`ServicePlan` asks for (where the model is, who owns the replica count).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from aiaas.contract import launch
from aiaas.operator import api

from .common import (
    base_labels,
    container_security_context,
    env_list,
    metadata,
    pod_security_context,
    resources,
    scheduling,
)
from .settings import RenderSettings


@dataclass(frozen=True)
class ServicePlan:
    """What the operator decided about a service's children. The default renders the service as written."""

    storage_uri: str | None = None  # the resolved model location (None: spec.model.storageUri, if any)
    # With an HPA the Deployment's replicas are the HPA's: leave them out of what the operator applies.
    hpa_owns_replicas: bool = False


def parse_pvc_uri(uri: str) -> tuple[str, str]:
    """``pvc://claim/some/path`` -> (claim, "some/path")."""
    parsed = urlparse(uri)
    if parsed.scheme != "pvc" or not parsed.netloc:
        raise ValueError(f"storage URI {uri!r} is not of the form pvc://<claim>/<path>")
    return parsed.netloc, parsed.path.strip("/")


def service_url(svc: api.InferenceService) -> str:
    ns = svc.metadata.namespace or "default"
    return f"http://{svc.metadata.name}.{ns}.svc/v2/models/{svc.model_name}"


def labels(svc: api.InferenceService) -> dict[str, str]:
    return base_labels("predictor", svc.metadata.name) | {launch.LABEL_ISVC: svc.metadata.name}


def _probe(path: str, period: int, failures: int) -> dict[str, Any]:
    return {"httpGet": {"path": path, "port": "http"}, "periodSeconds": period, "failureThreshold": failures}


def deployment(svc: api.InferenceService, settings: RenderSettings, storage_uri: str,
               with_replicas: bool) -> dict[str, Any]:
    claim, path = parse_pvc_uri(storage_uri)
    s = svc.spec
    mount: dict[str, Any] = {"name": "model", "mountPath": launch.MODEL_DIR, "readOnly": True}
    if path:
        mount["subPath"] = path
    container: dict[str, Any] = {
        "name": launch.SERVER_CONTAINER,
        "image": s.image or settings.server_image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": ["python", "-m", "aiaas.server"],
        "args": [
            "--model", launch.MODEL_DIR,
            "--name", svc.model_name,
            "--port", str(launch.SERVER_PORT),
            "--max-batch-size", str(s.max_batch_size),
            "--max-batch-delay-ms", str(s.max_batch_delay_ms),
        ],
        "ports": [{"name": "http", "containerPort": launch.SERVER_PORT, "protocol": "TCP"}],
        "env": [{"name": "PYTHONUNBUFFERED", "value": "1"}] + env_list(s.env),
        "readinessProbe": _probe("/v2/health/ready", 5, 3),
        "livenessProbe": _probe("/v2/health/live", 10, 3),
        "startupProbe": _probe("/v2/health/live", 2, 60),
        "volumeMounts": [mount, {"name": "tmp", "mountPath": "/tmp"}],
        "securityContext": container_security_context(),
    }
    res = resources(s.resources)
    if res:
        container["resources"] = res
    replicas = s.min_replicas if s.min_replicas is not None else s.replicas
    pod_labels = labels(svc)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata(svc, svc.metadata.name, pod_labels),
        "spec": {
            **({"replicas": replicas} if with_replicas else {}),
            "selector": {"matchLabels": {launch.LABEL_ISVC: svc.metadata.name}},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {
                "metadata": {
                    "labels": pod_labels,
                    "annotations": {"aiaas.dev/storage-uri": storage_uri},
                },
                "spec": {
                    "terminationGracePeriodSeconds": 30,
                    "enableServiceLinks": False,
                    "automountServiceAccountToken": False,
                    "securityContext": pod_security_context(settings.run_as_user),
                    "containers": [container],
                    "volumes": [
                        {"name": "model", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}},
                        {"name": "tmp", "emptyDir": {}},
                    ],
                    **scheduling(s.scheduling, s.resources.gpus()),
                },
            },
        },
    }


def service(svc: api.InferenceService) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(svc, svc.metadata.name, labels(svc)),
        "spec": {
            "selector": {launch.LABEL_ISVC: svc.metadata.name},
            "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}],
        },
    }


def autoscaler(svc: api.InferenceService) -> dict[str, Any] | None:
    s = svc.spec
    if s.min_replicas is None or s.max_replicas is None or s.min_replicas >= s.max_replicas:
        return None
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": metadata(svc, svc.metadata.name, labels(svc)),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": svc.metadata.name},
            "minReplicas": s.min_replicas,
            "maxReplicas": s.max_replicas,
            "metrics": [
                {
                    "type": "Resource",
                    "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": s.scale_target}},
                }
            ],
        },
    }


def render_inferenceservice(svc: api.InferenceService, settings: RenderSettings, plan: ServicePlan = ServicePlan()
                            ) -> list[dict[str, Any]]:
    """Children of the service. Without a model location (a TrainingJob that has not finished) only the
    Service is rendered."""
    uri = plan.storage_uri or svc.spec.model.storage_uri
    if not uri:
        return [service(svc)]
    hpa = autoscaler(svc)
    with_replicas = hpa is None or not plan.hpa_owns_replicas
    objs = [service(svc), deployment(svc, settings, uri, with_replicas), hpa]
    return [o for o in objs if o is not None]
