"""Generates the Grafana dashboard deploy/grafana/aiaas.json (run by ``python deploy/sync.py``).

The dashboard is written as code so that every query names its metric through aiaas.contract.metrics, and
tests/deploy/test_monitoring.py can check each query against what the operator, trainer and server export.

Labels the queries rely on (see deploy/prometheus/prometheus.yaml and the chart's ServiceMonitor/PodMonitors):
  trainer series:  namespace, job (the TrainingJob; scraped with honor_labels), rank
  server series:   namespace, model, endpoint, status
  operator series: job="aiaas-operator", phase, kind, reason
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from aiaas.contract import metrics as m

UID = "aiaas-overview"
OUT = Path(__file__).with_name("aiaas.json")
DS = {"type": "prometheus", "uid": "${datasource}"}

TRAINER_SEL = 'namespace=~"$namespace", job=~"$trainingjob"'
SERVER_SEL = 'namespace=~"$namespace", model=~"$model"'
INFER_SEL = SERVER_SEL + ', endpoint=~"infer|infer_version|predict"'
OPERATOR_SEL = 'job="aiaas-operator"'


class Layout:
    """Places panels left to right, 24 columns wide, starting a new line when a row is full."""

    def __init__(self) -> None:
        self.x = 0
        self.y = 0
        self.row_h = 0
        self.next_id = 1
        self.panels: list[dict[str, Any]] = []

    def _id(self) -> int:
        self.next_id += 1
        return self.next_id - 1

    def row(self, title: str) -> None:
        if self.x:
            self.y += self.row_h
        self.panels.append({"type": "row", "id": self._id(), "title": title, "collapsed": False,
                            "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y}, "panels": []})
        self.y += 1
        self.x, self.row_h = 0, 0

    def add(self, panel: dict[str, Any], w: int, h: int = 8) -> None:
        if self.x + w > 24:
            self.y += self.row_h
            self.x, self.row_h = 0, 0
        panel["id"] = self._id()
        panel["gridPos"] = {"h": h, "w": w, "x": self.x, "y": self.y}
        self.panels.append(panel)
        self.x += w
        self.row_h = max(self.row_h, h)


def target(expr: str, legend: str, ref: str = "A") -> dict[str, Any]:
    return {"datasource": DS, "expr": expr, "legendFormat": legend, "refId": ref, "range": True}


def timeseries(title: str, description: str, targets: list[dict[str, Any]], unit: str = "short",
               stack: bool = False, min_zero: bool = True, max_value: float | None = None) -> dict[str, Any]:
    defaults: dict[str, Any] = {
        "unit": unit,
        "custom": {
            "drawStyle": "line",
            "lineWidth": 1,
            "fillOpacity": 20 if stack else 0,
            "showPoints": "never",
            "spanNulls": False,
            "stacking": {"mode": "normal" if stack else "none", "group": "A"},
        },
    }
    if min_zero:
        defaults["min"] = 0
    if max_value is not None:
        defaults["max"] = max_value
    return {
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": DS,
        "targets": targets,
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
    }


def stat(title: str, description: str, expr: str, unit: str = "short",
         thresholds: list[tuple[float | None, str]] | None = None) -> dict[str, Any]:
    steps = [{"color": c, "value": v} for v, c in (thresholds or [(None, "green")])]
    return {
        "type": "stat",
        "title": title,
        "description": description,
        "datasource": DS,
        "targets": [target(expr, "", "A") | {"instant": True, "range": False}],
        "fieldConfig": {"defaults": {"unit": unit, "thresholds": {"mode": "absolute", "steps": steps}},
                        "overrides": []},
        "options": {"colorMode": "background", "graphMode": "none", "reduceOptions":
                    {"calcs": ["lastNotNull"], "fields": "", "values": False}, "textMode": "auto"},
    }


def quantiles(metric: str, by: str, sel: str, legend_prefix: str) -> list[dict[str, Any]]:
    """p50, p90 and p99 of a histogram, summed over everything but ``by``."""
    group = f"{by}, le" if by else "le"
    return [
        target(f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket{{{sel}}}[$__rate_interval])))",
               f"{legend_prefix} {name}", ref)
        for ref, q, name in (("A", "0.5", "p50"), ("B", "0.9", "p90"), ("C", "0.99", "p99"))
    ]


def variable(name: str, label: str, query: str, include_all: bool = True) -> dict[str, Any]:
    return {
        "type": "query",
        "name": name,
        "label": label,
        "datasource": DS,
        "query": {"query": query, "refId": f"{name}-var"},
        "definition": query,
        "refresh": 2,
        "includeAll": include_all,
        "multi": True,
        "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "sort": 1,
        "options": [],
        "hide": 0,
    }


def build() -> dict[str, Any]:
    lay = Layout()

    # --- overview ------------------------------------------------------------------------------------------
    lay.row("Overview")
    lay.add(stat("Operators up", "Operator replicas scraped successfully (one is the elected leader).",
                 f"sum(up{{{OPERATOR_SEL}}})", thresholds=[(None, "red"), (1, "green")]), 4, 4)
    lay.add(stat("Running training jobs", "TrainingJobs in phase Running.",
                 f'sum(max by (phase) ({m.OPERATOR_JOBS}{{{OPERATOR_SEL}, phase="Running"}}))'), 5, 4)
    lay.add(stat("Failed jobs (24h)", "TrainingJobs that reached phase Failed in the last 24 hours.",
                 f"sum(increase({m.OPERATOR_JOBS_FAILED}_total{{{OPERATOR_SEL}}}[24h]))",
                 thresholds=[(None, "green"), (1, "orange")]), 5, 4)
    lay.add(stat("Gang restarts (24h)", "Gang restarts of TrainingJobs in the last 24 hours.",
                 f"sum(increase({m.OPERATOR_JOBS_RESTARTED}_total{{{OPERATOR_SEL}}}[24h]))",
                 thresholds=[(None, "green"), (3, "orange")]), 5, 4)
    lay.add(stat("Inference requests/s", "Inference requests per second over all models.",
                 f"sum(rate({m.SERVER_REQUESTS}_total{{{INFER_SEL}}}[$__rate_interval]))", unit="reqps"), 5, 4)

    # --- training jobs -------------------------------------------------------------------------------------
    lay.row("Training jobs")
    lay.add(timeseries(
        "TrainingJobs by phase", "Number of TrainingJobs in each phase, as the operator sees them.",
        [target(f"max by (phase) ({m.OPERATOR_JOBS}{{{OPERATOR_SEL}}})", "{{phase}}")], stack=True), 12)
    lay.add(timeseries(
        "Jobs created, succeeded, failed", "TrainingJobs created, succeeded and failed per interval.",
        [target(f"sum(increase({m.OPERATOR_JOBS_CREATED}_total{{{OPERATOR_SEL}}}[$__rate_interval]))", "created", "A"),
         target(f"sum(increase({m.OPERATOR_JOBS_SUCCEEDED}_total{{{OPERATOR_SEL}}}[$__rate_interval]))", "succeeded", "B"),
         target(f"sum by (reason) (increase({m.OPERATOR_JOBS_FAILED}_total{{{OPERATOR_SEL}}}[$__rate_interval]))",
                "failed: {{reason}}", "C")]), 12)
    lay.add(timeseries(
        "Progress per job", "Optimizer steps done, as a fraction of the steps the job will run.",
        [target(f"max by (namespace, job) ({m.TRAINER_STEP}{{{TRAINER_SEL}}}) / "
                f"max by (namespace, job) ({m.TRAINER_TOTAL_STEPS}{{{TRAINER_SEL}}})", "{{namespace}}/{{job}}")],
        unit="percentunit", max_value=1), 12)
    lay.add(timeseries(
        "Loss per job", "Training loss (mean over the ranks' last logging windows).",
        [target(f"avg by (namespace, job) ({m.TRAINER_LOSS}{{{TRAINER_SEL}}})", "{{namespace}}/{{job}}")],
        min_zero=False), 12)
    lay.add(timeseries(
        "Eval accuracy per job", "Accuracy on the held-out split.",
        [target(f"max by (namespace, job) ({m.TRAINER_ACCURACY}{{{TRAINER_SEL}}})", "{{namespace}}/{{job}}")],
        unit="percentunit", max_value=1), 12)
    lay.add(timeseries(
        "Epoch per job", "Current epoch (0-based).",
        [target(f"max by (namespace, job) ({m.TRAINER_EPOCH}{{{TRAINER_SEL}}})", "{{namespace}}/{{job}}")]), 12)
    lay.add(timeseries(
        "Samples/s per job", "Training throughput of each job (global samples per second, as rank 0 reports it).",
        [target(f'max by (namespace, job) ({m.TRAINER_SAMPLES_PER_SECOND}{{{TRAINER_SEL}, rank="0"}})',
                "{{namespace}}/{{job}}")]), 12)
    lay.add(timeseries(
        "Samples/s per rank", "Throughput each rank reports; a rank far below the others is a straggler.",
        [target(f"max by (namespace, job, rank) ({m.TRAINER_SAMPLES_PER_SECOND}{{{TRAINER_SEL}}})",
                "{{namespace}}/{{job}} rank {{rank}}")]), 12)
    lay.add(timeseries(
        "Gang restarts", "Restarts of training gangs by the operator (from the last checkpoint).",
        [target(f"sum(increase({m.OPERATOR_JOBS_RESTARTED}_total{{{OPERATOR_SEL}}}[$__rate_interval]))", "restarts")]),
        8)
    lay.add(timeseries(
        "Checkpoint age", "Seconds since each job's last checkpoint; a restart loses this much work.",
        [target(f"max by (namespace, job) ({m.TRAINER_CHECKPOINT_AGE}{{{TRAINER_SEL}}})", "{{namespace}}/{{job}}")],
        unit="s"), 8)
    lay.add(timeseries(
        "Time to running", "Time from a TrainingJob's creation until all its pods run (scheduling, image pulls).",
        quantiles(m.OPERATOR_TIME_TO_RUNNING, "", OPERATOR_SEL, "time to running"), unit="s"), 8)

    # --- operator ------------------------------------------------------------------------------------------
    lay.row("Operator")
    lay.add(timeseries(
        "Reconcile latency", "Duration of one reconcile, by kind (p50, p90, p99).",
        quantiles(m.OPERATOR_RECONCILE_DURATION, "kind", OPERATOR_SEL, "{{kind}}"), unit="s"), 8)
    lay.add(timeseries(
        "Reconciles/s", "Reconciles per second, by kind.",
        [target(f"sum by (kind) (rate({m.OPERATOR_RECONCILE_DURATION}_count{{{OPERATOR_SEL}}}[$__rate_interval]))",
                "{{kind}}")], unit="ops"), 8)
    lay.add(timeseries(
        "Reconcile errors/s", "Reconciles that raised, by kind; they are retried with backoff.",
        [target(f"sum by (kind) (rate({m.OPERATOR_RECONCILE_ERRORS}_total{{{OPERATOR_SEL}}}[$__rate_interval]))",
                "{{kind}}")], unit="ops"), 8)

    # --- inference -----------------------------------------------------------------------------------------
    lay.row("Inference")
    lay.add(timeseries(
        "InferenceServices by phase", "Number of InferenceServices in each phase.",
        [target(f"max by (phase) ({m.OPERATOR_INFERENCESERVICES}{{{OPERATOR_SEL}}})", "{{phase}}")], stack=True), 8)
    lay.add(timeseries(
        "Request rate", "Inference requests per second, by model and status code.",
        [target(f"sum by (namespace, model, status) (rate({m.SERVER_REQUESTS}_total{{{INFER_SEL}}}[$__rate_interval]))",
                "{{namespace}}/{{model}} {{status}}")], unit="reqps"), 8)
    lay.add(timeseries(
        "Error ratio", "Share of inference requests answered with a 5xx status.",
        [target(f'sum by (namespace, model) (rate({m.SERVER_REQUESTS}_total{{{INFER_SEL}, status=~"5.."}}[$__rate_interval]))'
                f" / sum by (namespace, model) (rate({m.SERVER_REQUESTS}_total{{{INFER_SEL}}}[$__rate_interval]))",
                "{{namespace}}/{{model}}")], unit="percentunit", max_value=1), 8)
    lay.add(timeseries(
        "Latency percentiles", "Inference request latency (p50, p90, p99) by model.",
        quantiles(m.SERVER_LATENCY, "namespace, model", SERVER_SEL, "{{namespace}}/{{model}}"), unit="s"), 12)
    lay.add(timeseries(
        "Batch size", "Samples per forward pass of the dynamic batcher (mean).",
        [target(f"sum by (namespace, model) (rate({m.SERVER_BATCH_SIZE}_sum{{{SERVER_SEL}}}[$__rate_interval])) / "
                f"sum by (namespace, model) (rate({m.SERVER_BATCH_SIZE}_count{{{SERVER_SEL}}}[$__rate_interval]))",
                "{{namespace}}/{{model}}")]), 6)
    lay.add(timeseries(
        "Model load time", "Seconds each model server took to load its artifact.",
        [target(f"max by (namespace, model) ({m.SERVER_MODEL_LOAD}{{{SERVER_SEL}}})", "{{namespace}}/{{model}}")],
        unit="s"), 6)

    return {
        "uid": UID,
        "title": "aiaas",
        "description": "aiaas: TrainingJobs (phases, progress, loss, throughput, restarts), the operator "
                       "(reconcile latency and errors) and InferenceServices (requests, latency, errors).",
        "tags": ["aiaas", "kubernetes", "training", "inference"],
        "editable": True,
        "graphTooltip": 1,
        "refresh": "30s",
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-6h", "to": "now"},
        "timepicker": {},
        "timezone": "browser",
        "fiscalYearStartMonth": 0,
        "liveNow": False,
        "weekStart": "",
        "links": [],
        "annotations": {"list": [{
            "builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"}, "enable": True,
            "hide": True, "iconColor": "rgba(0, 211, 255, 1)", "name": "Annotations & Alerts", "type": "dashboard",
        }]},
        "templating": {"list": [
            {"type": "datasource", "name": "datasource", "label": "Data source", "query": "prometheus",
             "current": {}, "hide": 0, "includeAll": False, "multi": False, "options": [], "refresh": 1,
             "regex": ""},
            variable("namespace", "Namespace",
                     f'label_values({{__name__=~"{m.TRAINER_STEP}|{m.SERVER_REQUESTS}_total"}}, namespace)'),
            variable("trainingjob", "TrainingJob", f'label_values({m.TRAINER_STEP}{{namespace=~"$namespace"}}, job)'),
            variable("model", "Model", f'label_values({m.SERVER_REQUESTS}_total{{namespace=~"$namespace"}}, model)'),
        ]},
        "panels": lay.panels,
    }


def render() -> str:
    return json.dumps(build(), indent=2, sort_keys=False) + "\n"


def main() -> int:
    OUT.write_text(render())
    print(f"wrote {OUT}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
