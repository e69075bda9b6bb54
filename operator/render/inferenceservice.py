"""InferenceService -> Service + one Deployment per version (stable, and canary while spec.canary has a model)
+ a HorizontalPodAutoscaler per autoscaled version + a NetworkPolicy when asked.

The renderer draws what a :class:`ServicePlan` asks for (where the models are, who owns the replica counts).
The Service selects every pod of the service (``aiaas.dev/inferenceservice``); each Deployment selects only its
own version (``aiaas.dev/track``), so the replica split between the versions is the traffic split.
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

TRACK_STABLE = "stable"
TRACK_CANARY = "canary"
CANARY_SUFFIX = "-canary"
SERVICE_HTTP_PORT = 80
# The CRD's explainer method -> the server's --explain-method value.
EXPLAIN_METHODS = {api.ExplainMethod.integrated_gradients.value: "integrated-gradients"}


@dataclass(frozen=True)
class ServicePlan:
    """What the operator decided about a service's children. The default renders the service as written."""

    storage_uri: str | None = None  # the resolved model location (None: spec.model.storageUri, if any)
    canary_storage_uri: str | None = None  # the resolved canary model (None: spec.canary.model.storageUri, if any)
    # With an HPA the Deployment's replicas are the HPA's: leave them out of what the operator applies.
    hpa_owns_replicas: bool = False


@dataclass(frozen=True)
class Track:
    """One version of the service: a Deployment (and maybe an HPA) of that name."""

    track: str  # TRACK_STABLE or TRACK_CANARY
    name: str  # of its Deployment and HPA
    storage_uri: str
    replicas: int  # fixed replicas, or the HPA's lower bound
    max_replicas: int | None  # an HPA's upper bound; None: no HPA


def split_replicas(total: int, percent: int) -> tuple[int, int]:
    """(stable, canary) replicas for a canary share of ``percent``: canary = round(total x percent / 100)
    (halves up), at least 1 when percent > 0 and at most total - 1 when percent < 100; stable = the rest, at
    least 1 when percent < 100. So a total of 1 at 1..99% runs 1 + 1. Non-decreasing in ``total``, so the
    bounds of an HPA split this way stay ordered."""
    if total == 0 or percent == 0:
        return total, 0
    if percent == 100:
        return 0, total
    canary = min(max((total * percent + 50) // 100, 1), max(total - 1, 1))
    return max(total - canary, 1), canary


def deployment_names(svc: api.InferenceService) -> tuple[str, str]:
    """(stable, canary) Deployment (and HPA) names."""
    return svc.metadata.name, svc.metadata.name + CANARY_SUFFIX


def tracks(svc: api.InferenceService, plan: ServicePlan) -> list[Track]:
    """The versions to deploy. Without a model location (a TrainingJob that has not finished) none; the canary
    only beside a stable version and with its own model location."""
    s = svc.spec
    uri = plan.storage_uri or s.model.storage_uri
    if not uri:
        return []
    canary_uri = (plan.canary_storage_uri or s.canary.model.storage_uri) if s.canary else None
    autoscaled = s.min_replicas is not None and s.max_replicas is not None and s.min_replicas < s.max_replicas
    lo, hi = s.total_replicas, (s.max_replicas if autoscaled else None)
    stable_name, canary_name = deployment_names(svc)
    if s.canary is None or not canary_uri:
        return [Track(TRACK_STABLE, stable_name, uri, lo, hi)]
    pct = s.canary.traffic_percent
    (lo_s, lo_c), (hi_s, hi_c) = split_replicas(lo, pct), split_replicas(hi if hi is not None else lo, pct)
    return [Track(TRACK_STABLE, stable_name, uri, lo_s, hi_s if hi is not None and lo_s < hi_s else None),
            Track(TRACK_CANARY, canary_name, canary_uri, lo_c, hi_c if hi is not None and lo_c < hi_c else None)]


def parse_pvc_uri(uri: str) -> tuple[str, str]:
    """``pvc://claim/some/path`` -> (claim, "some/path")."""
    parsed = urlparse(uri)
    if parsed.scheme != "pvc" or not parsed.netloc:
        raise ValueError(f"storage URI {uri!r} is not of the form pvc://<claim>/<path>")
    return parsed.netloc, parsed.path.strip("/")


def service_url(svc: api.InferenceService) -> str:
    ns = svc.metadata.namespace or "default"
    return f"http://{svc.metadata.name}.{ns}.svc/v2/models/{svc.model_name}"


def grpc_address(svc: api.InferenceService) -> str:
    ns = svc.metadata.namespace or "default"
    return f"{svc.metadata.name}.{ns}.svc:{launch.SERVER_GRPC_PORT}"


def labels(svc: api.InferenceService) -> dict[str, str]:
    return base_labels("predictor", svc.metadata.name) | {launch.LABEL_ISVC: svc.metadata.name}


def _probe(path: str, period: int, failures: int) -> dict[str, Any]:
    return {"httpGet": {"path": path, "port": "http"}, "periodSeconds": period, "failureThreshold": failures}


def server_args(svc: api.InferenceService) -> list[str]:
    """The model server's command line: what the spec switches on becomes its flags (docs/serving.md)."""
    s = svc.spec
    args = [
        "--model", launch.MODEL_DIR,
        "--name", svc.model_name,
        "--port", str(launch.SERVER_PORT),
        "--grpc-port", str(launch.SERVER_GRPC_PORT),
        "--max-batch-size", str(s.max_batch_size),
        "--max-batch-delay-ms", str(s.max_batch_delay_ms),
    ]
    if s.explainer is not None:
        args += ["--explain-method", EXPLAIN_METHODS[s.explainer.method], "--explain-steps", str(s.explainer.steps)]
    if s.auth is not None:
        args += ["--auth-token-file", launch.AUTH_TOKEN_FILE]
    return args


def _volumes(svc: api.InferenceService, claim: str, path: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(pod volumes, the server's mounts): the model read-only, /tmp, and the token Secret when asked."""
    mount: dict[str, Any] = {"name": "model", "mountPath": launch.MODEL_DIR, "readOnly": True}
    if path:
        mount["subPath"] = path
    volumes: list[dict[str, Any]] = [
        {"name": "model", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}},
        {"name": "tmp", "emptyDir": {}},
    ]
    mounts = [mount, {"name": "tmp", "mountPath": "/tmp"}]
    auth = svc.spec.auth
    if auth is not None:
        ref = auth.token_secret_ref
        token_file = launch.AUTH_TOKEN_FILE.rpartition("/")[2]
        volumes.append({"name": "auth-token", "secret": {
            "secretName": ref.name, "items": [{"key": ref.key, "path": token_file}], "defaultMode": 0o440}})
        mounts.append({"name": "auth-token", "mountPath": launch.AUTH_TOKEN_DIR, "readOnly": True})
    return volumes, mounts


def deployment(svc: api.InferenceService, settings: RenderSettings, track: Track,
               with_replicas: bool) -> dict[str, Any]:
    claim, path = parse_pvc_uri(track.storage_uri)
    s = svc.spec
    volumes, mounts = _volumes(svc, claim, path)
    container: dict[str, Any] = {
        "name": launch.SERVER_CONTAINER,
        "image": s.image or settings.server_image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": ["python", "-m", "aiaas.server"],
        "args": server_args(svc),
        "ports": [{"name": "http", "containerPort": launch.SERVER_PORT, "protocol": "TCP"},
                  {"name": "grpc", "containerPort": launch.SERVER_GRPC_PORT, "protocol": "TCP"}],
        "env": [{"name": "PYTHONUNBUFFERED", "value": "1"}] + env_list(s.env),
        "readinessProbe": _probe("/v2/health/ready", 5, 3),
        "livenessProbe": _probe("/v2/health/live", 10, 3),
        "startupProbe": _probe("/v2/health/live", 2, 60),
        "volumeMounts": mounts,
        "securityContext": container_security_context(),
    }
    res = resources(s.resources)
    if res:
        container["resources"] = res
    pod_labels = labels(svc) | {launch.LABEL_TRACK: track.track}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata(svc, track.name, pod_labels),
        "spec": {
            **({"replicas": track.replicas} if with_replicas else {}),
            "selector": {"matchLabels": {launch.LABEL_ISVC: svc.metadata.name, launch.LABEL_TRACK: track.track}},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {
                "metadata": {
                    "labels": pod_labels,
                    "annotations": {"aiaas.dev/storage-uri": track.storage_uri},
                },
                "spec": {
                    "terminationGracePeriodSeconds": 30,
                    "enableServiceLinks": False,
                    "automountServiceAccountToken": False,
                    "securityContext": pod_security_context(settings.run_as_user),
                    "containers": [container],
                    "volumes": volumes,
                    **scheduling(s.scheduling, s.resources.gpus()),
                },
            },
        },
    }


def service(svc: api.InferenceService) -> dict[str, Any]:
    """One Service for every version: it selects the service's pods, whatever their track."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(svc, svc.metadata.name, labels(svc)),
        "spec": {
            "selector": {launch.LABEL_ISVC: svc.metadata.name},
            "ports": [
                {"name": "http", "port": SERVICE_HTTP_PORT, "targetPort": "http", "protocol": "TCP"},
                {"name": "grpc", "port": launch.SERVER_GRPC_PORT, "targetPort": "grpc", "protocol": "TCP",
                 "appProtocol": "grpc"},
            ],
        },
    }


def autoscaler(svc: api.InferenceService, track: Track) -> dict[str, Any] | None:
    if track.max_replicas is None:
        return None
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": metadata(svc, track.name, labels(svc) | {launch.LABEL_TRACK: track.track}),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": track.name},
            "minReplicas": track.replicas,
            "maxReplicas": track.max_replicas,
            "metrics": [
                {
                    "type": "Resource",
                    "resource": {"name": "cpu", "target": {"type": "Utilization",
                                                          "averageUtilization": svc.spec.scale_target}},
                }
            ],
        },
    }


def network_policy(svc: api.InferenceService) -> dict[str, Any] | None:
    """Only the listed peers may reach the server's HTTP and gRPC ports (ingress to every version's pods)."""
    n = svc.spec.network_policy
    if n is None:
        return None
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": metadata(svc, svc.metadata.name, labels(svc)),
        "spec": {
            "podSelector": {"matchLabels": {launch.LABEL_ISVC: svc.metadata.name}},
            "policyTypes": ["Ingress"],
            "ingress": [{
                "from": [peer.dump() for peer in n.allow_from],
                "ports": [{"protocol": "TCP", "port": launch.SERVER_PORT},
                          {"protocol": "TCP", "port": launch.SERVER_GRPC_PORT}],
            }],
        },
    }


def render_inferenceservice(svc: api.InferenceService, settings: RenderSettings, plan: ServicePlan = ServicePlan()
                            ) -> list[dict[str, Any]]:
    """Children of the service: the Service (and NetworkPolicy) always; per version with a model location its
    Deployment and, when it autoscales, its HPA. A version without a model location renders no Deployment."""
    objs: list[dict[str, Any] | None] = [service(svc), network_policy(svc)]
    for track in tracks(svc, plan):
        hpa = autoscaler(svc, track)
        objs += [deployment(svc, settings, track, with_replicas=hpa is None or not plan.hpa_owns_replicas), hpa]
    return [o for o in objs if o is not None]
