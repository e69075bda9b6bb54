"""The operator's own Prometheus metrics (names from :mod:`aiaas.contract.metrics`) and its HTTP endpoints.

``/metrics`` (exposition format), ``/healthz`` (the process and its event loop are alive) and ``/readyz``
(this replica leads and its watches are running; a standby replica answers 503).
"""

from __future__ import annotations

import threading
import time
from collections import Counter as Tally
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from aiaas.contract import metrics as names

from . import api

PhaseSource = Callable[[], dict[str, str]]  # resource key -> phase


class _PhaseGauge(Collector):
    """A gauge computed at scrape time from the operator's view of every resource's phase."""

    def __init__(self, name: str, doc: str, phases: list[str], source: PhaseSource) -> None:
        self.name, self.doc, self.phases, self.source = name, doc, phases, source

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(self.name, self.doc, labels=["phase"])
        tally = Tally(self.source().values())
        for phase in sorted(set(self.phases) | set(tally)):
            family.add_metric([phase], float(tally.get(phase, 0)))
        yield family


class OperatorMetrics:
    """Every metric the operator exports, on a registry of its own (tests make as many as they like)."""

    def __init__(self, jobs: PhaseSource | None = None, services: PhaseSource | None = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.jobs_created = Counter(names.OPERATOR_JOBS_CREATED, "TrainingJobs whose children were created.",
                                    registry=r)
        self.jobs_succeeded = Counter(names.OPERATOR_JOBS_SUCCEEDED, "TrainingJobs that succeeded.", registry=r)
        self.jobs_failed = Counter(names.OPERATOR_JOBS_FAILED, "TrainingJobs that failed, by reason.",
                                   ["reason"], registry=r)
        self.jobs_restarted = Counter(names.OPERATOR_JOBS_RESTARTED, "Gang restarts of TrainingJobs.", registry=r)
        self.reconcile_duration = Histogram(
            names.OPERATOR_RECONCILE_DURATION, "Time of one reconcile, by kind.", ["kind"], registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
        )
        self.reconcile_errors = Counter(names.OPERATOR_RECONCILE_ERRORS, "Reconciles that raised, by kind.",
                                        ["kind"], registry=r)
        self.time_to_running = Histogram(
            names.OPERATOR_TIME_TO_RUNNING, "Seconds from a TrainingJob's creation to phase Running.", registry=r,
            buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800),
        )
        if jobs is not None:
            r.register(_PhaseGauge(names.OPERATOR_JOBS, "TrainingJobs by phase.",
                                   [p.value for p in api.Phase], jobs))
        if services is not None:
            r.register(_PhaseGauge(names.OPERATOR_INFERENCESERVICES, "InferenceServices by phase.",
                                   ["WaitingForModel", "Deploying", "Ready", "Failed"], services))
        for kind in ("TrainingJob", "InferenceService"):
            self.reconcile_errors.labels(kind)
            self.reconcile_duration.labels(kind)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class Health:
    """Liveness: a heartbeat the event loop refreshes. Readiness: leading and watching."""

    def __init__(self, stale_after: float = 60.0) -> None:
        self.ready = False
        self.beat = time.monotonic()
        self.stale_after = stale_after

    def heartbeat(self) -> None:
        self.beat = time.monotonic()

    @property
    def alive(self) -> bool:
        return time.monotonic() - self.beat < self.stale_after


def serve(metrics: OperatorMetrics, health: Health, host: str, port: int) -> ThreadingHTTPServer:
    """Start the endpoints on a daemon thread; returns the server (``server_address`` has the real port)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server API
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, metrics.exposition(), CONTENT_TYPE_LATEST)
            elif path in ("/healthz", "/livez"):
                ok = health.alive
                self._send(200 if ok else 503, b"ok\n" if ok else b"event loop stalled\n")
            elif path == "/readyz":
                ok = health.ready and health.alive
                self._send(200 if ok else 503, b"ok\n" if ok else b"not leading (standby) or not started\n")
            else:
                self._send(404, b"not found: try /metrics, /healthz, /readyz\n")

        def _send(self, code: int, body: bytes, ctype: str = "text/plain; charset=utf-8") -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - http.server API
            return

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="aiaas-metrics", daemon=True).start()
    return server
