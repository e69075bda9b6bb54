"""The Helm chart: lint, render with default and non-default values, every object strictly valid, values
documented and typed, the copies of the CRDs/rules/dashboard in step with their sources, RBAC least-privilege."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_util import (
    CHART,
    MONITORING_VALUES,
    NAMESPACE,
    REPO,
    helm_template,
    is_helm_hook,
    run,
    tool,
    validate,
    write_values,
)

import aiaas
from aiaas.contract import launch

HELM = tool("helm")
needs_helm = pytest.mark.skipif(HELM is None, reason="helm not found: run hack/cluster.sh build (or put helm on PATH)")

# Non-default value sets; each must lint, render and validate.
VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "monitoring": MONITORING_VALUES,
    "namespaced": {
        "operator": {"watchNamespaces": ["team-a", "team-b"], "trainerImage": "registry.example.com/trainer:1",
                     "serverImage": "registry.example.com/server:1", "workloadServiceAccount": "trainer",
                     "logLevel": "DEBUG", "successPolicy": "Rank0", "extraArgs": ["--scrape-timeout=5"],
                     "extraEnv": [{"name": "HTTPS_PROXY", "value": "http://proxy:3128"}]},
        "rbac": {"volcano": True, "aggregateToDefaultRoles": False},
        "image": {"repository": "registry.example.com/aiaas-operator", "digest": "sha256:" + "a" * 64},
        "imagePullSecrets": [{"name": "regcred"}],
    },
    "single-replica": {
        "replicaCount": 1,
        "operator": {"leaderElection": {"enabled": False}},
        "metrics": {"port": 9443, "service": {"enabled": False}},
        "serviceAccount": {"create": False, "name": "existing"},
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ops", "effect": "NoSchedule"}],
        "priorityClassName": "system-cluster-critical",
        "podAnnotations": {"example.com/a": "b"},
        "topologySpreadConstraints": [],
    },
    "monitoring-customised": {
        **MONITORING_VALUES,
        "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}, "interval": "15s"},
        "podMonitor": {"trainer": True, "server": False, "labels": {"release": "kube-prometheus-stack"}},
        "prometheusRule": {"enabled": True, "labels": {"release": "kube-prometheus-stack"},
                           "additionalRuleLabels": {"team": "ml-platform"},
                           "disabledAlerts": ["AiaasTrainingCheckpointStale"]},
        "grafanaDashboard": {"enabled": True, "namespace": "monitoring", "annotations": {"grafana_folder": "aiaas"}},
    },
}


def render(values: dict[str, Any], tmp_path: Path, *args: str) -> list[dict[str, Any]]:
    assert HELM
    return helm_template(HELM, *args, values=values, tmp=tmp_path)


def by_kind(objs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind]


def one(objs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = by_kind(objs, kind)
    assert len(found) == 1, f"expected one {kind}, got {[o['metadata']['name'] for o in found]}"
    return found[0]


# ------------------------------------------------------------------------------------------- lint, render
@needs_helm
@pytest.mark.parametrize("name", VALUE_SETS)
def test_helm_lint_strict(name: str, tmp_path: Path) -> None:
    assert HELM
    cmd = [HELM, "lint", "--strict", str(CHART), "--kube-version", "1.36.0", "--namespace", NAMESPACE]
    if VALUE_SETS[name]:
        cmd += ["--values", str(write_values(tmp_path, VALUE_SETS[name]))]
    out = run(cmd)
    assert "0 chart(s) failed" in out.stdout + out.stderr


@needs_helm
@pytest.mark.parametrize("name", VALUE_SETS)
def test_every_rendered_object_is_strictly_valid(name: str, tmp_path: Path) -> None:
    objs = render(VALUE_SETS[name], tmp_path)
    assert objs
    for obj in objs:
        validate(obj)
    names = {(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]) for o in objs}
    assert len(names) == len(objs), "two objects with the same kind, namespace and name"


@needs_helm
def test_defaults_render_the_operator_with_leader_election(tmp_path: Path) -> None:
    objs = render({}, tmp_path)
    kinds = sorted(o["kind"] for o in objs if not is_helm_hook(o))
    assert kinds == sorted([
        "CustomResourceDefinition", "CustomResourceDefinition", "ServiceAccount", "ClusterRole", "ClusterRole",
        "ClusterRole", "ClusterRoleBinding",
        "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding", "Deployment", "Service", "PodDisruptionBudget",
        "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding",
    ])
    dep = one(objs, "Deployment")
    assert dep["spec"]["replicas"] == 2
    pod = dep["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["image"] == f"localhost/aiaas-operator:{aiaas.__version__}"
    assert c["command"] == ["aiaas", "operator"]
    args = c["args"]
    assert "--all-namespaces" in args and "--standalone" not in args
    assert "--lease-name=aiaas-operator" in args and "--metrics-port=8080" in args
    assert f"--trainer-image=localhost/aiaas-trainer:{aiaas.__version__}" in args
    env = {e["name"]: e for e in c["env"]}
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"  # the Lease's ns
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    # a standby replica answers 503 on /readyz: probing it would stall every rolling update (maxUnavailable 0)
    # and let the PodDisruptionBudget (minAvailable 1) block every drain of the leader's node
    assert c["readinessProbe"]["httpGet"]["path"] == "/healthz"
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
    # restricted Pod Security Standard
    sc, psc = c["securityContext"], pod["securityContext"]
    assert psc["runAsNonRoot"] is True and psc["seccompProfile"]["type"] == "RuntimeDefault"
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"]
    assert sc["readOnlyRootFilesystem"] is True
    svc = one(objs, "Service")
    assert svc["metadata"]["name"] == "aiaas-operator-metrics"
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    assert svc["spec"]["ports"][0]["targetPort"] == "metrics"
    pdb = one(objs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"] == dep["spec"]["selector"]


@needs_helm
def test_operator_flags_exist(tmp_path: Path) -> None:
    """Every flag the chart passes is one `aiaas operator` accepts (its parser is the source of truth)."""
    import argparse

    from aiaas.operator import settings

    parser = argparse.ArgumentParser()
    settings.add_arguments(parser)
    for name in VALUE_SETS:
        dep = one(render(VALUE_SETS[name], tmp_path), "Deployment")
        args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
        parsed = settings.from_args(parser.parse_args(args))
        if name == "namespaced":
            assert parsed.namespaces == ("team-a", "team-b")
            assert parsed.render.trainer_image == "registry.example.com/trainer:1"
            assert parsed.render.service_account_name == "trainer" and parsed.success_policy == "Rank0"
            assert parsed.scrape_timeout_seconds == 5
        if name == "single-replica":
            assert parsed.standalone and parsed.metrics_port == 9443
        if name == "defaults":
            assert parsed.namespaces == () and not parsed.standalone and parsed.lease_name == "aiaas-operator"


@needs_helm
def test_namespaced_mode_gets_a_role_per_watched_namespace(tmp_path: Path) -> None:
    objs = render(VALUE_SETS["namespaced"], tmp_path)
    # aggregateToDefaultRoles off: the only cluster-scoped permissions are kopf's scanning of namespaces and CRDs
    assert [o["metadata"]["name"] for o in by_kind(objs, "ClusterRole")] == ["aiaas-operator-scanning"]
    roles = {o["metadata"]["namespace"]: o for o in by_kind(objs, "Role") if o["metadata"]["name"] == "aiaas-operator"}
    assert set(roles) == {"team-a", "team-b"}
    assert any(r["apiGroups"] == ["scheduling.volcano.sh"] for r in roles["team-a"]["rules"])
    bindings = [o for o in by_kind(objs, "RoleBinding") if o["metadata"]["name"] == "aiaas-operator"]
    assert {b["metadata"]["namespace"] for b in bindings} == {"team-a", "team-b"}
    for b in bindings:
        assert b["subjects"] == [{"kind": "ServiceAccount", "name": "aiaas-operator", "namespace": NAMESPACE}]
    dep = one(objs, "Deployment")
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert c["image"] == "registry.example.com/aiaas-operator@sha256:" + "a" * 64
    assert dep["spec"]["template"]["spec"]["imagePullSecrets"] == [{"name": "regcred"}]


@needs_helm
def test_single_replica_without_leader_election(tmp_path: Path) -> None:
    objs = render(VALUE_SETS["single-replica"], tmp_path)
    assert not by_kind(objs, "PodDisruptionBudget") and not by_kind(objs, "ServiceAccount")
    assert not [o for o in by_kind(objs, "Role") if "leader" in o["metadata"]["name"]]
    assert not [o for o in objs if o["kind"] == "Service"] and not [o for o in objs if is_helm_hook(o)]
    dep = one(objs, "Deployment")
    spec = dep["spec"]["template"]["spec"]
    assert spec["serviceAccountName"] == "existing" and "--standalone" in spec["containers"][0]["args"]
    assert spec["containers"][0]["ports"][0]["containerPort"] == 9443


@needs_helm
def test_more_replicas_without_leader_election_is_refused(tmp_path: Path) -> None:
    assert HELM
    values = write_values(tmp_path, {"operator": {"leaderElection": {"enabled": False}}})
    proc = run([HELM, "template", "x", str(CHART), "--kube-version", "1.36.0", "-f", str(values)], check=False)
    assert proc.returncode != 0 and "needs replicaCount=1" in proc.stderr


@needs_helm
@pytest.mark.parametrize("values, message", [
    ({"replicaCount": "two"}, "replicaCount"),
    ({"operator": {"logLevel": "LOUD"}}, "logLevel"),
    ({"operator": {"successPolicy": "Majority"}}, "successPolicy"),
    ({"operator": {"watchNamespaces": "team-a"}}, "watchNamespaces"),
    ({"metrics": {"port": 70000}}, "port"),
    ({"serviceMonitor": {"enabld": True}}, "enabld"),
    ({"prometheusRule": {"disabledAlerts": ["NoSuchAlert"]}}, "disabledAlerts"),
])
def test_values_schema_rejects_bad_values(values: dict[str, Any], message: str, tmp_path: Path) -> None:
    assert HELM
    path = write_values(tmp_path, values)
    proc = run([HELM, "template", "x", str(CHART), "--kube-version", "1.36.0", "-f", str(path)], check=False)
    assert proc.returncode != 0, f"{values} was accepted"
    assert message in proc.stderr, proc.stderr


# ---------------------------------------------------------------------------------------------- values
def test_every_value_has_a_comment() -> None:
    """Each value in values.yaml has a comment line above it. A key documented with ``# --`` whose default is a
    structure (a security context, probes, resources) documents the whole structure; a bare section header
    (``image:``) needs none, but each value in it does."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    missing = []
    stack: list[tuple[int, bool]] = []  # (indent, documents its subtree) of the enclosing keys
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)(- )?([A-Za-z][\w.-]*):(.*)$", line)
        if not m or m.group(2):
            continue
        indent = len(m.group(1))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        j = i - 1
        while j >= 0 and not lines[j].strip():
            j -= 1
        comment: list[str] = []  # the comment block right above the key
        while j >= 0 and lines[j].strip().startswith("#"):
            comment.insert(0, lines[j].strip())
            j -= 1
        covered = any(doc for _, doc in stack)
        is_header = not m.group(4).strip()
        if not covered and not is_header and not comment:
            missing.append(f"{i + 1}: {line.strip()}")
        if is_header:
            stack.append((indent, bool(comment) and comment[0].startswith("# --")))
    assert not missing, "values without a comment:\n" + "\n".join(missing)


def test_values_match_the_schema_and_the_schema_is_closed() -> None:
    import jsonschema

    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    jsonschema.validate(values, schema)

    def walk(s: dict[str, Any], path: str) -> list[str]:
        out = []
        if s.get("type") == "object" and "properties" in s:
            if s.get("additionalProperties") is not False:
                out.append(path or "<root>")
            for k, v in s["properties"].items():
                out += walk(v, f"{path}.{k}")
        return out

    # every object with declared properties is closed (a typo in a value name is an error), except where
    # free-form maps are the point (labels, annotations)
    open_objects = [p for p in walk(schema, "") if p != "<root>"]
    assert not open_objects, f"schema objects that accept unknown keys: {open_objects}"


def test_chart_version_matches_the_package() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["appVersion"] == aiaas.__version__
    assert chart["apiVersion"] == "v2" and chart["kubeVersion"]


def test_copies_are_in_step_with_their_sources() -> None:
    """CRDs in the chart and in deploy/crds are byte-identical to crds/; rules and dashboard copies match."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("aiaas_deploy_sync", REPO / "deploy" / "sync.py")
    assert spec and spec.loader
    sync = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sync)
    assert sync.out_of_date() == [], "run `python deploy/sync.py`"
    for crd in (REPO / "crds").glob("*.yaml"):
        assert (CHART / "crds" / crd.name).read_bytes() == crd.read_bytes()
        assert (REPO / "deploy" / "crds" / crd.name).read_bytes() == crd.read_bytes()
    assert sorted(p.name for p in (CHART / "crds").glob("*.yaml")) == sorted(p.name for p in (REPO / "crds").glob("*.yaml"))


# ------------------------------------------------------------------------------------------ monitoring
@needs_helm
def test_monitoring_objects_select_what_the_operator_renders(tmp_path: Path) -> None:
    """The PodMonitors select the labels the renderers put on training and server pods, and keep their ports."""
    from aiaas.operator import api
    from aiaas.operator.render import RenderSettings, render_inferenceservice, render_trainingjob

    objs = render(MONITORING_VALUES, tmp_path)
    monitors = {o["metadata"]["name"]: o for o in by_kind(objs, "PodMonitor")}
    job = api.TrainingJob.model_validate({"apiVersion": api.API_VERSION, "kind": "TrainingJob",
                                          "metadata": {"name": "j", "namespace": "ns", "uid": "u"},
                                          "spec": {"topology": {"nodes": 2, "nprocPerNode": 2}}})
    sts = next(o for o in render_trainingjob(job, RenderSettings()) if o["kind"] == "StatefulSet")
    pod = sts["spec"]["template"]
    trainer = monitors["aiaas-operator-trainer"]["spec"]
    assert trainer["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    keep = trainer["podMetricsEndpoints"][0]["relabelings"][0]
    ports = [p["name"] for p in pod["spec"]["containers"][0]["ports"]]
    kept = [p for p in ports if re.fullmatch(keep["regex"], p)]
    assert kept == ["metrics", "metrics-1"]  # one target per local rank, not the rendezvous ports
    assert trainer["podMetricsEndpoints"][0]["honorLabels"] is True
    isvc = api.InferenceService.model_validate({"apiVersion": api.API_VERSION, "kind": "InferenceService",
                                                "metadata": {"name": "m", "namespace": "ns", "uid": "u"},
                                                "spec": {"model": {"storageUri": "pvc://models/m"}}})
    dep = next(o for o in render_inferenceservice(isvc, RenderSettings()) if o["kind"] == "Deployment")
    server = monitors["aiaas-operator-server"]["spec"]
    assert server["selector"]["matchLabels"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    assert server["podMetricsEndpoints"][0]["port"] in [p["name"] for p in dep["spec"]["template"]["spec"]["containers"][0]["ports"]]
    assert server["podMetricsEndpoints"][0]["path"] == launch.SERVER_METRICS_PATH
    sm = one(objs, "ServiceMonitor")
    svc = one(objs, "Service")
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert sm["spec"]["endpoints"][0]["port"] == svc["spec"]["ports"][0]["name"]
    jobs = {e["relabelings"][-1]["replacement"] for m in [sm] for e in m["spec"]["endpoints"]}
    jobs |= {e["relabelings"][-1]["replacement"] for m in monitors.values() for e in m["spec"]["podMetricsEndpoints"]}
    assert jobs == {"aiaas-operator", "aiaas-trainer", "aiaas-server"}


@needs_helm
def test_prometheus_rule_carries_the_rule_file(tmp_path: Path) -> None:
    rules = yaml.safe_load((REPO / "deploy" / "prometheus" / "aiaas-rules.yaml").read_text())
    pr = one(render(MONITORING_VALUES, tmp_path), "PrometheusRule")
    assert pr["spec"]["groups"] == rules["groups"]
    custom = one(render(VALUE_SETS["monitoring-customised"], tmp_path), "PrometheusRule")
    alerts = [r for g in custom["spec"]["groups"] for r in g["rules"]]
    assert "AiaasTrainingCheckpointStale" not in {r["alert"] for r in alerts}
    assert len(alerts) == sum(len(g["rules"]) for g in rules["groups"]) - 1
    assert all(r["labels"]["team"] == "ml-platform" and r["labels"]["severity"] for r in alerts)
    assert custom["metadata"]["labels"]["release"] == "kube-prometheus-stack"


@needs_helm
def test_dashboard_configmap_holds_the_dashboard(tmp_path: Path) -> None:
    cm = one(render(VALUE_SETS["monitoring-customised"], tmp_path), "ConfigMap")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["namespace"] == "monitoring"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "aiaas"}
    assert json.loads(cm["data"]["aiaas.json"]) == json.loads((REPO / "deploy" / "grafana" / "aiaas.json").read_text())


@needs_helm
def test_helm_test_hook_fetches_health_and_metrics_through_the_service(tmp_path: Path) -> None:
    objs = render({}, tmp_path)
    hooks = [o for o in objs if is_helm_hook(o)]
    assert len(hooks) == 1
    pod = hooks[0]
    assert pod["kind"] == "Pod" and pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    svc = one([o for o in objs if not is_helm_hook(o)], "Service")
    c = pod["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env["BASE"] == f"http://{svc['metadata']['name']}.{NAMESPACE}.svc:{svc['spec']['ports'][0]['port']}"
    assert "$BASE/healthz" in c["args"][0] and "$BASE/metrics" in c["args"][0]
    assert pod["spec"]["restartPolicy"] == "Never"


def test_docs_templates_do_not_reference_missing_files() -> None:
    for tpl in (CHART / "templates").rglob("*.yaml"):
        for ref in re.findall(r'\.Files\.Get "([^"]+)"', tpl.read_text()):
            assert (CHART / ref).is_file(), f"{tpl.name} reads {ref}, which does not exist"
