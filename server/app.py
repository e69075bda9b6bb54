"""The HTTP application (aiohttp): routes of the Open Inference Protocol, errors as JSON, metrics, readiness."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from aiaas import __version__

from . import openapi, protocol
from .batcher import Batcher
from .metrics import CONTENT_TYPE, ServerMetrics
from .model import ServedModel, output_kind
from .protocol import HEADER_CONTENT_LENGTH, ProtocolError

log = logging.getLogger(__name__)

SERVER_NAME = "aiaas"
EXTENSIONS = ["binary_tensor_data", "model_configuration"]
JSON_TYPE = "application/json"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class ServerConfig:
    max_batch_size: int = 64
    max_batch_delay: float = 0.005  # seconds
    max_request_bytes: int = 16 * 1024 * 1024
    name: str | None = None  # overrides the manifest's model name


class State:
    """What the handlers share: the model once it is loaded, the batcher, the metrics."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.model: ServedModel | None = None
        self.batcher: Batcher | None = None
        self.metrics = ServerMetrics(config.name or "")
        self.shutting_down = False
        self.load_error: str | None = None
        self._openapi: bytes | None = None

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
        )
        self.batcher.start()
        self._openapi = None
        self.model = model

    def require_model(self, request: web.Request) -> ServedModel:
        """The model the path names (and its version, when given): 404 if unknown, 503 while loading."""
        model = self.model
        name = request.match_info.get("name", "")
        if model is None:
            if self.config.name is not None and name != self.config.name:
                raise ProtocolError(404, f"model {name!r} not found; this server serves {self.config.name!r}")
            raise ProtocolError(503, f"model {name!r} is not ready yet: it is still loading")
        if name != model.name:
            raise ProtocolError(404, f"model {name!r} not found; this server serves {model.name!r}")
        version = request.match_info.get("version")
        if version is not None and version not in model.versions:
            raise ProtocolError(
                404, f"version {version!r} of model {name!r} not found; available versions: {model.versions}"
            )
        return model

    def openapi(self) -> bytes:
        if self._openapi is None:
            model = self.model
            if model is None:
                doc = openapi.document(self.config.name)
            else:
                example = example_request(model)
                instances = None
                if len(model.inputs) == 1 and -1 not in model.inputs[0].shape[1:]:
                    instances = [example["inputs"][0]["data"]]
                doc = openapi.document(model.name, model.version, example, instances)
            self._openapi = protocol.dumps(doc)
        return self._openapi


def example_request(model: ServedModel) -> dict[str, Any]:
    """A valid v2 request for the model: one sample of zeros."""
    inputs = []
    for spec in model.inputs:
        shape = [1, *(d if d > 0 else 4 for d in spec.shape[1:])]
        count = int(np.prod(shape))
        value: Any = False if spec.datatype == "BOOL" else (0.0 if spec.datatype.startswith("FP") else 0)
        inputs.append({"name": spec.name, "shape": shape, "datatype": spec.datatype, "data": [value] * count})
    return {"id": "example", "inputs": inputs}


def json_response(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=protocol.dumps(body), status=status, content_type=JSON_TYPE)


def error_response(status: int, message: str) -> web.Response:
    return web.Response(body=protocol.error_body(message), status=status, content_type=JSON_TYPE)


STATE_KEY = web.AppKey("state", State)


def build_app(config: ServerConfig) -> web.Application:
    """The aiohttp application; call ``app[STATE_KEY].set_model(model)`` once the model is loaded."""
    state = State(config)

    @web.middleware
    async def errors_and_metrics(request: web.Request, handler: Handler) -> web.StreamResponse:
        """Answer every failure as {"error": ...}; count every request by route name and status."""
        route = request.match_info.route
        endpoint = route.name or "unknown"
        try:
            response = await handler(request)
        except ProtocolError as e:
            response = error_response(e.status, e.message)
        except web.HTTPException as e:
            if e.status < 400:
                raise
            reason = e.text if e.text and not e.text.startswith(f"{e.status}:") else e.reason
            if e.status == 413:
                reason = f"the request body is larger than the limit of {config.max_request_bytes} bytes"
            elif e.status == 404:
                reason = f"no such endpoint: {request.method} {request.path}; see /v2/openapi.json"
            elif e.status == 405:
                reason = f"method {request.method} is not allowed on {request.path}"
            response = error_response(e.status, reason or "error")
            for header in ("Allow",):
                if header in e.headers:
                    response.headers[header] = e.headers[header]
        except (HttpProcessingError, RequestPayloadError) as e:  # a broken body: bad chunking or content encoding
            reason = str(e).strip().splitlines()[-1].strip() if str(e).strip() else type(e).__name__
            response = error_response(400, f"the request body cannot be read: {reason}")
        except (ConnectionResetError, asyncio.CancelledError):
            raise
        except Exception:
            log.exception("unhandled error serving %s %s", request.method, request.path)
            response = error_response(500, "internal server error; see the server log")
        state.metrics.count(endpoint, response.status)
        return response

    async def live(request: web.Request) -> web.Response:
        return json_response({"live": True})

    async def root(request: web.Request) -> web.Response:
        return json_response({"status": "alive"})  # KServe's v1 liveness answer

    async def ready(request: web.Request) -> web.Response:
        if state.ready:
            return json_response({"ready": True})
        return json_response({"ready": False, "error": state.load_error or "the model is not loaded"}, 503)

    async def server_metadata(request: web.Request) -> web.Response:
        return json_response({"name": SERVER_NAME, "version": __version__, "extensions": EXTENSIONS})

    async def model_metadata(request: web.Request) -> web.Response:
        return json_response(state.require_model(request).metadata())

    async def model_ready(request: web.Request) -> web.Response:
        model = state.require_model(request)
        return json_response({"name": model.name, "ready": True})

    async def model_config(request: web.Request) -> web.Response:
        """Triton's model configuration extension (``tritonclient``'s ``get_model_config``)."""
        model = state.require_model(request)
        return json_response(
            {
                "name": model.name,
                "platform": model.platform,
                "max_batch_size": config.max_batch_size,
                "input": [{"name": s.name, "data_type": "TYPE_" + s.datatype, "dims": list(s.shape[1:])}
                          for s in model.inputs],
                "output": [{"name": s.name, "data_type": "TYPE_" + s.datatype, "dims": list(s.shape[1:])}
                           for s in model.outputs],
                "dynamic_batching": {"max_queue_delay_microseconds": int(config.max_batch_delay * 1e6)},
            }
        )

    async def run_batched(inputs: list[np.ndarray]) -> dict[str, np.ndarray]:
        batcher = state.batcher
        if batcher is None:
            raise ProtocolError(503, "the model is not ready yet")
        try:
            return await batcher.submit(inputs)
        except ProtocolError:
            raise
        except Exception as e:
            log.warning("inference failed: %s", e)
            raise ProtocolError(500, f"inference failed: {e}") from None

    async def infer(request: web.Request) -> web.Response:
        start = time.perf_counter()
        model = state.require_model(request)
        batcher = state.batcher
        assert batcher is not None
        token = batcher.arrival_started()
        try:
            body = await request.read()
            parsed = protocol.parse_infer_request(
                body, request.headers.get(HEADER_CONTENT_LENGTH), model.inputs, model.outputs
            )
            model.check(parsed.inputs)
        finally:
            batcher.arrival_ended(token)
        try:
            results = await run_batched(parsed.inputs)
            payload, header_length = protocol.encode_infer_response(
                model.name, model.version, parsed, model.output_specs, results
            )
        finally:
            state.metrics.observe_latency(time.perf_counter() - start)
        if header_length is None:
            return web.Response(body=payload, content_type=JSON_TYPE)
        return web.Response(
            body=payload,
            content_type="application/octet-stream",
            headers={HEADER_CONTENT_LENGTH: str(header_length)},
        )

    async def predict_v1(request: web.Request) -> web.Response:
        start = time.perf_counter()
        model = state.require_model(request)
        if len(model.inputs) != 1:
            raise ProtocolError(400, "this model has several inputs; use the v2 infer endpoint")
        class_outputs = [s.name for s in model.outputs if output_kind(s) == "class"]
        batcher = state.batcher
        assert batcher is not None
        token = batcher.arrival_started()
        try:
            array = protocol.v1_instances(await request.read(), model.inputs[0])
            model.check([array])
        finally:
            batcher.arrival_ended(token)
        try:
            results = await run_batched([array])
            if class_outputs:
                classes = results[class_outputs[0]]
            else:
                classes = next(iter(results.values())).reshape(array.shape[0], -1).argmax(axis=-1)
            return web.Response(body=protocol.v1_predictions(classes), content_type=JSON_TYPE)
        finally:
            state.metrics.observe_latency(time.perf_counter() - start)

    async def list_models_v1(request: web.Request) -> web.Response:
        return json_response({"models": [state.model.name] if state.model else []})

    async def model_status_v1(request: web.Request) -> web.Response:
        model = state.require_model(request)
        return json_response({"name": model.name, "ready": True})

    async def metrics(request: web.Request) -> web.Response:
        response = web.Response(body=state.metrics.render())
        response.headers["Content-Type"] = CONTENT_TYPE
        return response

    async def openapi_json(request: web.Request) -> web.Response:
        return web.Response(body=state.openapi(), content_type=JSON_TYPE)

    async def on_cleanup(app: web.Application) -> None:
        if state.batcher is not None:
            await state.batcher.stop()

    app = web.Application(middlewares=[errors_and_metrics], client_max_size=config.max_request_bytes)
    app[STATE_KEY] = state
    name = r"{name:[^/:]+}"
    routes = [
        ("GET", "/", root, "root"),
        ("GET", "/v2/health/live", live, "health_live"),
        ("GET", "/v2/health/ready", ready, "health_ready"),
        ("GET", "/v2", server_metadata, "server_metadata"),
        ("GET", "/v2/", server_metadata, "server_metadata_slash"),
        ("GET", f"/v2/models/{name}", model_metadata, "model_metadata"),
        ("GET", f"/v2/models/{name}/ready", model_ready, "model_ready"),
        ("GET", f"/v2/models/{name}/config", model_config, "model_config"),
        ("POST", f"/v2/models/{name}/infer", infer, "infer"),
        ("GET", f"/v2/models/{name}/versions/{{version}}", model_metadata, "model_version_metadata"),
        ("GET", f"/v2/models/{name}/versions/{{version}}/ready", model_ready, "model_version_ready"),
        ("POST", f"/v2/models/{name}/versions/{{version}}/infer", infer, "infer_version"),
        ("GET", "/v1/models", list_models_v1, "list_models"),
        ("GET", f"/v1/models/{name}", model_status_v1, "model_status"),
        ("POST", f"/v1/models/{name}:predict", predict_v1, "predict"),
        ("GET", "/metrics", metrics, "metrics"),
        ("GET", "/v2/openapi.json", openapi_json, "openapi"),
        ("GET", "/openapi.json", openapi_json, "openapi_root"),
    ]
    for method, path, handler, route_name in routes:
        app.router.add_route(method, path, handler, name=route_name)
    app.on_cleanup.append(on_cleanup)
    return app
