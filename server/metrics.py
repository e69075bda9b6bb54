"""The model server's Prometheus metrics, named in :mod:`aiaas.contract.metrics`.

* ``aiaas_server_requests_total{model, endpoint, status}`` — every HTTP request; ``endpoint`` is the route's
  name (``infer``, ``predict``, ``model_metadata``, ``health_ready``, …, ``unknown`` for unmatched paths), never
  the raw path, so a scan of random URLs cannot blow up the series count;
* ``aiaas_server_request_duration_seconds{model}`` — latency of inference requests (v2 infer and v1 predict) that
  passed validation, from the start of the request to the response (refused ones are only counted);
* ``aiaas_server_batch_size{model}`` — samples per forward pass of the dynamic batcher;
* ``aiaas_server_model_load_seconds{model}`` — how long loading the artifact took.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from aiaas.contract.metrics import SERVER_BATCH_SIZE, SERVER_LATENCY, SERVER_MODEL_LOAD, SERVER_REQUESTS

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServerMetrics:
    def __init__(self, model: str = "") -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.model = model
        self.requests = Counter(
            SERVER_REQUESTS, "HTTP requests by endpoint and status code.", ["model", "endpoint", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            SERVER_LATENCY, "Latency of inference requests, from request to response.", ["model"],
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.batch_size = Histogram(
            SERVER_BATCH_SIZE, "Samples per forward pass of the dynamic batcher.", ["model"],
            buckets=BATCH_BUCKETS, registry=self.registry,
        )
        self.model_load = Gauge(
            SERVER_MODEL_LOAD, "Seconds it took to load the model artifact.", ["model"], registry=self.registry
        )
        # labels() takes a lock and builds its key on every call: the children of this model are looked up once
        self._request_children: dict[tuple[str, int], Counter] = {}
        self._latency_child: Histogram | None = None  # created on first use (or by set_model)
        self._batch_child: Histogram | None = None

    def count(self, endpoint: str, status: int) -> None:
        child = self._request_children.get((endpoint, status))
        if child is None:
            child = self.requests.labels(self.model, endpoint, str(status))
            self._request_children[(endpoint, status)] = child
        child.inc()

    def observe_latency(self, seconds: float) -> None:
        child = self._latency_child
        if child is None:
            child = self._latency_child = self.latency.labels(self.model)
        child.observe(seconds)

    def observe_batch(self, size: int) -> None:
        child = self._batch_child
        if child is None:
            child = self._batch_child = self.batch_size.labels(self.model)
        child.observe(size)

    def set_model(self, model: str, load_seconds: float) -> None:
        self.model = model
        self._request_children.clear()
        self.model_load.labels(model).set(load_seconds)
        # Create the series now, so dashboards see zeros rather than nothing before the first request.
        self._latency_child = self.latency.labels(model)
        self._batch_child = self.batch_size.labels(model)

    def render(self) -> bytes:
        return generate_latest(self.registry)
