"""InferenceService versions on a real control plane: `aiaas operator` as a subprocess, kwok plays the kubelet.

A canary beside the stable version (two Deployments behind one Service, replicas split by trafficPercent), status
with both versions and the ready replicas of kwok's pods, then a traffic change, promotion and roll back by
editing the spec; plus the NetworkPolicy and the token Secret in the pods. Pods run no containers here: traffic
through the Service is the real-node test's job.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from e2e_util import wait_for
from test_operator import Operator, _static_volume, apply, condition, event_reasons, get

from aiaas.contract import launch

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(400), pytest.mark.usefixtures("e2e_cluster")]

NAME = "digits"


@pytest.fixture
def operator(namespace: str, tmp_path) -> Any:
    op = Operator(namespace, ["--standalone"], str(tmp_path / "operator.log")).start()
    yield op
    op.stop()


def service(**spec: Any) -> dict[str, Any]:
    return {"apiVersion": "aiaas.dev/v1alpha1", "kind": "InferenceService", "metadata": {"name": NAME},
            "spec": {"model": {"storageUri": "pvc://models/v1"}, "replicas": 4,
                     "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}}, **spec}}


def status(kubectl, namespace: str) -> dict[str, Any]:
    return (get(kubectl, namespace, "inferenceservices.aiaas.dev", NAME) or {}).get("status") or {}


def ready_pods_by_track(kubectl, namespace: str) -> dict[str, int]:
    out = kubectl("get", "pods", "-l", f"{launch.LABEL_ISVC}={NAME}", "-o", "json", namespace=namespace).stdout
    counts: dict[str, int] = {}
    for p in json.loads(out)["items"]:
        ready = any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", []))
        if ready and not p["metadata"].get("deletionTimestamp"):
            track = p["metadata"]["labels"].get(launch.LABEL_TRACK, "?")
            counts[track] = counts.get(track, 0) + 1
    return counts


def wait_status(kubectl, namespace: str, op: Operator, what: str, ok, timeout: float = 90) -> dict[str, Any]:
    try:
        return wait_for(lambda: (s := status(kubectl, namespace)) and ok(s) and s, timeout=timeout, interval=0.5,
                        what=what)
    except TimeoutError:
        print(json.dumps(status(kubectl, namespace), indent=1))
        print(op.log())
        raise


def versions(st: dict[str, Any]) -> tuple[Any, ...]:
    s, c = st.get("stable") or {}, st.get("canary") or {}
    return (s.get("replicas"), s.get("readyReplicas"), c.get("replicas"), c.get("readyReplicas"))


def test_canary_split_status_promote_and_rollback(kubectl, namespace, operator):
    op = operator
    _static_volume(kubectl, namespace, "models")
    kubectl("create", "secret", "generic", "digits-token", "--from-literal=token=s3cret", namespace=namespace)
    apply(kubectl, namespace, service(
        canary={"model": {"storageUri": "pvc://models/v2"}, "trafficPercent": 25},
        auth={"tokenSecretRef": {"name": "digits-token", "key": "token"}},
        networkPolicy={"allowFrom": [{"podSelector": {}}]}))

    st = wait_status(kubectl, namespace, op, "stable 3/3 and canary 1/1",
                     lambda s: versions(s) == (3, 3, 1, 1) and s.get("phase") == "Ready")
    assert st["canary"]["model"] == {"source": "pvc://models/v2", "uri": "pvc://models/v2"}
    assert st["stable"]["model"] == st["model"] == {"source": "pvc://models/v1", "uri": "pvc://models/v1"}
    assert (st["stable"]["trafficPercent"], st["canary"]["trafficPercent"]) == (75, 25)
    assert (st["replicas"], st["readyReplicas"]) == (4, 4)
    assert condition(st, "CanaryReady")["status"] == "True"
    assert st["grpcAddress"] == f"{NAME}.{namespace}.svc:{launch.SERVER_GRPC_PORT}"
    assert ready_pods_by_track(kubectl, namespace) == {"stable": 3, "canary": 1}
    svc = get(kubectl, namespace, "service", NAME)
    assert svc is not None and svc["spec"]["selector"] == {launch.LABEL_ISVC: NAME}
    assert {p["name"]: p.get("appProtocol") for p in svc["spec"]["ports"]} == {"http": None, "grpc": "grpc"}
    canary = get(kubectl, namespace, "deployment", f"{NAME}-canary")
    assert canary is not None
    pod = canary["spec"]["template"]["spec"]
    assert {"secretName": "digits-token", "items": [{"key": "token", "path": "token"}], "defaultMode": 0o440} in \
        [v.get("secret") for v in pod["volumes"]]
    assert "--auth-token-file" in pod["containers"][0]["args"]
    np = get(kubectl, namespace, "networkpolicy", NAME)
    assert np is not None and np["spec"]["podSelector"] == {"matchLabels": {launch.LABEL_ISVC: NAME}}

    # more traffic to the canary: 2 + 2
    apply(kubectl, namespace, service(canary={"model": {"storageUri": "pvc://models/v2"}, "trafficPercent": 50},
                                      auth={"tokenSecretRef": {"name": "digits-token", "key": "token"}}))
    wait_status(kubectl, namespace, op, "stable 2/2 and canary 2/2", lambda s: versions(s) == (2, 2, 2, 2))
    wait_for(lambda: ready_pods_by_track(kubectl, namespace) == {"stable": 2, "canary": 2}, timeout=60,
             what="2 + 2 ready pods")
    wait_for(lambda: get(kubectl, namespace, "networkpolicy", NAME) is None, timeout=30,
             what="NetworkPolicy deleted once spec.networkPolicy is gone")

    # promote: the canary's model becomes spec.model, spec.canary goes
    apply(kubectl, namespace, service(model={"storageUri": "pvc://models/v2"}))
    st = wait_status(kubectl, namespace, op, "promoted: one version, 4 ready",
                     lambda s: "canary" not in s and s.get("readyReplicas") == 4
                     and (s.get("model") or {}).get("uri") == "pvc://models/v2")
    assert not condition(st, "CanaryReady") and "stable" not in st
    wait_for(lambda: get(kubectl, namespace, "deployment", f"{NAME}-canary") is None, timeout=30,
             what="canary Deployment deleted")
    stable = get(kubectl, namespace, "deployment", NAME)
    assert stable is not None and stable["spec"]["replicas"] == 4
    assert stable["spec"]["template"]["metadata"]["annotations"]["aiaas.dev/storage-uri"] == "pvc://models/v2"
    wait_for(lambda: ready_pods_by_track(kubectl, namespace) == {"stable": 4}, timeout=90,
             what="4 ready stable pods of the promoted model")
    assert "CanaryPromoted" in event_reasons(kubectl, namespace, NAME)

    # a new canary, then roll it back: spec.canary goes, spec.model stays
    apply(kubectl, namespace, service(model={"storageUri": "pvc://models/v2"},
                                      canary={"model": {"storageUri": "pvc://models/v3"}, "trafficPercent": 10}))
    wait_status(kubectl, namespace, op, "stable 3/3 and canary 1/1 of v3",
                lambda s: versions(s) == (3, 3, 1, 1) and s["canary"]["model"]["uri"] == "pvc://models/v3")
    apply(kubectl, namespace, service(model={"storageUri": "pvc://models/v2"}))
    wait_status(kubectl, namespace, op, "rolled back: one version, 4 ready",
                lambda s: "canary" not in s and s.get("readyReplicas") == 4)
    wait_for(lambda: get(kubectl, namespace, "deployment", f"{NAME}-canary") is None, timeout=30,
             what="canary Deployment deleted")
    stable = get(kubectl, namespace, "deployment", NAME)
    assert stable is not None
    assert stable["spec"]["template"]["metadata"]["annotations"]["aiaas.dev/storage-uri"] == "pvc://models/v2"
    assert "CanaryRolledBack" in event_reasons(kubectl, namespace, NAME)


def test_the_api_server_rejects_a_bad_canary(kubectl, namespace):
    r = kubectl("apply", "-f", "-", input=json.dumps(service(
        canary={"model": {"storageUri": "pvc://models/v2", "name": "other"}, "trafficPercent": 10})),
        namespace=namespace, check=False)
    assert r.returncode != 0 and "spec.canary.model.name" in r.stderr, r.stderr
    r = kubectl("apply", "-f", "-", input=json.dumps(service(
        canary={"model": {"storageUri": "pvc://models/v2"}, "trafficPercent": 150})), namespace=namespace,
        check=False)
    assert r.returncode != 0 and "trafficPercent" in r.stderr, r.stderr
