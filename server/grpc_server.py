"""The gRPC front end: ``inference.GRPCInferenceService`` (the Open Inference Protocol's gRPC API) on grpc.aio.

It runs in the same event loop as the REST front end and shares its :class:`~.dataplane.DataPlane`: the same
model, batcher (REST and gRPC requests join the same batches), admission limits, bearer token and metrics
(``endpoint`` label ``grpc_<Method>``, ``status`` the HTTP status the answer corresponds to). Methods stay
thin: conversion and validation are :mod:`.grpc_protocol`'s, everything else the data plane's.

``ServerLive`` and ``ServerReady`` need no token (they are the probes); the others want the metadata
``authorization: Bearer <token>`` when the server has one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from grpc import aio

from aiaas import __version__

from . import grpc_predict_v2_pb2 as pb
from . import grpc_predict_v2_pb2_grpc as pb_grpc
from .dataplane import DataPlane
from .grpc_protocol import grpc_code_name, model_infer_response, parse_model_infer, tensor_metadata
from .protocol import ProtocolError

log = logging.getLogger(__name__)

SERVER_NAME = "aiaas"
EXTENSIONS = ["binary_tensor_data", "model_configuration"]
Reply = TypeVar("Reply")


def _metadata(context: aio.ServicerContext, key: str) -> str | None:
    for item_key, value in context.invocation_metadata() or ():
        if item_key == key:
            return value if isinstance(value, str) else None
    return None


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, plane: DataPlane) -> None:
        self.plane = plane

    async def _call(
        self, method: str, context: aio.ServicerContext, body: Callable[[], Awaitable[Reply]], open_: bool = False
    ) -> Reply:
        """Run one method: authentication, errors as gRPC status codes, the request counted."""
        status = 200
        try:
            if not open_:
                self.plane.authorized(_metadata(context, "authorization"))
            return await body()
        except ProtocolError as e:
            status = e.status
            await context.abort(getattr(grpc.StatusCode, grpc_code_name(e)), e.message)
        except Exception:
            status = 500
            request_id = _metadata(context, "x-request-id") or self.plane.new_request_id()
            log.exception("internal error serving gRPC %s (request id %s)", method, request_id)
            await context.abort(
                grpc.StatusCode.INTERNAL,
                f"internal server error; the server log has the details under request id {request_id}",
            )
        finally:
            self.plane.metrics.count("grpc_" + method, status)
        raise AssertionError("unreachable: context.abort raises")

    async def ServerLive(self, request: pb.ServerLiveRequest, context: aio.ServicerContext) -> pb.ServerLiveResponse:
        async def body() -> pb.ServerLiveResponse:
            return pb.ServerLiveResponse(live=True)

        return await self._call("ServerLive", context, body, open_=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: aio.ServicerContext) -> pb.ServerReadyResponse:
        async def body() -> pb.ServerReadyResponse:
            return pb.ServerReadyResponse(ready=self.plane.ready)

        return await self._call("ServerReady", context, body, open_=True)

    async def ModelReady(self, request: pb.ModelReadyRequest, context: aio.ServicerContext) -> pb.ModelReadyResponse:
        async def body() -> pb.ModelReadyResponse:
            try:
                self.plane.require_model(request.name, request.version or None)
            except ProtocolError:
                return pb.ModelReadyResponse(ready=False)
            return pb.ModelReadyResponse(ready=self.plane.ready)

        return await self._call("ModelReady", context, body)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: aio.ServicerContext
    ) -> pb.ServerMetadataResponse:
        async def body() -> pb.ServerMetadataResponse:
            return pb.ServerMetadataResponse(name=SERVER_NAME, version=__version__, extensions=EXTENSIONS)

        return await self._call("ServerMetadata", context, body)

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: aio.ServicerContext
    ) -> pb.ModelMetadataResponse:
        async def body() -> pb.ModelMetadataResponse:
            model = self.plane.require_model(request.name, request.version or None)
            return pb.ModelMetadataResponse(
                name=model.name, versions=model.versions, platform=model.platform,
                inputs=tensor_metadata(model.inputs), outputs=tensor_metadata(model.outputs),
            )

        return await self._call("ModelMetadata", context, body)

    async def ModelInfer(self, request: pb.ModelInferRequest, context: aio.ServicerContext) -> pb.ModelInferResponse:
        started = time.perf_counter()

        async def body() -> pb.ModelInferResponse:
            plane = self.plane
            model = plane.require_model(request.model_name, request.model_version or None)
            with plane.admitted(request.ByteSize()), plane.timed(started):
                with plane.receiving():
                    parsed = parse_model_infer(request, model.inputs, model.outputs)
                    model.check(parsed.inputs)
                results = await plane.infer(parsed.inputs, wanted=parsed.wanted, offload=plane.calls_overlap())
                return model_infer_response(model.name, model.version, parsed, model.output_specs, results)

        return await self._call("ModelInfer", context, body)


def build_server(plane: DataPlane, host: str, port: int) -> tuple[aio.Server, int]:
    """A grpc.aio server for the plane on host:port (0 picks a port); returns it, not started, and its port."""
    config = plane.config
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", config.max_request_bytes),
        ("grpc.max_send_message_length", -1),
        ("grpc.so_reuseport", 0),
    ]
    server = aio.server(options=options, maximum_concurrent_rpcs=config.max_inflight_requests)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(plane), server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    bound = server.add_insecure_port(address)
    if bound == 0:
        raise OSError(f"cannot listen for gRPC on {address}")
    return server, bound
