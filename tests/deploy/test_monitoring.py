"""Monitoring files: the alert rules pass promtool (syntax and unit tests), the dashboard's and the alerts'
queries parse and use only metrics the operator, trainer and server really register, and the scrape configs
find the pods the operator renders."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_util import CHART, DEPLOY, METRIC_NAME, run

from aiaas.contract import launch
from aiaas.contract import metrics as contract

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not found: install Debian's `prometheus` package (hack/setup.sh --test does)")

RULES = DEPLOY / "prometheus" / "aiaas-rules.yaml"
RULE_TESTS = DEPLOY / "prometheus" / "aiaas-rules.test.yaml"
DASHBOARD = DEPLOY / "grafana" / "aiaas.json"
SCRAPE = DEPLOY / "prometheus" / "prometheus.yaml"
SCRAPE_LOCAL = DEPLOY / "prometheus" / "prometheus-local.yaml"
# Labels Prometheus adds to every series of a target (the scrape configs/PodMonitors set namespace and pod).
TARGET_LABELS = {"job", "instance", "namespace", "pod", "le"}


# -------------------------------------------------------------------------------- what is exported
def _series_names(registry: Any) -> dict[str, set[str]]:
    """Series names a registry exposes (counter -> _total, histogram -> _bucket/_sum/_count) and their labels."""
    out: dict[str, set[str]] = {}
    for family in registry.collect():
        labels = {lbl for s in family.samples for lbl in s.labels}
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"],
                    "gauge": [""], "summary": ["_sum", "_count", ""]}[family.type]
        for suffix in suffixes:
            out[family.name + suffix] = labels - {"le"}
    return out


def exported() -> dict[str, set[str]]:
    """Every series name the three components register, with its label names (from their own code)."""
    from aiaas.operator.metrics import OperatorMetrics
    from aiaas.server.metrics import ServerMetrics
    from aiaas.trainer.metrics import TrainerMetrics

    series: dict[str, set[str]] = {}
    op = OperatorMetrics(jobs=lambda: {"ns/a": "Running"}, services=lambda: {"ns/s": "Ready"})
    op.jobs_failed.labels("BackoffLimitExceeded").inc()
    server = ServerMetrics("m")
    server.count("infer", 200)
    server.observe_latency(0.01)
    server.observe_batch(4)
    server.set_model("m", 1.0)
    trainer = TrainerMetrics("job", 0, None)
    for registry in (op.registry, server.registry, trainer.registry):
        for name, labels in _series_names(registry).items():
            series.setdefault(name, set()).update(labels)
    return series


def test_every_contract_name_is_registered_by_its_component() -> None:
    """contract/metrics.py names nothing a component does not export (and the tests below rely on it)."""
    series = exported()
    bases = {n.removesuffix(s) for n in series for s in ("_total", "_bucket", "_sum", "_count", "") if n.endswith(s)}
    names = {v for k, v in vars(contract).items() if k.isupper() and isinstance(v, str) and v.startswith("aiaas_")}
    assert names and names <= bases, f"named in the contract but not registered: {sorted(names - bases)}"
    # the labels the dashboard and the alerts group by
    assert series[f"{contract.TRAINER_STEP}"] >= {"job", "rank"}
    assert series[f"{contract.SERVER_REQUESTS}_total"] >= {"model", "endpoint", "status"}
    assert series[f"{contract.OPERATOR_RECONCILE_DURATION}_bucket"] >= {"kind"}
    assert series[f"{contract.OPERATOR_JOBS_FAILED}_total"] >= {"reason"}
    assert series[contract.OPERATOR_JOBS] >= {"phase"}


# ------------------------------------------------------------------------------------------- queries
def grafana_to_promql(expr: str) -> str:
    """Substitute Grafana's variables so that promtool can parse the expression."""
    expr = expr.replace("$__rate_interval", "5m").replace("$__interval", "1m").replace("$__range", "1h")
    return re.sub(r"\$\{?(\w+)\}?", ".*", expr)


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def dashboard_exprs() -> list[tuple[str, str]]:
    out = []
    for panel in dashboard()["panels"]:
        for t in panel.get("targets", []):
            out.append((panel["title"], t["expr"]))
    for var in dashboard()["templating"]["list"]:
        if var["type"] == "query":
            q = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", q)
            assert m, f"variable {var['name']}: {q}"
            out.append((f"variable {var['name']}", m.group(1)))
    return out


def alert_exprs() -> list[tuple[str, str]]:
    rules = yaml.safe_load(RULES.read_text())
    return [(r["alert"], r["expr"]) for g in rules["groups"] for r in g["rules"]]


@pytest.mark.parametrize("source", ["dashboard", "alerts"])
def test_queries_use_only_exported_metrics_and_labels(source: str) -> None:
    series = exported()
    exprs = dashboard_exprs() if source == "dashboard" else alert_exprs()
    assert exprs
    used: set[str] = set()
    for where, expr in exprs:
        names = set(METRIC_NAME.findall(expr))
        unknown = names - set(series)
        assert not unknown, f"{where}: {sorted(unknown)} is not exported by the operator, trainer or server"
        used |= names
        known_labels = set().union(*(series[n] for n in names)) | TARGET_LABELS if names else TARGET_LABELS
        for group in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", expr):
            labels = {lbl.strip() for lbl in group.split(",") if lbl.strip()}
            assert labels <= known_labels, f"{where}: groups by {sorted(labels - known_labels)}, which no series has"
        for label in re.findall(r"[{,]\s*(\w+)\s*(?:=~|!~|!=|=)", expr):
            assert label in known_labels | {"__name__"}, f"{where}: matches on label {label!r}, which no series has"
    if source == "dashboard":
        # every component's metrics appear on the dashboard
        for prefix in ("aiaas_trainer_", "aiaas_server_", "aiaas_operator_"):
            assert any(n.startswith(prefix) for n in used), prefix


@needs_promtool
def test_dashboard_queries_parse(tmp_path: Path) -> None:
    """promtool parses every query (written as recording rules, since promtool has no query linter)."""
    rules = [{"record": f"dashboard:query_{i}", "expr": grafana_to_promql(expr)}
             for i, (_, expr) in enumerate(dashboard_exprs())]
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    assert PROMTOOL
    run([PROMTOOL, "check", "rules", str(path)])


def test_dashboard_layout_and_contents() -> None:
    d = dashboard()
    assert d["uid"] and d["title"] == "aiaas" and d["schemaVersion"] >= 36
    panels = d["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for p in panels:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, f"panel {p['title']!r} overlaps another"
        cells |= mine
        if p["type"] != "row":
            assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert p["targets"] and p.get("description")
    titles = {p["title"] for p in panels}
    # what the issue asks the dashboard to show
    for wanted in ("TrainingJobs by phase", "Progress per job", "Loss per job", "Samples/s per job",
                   "Samples/s per rank", "Gang restarts", "Reconcile latency", "Reconcile errors/s",
                   "Request rate", "Latency percentiles", "Error ratio"):
        assert wanted in titles
    variables = {v["name"] for v in d["templating"]["list"]}
    assert variables == {"datasource", "namespace", "trainingjob", "model"}


def test_dashboard_matches_grafanas_schema() -> None:
    """Grafana's own dashboard schema (grafana-foundation-sdk) knows every field the dashboard sets: a round
    trip through its typed models keeps everything but two fields Grafana itself writes outside the schema."""
    pytest.importorskip("grafana_foundation_sdk", reason="pip install grafana-foundation-sdk")
    from grafana_foundation_sdk.cog import plugins
    from grafana_foundation_sdk.models.dashboard import Dashboard

    plugins.register_default_plugins()  # typed options/fieldConfig per panel type
    src = dashboard()
    out = json.loads(json.dumps(Dashboard.from_json(src).to_json(),
                                default=lambda o: o.to_json() if hasattr(o, "to_json") else str(o)))
    lost: list[str] = []

    def compare(a: Any, b: Any, path: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k, v in a.items():
                if k not in b:
                    lost.append(f"{path}.{k}")
                else:
                    compare(v, b[k], f"{path}.{k}")
        elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            for x, y in zip(a, b, strict=True):
                compare(x, y, f"{path}[]")
        elif a != b:
            lost.append(f"{path}: {a!r} -> {b!r}")

    compare(src, out, "")
    assert set(lost) <= {".templating.list[].definition", ".annotations.list[].builtIn"}, lost


def test_dashboard_is_generated_from_its_source() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("aiaas_dashboard", DEPLOY / "grafana" / "dashboard.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert DASHBOARD.read_text() == module.render(), "run `python deploy/sync.py`"
    assert (CHART / "files" / "aiaas-dashboard.json").read_text() == DASHBOARD.read_text()


# ------------------------------------------------------------------------------------------ rules
@needs_promtool
def test_promtool_check_rules() -> None:
    assert PROMTOOL
    out = run([PROMTOOL, "check", "rules", str(RULES), str(CHART / "files" / "prometheus-rules.yaml")])
    assert "SUCCESS" in out.stdout


@needs_promtool
def test_promtool_rule_unit_tests() -> None:
    """Inputs that must fire each alert and inputs that must not (deploy/prometheus/aiaas-rules.test.yaml)."""
    assert PROMTOOL
    out = run([PROMTOOL, "test", "rules", str(RULE_TESTS)])
    assert "SUCCESS" in out.stdout + out.stderr
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    tested = {t["alertname"] for case in tests for t in case.get("alert_rule_test", [])}
    silent = {t["alertname"] for case in tests for t in case.get("alert_rule_test", []) if not t.get("exp_alerts")}
    alerts = {name for name, _ in alert_exprs()}
    assert tested == alerts, f"alerts without a unit test: {sorted(alerts - tested)}"
    # every test case that fires also has a series that must not fire (an exact exp_alerts list), or a silent check
    assert len(silent) >= 5


def test_every_alert_has_severity_summary_description_and_runbook() -> None:
    for g in yaml.safe_load(RULES.read_text())["groups"]:
        for r in g["rules"]:
            assert r["labels"]["severity"] in ("critical", "warning", "info"), r["alert"]
            assert {"summary", "description", "runbook_url"} <= set(r["annotations"]), r["alert"]
            assert r["alert"].startswith("Aiaas")


def test_alerts_and_runbook_are_documented() -> None:
    doc = (DEPLOY.parent / "docs" / "monitoring.md").read_text().lower()
    for name, _ in alert_exprs():
        assert f"### {name.lower()}" in doc, f"docs/monitoring.md has no section for {name}"


# -------------------------------------------------------------------------------------- scrape configs
def relabel(labels: dict[str, str], configs: list[dict[str, Any]]) -> dict[str, str] | None:
    """Prometheus relabelling (keep, drop, replace), enough for our configs; None when the target is dropped."""
    labels = dict(labels)
    for c in configs:
        action = c.get("action", "replace")
        regex = re.compile(c.get("regex", "(.*)"))
        value = c.get("separator", ";").join(labels.get(s, "") for s in c.get("source_labels", []))
        m = regex.fullmatch(value)
        if action == "keep" and not m:
            return None
        if action == "drop" and m:
            return None
        if action == "replace" and m:
            labels[c["target_label"]] = m.expand(re.sub(r"\$\{?(\d+)\}?", r"\\g<\1>", c.get("replacement", "$1")))
    return labels


def pod_targets(pod: dict[str, Any], namespace: str, name: str, phase: str = "Running") -> list[dict[str, str]]:
    """The targets kubernetes_sd (role: pod) makes of a pod: one per container port."""
    targets = []
    meta = {f"__meta_kubernetes_pod_label_{re.sub(r'[^a-zA-Z0-9_]', '_', k)}": v
            for k, v in pod["metadata"]["labels"].items()}
    for c in pod["spec"]["containers"]:
        for p in c.get("ports", []):
            targets.append({**meta, "__address__": f"10.0.0.1:{p['containerPort']}",
                            "__meta_kubernetes_pod_container_port_name": p.get("name", ""),
                            "__meta_kubernetes_namespace": namespace, "__meta_kubernetes_pod_name": name,
                            "__meta_kubernetes_pod_phase": phase})
    return targets


def scrape_jobs() -> dict[str, dict[str, Any]]:
    return {j["job_name"]: j for j in yaml.safe_load(SCRAPE.read_text())["scrape_configs"]}


def test_scrape_config_finds_every_rank_of_a_training_pod() -> None:
    from aiaas.operator import api
    from aiaas.operator.render import RenderSettings, render_inferenceservice, render_trainingjob

    job = api.TrainingJob.model_validate({"apiVersion": api.API_VERSION, "kind": "TrainingJob",
                                          "metadata": {"name": "cnn", "namespace": "ml", "uid": "u"},
                                          "spec": {"topology": {"nodes": 2, "nprocPerNode": 4}}})
    sts = next(o for o in render_trainingjob(job, RenderSettings()) if o["kind"] == "StatefulSet")
    jobs = scrape_jobs()
    trainer = jobs["aiaas-trainer"]
    assert trainer["honor_labels"] is True
    found = [t for t in (relabel(t, trainer["relabel_configs"]) for t in pod_targets(sts["spec"]["template"], "ml", "cnn-0")) if t]
    assert sorted(t["__address__"] for t in found) == [f"10.0.0.1:{launch.METRICS_PORT + r}" for r in range(4)]
    assert all(t["namespace"] == "ml" and t["pod"] == "cnn-0" for t in found)
    # the other jobs leave training pods alone; a finished pod is not scraped
    for other in ("aiaas-server", "aiaas-operator"):
        assert not [t for t in pod_targets(sts["spec"]["template"], "ml", "cnn-0")
                    if relabel(t, jobs[other]["relabel_configs"])]
    assert not [t for t in pod_targets(sts["spec"]["template"], "ml", "cnn-0", "Succeeded")
                if relabel(t, trainer["relabel_configs"])]

    isvc = api.InferenceService.model_validate({"apiVersion": api.API_VERSION, "kind": "InferenceService",
                                                "metadata": {"name": "digits", "namespace": "ml", "uid": "u"},
                                                "spec": {"model": {"storageUri": "pvc://models/m"}}})
    dep = next(o for o in render_inferenceservice(isvc, RenderSettings()) if o["kind"] == "Deployment")
    server = jobs["aiaas-server"]
    found = [t for t in (relabel(t, server["relabel_configs"]) for t in pod_targets(dep["spec"]["template"], "ml", "digits-x")) if t]
    assert [t["__address__"] for t in found] == [f"10.0.0.1:{launch.SERVER_PORT}"]
    assert server.get("metrics_path", "/metrics") == launch.SERVER_METRICS_PATH


def test_scrape_config_finds_the_operator_through_its_service() -> None:
    from deploy_util import kustomize, tool

    kubectl = tool("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not found: run hack/cluster.sh build")
    svc = next(o for o in kustomize(kubectl, "default") if o["kind"] == "Service")
    labels = {f"__meta_kubernetes_service_label_{re.sub(r'[^a-zA-Z0-9_]', '_', k)}": v
              for k, v in svc["metadata"]["labels"].items()}
    target = {**labels, "__address__": "10.0.0.2:8080", "__meta_kubernetes_namespace": "aiaas-system",
              "__meta_kubernetes_pod_name": "aiaas-operator-abc",
              "__meta_kubernetes_endpointslice_port_name": svc["spec"]["ports"][0]["name"]}
    found = relabel(target, scrape_jobs()["aiaas-operator"]["relabel_configs"])
    assert found and found["namespace"] == "aiaas-system"


@needs_promtool
@pytest.mark.parametrize("path", [SCRAPE, SCRAPE_LOCAL], ids=lambda p: p.name)
def test_promtool_check_config(path: Path, tmp_path: Path) -> None:
    """Both scrape configs are valid. Debian's Prometheus is built without Kubernetes service discovery, so
    kubernetes_sd_configs is swapped for static_configs before the check (relabelling is checked as written)."""
    config = yaml.safe_load(path.read_text())
    for job in config["scrape_configs"]:
        if job.pop("kubernetes_sd_configs", None) is not None:
            job["static_configs"] = [{"targets": ["127.0.0.1:1"]}]
    out = tmp_path / path.name
    out.write_text(yaml.safe_dump(config))
    shutil.copy(RULES, tmp_path / RULES.name)
    assert PROMTOOL
    run([PROMTOOL, "check", "config", str(out)])
    assert {j["job_name"] for j in config["scrape_configs"]} == {"aiaas-operator", "aiaas-trainer", "aiaas-server"}
