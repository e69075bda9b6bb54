"""The data plane both front ends share (REST in :mod:`.app`, gRPC in :mod:`.grpc_server`): no HTTP, no gRPC.

What lives here: the server's configuration, the loaded model and its batcher, the metrics, readiness, the
admission limits (requests and request bytes in flight, checked before a body is read), the bearer token, the
explainer and its own concurrency limit. Everything a client can get wrong raises
:class:`~.protocol.ProtocolError`; the front ends only translate that into their status codes.

What must not live here: parsing a wire format (that is :mod:`.protocol` and :mod:`.grpc_protocol`) or
anything that imports aiohttp or grpc.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import itertools
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .batcher import Batcher, Outputs, Overlap, Wanted
from .metrics import ServerMetrics
from .model import ServedModel
from .protocol import ProtocolError

log = logging.getLogger(__name__)

RETRY_AFTER_SECONDS = 1  # what a refused client is told to wait before trying again


@dataclass
class ServerConfig:
    max_batch_size: int = 64
    max_batch_delay: float = 0.005  # seconds
    max_request_bytes: int = 16 * 1024 * 1024
    name: str | None = None  # overrides the manifest's model name
    # Load shedding: beyond these the server answers 503 with Retry-After instead of queueing.
    max_inflight_requests: int = 256  # data-plane requests being received, queued or run
    max_inflight_bytes: int = 64 * 1024 * 1024  # their declared body sizes, together
    max_queue_samples: int = 16384  # samples waiting for the model (about a second of work for the small models here)
    body_timeout: float = 30.0  # seconds to receive a whole request body; slower ones get 408
    auth_token: str | None = None  # when set, every non-health endpoint wants "Authorization: Bearer <token>"
    explain_method: str | None = None  # "integrated-gradients" enables the explain endpoints
    explain_steps: int = 32  # the most integration steps one explanation may use
    explain_internal_batch_size: int = 64  # samples (of steps x inputs) per forward/backward pass
    explain_concurrency: int = 1  # explanations computed at once; more wait, a few; beyond that 503
    inline_forward: float = 0.001  # seconds: forward passes measured to be shorter run on the event loop (0: never)


class InternalError(Exception):
    """A failure that is the server's fault; the client sees only a generic message and the request id."""


# The brackets of a data-plane request are small classes rather than @contextmanager generators: they run on
# every request, and a generator-based context manager costs several times as much to enter and leave.


class _OnExit:
    """``with``: calls ``fn(arg)`` on the way out, however the block ends."""

    __slots__ = ("fn", "arg")

    def __init__(self, fn: Callable[[int], None], arg: int) -> None:
        self.fn, self.arg = fn, arg

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        self.fn(self.arg)


class _Timed:
    __slots__ = ("metrics", "started")

    def __init__(self, metrics: ServerMetrics, started: float) -> None:
        self.metrics, self.started = metrics, started

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is None:
            self.metrics.observe_latency(time.perf_counter() - self.started)


class DataPlane:
    """What every endpoint shares: the model once loaded, the batcher, metrics and the limits."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.model: ServedModel | None = None
        self.batcher: Batcher | None = None
        self.explainer: Any = None  # an explain.Explainer once the model is loaded and explaining is on
        self.metrics = ServerMetrics(config.name or "")
        self.shutting_down = False
        self.load_error: str | None = None
        self.requests_in_flight = 0
        self._call_overlap = Overlap()  # gRPC calls seen overlapping (they share one connection)
        self.bytes_in_flight = 0
        self._explain_slots = asyncio.Semaphore(max(1, config.explain_concurrency))
        # request ids: this process's random prefix and a counter, 16 hex digits (uuid4 per request was 1.2 % of
        # the server's CPU time at concurrency 1)
        self._id_prefix = os.urandom(4).hex()
        self._id_counter = itertools.count()
        self._explains_admitted = 0

    def new_request_id(self) -> str:
        return f"{self._id_prefix}{next(self._id_counter) & 0xFFFFFFFF:08x}"

    @property
    def ready(self) -> bool:
        return self.model is not None and not self.shutting_down

    def set_model(self, model: ServedModel) -> None:
        self.metrics.set_model(model.name, model.load_seconds)
        self.batcher = Batcher(
            model.predict,
            max_batch_size=self.config.max_batch_size,
            max_delay=self.config.max_batch_delay,
            on_batch=self.metrics.observe_batch,
            max_queue_samples=self.config.max_queue_samples,
            inline_seconds=self.config.inline_forward,
        )
        self.batcher.start()
        if self.config.explain_method:
            from .explain import Explainer

            config = self.config
            self.explainer = Explainer(
                model, config.explain_steps, config.explain_internal_batch_size, config.explain_concurrency
            )
        self.model = model

    async def stop(self) -> None:
        if self.batcher is not None:
            await self.batcher.stop()

    def require_model(self, name: str, version: str | None = None) -> ServedModel:
        """The model a request names (and its version, when given): 404 if unknown, 503 while loading."""
        model = self.model
        if model is None:
            if self.config.name is not None and name != self.config.name:
                raise ProtocolError(404, f"model {name!r} not found; this server serves {self.config.name!r}")
            raise ProtocolError(503, f"model {name!r} is not ready yet: it is still loading")
        if name != model.name:
            raise ProtocolError(404, f"model {name!r} not found; this server serves {model.name!r}")
        if version is not None and version not in model.versions:
            raise ProtocolError(
                404, f"version {version!r} of model {name!r} not found; available versions: {model.versions}"
            )
        return model

    def authorized(self, credentials: str | None) -> None:
        """Check an ``Authorization`` value (``Bearer <token>``) in constant time; 401 when it does not match."""
        expected = self.config.auth_token
        if expected is None:
            return
        scheme, _, token = (credentials or "").partition(" ")
        if not hmac.compare_digest(f"{scheme.lower()} {token.strip()}".encode(), f"bearer {expected}".encode()):
            raise ProtocolError(
                401, "this server wants a bearer token: send the header 'Authorization: Bearer <token>'"
            )

    def admitted(self, body_bytes: int) -> _OnExit:
        """Hold a place for one data-plane request of ``body_bytes`` (``with plane.admitted(n): ...``); 413 if too
        large, 503 when full."""
        config = self.config
        self.check_body_size(body_bytes)
        if self.requests_in_flight >= config.max_inflight_requests:
            raise ProtocolError(
                503, f"the server is busy: {self.requests_in_flight} requests are in flight; retry later",
                RETRY_AFTER_SECONDS,
            )
        if self.bytes_in_flight + body_bytes > config.max_inflight_bytes:
            raise ProtocolError(
                503, f"the server is busy: {self.bytes_in_flight} bytes of requests are in flight; retry later",
                RETRY_AFTER_SECONDS,
            )
        self.requests_in_flight += 1
        self.bytes_in_flight += body_bytes
        return _OnExit(self._release, body_bytes)

    def too_large_message(self) -> str:
        return f"the request body is larger than the limit of {self.config.max_request_bytes} bytes"

    def check_body_size(self, body_bytes: int) -> None:
        """413 when a request body (declared or received) is larger than ``max_request_bytes``."""
        if body_bytes > self.config.max_request_bytes:
            raise ProtocolError(413, self.too_large_message())

    def calls_overlap(self) -> bool:
        """Are gRPC calls being served concurrently (now, or within :attr:`.batcher.Overlap.HOLD`)? Then their
        passes go off the loop, which lets grpc.aio hand over more calls meanwhile, and so lets them batch."""
        return self._call_overlap.seen(self.requests_in_flight > 1, time.perf_counter())

    def _release(self, body_bytes: int) -> None:
        self.requests_in_flight -= 1
        self.bytes_in_flight -= body_bytes

    def receiving(self) -> _OnExit:
        """Bracket receiving and validating a request (``with plane.receiving(): ...``), so the batcher knows more
        work is on its way."""
        batcher = self.batcher
        if batcher is None or self.model is None:
            raise ProtocolError(503, "the model is not ready yet: it is still loading")
        return _OnExit(batcher.arrival_ended, batcher.arrival_started())

    def timed(self, started: float) -> _Timed:
        """Observe the latency of one inference request (since ``started``, a ``perf_counter`` reading) if it
        was answered (``with plane.timed(t): ...``); refused ones are only counted."""
        return _Timed(self.metrics, started)

    async def infer(self, inputs: list[np.ndarray], source: int | None = None, wanted: Wanted = None,
                    offload: bool = False) -> Outputs:
        """Run validated inputs through the batcher for the ``wanted`` outputs (None: all); a failure of the
        model is an :class:`InternalError`. ``source`` identifies the client connection (see
        :class:`.batcher.Clients`); None when unknown. ``offload``: see :meth:`.batcher.Batcher.submit`."""
        batcher = self.batcher
        if batcher is None:
            raise ProtocolError(503, "the model is not ready yet: it is still loading")
        try:
            return await batcher.submit(inputs, source, wanted, offload)
        except ProtocolError:
            raise
        except Exception as e:
            raise InternalError(f"inference failed: {e!r}") from e

    @contextlib.asynccontextmanager
    async def explain_slot(self) -> AsyncIterator[Any]:
        """One of ``explain_concurrency`` places to compute an explanation; a few may wait, more get 503."""
        if self.explainer is None:
            raise ProtocolError(
                404, "explanations are not enabled on this server; start it with --explain-method integrated-gradients"
            )
        limit = max(1, self.config.explain_concurrency)
        if self._explains_admitted >= 4 * limit:
            raise ProtocolError(503, "too many explanations are in progress; retry later", RETRY_AFTER_SECONDS)
        self._explains_admitted += 1
        try:
            async with self._explain_slots:
                yield self.explainer
        finally:
            self._explains_admitted -= 1
