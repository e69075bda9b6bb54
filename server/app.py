"""The HTTP front end (aiohttp): routes of the Open Inference Protocol, errors as JSON, admission, auth.

Handlers stay thin: they parse with :mod:`.protocol` and ask the shared :class:`~.dataplane.DataPlane` (also
behind the gRPC front end) for everything else. What every request goes through, in order:

1. :func:`guard` (middleware): a request id; the bearer token unless the path is a health or metrics path;
   every failure answered as ``{"error": ...}`` (a 500 names only the request id: the details go to the log);
   the request counted by route name and status;
2. :func:`data_plane` (for inference and explanations only): a place among the requests and bytes in flight
   (503 with ``Retry-After`` when full), the body read within ``body_timeout`` (408 when slower).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from aiaas import __version__

from . import generate, openapi, protocol
from .dataplane import DataPlane, ServerConfig
from .metrics import CONTENT_TYPE
from .model import ServedModel, output_kind
from .protocol import HEADER_CONTENT_LENGTH, ProtocolError

__all__ = ["PLANE_KEY", "STATE_KEY", "ServerConfig", "build_app", "example_request"]

log = logging.getLogger(__name__)

SERVER_NAME = "aiaas"
EXTENSIONS = ["binary_tensor_data", "model_configuration", "generate"]
JSON_TYPE = "application/json"
REQUEST_ID_HEADER = "X-Request-Id"
OPEN_PATHS = frozenset({"/", "/v2/health/live", "/v2/health/ready", "/metrics"})  # no token needed
_CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
RECEIVED_AT = web.RequestKey("aiaas.received_at", float)  # perf_counter() when the request was admitted
BodyHandler = Callable[[web.Request, bytes], Awaitable[web.StreamResponse]]

PLANE_KEY = web.AppKey("plane", DataPlane)
STATE_KEY = PLANE_KEY  # the older name


def plane_of(request: web.Request) -> DataPlane:
    return request.app[PLANE_KEY]


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


# --- middleware -------------------------------------------------------------------------------------------


def http_error_reason(request: web.Request, e: web.HTTPException) -> str:
    """A message for aiohttp's own refusals (unknown path, wrong method, body too large)."""
    if e.status == 413:
        return plane_of(request).too_large_message()
    if e.status == 404:
        return f"no such endpoint: {request.method} {request.path}; see /v2/openapi.json"
    if e.status == 405:
        return f"method {request.method} is not allowed on {request.path}"
    reason = e.text if e.text and not e.text.startswith(f"{e.status}:") else e.reason
    return reason or "error"


def protocol_error_response(e: ProtocolError) -> web.Response:
    response = error_response(e.status, e.message)
    if e.retry_after is not None:
        response.headers["Retry-After"] = str(e.retry_after)
    if e.status in (408, 413, 503):
        response.force_close()  # the body may be unread: do not read more of it on this connection
    return response


async def answer(request: web.Request, handler: Handler, request_id: str) -> web.StreamResponse:
    """The handler's response, or the error response for whatever it raised."""
    try:
        if request.path not in OPEN_PATHS:
            plane_of(request).authorized(request.headers.get("Authorization"))
        return await handler(request)
    except ProtocolError as e:
        return protocol_error_response(e)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        response = error_response(e.status, http_error_reason(request, e))
        if "Allow" in e.headers:
            response.headers["Allow"] = e.headers["Allow"]
        return response
    except (HttpProcessingError, RequestPayloadError) as e:  # a broken body: bad chunking or content encoding
        reason = str(e).strip().splitlines()[-1].strip() if str(e).strip() else type(e).__name__
        return error_response(400, f"the request body cannot be read: {reason}")
    except (ConnectionResetError, asyncio.CancelledError):
        raise
    except Exception:  # a bug or a model failure: log it, tell the client only how to find it in the log
        log.exception("internal error serving %s %s (request id %s)", request.method, request.path, request_id)
        return error_response(500, f"internal server error; the server log has the details under request id {request_id}")


@web.middleware
async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Request id, authentication, errors as JSON, and the request counted by route name and status."""
    given = request.headers.get(REQUEST_ID_HEADER)
    request_id = given if given and _CLIENT_REQUEST_ID.fullmatch(given) else plane_of(request).new_request_id()
    response = await answer(request, handler, request_id)
    response.headers[REQUEST_ID_HEADER] = request_id
    plane_of(request).metrics.count(request.match_info.route.name or "unknown", response.status)
    return response


def data_plane(handler: BodyHandler) -> Handler:
    """Admit a request among those in flight (by count and declared bytes), then read its body in time."""

    async def admitted(request: web.Request) -> web.StreamResponse:
        plane = plane_of(request)
        request[RECEIVED_AT] = time.perf_counter()
        declared = request.content_length
        with plane.admitted(declared if declared is not None else plane.config.max_request_bytes):
            if request.content.is_eof():  # the whole body came with the headers: take it, nothing to wait for
                plane.check_body_size(request.content.total_bytes)  # as request.read() would (inflated, if gzip)
                body = request.content.read_nowait()
            else:
                try:
                    body = await asyncio.wait_for(request.read(), plane.config.body_timeout)
                except asyncio.TimeoutError:
                    raise ProtocolError(
                        408, f"the request body did not arrive within {plane.config.body_timeout:g} seconds"
                    ) from None
            return await handler(request, body)

    return admitted


# --- handlers ---------------------------------------------------------------------------------------------


def connection_of(request: web.Request) -> int:
    """Which client connection a request came on (the batcher tells a lone client from several by it)."""
    return id(request.protocol)


def model_of(request: web.Request) -> ServedModel:
    info = request.match_info
    return plane_of(request).require_model(info.get("name", ""), info.get("version"))


async def live(request: web.Request) -> web.Response:
    return json_response({"live": True})


async def root(request: web.Request) -> web.Response:
    return json_response({"status": "alive"})  # KServe's v1 liveness answer


async def ready(request: web.Request) -> web.Response:
    plane = plane_of(request)
    if plane.ready:
        return json_response({"ready": True})
    return json_response({"ready": False, "error": plane.load_error or "the model is not loaded"}, 503)


async def server_metadata(request: web.Request) -> web.Response:
    return json_response({"name": SERVER_NAME, "version": __version__, "extensions": EXTENSIONS})


async def model_metadata(request: web.Request) -> web.Response:
    return json_response(model_of(request).metadata())


async def model_ready(request: web.Request) -> web.Response:
    return json_response({"name": model_of(request).name, "ready": True})


async def model_config(request: web.Request) -> web.Response:
    """Triton's model configuration extension (``tritonclient``'s ``get_model_config``)."""
    model = model_of(request)
    config = plane_of(request).config

    def dims(specs: list[protocol.TensorSpec]) -> list[dict[str, Any]]:
        return [{"name": s.name, "data_type": "TYPE_" + s.datatype, "dims": list(s.shape[1:])} for s in specs]

    return json_response({
        "name": model.name,
        "platform": model.platform,
        "max_batch_size": config.max_batch_size,
        "input": dims(model.inputs),
        "output": dims(model.outputs),
        "dynamic_batching": {"max_queue_delay_microseconds": int(config.max_batch_delay * 1e6)},
    })


@data_plane
async def infer(request: web.Request, body: bytes) -> web.Response:
    plane = plane_of(request)
    model = model_of(request)
    with plane.timed(request[RECEIVED_AT]):
        with plane.receiving():
            parsed = protocol.parse_infer_request(
                body, request.headers.get(HEADER_CONTENT_LENGTH), model.inputs, model.outputs
            )
            model.check(parsed.inputs)
        results = await plane.infer(parsed.inputs, connection_of(request), parsed.wanted)
        payload, header_length = protocol.encode_infer_response(
            model.name, model.version, parsed, model.output_specs, results
        )
    if header_length is None:
        return web.Response(body=payload, content_type=JSON_TYPE)
    return web.Response(
        body=payload, content_type="application/octet-stream", headers={HEADER_CONTENT_LENGTH: str(header_length)}
    )


@data_plane
async def generate_text(request: web.Request, body: bytes) -> web.Response:
    """The generate extension (language models): text in, text out; see :mod:`.generate`."""
    plane = plane_of(request)
    model = model_of(request)
    with plane.timed(request[RECEIVED_AT]):
        text = await generate.answer(model, body, plane.infer)
    return json_response({"model_name": model.name, "model_version": model.version, "text_output": text})


def v1_input(model: ServedModel, body: bytes) -> np.ndarray:
    if len(model.inputs) != 1:
        raise ProtocolError(400, "this model has several inputs; use the v2 endpoints")
    array = protocol.v1_instances(body, model.inputs[0])
    model.check([array])
    return array


@data_plane
async def predict_v1(request: web.Request, body: bytes) -> web.Response:
    plane = plane_of(request)
    model = model_of(request)
    class_outputs = [s.name for s in model.outputs if output_kind(s) == "class"]
    with plane.timed(request[RECEIVED_AT]):
        with plane.receiving():
            array = v1_input(model, body)
        results = await plane.infer([array], connection_of(request), frozenset(class_outputs[:1]) or None)
    if class_outputs:
        classes = results[class_outputs[0]]
    else:
        classes = next(iter(results.values())).reshape(array.shape[0], -1).argmax(axis=-1)
    return web.Response(body=protocol.v1_predictions(model.name, model.version, classes), content_type=JSON_TYPE)


@data_plane
async def explain_v2(request: web.Request, body: bytes) -> web.Response:
    plane = plane_of(request)
    model = model_of(request)
    parsed = protocol.parse_infer_request(body, request.headers.get(HEADER_CONTENT_LENGTH), model.inputs, [])
    model.check(parsed.inputs)
    async with plane.explain_slot() as explainer:
        explanation = await explainer.explain(parsed.inputs, parsed.parameters)
    return json_response(explanation.v2_response(model, parsed.id))


@data_plane
async def explain_v1(request: web.Request, body: bytes) -> web.Response:
    plane = plane_of(request)
    model = model_of(request)
    array = v1_input(model, body)
    params = protocol.loads(body).get("parameters")
    async with plane.explain_slot() as explainer:
        explanation = await explainer.explain([array], params if isinstance(params, dict) else {})
    return json_response(explanation.v1_response(model))


async def list_models_v1(request: web.Request) -> web.Response:
    model = plane_of(request).model
    return json_response({"models": [model.name] if model else []})


async def model_status_v1(request: web.Request) -> web.Response:
    return json_response({"name": model_of(request).name, "ready": True})


async def metrics(request: web.Request) -> web.Response:
    response = web.Response(body=plane_of(request).metrics.render())
    response.headers["Content-Type"] = CONTENT_TYPE
    return response


async def openapi_json(request: web.Request) -> web.Response:
    return web.Response(body=openapi_document(plane_of(request)), content_type=JSON_TYPE)


def openapi_document(plane: DataPlane) -> bytes:
    model = plane.model
    if model is None:
        return protocol.dumps(openapi.document(plane.config.name))
    example = example_request(model)
    instances = None
    if len(model.inputs) == 1 and -1 not in model.inputs[0].shape[1:]:
        instances = [example["inputs"][0]["data"]]
    return protocol.dumps(openapi.document(model.name, model.version, example, instances))


NAME = r"{name:[^/:]+}"
VERSION = "{version}"
# aiohttp tries the routes that share a path prefix in this order (their patterns never overlap: a name holds
# no '/' or ':'), so the inference routes come first within each prefix.
ROUTES: list[tuple[str, str, Handler, str]] = [
    ("POST", f"/v2/models/{NAME}/infer", infer, "infer"),
    ("POST", f"/v1/models/{NAME}:predict", predict_v1, "predict"),
    ("GET", "/", root, "root"),
    ("GET", "/v2/health/live", live, "health_live"),
    ("GET", "/v2/health/ready", ready, "health_ready"),
    ("GET", "/v2", server_metadata, "server_metadata"),
    ("GET", "/v2/", server_metadata, "server_metadata_slash"),
    ("GET", f"/v2/models/{NAME}", model_metadata, "model_metadata"),
    ("GET", f"/v2/models/{NAME}/ready", model_ready, "model_ready"),
    ("GET", f"/v2/models/{NAME}/config", model_config, "model_config"),
    ("POST", f"/v2/models/{NAME}/explain", explain_v2, "explain"),
    ("POST", f"/v2/models/{NAME}/generate", generate_text, "generate"),
    ("GET", f"/v2/models/{NAME}/versions/{VERSION}", model_metadata, "model_version_metadata"),
    ("GET", f"/v2/models/{NAME}/versions/{VERSION}/ready", model_ready, "model_version_ready"),
    ("POST", f"/v2/models/{NAME}/versions/{VERSION}/infer", infer, "infer_version"),
    ("GET", "/v1/models", list_models_v1, "list_models"),
    ("GET", f"/v1/models/{NAME}", model_status_v1, "model_status"),
    ("POST", f"/v1/models/{NAME}:explain", explain_v1, "explain_v1"),
    ("GET", "/metrics", metrics, "metrics"),
    ("GET", "/v2/openapi.json", openapi_json, "openapi"),
    ("GET", "/openapi.json", openapi_json, "openapi_root"),
]


def build_app(config: ServerConfig, plane: DataPlane | None = None) -> web.Application:
    """The aiohttp application; call ``app[PLANE_KEY].set_model(model)`` once the model is loaded."""
    plane = plane or DataPlane(config)
    app = web.Application(middlewares=[guard], client_max_size=config.max_request_bytes)
    app[PLANE_KEY] = plane
    for method, path, handler, route_name in ROUTES:
        app.router.add_route(method, path, handler, name=route_name)

    async def on_cleanup(app: web.Application) -> None:
        await plane.stop()

    app.on_cleanup.append(on_cleanup)
    return app
