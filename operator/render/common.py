"""Pieces shared by the renderers: metadata, owner references, security context, scheduling."""

from __future__ import annotations

from typing import Any

from aiaas.contract import launch
from aiaas.operator import api


def owner_reference(obj: api.TrainingJob | api.InferenceService) -> list[dict[str, Any]]:
    """The controller owner reference (empty for objects not yet stored, e.g. ``aiaas render`` of a file)."""
    if not obj.metadata.uid:
        return []
    return [
        {
            "apiVersion": api.API_VERSION,
            "kind": obj.kind,
            "name": obj.metadata.name,
            "uid": obj.metadata.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]


def metadata(obj: api.TrainingJob | api.InferenceService, name: str, labels: dict[str, str],
             annotations: dict[str, str] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "labels": labels}
    if obj.metadata.namespace:
        meta["namespace"] = obj.metadata.namespace
    if annotations:
        meta["annotations"] = annotations
    owners = owner_reference(obj)
    if owners:
        meta["ownerReferences"] = owners
    return meta


def pod_security_context(run_as_user: int) -> dict[str, Any]:
    """Restricted Pod Security Standard: non-root, RuntimeDefault seccomp."""
    return {
        "runAsNonRoot": True,
        "runAsUser": run_as_user,
        "runAsGroup": run_as_user,
        "fsGroup": run_as_user,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security_context() -> dict[str, Any]:
    """Restricted Pod Security Standard, and a read-only root filesystem: training and model server pods write
    only to their volumes (/tmp, /dev/shm, /var/run/aiaas)."""
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "runAsNonRoot": True,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def resources(res: api.Resources) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if res.requests:
        out["requests"] = {k: str(v) for k, v in res.requests.items()}
    if res.limits:
        out["limits"] = {k: str(v) for k, v in res.limits.items()}
    return out


def env_list(env: list[api.EnvVar]) -> list[dict[str, Any]]:
    return [e.dump() for e in env]


def scheduling(sched: api.Scheduling, gpus: int) -> dict[str, Any]:
    """Pod spec fields for node selection. GPU pods tolerate the usual nvidia.com/gpu taint."""
    spec: dict[str, Any] = {}
    if sched.node_selector:
        spec["nodeSelector"] = dict(sched.node_selector)
    tolerations = [t.dump() for t in sched.tolerations]
    if gpus and not any(t.get("key") == api.GPU_RESOURCE for t in tolerations):
        tolerations.append({"key": api.GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"})
    if tolerations:
        spec["tolerations"] = tolerations
    if sched.affinity:
        spec["affinity"] = sched.affinity
    if sched.priority_class_name:
        spec["priorityClassName"] = sched.priority_class_name
    if sched.gang and sched.gang.provider == api.GangProvider.volcano.value:
        spec["schedulerName"] = sched.scheduler_name or "volcano"
    elif sched.scheduler_name:
        spec["schedulerName"] = sched.scheduler_name
    return spec


def base_labels(component: str, instance: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "aiaas",
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/instance": instance,
        launch.LABEL_MANAGED_BY: launch.MANAGED_BY,
    }
