"""The one module that talks to the Kubernetes API server (besides kopf's own watches).

Children are written with server-side apply under one field manager (``aiaas-operator``, ``force=true``): applying
the same manifest twice is a no-op, an operator restart re-applies without creating duplicates, and fields other
managers own (an HPA's replicas, a user's labels) are left alone. Status goes through the ``/status`` subresource
as a JSON merge patch. Errors come back as :class:`KubeError` with the API server's message, so a handler can put
it into the resource's status.
"""

from __future__ import annotations

import json
import logging
import uuid
from datetime import datetime, timezone
from typing import Any

import urllib3
from kubernetes import client as kclient
from kubernetes import config as kconfig

log = logging.getLogger("aiaas.operator.k8s")

# apiVersion/kind -> (path prefix, plural, namespaced). Only the kinds the renderers produce, plus our own.
RESOURCES: dict[tuple[str, str], tuple[str, str]] = {
    ("v1", "Service"): ("/api/v1", "services"),
    ("v1", "Pod"): ("/api/v1", "pods"),
    ("v1", "PersistentVolumeClaim"): ("/api/v1", "persistentvolumeclaims"),
    ("v1", "Event"): ("/api/v1", "events"),
    ("apps/v1", "StatefulSet"): ("/apis/apps/v1", "statefulsets"),
    ("networking.k8s.io/v1", "NetworkPolicy"): ("/apis/networking.k8s.io/v1", "networkpolicies"),
    ("apps/v1", "Deployment"): ("/apis/apps/v1", "deployments"),
    ("autoscaling/v2", "HorizontalPodAutoscaler"): ("/apis/autoscaling/v2", "horizontalpodautoscalers"),
    ("scheduling.volcano.sh/v1beta1", "PodGroup"): ("/apis/scheduling.volcano.sh/v1beta1", "podgroups"),
    ("aiaas.dev/v1alpha1", "TrainingJob"): ("/apis/aiaas.dev/v1alpha1", "trainingjobs"),
    ("aiaas.dev/v1alpha1", "InferenceService"): ("/apis/aiaas.dev/v1alpha1", "inferenceservices"),
    ("coordination.k8s.io/v1", "Lease"): ("/apis/coordination.k8s.io/v1", "leases"),
}


# A resourceVersion no stored object has (etcd's first write is revision 2): an apply that names it can only
# create, since an existing object's version never matches (409). Where a storage does hand out "1", the
# apply is refused and the caller reads the object instead: one round trip more, nothing written.
CREATE_ONLY_RESOURCE_VERSION = "1"


class KubeError(Exception):
    """An API call failed; ``str()`` is the API server's message."""

    def __init__(self, status: int, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason

    @property
    def not_found(self) -> bool:
        return self.status == 404

    @property
    def conflict(self) -> bool:
        return self.status == 409


def resource_path(api_version: str, kind: str, namespace: str | None, name: str | None = None,
                  subresource: str | None = None) -> str:
    try:
        prefix, plural = RESOURCES[(api_version, kind)]
    except KeyError:
        raise KubeError(400, f"the operator does not know how to manage {kind} ({api_version})") from None
    path = prefix + (f"/namespaces/{namespace}" if namespace else "") + f"/{plural}"
    if name:
        path += f"/{name}"
    if subresource:
        path += f"/{subresource}"
    return path


def load_api_client(pool_size: int = 32, retries: int | None = None) -> kclient.ApiClient:
    """In-cluster configuration if there is one, else ``$KUBECONFIG``/``~/.kube/config``. ``retries``: how often
    urllib3 retries a failed request (None: its default; 0 for calls that must end by a deadline, since each
    retry gets a fresh timeout)."""
    cfg = kclient.Configuration()
    try:
        kconfig.load_incluster_config(client_configuration=cfg)
    except kconfig.ConfigException:
        kconfig.load_kube_config(client_configuration=cfg)
    cfg.connection_pool_maxsize = pool_size
    if retries is not None:
        cfg.retries = retries
    return kclient.ApiClient(cfg)


class Kube:
    """Thin, thread-safe wrapper over the API: apply, delete, status patch, events, leases."""

    def __init__(self, api_client: kclient.ApiClient, field_manager: str, timeout: float = 30.0) -> None:
        self.api = api_client
        self.field_manager = field_manager
        self.timeout = timeout

    # ---------------------------------------------------------------------------------------- raw call
    def call(self, method: str, path: str, *, query: dict[str, str] | None = None, body: Any = None,
             content_type: str = "application/json", timeout: float | None = None) -> dict[str, Any]:
        """One request, bounded by ``timeout`` seconds in all (default: the client's)."""
        headers = {"Accept": "application/json", "Content-Type": content_type}
        m, url, hdrs, data, _ = self.api.param_serialize(
            method=method, resource_path=path, query_params=list((query or {}).items()), header_params=headers,
            body=body, auth_settings=["BearerToken"],
        )
        try:
            resp = self.api.call_api(m, url, header_params=hdrs, body=data, _request_timeout=timeout or self.timeout)
            resp.read()
        except kclient.ApiException as err:
            raise KubeError(err.status or 0, str(err.reason or err)) from None
        except (OSError, urllib3.exceptions.HTTPError) as err:  # connection refused, timeouts
            raise KubeError(0, f"cannot reach the API server: {err}") from None
        text = resp.data.decode("utf-8", "replace") if resp.data else ""
        if not 200 <= resp.status <= 299:
            message, reason = text, ""
            try:
                payload = json.loads(text)
                message, reason = payload.get("message", text), payload.get("reason", "")
            except ValueError:
                pass
            raise KubeError(resp.status, message, reason)
        return json.loads(text) if text else {}

    # ------------------------------------------------------------------------------------------ writes
    def apply(self, manifest: dict[str, Any], uid: str | None = None, create_only: bool = False) -> dict[str, Any]:
        """Server-side apply ``manifest`` (create or update; idempotent). With ``uid`` it only updates the object
        of that UID: if the name is free the API server answers 409, if another object holds it 422. With
        ``create_only`` it only creates: if the name is taken, 409. Either way a refusal writes nothing, and
        what is applied is owned by our field manager as an apply (later applies can remove fields)."""
        meta = manifest["metadata"]
        path = resource_path(manifest["apiVersion"], manifest["kind"], meta.get("namespace"), meta["name"])
        if uid is not None:
            meta = {**meta, "uid": uid}
        if create_only:
            meta = {**meta, "resourceVersion": CREATE_ONLY_RESOURCE_VERSION}
        body = manifest if meta is manifest["metadata"] else {**manifest, "metadata": meta}
        try:
            return self.call("PATCH", path, query={"fieldManager": self.field_manager, "force": "true"},
                             body=body, content_type="application/apply-patch+yaml")
        except KubeError as err:
            what = f"{manifest['kind']} {meta.get('namespace', '')}/{meta['name']}".replace(" /", " ")
            if err.status == 404:
                raise KubeError(404, f"cannot create {what}: the cluster does not serve {manifest['kind']} "
                                f"({manifest['apiVersion']}); install the component that provides it "
                                f"({err})", err.reason) from None
            raise KubeError(err.status, f"cannot apply {what}: {err}", err.reason) from None

    def delete(self, api_version: str, kind: str, namespace: str | None, name: str, *,
               propagation: str = "Background", uid: str | None = None) -> bool:
        """Delete; False if it was already gone. ``uid`` guards against deleting a recreated namesake."""
        body: dict[str, Any] = {"propagationPolicy": propagation}
        if uid:
            body["preconditions"] = {"uid": uid}
        try:
            self.call("DELETE", resource_path(api_version, kind, namespace, name), body=body)
            return True
        except KubeError as err:
            if err.not_found or err.conflict:
                return False
            raise

    def delete_pods(self, namespace: str, names: list[str]) -> int:
        return sum(self.delete("v1", "Pod", namespace, n) for n in names)

    def patch_status(self, api_version: str, kind: str, namespace: str, name: str,
                     status: dict[str, Any]) -> dict[str, Any]:
        """JSON merge patch of ``.status`` (keys set to None are removed)."""
        return self.call("PATCH", resource_path(api_version, kind, namespace, name, "status"),
                         body={"status": status}, content_type="application/merge-patch+json")

    def get(self, api_version: str, kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        try:
            return self.call("GET", resource_path(api_version, kind, namespace, name))
        except KubeError as err:
            if err.not_found:
                return None
            raise

    def post_event(self, involved: dict[str, Any], type_: str, reason: str, message: str,
                   component: str = "aiaas-operator") -> None:
        """A core/v1 Event about ``involved`` (a resource body). Failures are logged, never raised."""
        meta = involved.get("metadata") or {}
        ns = meta.get("namespace") or "default"
        now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": f"{meta.get('name')}.{uuid.uuid4().hex[:12]}", "namespace": ns},
            "involvedObject": {
                "apiVersion": involved.get("apiVersion"),
                "kind": involved.get("kind"),
                "name": meta.get("name"),
                "namespace": ns,
                "uid": meta.get("uid"),
                "resourceVersion": meta.get("resourceVersion"),
            },
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": component},
            "reportingComponent": component,
            "reportingInstance": component,
            "firstTimestamp": now[:19] + "Z",
            "lastTimestamp": now[:19] + "Z",
            "eventTime": now,
            "action": reason,
            "count": 1,
        }
        try:
            self.call("POST", resource_path("v1", "Event", ns), body=event)
        except KubeError as err:
            log.warning("could not post event %s for %s/%s: %s", reason, ns, meta.get("name"), err)

    # -------------------------------------------------------------------------------------------- lease
    def get_lease(self, namespace: str, name: str, timeout: float | None = None) -> dict[str, Any] | None:
        try:
            return self.call("GET", resource_path("coordination.k8s.io/v1", "Lease", namespace, name), timeout=timeout)
        except KubeError as err:
            if err.not_found:
                return None
            raise

    def create_lease(self, lease: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        ns = lease["metadata"]["namespace"]
        return self.call("POST", resource_path("coordination.k8s.io/v1", "Lease", ns), body=lease, timeout=timeout)

    def replace_lease(self, lease: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        """PUT with the lease's resourceVersion: fails with 409 if someone else wrote it in between."""
        meta = lease["metadata"]
        return self.call("PUT", resource_path("coordination.k8s.io/v1", "Lease", meta["namespace"], meta["name"]),
                         body=lease, timeout=timeout)
