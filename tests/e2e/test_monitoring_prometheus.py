"""A real Prometheus (Debian's `prometheus`) scrapes a real operator, trainer metrics and a model server.

Everything runs on loopback: `aiaas operator` against the session's control plane, two ranks of a training
job's metrics (the trainer's own TrainerMetrics registries), and the model server's HTTP app. Prometheus gets
deploy/prometheus/prometheus-local.yaml (what docs/monitoring.md tells people to use on one machine) with only
the target ports and the intervals changed, loads the alert rules, and must return, over its HTTP API, the
series the dashboard and the alerts rely on.
"""

from __future__ import annotations

import json
import shutil
import sys
import textwrap
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "deploy"))
from deploy_util import DEPLOY, Process, free_port, http_get, wait_until  # noqa: E402

from aiaas.contract import metrics as m  # noqa: E402

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300), pytest.mark.usefixtures("e2e_cluster")]  # CRDs applied

PROMETHEUS = shutil.which("prometheus")
JOB = "cnn-digits"
TRAININGJOB = {"apiVersion": "aiaas.dev/v1alpha1", "kind": "TrainingJob", "metadata": {"name": JOB},
               "spec": {"trainer": {"model": {"architecture": "cnn"}, "dataset": {"kind": "digits"},
                                    "hyperparameters": {"epochs": 1, "batchSize": 32}},
                        "topology": {"nodes": 1, "nprocPerNode": 1,
                                     "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}}}}}

TRAINER_SCRIPT = textwrap.dedent("""
    import sys, time
    from prometheus_client import start_http_server
    from aiaas.trainer.metrics import TrainerMetrics

    job, ports = sys.argv[1], [int(p) for p in sys.argv[2:]]
    ranks = []
    for rank, port in enumerate(ports):
        t = TrainerMetrics(job, rank, None)
        t.total_steps.set(1000)
        t.epoch.set(0)
        t.checkpointed(time.time())
        start_http_server(port, addr="127.0.0.1", registry=t.registry)
        ranks.append(t)
    step = 0
    deadline = time.time() + 600
    while time.time() < deadline:
        step += 1
        for rank, t in enumerate(ranks):
            t.step.set(step)
            t.loss.set(2.3 / (1 + 0.05 * step))
            t.samples_per_second.set(1000.0 + 10 * rank)
            t.accuracy.set(min(0.99, 0.1 + 0.01 * step))
        time.sleep(0.25)
""")

SERVER_SCRIPT = textwrap.dedent("""
    import sys
    from aiohttp import web
    from aiaas.server.app import ServerConfig, build_app

    # no artifact: the model stays "loading", inference answers 503 and readiness fails, as in a starting pod
    web.run_app(build_app(ServerConfig(name="digits")), host="127.0.0.1", port=int(sys.argv[1]), print=None)
""")


class Prom:
    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    def query(self, expr: str) -> list[dict[str, Any]]:
        code, body = http_get(f"{self.base}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
        assert code == 200, f"{expr}: HTTP {code} {body}"
        data = json.loads(body)
        assert data["status"] == "success", data
        return data["data"]["result"]

    def get(self, path: str) -> dict[str, Any]:
        code, body = http_get(self.base + path)
        assert code == 200, body
        return json.loads(body)["data"]


@pytest.fixture
def stack(kubectl, namespace, tmp_path) -> Iterator[dict[str, Any]]:
    if PROMETHEUS is None:
        pytest.skip("prometheus not found: install Debian's `prometheus` package (hack/setup.sh --test does)")
    procs: list[Process] = []
    try:
        trainer_ports = [free_port(), free_port()]
        trainer = Process([sys.executable, "-c", TRAINER_SCRIPT, JOB, *map(str, trainer_ports)], tmp_path / "trainer.log")
        procs.append(trainer)
        server_port = free_port()
        server = Process([sys.executable, "-c", SERVER_SCRIPT, str(server_port)], tmp_path / "server.log")
        procs.append(server)
        op_port = free_port()
        operator = Process([sys.executable, "-m", "aiaas.operator", "operator", "--namespace", namespace, "--standalone",
                            "--resync-seconds=1", "--metrics-host=127.0.0.1", f"--metrics-port={op_port}",
                            f"--metrics-url-template=http://127.0.0.1:{trainer_ports[0]}/metrics"],
                           tmp_path / "operator.log")
        procs.append(operator)
        for port, proc, path in [(trainer_ports[0], trainer, "/metrics"), (trainer_ports[1], trainer, "/metrics"),
                                 (server_port, server, "/metrics"), (op_port, operator, "/readyz")]:
            wait_until(lambda p=port, x=path, pr=proc: http_get(f"http://127.0.0.1:{p}{x}")[0] == 200 or not pr.alive(),
                       timeout=60, what=f"{path} on {port}")
            assert proc.alive(), proc.log()

        # the documented configuration, pointed at these ports
        config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus-local.yaml").read_text())
        config["global"] |= {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"}
        config["rule_files"] = [str(DEPLOY / "prometheus" / "aiaas-rules.yaml")]
        jobs = {j["job_name"]: j for j in config["scrape_configs"]}
        assert jobs["aiaas-trainer"]["honor_labels"] is True
        jobs["aiaas-operator"]["static_configs"][0]["targets"] = [f"127.0.0.1:{op_port}"]
        jobs["aiaas-trainer"]["static_configs"][0]["targets"] = [f"127.0.0.1:{p}" for p in trainer_ports]
        jobs["aiaas-server"]["static_configs"][0]["targets"] = [f"127.0.0.1:{server_port}"]
        (tmp_path / "prometheus.yaml").write_text(yaml.safe_dump(config))
        prom_port = free_port()
        prom = Process([PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yaml'}",
                        f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{prom_port}",
                        "--log.level=warn"], tmp_path / "prometheus.log")
        procs.append(prom)
        wait_until(lambda: http_get(f"http://127.0.0.1:{prom_port}/-/ready")[0] == 200 or not prom.alive(),
                   timeout=60, what="prometheus /-/ready")
        assert prom.alive(), prom.log()
        yield {"prom": Prom(prom_port), "server_port": server_port, "operator": operator}
    finally:
        for p in reversed(procs):
            p.stop()


def send_traffic(port: int, n: int = 5) -> None:
    """Inference requests while the model is not loaded (answered 503), and liveness probes."""
    base = f"http://127.0.0.1:{port}"
    for _ in range(n):
        req = urllib.request.Request(f"{base}/v2/models/digits/infer", method="POST", data=b'{"inputs": []}',
                                     headers={"Content-Type": "application/json"})
        try:
            urllib.request.urlopen(req, timeout=3).close()
        except urllib.error.HTTPError as err:
            assert err.code == 503
        http_get(f"{base}/v2/health/live")


def test_prometheus_scrapes_operator_trainer_and_server(kubectl, namespace, stack):
    prom: Prom = stack["prom"]
    # a TrainingJob, so that the operator has something to count and time
    kubectl("apply", "-f", "-", input=json.dumps(TRAININGJOB), namespace=namespace)
    send_traffic(stack["server_port"])

    # every target of the three jobs is up
    def targets_up() -> dict[str, int] | None:
        got: dict[str, int] = {}
        for r in prom.query("up == 1"):
            got[r["metric"]["job"]] = got.get(r["metric"]["job"], 0) + 1
        return got if got == {"aiaas-operator": 1, "aiaas-trainer": 2, "aiaas-server": 1} else None

    wait_until(targets_up, timeout=60, interval=1, what="all targets up")

    # trainer series keep the trainer's job (the TrainingJob) and rank labels: honor_labels works
    steps = wait_until(lambda: (r := prom.query(f'{m.TRAINER_STEP}{{job="{JOB}"}}')) and len(r) == 2 and r,
                       timeout=30, interval=1, what="both ranks' step")
    assert {s["metric"]["rank"] for s in steps} == {"0", "1"}
    assert all(s["metric"]["namespace"] == "local" and float(s["value"][1]) > 0 for s in steps)
    assert not prom.query(f'{m.TRAINER_STEP}{{exported_job!=""}}')
    # progress moves
    first = float(steps[0]["value"][1])
    wait_until(lambda: float(prom.query(f'max({m.TRAINER_STEP}{{job="{JOB}"}})')[0]["value"][1]) > first,
               timeout=20, interval=1, what="the step to advance")

    # the operator sees the job running, and times its reconciles
    wait_until(lambda: [r for r in prom.query(f'{m.OPERATOR_JOBS}{{job="aiaas-operator", phase="Running"}}')
                        if float(r["value"][1]) == 1], timeout=60, interval=1, what="one Running job in the gauge",)
    assert prom.query(f'{m.OPERATOR_RECONCILE_DURATION}_count{{job="aiaas-operator", kind="TrainingJob"}} > 0')

    # the model server's requests, by endpoint and status
    infer = wait_until(lambda: prom.query(f'{m.SERVER_REQUESTS}_total{{job="aiaas-server", endpoint="infer", status="503"}}'),
                       timeout=30, interval=1, what="the server's request counter")
    assert float(infer[0]["value"][1]) >= 5 and infer[0]["metric"]["model"] == "digits"

    # the alert rules are loaded and healthy; the operator is not reported down
    rules = [r for g in prom.get("/api/v1/rules")["groups"] for r in g["rules"]]
    assert len(rules) >= 9 and all(r["health"] == "ok" for r in rules), rules
    # AiaasOperatorDown is pending (its expression true) until the rules are evaluated after the first scrape;
    # once the operator is up it must be neither pending nor firing.
    def operator_down_alerts() -> set[str]:
        return {a["state"] for a in prom.get("/api/v1/alerts")["alerts"]
                if a["labels"]["alertname"] == "AiaasOperatorDown"}

    wait_until(lambda: not operator_down_alerts(), timeout=30, interval=1, what="AiaasOperatorDown to clear")


def test_dashboard_queries_return_data(kubectl, namespace, stack):
    """Every dashboard query evaluates; those on the running components return series."""
    prom: Prom = stack["prom"]
    kubectl("apply", "-f", "-", input=json.dumps(TRAININGJOB), namespace=namespace)
    dashboard = json.loads((DEPLOY / "grafana" / "aiaas.json").read_text())

    def expr_of(t: dict[str, Any]) -> str:
        e = t["expr"].replace("$__rate_interval", "30s")
        for var in ("namespace", "trainingjob", "model"):
            e = e.replace(f"${var}", ".*")
        return e

    wanted = {"Progress per job", "Loss per job", "Samples/s per job", "Samples/s per rank", "TrainingJobs by phase",
              "Reconcile latency", "Reconciles/s", "Request rate", "Operators up", "Checkpoint age", "Epoch per job"}
    # let a few scrapes accumulate, so that rate() has two samples of every counter
    send_traffic(stack["server_port"])
    wait_until(lambda: prom.query(f'{m.SERVER_REQUESTS}_total{{endpoint="infer"}}'), timeout=30, interval=1,
               what="the server's first requests")
    time.sleep(2)
    send_traffic(stack["server_port"])
    wait_until(lambda: prom.query(f'count_over_time({m.TRAINER_STEP}{{job="{JOB}"}}[30s]) > 3'), timeout=60,
               interval=1, what="a few scrapes of the trainer")
    wait_until(lambda: prom.query(f'{m.OPERATOR_JOBS}{{phase="Running"}} == 1'), timeout=60, interval=1,
               what="the operator to count the job")
    time.sleep(2)
    empty = []
    for panel in dashboard["panels"]:
        for t in panel.get("targets", []):
            result = prom.query(expr_of(t))  # asserts the query evaluates
            if panel["title"] in wanted and not result:
                empty.append(f"{panel['title']}: {t['expr']}")
    assert not empty, "dashboard queries without data:\n" + "\n".join(empty)
