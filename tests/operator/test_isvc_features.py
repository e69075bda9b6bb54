"""InferenceService features (operator/render/inferenceservice.py, status_isvc.py, reconcile_inferenceservice.py):
the server's gRPC port, explanations and token auth wired into the pods; canary versions (replica split, status,
promote and roll back); the optional NetworkPolicy. Rendered objects are checked against the Kubernetes schema."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import kubernetes_validate
import pytest

from aiaas.contract import launch
from aiaas.operator import api
from aiaas.operator.reconcile_inferenceservice import InferenceServiceReconciler
from aiaas.operator.reconciler import InvalidSpec, Snapshot
from aiaas.operator.render import RenderSettings, ServicePlan, render_inferenceservice
from aiaas.operator.render.inferenceservice import split_replicas
from aiaas.operator.status_isvc import evaluate_service

T0 = datetime(2026, 5, 1, 12, 0, 0, tzinfo=timezone.utc)
SETTINGS = RenderSettings()
SERVICES = InferenceServiceReconciler(SETTINGS)
K8S_VERSION = "1.36.0"


def body(status: dict[str, Any] | None = None, **spec: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"apiVersion": api.API_VERSION, "kind": "InferenceService",
                           "metadata": {"name": "digits", "namespace": "ml", "uid": "i1", "generation": 2},
                           "spec": {"model": {"storageUri": "pvc://models/v1"}, **spec}}
    if status is not None:
        out["status"] = status
    return out


def isvc(**spec: Any) -> api.InferenceService:
    return api.InferenceService.model_validate(body(**spec))


def render(**spec: Any) -> list[dict[str, Any]]:
    objs = render_inferenceservice(isvc(**spec), SETTINGS)
    for o in objs:
        kubernetes_validate.validate(o, K8S_VERSION, strict=True)
    return objs


def named(objs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return next(o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name)


def server(objs: list[dict[str, Any]], name: str = "digits") -> dict[str, Any]:
    return named(objs, "Deployment", name)["spec"]["template"]["spec"]["containers"][0]


def flag(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


def deployment(name: str, replicas: int, ready: int, track: str = "stable", late: bool = False) -> dict[str, Any]:
    progressing = {"type": "Progressing", "status": "False" if late else "True",
                   "reason": "ProgressDeadlineExceeded" if late else "NewReplicaSetAvailable", "message": "slow"}
    return {"metadata": {"name": name, "labels": {launch.LABEL_ISVC: "digits"}},
            "spec": {"replicas": replicas, "selector": {"matchLabels": {launch.LABEL_ISVC: "digits",
                                                                         launch.LABEL_TRACK: track}}},
            "status": {"replicas": replicas, "readyReplicas": ready, "conditions": [progressing]}}


def snap(b: dict[str, Any], deployments: tuple[dict[str, Any], ...] = (), related: dict | None = None) -> Snapshot:
    return Snapshot(key=("ml", "digits"), body=b, children={"Deployment": deployments}, related=related or {},
                    probe=None, now=T0)


def cond(st: dict[str, Any], t: str) -> dict[str, Any]:
    return next((c for c in st.get("conditions", []) if c["type"] == t), {})


# ------------------------------------------------------------------------------------ gRPC, explainer, auth
def test_grpc_has_a_port_of_its_own_in_the_deployment_and_the_service():
    objs = render()
    c = server(objs)
    assert flag(c["args"], "--grpc-port") == str(launch.SERVER_GRPC_PORT)
    assert {"name": "grpc", "containerPort": launch.SERVER_GRPC_PORT, "protocol": "TCP"} in c["ports"]
    ports = {p["name"]: p for p in named(objs, "Service", "digits")["spec"]["ports"]}
    assert ports["grpc"] == {"name": "grpc", "port": launch.SERVER_GRPC_PORT, "targetPort": "grpc",
                             "protocol": "TCP", "appProtocol": "grpc"}
    assert ports["http"]["port"] == 80
    assert "--explain-method" not in c["args"] and "--auth-token-file" not in c["args"], "off unless asked"


def test_explainer_sets_the_method_and_steps():
    c = server(render(explainer={"method": "integratedGradients", "steps": 64}))
    assert flag(c["args"], "--explain-method") == "integrated-gradients"
    assert flag(c["args"], "--explain-steps") == "64"
    assert flag(server(render(explainer={}))["args"], "--explain-steps") == "32"
    for bad in ({"steps": 0}, {"steps": 513}, {"method": "shap"}):
        with pytest.raises(ValueError, match="explainer"):
            isvc(explainer=bad)


def test_auth_mounts_the_named_secret_read_only_and_probes_stay_open():
    objs = render(auth={"tokenSecretRef": {"name": "digits-token", "key": "token.txt"}})
    pod = named(objs, "Deployment", "digits")["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert flag(c["args"], "--auth-token-file") == launch.AUTH_TOKEN_FILE
    vol = next(v for v in pod["volumes"] if v["name"] == "auth-token")
    assert vol["secret"] == {"secretName": "digits-token", "defaultMode": 0o440,
                             "items": [{"key": "token.txt", "path": launch.AUTH_TOKEN_FILE.rpartition("/")[2]}]}
    mount = next(m for m in c["volumeMounts"] if m["name"] == "auth-token")
    assert mount == {"name": "auth-token", "mountPath": launch.AUTH_TOKEN_DIR, "readOnly": True}
    assert launch.AUTH_TOKEN_FILE.startswith(launch.AUTH_TOKEN_DIR + "/")
    assert {c[p]["httpGet"]["path"] for p in ("readinessProbe", "livenessProbe", "startupProbe")} == {
        "/v2/health/ready", "/v2/health/live"}, "probes use the endpoints the server leaves open"
    with pytest.raises(ValueError, match="tokenSecretRef"):
        isvc(auth={"tokenSecretRef": {"name": "Bad_Name", "key": "t"}})


# -------------------------------------------------------------------------------------------------- canary
@pytest.mark.parametrize(("total", "percent", "expected"), [
    (4, 0, (4, 0)), (4, 100, (0, 4)), (4, 50, (2, 2)), (4, 10, (3, 1)), (4, 90, (1, 3)), (10, 25, (7, 3)),
    (10, 20, (8, 2)), (1, 50, (1, 1)), (1, 1, (1, 1)), (2, 99, (1, 1)), (0, 50, (0, 0)), (3, 50, (1, 2)),
])
def test_replica_split(total, percent, expected):
    assert split_replicas(total, percent) == expected


def test_split_is_monotone_so_hpa_bounds_stay_ordered():
    for pct in range(101):
        splits = [split_replicas(t, pct) for t in range(0, 60)]
        assert all(a[0] <= b[0] and a[1] <= b[1] for a, b in zip(splits, splits[1:], strict=False)), pct
        assert all(s + c >= t for t, (s, c) in enumerate(splits))


def test_canary_renders_two_versions_behind_one_service():
    objs = render(replicas=4, canary={"model": {"storageUri": "pvc://models/v2"}, "trafficPercent": 25})
    stable, canary = named(objs, "Deployment", "digits"), named(objs, "Deployment", "digits-canary")
    assert (stable["spec"]["replicas"], canary["spec"]["replicas"]) == (3, 1)
    for dep, track, sub in ((stable, "stable", "v1"), (canary, "canary", "v2")):
        sel = dep["spec"]["selector"]["matchLabels"]
        assert sel == {launch.LABEL_ISVC: "digits", launch.LABEL_TRACK: track}
        tmpl = dep["spec"]["template"]
        assert sel.items() <= tmpl["metadata"]["labels"].items()
        assert {"name": "model", "mountPath": "/mnt/models", "readOnly": True, "subPath": sub} in \
            tmpl["spec"]["containers"][0]["volumeMounts"]
        assert flag(tmpl["spec"]["containers"][0]["args"], "--name") == "digits", "same name: clients keep URLs"
    assert named(objs, "Service", "digits")["spec"]["selector"] == {launch.LABEL_ISVC: "digits"}
    assert [o["kind"] for o in objs].count("Service") == 1


def test_canary_with_autoscaling_gets_an_hpa_per_version_with_split_bounds():
    objs = render(minReplicas=2, maxReplicas=10, canary={"model": {"storageUri": "pvc://m/v2"}, "trafficPercent": 20})
    hpas = {o["metadata"]["name"]: o["spec"] for o in objs if o["kind"] == "HorizontalPodAutoscaler"}
    assert {n: (h["minReplicas"], h["maxReplicas"], h["scaleTargetRef"]["name"]) for n, h in hpas.items()} == {
        "digits": (1, 8, "digits"), "digits-canary": (1, 2, "digits-canary")}
    full = render(minReplicas=2, maxReplicas=4, canary={"model": {"storageUri": "pvc://m/v2"}, "trafficPercent": 100})
    assert [o["metadata"]["name"] for o in full if o["kind"] == "HorizontalPodAutoscaler"] == ["digits-canary"]
    assert named(full, "Deployment", "digits")["spec"]["replicas"] == 0


def test_canary_rules():
    with pytest.raises(ValueError, match="spec.canary.model: set exactly one"):
        isvc(canary={"model": {}, "trafficPercent": 10})
    with pytest.raises(ValueError, match="spec.canary.model.storageUri"):
        isvc(canary={"model": {"storageUri": "s3://x"}, "trafficPercent": 10})
    with pytest.raises(ValueError, match="spec.canary.model.name"):
        isvc(canary={"model": {"storageUri": "pvc://m/v2", "name": "other"}, "trafficPercent": 10})
    with pytest.raises(ValueError, match="trafficPercent"):
        isvc(canary={"model": {"storageUri": "pvc://m/v2"}, "trafficPercent": 101})
    isvc(canary={"model": {"storageUri": "pvc://m/v2", "name": "digits"}, "trafficPercent": 10})


def test_status_shows_both_versions_and_their_ready_replicas():
    svc = isvc(replicas=4, canary={"model": {"trainingJob": "lenet2"}, "trafficPercent": 50})
    job2 = {"status": {"phase": "Succeeded", "artifact": {"uri": "pvc://c/lenet2/artifacts", "version": "900"}}}
    ev = evaluate_service(svc, None, deployment("digits", 2, 2), T0, job2, deployment("digits-canary", 2, 1, "canary"))
    st = ev.status
    assert (ev.storage_uri, ev.canary_storage_uri) == ("pvc://models/v1", "pvc://c/lenet2/artifacts")
    assert st.stable == api.TrackStatus(model=api.ServedModel(source="pvc://models/v1", uri="pvc://models/v1"),
                                        traffic_percent=50, replicas=2, ready_replicas=2)
    assert st.canary == api.TrackStatus(
        model=api.ServedModel(source="trainingjob/lenet2", uri="pvc://c/lenet2/artifacts", version="900"),
        traffic_percent=50, replicas=2, ready_replicas=1)
    assert (st.phase, st.replicas, st.ready_replicas) == ("Ready", 4, 3)
    canary_ready = next(c for c in st.conditions if c.type == "CanaryReady")
    assert (canary_ready.status, canary_ready.reason) == ("True", "CanaryReady")
    assert ("Normal", "CanaryReady") in [(e.type, e.reason) for e in ev.events]


def test_a_canary_waiting_for_its_job_leaves_the_stable_version_all_replicas():
    svc = isvc(replicas=4, canary={"model": {"trainingJob": "lenet2"}, "trafficPercent": 50})
    ev = evaluate_service(svc, None, deployment("digits", 4, 4), T0, {"status": {"phase": "Running"}}, None)
    assert ev.canary_storage_uri is None and ev.status.phase == "Ready"
    assert ev.status.stable is not None and ev.status.stable.replicas == 4
    c = next(c for c in ev.status.conditions if c.type == "CanaryReady")
    assert (c.status, c.reason) == ("False", "WaitingForTrainingJob")
    kinds = [(o["kind"], o["metadata"]["name"]) for o in render_inferenceservice(svc, SETTINGS, ev.plan)]
    assert ("Deployment", "digits-canary") not in kinds
    late = evaluate_service(svc, None, deployment("digits", 2, 2), T0,
                            {"status": {"phase": "Succeeded", "artifact": {"uri": "pvc://c/x"}}},
                            deployment("digits-canary", 2, 0, "canary", late=True))
    c = next(c for c in late.status.conditions if c.type == "CanaryReady")
    assert (c.status, c.reason, late.status.phase) == ("False", "ProgressDeadlineExceeded", "Ready")
    assert ("Warning", "ProgressDeadlineExceeded") in [(e.type, e.reason) for e in late.events]


def test_reconciler_promote_and_rollback_delete_the_canary():
    canary = {"model": {"storageUri": "pvc://models/v2"}, "trafficPercent": 50}
    r = SERVICES.reconcile(snap(body(replicas=2, canary=canary)))
    assert [(o["kind"], o["metadata"]["name"]) for o in r.children] == [
        ("Service", "digits"), ("Deployment", "digits"), ("Deployment", "digits-canary")]
    assert r.drifted and r.status["canary"]["replicas"] == 1
    running = (deployment("digits", 1, 1), deployment("digits-canary", 1, 1, "canary"))
    # promote: the canary's model becomes spec.model, spec.canary goes
    promoted = SERVICES.reconcile(snap(body(r.status, replicas=2, model=canary["model"]), running))
    assert "digits-canary" in [a.name for a in promoted.absent if a.kind == "Deployment"]
    stable = next(o for o in promoted.children if o["kind"] == "Deployment")
    assert stable["metadata"]["name"] == "digits" and stable["spec"]["replicas"] == 2
    assert stable["spec"]["template"]["metadata"]["annotations"]["aiaas.dev/storage-uri"] == "pvc://models/v2"
    assert "canary" not in promoted.status and "stable" not in promoted.status
    assert not cond(promoted.status, "CanaryReady")
    assert ("Normal", "CanaryPromoted") in [(e.type, e.reason) for e in promoted.events]
    # roll back: spec.canary goes, spec.model stays
    rolled = SERVICES.reconcile(snap(body(r.status, replicas=2), running))
    assert "digits-canary" in [a.name for a in rolled.absent if a.kind == "Deployment"]
    assert ("Normal", "CanaryRolledBack") in [(e.type, e.reason) for e in rolled.events]
    assert "pvc://models/v1" in str(next(o for o in rolled.children if o["kind"] == "Deployment"))


def test_reconciler_refers_to_both_training_jobs():
    b = body(model={"trainingJob": "lenet"}, canary={"model": {"trainingJob": "lenet2"}, "trafficPercent": 10})
    assert SERVICES.references(b) == (("TrainingJob", ("ml", "lenet")), ("TrainingJob", ("ml", "lenet2")))
    done = {"status": {"phase": "Succeeded", "artifact": {"uri": "pvc://c/lenet2/artifacts", "version": "9"}}}
    r = SERVICES.reconcile(snap(b, related={("TrainingJob", ("ml", "lenet2")): done}))
    assert [o["kind"] for o in r.children] == ["Service"], "no canary before the stable version has a model"
    assert cond(r.status, "CanaryReady")["reason"] == "WaitingForStable"


def test_a_deployment_from_before_versions_is_recreated():
    old = deployment("digits", 1, 1)
    old["spec"]["selector"] = {"matchLabels": {launch.LABEL_ISVC: "digits"}}
    r = SERVICES.reconcile(snap(body(), (old,)))
    assert [o["kind"] for o in r.children] == ["Service"]
    assert ("Deployment", "digits") in [(a.kind, a.name) for a in r.absent]
    again = SERVICES.reconcile(snap(body(), ()))
    assert ("Deployment", "digits") in [(o["kind"], o["metadata"]["name"]) for o in again.children] and again.drifted


def test_children_the_spec_dropped_are_deleted():
    r = SERVICES.reconcile(snap(body(), (deployment("digits", 1, 1),)))
    assert sorted((a.kind, a.name) for a in r.absent) == [
        ("HorizontalPodAutoscaler", "digits"), ("HorizontalPodAutoscaler", "digits-canary"),
        ("NetworkPolicy", "digits")]
    assert not r.drifted
    auto = SERVICES.reconcile(snap(body(minReplicas=1, maxReplicas=3, networkPolicy={"allowFrom": [{"podSelector": {}}]}),
                                   (deployment("digits", 1, 1),)))
    assert sorted((a.kind, a.name) for a in auto.absent) == [("HorizontalPodAutoscaler", "digits-canary")]


def test_an_invalid_canary_is_an_invalid_spec():
    with pytest.raises(InvalidSpec, match="spec.canary.model"):
        SERVICES.reconcile(snap(body(canary={"model": {}, "trafficPercent": 5})))


# ------------------------------------------------------------------------------------------ NetworkPolicy
def test_no_network_policy_unless_asked():
    assert "NetworkPolicy" not in [o["kind"] for o in render()]


def test_network_policy_admits_the_listed_peers_to_both_ports():
    peers = [{"podSelector": {}}, {"namespaceSelector": {"matchLabels": {"team": "a"}},
                                   "podSelector": {"matchLabels": {"app": "web"}}}]
    objs = render(networkPolicy={"allowFrom": peers},
                  canary={"model": {"storageUri": "pvc://m/v2"}, "trafficPercent": 10})
    np = named(objs, "NetworkPolicy", "digits")["spec"]
    assert np["podSelector"] == {"matchLabels": {launch.LABEL_ISVC: "digits"}}, "both versions"
    assert np["policyTypes"] == ["Ingress"]
    assert np["ingress"] == [{"from": peers, "ports": [{"protocol": "TCP", "port": launch.SERVER_PORT},
                                                        {"protocol": "TCP", "port": launch.SERVER_GRPC_PORT}]}]
    with pytest.raises(ValueError, match="allowFrom"):
        isvc(networkPolicy={"allowFrom": []})
    with pytest.raises(ValueError, match="namespaceSelector, podSelector or both"):
        isvc(networkPolicy={"allowFrom": [{}]})


def test_plan_without_model_renders_service_and_policy_only():
    svc = isvc(model={"trainingJob": "lenet"}, networkPolicy={"allowFrom": [{"podSelector": {}}]})
    assert [o["kind"] for o in render_inferenceservice(svc, SETTINGS, ServicePlan())] == ["Service", "NetworkPolicy"]
