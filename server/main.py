"""``python -m aiaas.server``: open the port, load the model in the background, serve until SIGTERM.

Lifecycle:

1. the port opens at once: ``/v2/health/live`` answers 200, ``/v2/health/ready`` 503 while the model loads;
2. the artifact is loaded (and warmed up) in a thread; then ``ready`` turns 200. If loading fails the reason is
   logged and the process exits with status 1, so Kubernetes shows a crash with the reason in the log;
3. on SIGTERM (or SIGINT) readiness turns 503, the listening socket closes, requests already received are
   finished (up to ``--shutdown-timeout`` seconds), then the process exits with status 0.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

import prometheus_client
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from aiaas.contract.launch import MODEL_DIR, SERVER_GRPC_PORT, SERVER_PORT

from .app import PLANE_KEY, build_app
from .dataplane import DataPlane, ServerConfig

log = logging.getLogger("aiaas.server")


class QuietClientErrors(logging.Filter):
    """Drop aiohttp's tracebacks for what clients do wrong (malformed HTTP, connections closed mid-request):
    aiohttp already answered them with a 400 or had no one left to answer, and a client must not be able to
    fill the log with tracebacks. Everything else aiohttp logs passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not isinstance(error, (HttpProcessingError, RequestPayloadError, ConnectionResetError))


EVENT_LOOPS = ("auto", "uvloop", "asyncio")
ENV_PREFIX = "AIAAS_SERVER_"  # every flag's default can come from AIAAS_SERVER_<FLAG>, e.g. AIAAS_SERVER_GRPC_PORT
MIB = 1024 * 1024


def env_default(flag: str, default: object) -> object:
    """The default of ``--some-flag``: ``$AIAAS_SERVER_SOME_FLAG`` when set (the operator may pass either)."""
    return os.environ.get(ENV_PREFIX + flag.upper().replace("-", "_"), default)


def add_limit_flags(p: argparse.ArgumentParser) -> None:
    """Load shedding: what the server holds at once before it answers 503 with Retry-After."""
    p.add_argument(
        "--max-inflight-requests", type=int, default=env_default("max-inflight-requests", 256),
        help="inference/explain requests being received, queued or run at once; more get 503 (default 256)",
    )
    p.add_argument(
        "--max-inflight-bytes", type=int, default=env_default("max-inflight-bytes", 64 * MIB),
        help="their declared body sizes together (a body without Content-Length counts as --max-request-bytes); "
        "more get 503 (default 64 MiB)",
    )
    p.add_argument(
        "--max-queue-samples", type=int, default=env_default("max-queue-samples", 16384),
        help="samples waiting for the model; a request that would exceed it gets 503 (default 16384)",
    )
    p.add_argument(
        "--body-timeout", type=float, default=env_default("body-timeout", 30.0),
        help="seconds to receive a whole request body; slower bodies get 408 (default 30)",
    )


def add_feature_flags(p: argparse.ArgumentParser) -> None:
    """Authentication, gRPC and explanations."""
    p.add_argument(
        "--auth-token-file", default=env_default("auth-token-file", None),
        help="file holding a bearer token (e.g. a mounted Secret); when given, every endpoint except health, "
        "liveness and /metrics wants 'Authorization: Bearer <token>' (REST) or the 'authorization' metadata (gRPC)",
    )
    p.add_argument(
        "--grpc-port", type=int, default=env_default("grpc-port", SERVER_GRPC_PORT),
        help=f"Open Inference Protocol gRPC port (default {SERVER_GRPC_PORT}; 0 picks one; -1 disables gRPC)",
    )
    p.add_argument(
        "--explain-method", choices=["integrated-gradients"], default=env_default("explain-method", None),
        help="enable POST /v2/models/NAME/explain and /v1/models/NAME:explain with this method (default: off)",
    )
    p.add_argument(
        "--explain-steps", type=int, default=env_default("explain-steps", 32),
        help="integration steps of one explanation, also the most a request may ask for (default 32, at most 512)",
    )
    p.add_argument(
        "--explain-internal-batch-size", type=int, default=env_default("explain-internal-batch-size", 64),
        help="samples per forward/backward pass while explaining (bounds its memory; default 64)",
    )
    p.add_argument(
        "--explain-concurrency", type=int, default=env_default("explain-concurrency", 1),
        help="explanations computed at once, in their own thread (default 1); a few more wait, beyond that 503",
    )


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.max_batch_size < 1:
        p.error("--max-batch-size must be at least 1")
    if args.max_batch_delay_ms < 0:
        p.error("--max-batch-delay-ms must not be negative")
    if args.inline_forward_ms < 0:
        p.error("--inline-forward-ms must not be negative")
    if args.max_request_bytes < 1024:
        p.error("--max-request-bytes must be at least 1024")
    if not 0 <= args.port <= 65535:
        p.error("--port must be between 0 and 65535")
    if not -1 <= args.grpc_port <= 65535:
        p.error("--grpc-port must be between 0 and 65535, or -1 to disable gRPC")
    for flag in ("max_inflight_requests", "max_inflight_bytes", "max_queue_samples", "explain_internal_batch_size",
                 "explain_concurrency"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1")
    if args.max_inflight_bytes < args.max_request_bytes:
        p.error("--max-inflight-bytes must be at least --max-request-bytes, or no large request could ever run")
    if args.body_timeout <= 0:
        p.error("--body-timeout must be positive")
    if args.event_loop not in EVENT_LOOPS:
        p.error(f"--event-loop must be one of {', '.join(EVENT_LOOPS)}")
    if args.explain_method not in (None, "integrated-gradients"):
        p.error("--explain-method must be integrated-gradients (or unset: explanations off)")
    if not 1 <= args.explain_steps <= 512:
        p.error("--explain-steps must be between 1 and 512")


def read_token(path: str | None) -> str | None:
    """The bearer token in ``path`` (surrounding whitespace dropped); an empty or unreadable file is an error."""
    if path is None:
        return None
    with open(path, encoding="utf-8") as f:
        token = f.read().strip()
    if not token or any(c.isspace() for c in token):
        raise ValueError(f"the token file {path} must hold one token without spaces")
    return token


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m aiaas.server",
        description="Serve an exported aiaas model over the Open Inference Protocol (KServe v2 REST and gRPC). "
        f"Every flag's default can be set with {ENV_PREFIX}<FLAG> (e.g. {ENV_PREFIX}AUTH_TOKEN_FILE).",
    )
    p.add_argument("--model", default=MODEL_DIR, help=f"artifact directory written by the trainer (default {MODEL_DIR})")
    p.add_argument("--port", type=int, default=SERVER_PORT, help=f"HTTP port (default {SERVER_PORT}; 0 picks one)")
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    p.add_argument("--name", default=None, help="model name in the URLs (default: the name in the manifest)")
    p.add_argument("--max-batch-size", type=int, default=64, help="most samples in one forward pass (default 64)")
    p.add_argument(
        "--max-batch-delay-ms", type=float, default=5.0,
        help="longest wait for more requests to join a batch, in milliseconds (default 5; 0 disables waiting)",
    )
    p.add_argument(
        "--inline-forward-ms", type=float, default=env_default("inline-forward-ms", 1.0),
        help="forward passes measured to take less than this run on the event loop instead of the model thread, "
        "which saves two thread wake-ups per pass (default 1 ms; 0 always uses the model thread)",
    )
    p.add_argument(
        "--max-request-bytes", type=int, default=16 * 1024 * 1024,
        help="largest request body accepted; larger ones get 413 (default 16 MiB)",
    )
    p.add_argument(
        "--threads", type=int, default=int(os.environ.get("AIAAS_SERVER_THREADS", "1")),
        help="torch intra-op threads (default 1: small models are fastest single-threaded next to the event loop)",
    )
    p.add_argument(
        "--shutdown-timeout", type=float, default=25.0,
        help="seconds to finish requests on SIGTERM (default 25: inside Kubernetes' default 30 s grace period)",
    )
    p.add_argument(
        "--event-loop", choices=EVENT_LOOPS, default=env_default("event-loop", "auto"),
        help="the asyncio event loop: uvloop (libuv's, in C), asyncio (the standard library's) or auto (uvloop "
        "where it is installed; default)",
    )
    p.add_argument("--access-log", action="store_true", help="log every request")
    p.add_argument("--log-level", default=os.environ.get("AIAAS_LOG_LEVEL", "INFO"))
    p.add_argument(
        "--print-openapi", action="store_true",
        help="print the OpenAPI description of the HTTP API (as served at /v2/openapi.json) and exit",
    )
    add_limit_flags(p)
    add_feature_flags(p)
    args = p.parse_args(argv)
    check_args(p, args)
    try:
        args.auth_token = read_token(args.auth_token_file)
    except (OSError, ValueError) as e:
        p.error(f"--auth-token-file: {e}")
    return args


def server_config(args: argparse.Namespace) -> ServerConfig:
    return ServerConfig(
        max_batch_size=args.max_batch_size,
        max_batch_delay=args.max_batch_delay_ms / 1000.0,
        inline_forward=args.inline_forward_ms / 1000.0,
        max_request_bytes=args.max_request_bytes,
        name=args.name,
        max_inflight_requests=args.max_inflight_requests,
        max_inflight_bytes=args.max_inflight_bytes,
        max_queue_samples=args.max_queue_samples,
        body_timeout=args.body_timeout,
        auth_token=args.auth_token,
        explain_method=args.explain_method,
        explain_steps=args.explain_steps,
        explain_internal_batch_size=args.explain_internal_batch_size,
        explain_concurrency=args.explain_concurrency,
    )


async def start_http(app: web.Application, args: argparse.Namespace) -> web.AppRunner:
    runner = web.AppRunner(
        app,
        handle_signals=False,
        access_log=logging.getLogger("aiaas.server.access") if args.access_log else None,
        shutdown_timeout=args.shutdown_timeout,
        keepalive_timeout=75.0,  # idle keep-alive connections are closed after this (aiohttp's default is an hour)
    )
    await runner.setup()
    site = web.TCPSite(runner, args.host, args.port, backlog=1024, reuse_address=True)
    await site.start()
    sockets = [s.getsockname() for s in (site._server.sockets if site._server else [])]  # type: ignore[attr-defined]
    port = sockets[0][1] if sockets else args.port
    log.info("listening on http://%s:%d (model loading from %s; event loop: %s)", args.host, port, args.model,
             loop_name(asyncio.get_running_loop()))
    return runner


async def start_grpc(plane: DataPlane, args: argparse.Namespace) -> Any:
    """The gRPC server, started; None when --grpc-port is -1."""
    if args.grpc_port < 0:
        return None
    from .grpc_server import build_server

    server, port = build_server(plane, args.host, args.grpc_port)
    await server.start()
    log.info("listening for gRPC (inference.GRPCInferenceService) on %s:%d", args.host, port)
    return server


def freeze_heap() -> None:
    """Move everything allocated so far (the model, torch, the libraries: most of the heap) out of the garbage
    collector's sight, so that its collections of the older generations walk only what requests allocated
    (short-lived objects) instead of the whole heap again."""
    gc.collect()
    gc.freeze()


async def serve(args: argparse.Namespace) -> int:
    from . import model as model_module

    app = build_app(server_config(args))
    plane = app[PLANE_KEY]
    runner = await start_http(app, args)
    grpc_server = await start_grpc(plane, args)

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    exit_code = 0
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def load() -> None:
        nonlocal exit_code
        try:
            served = await loop.run_in_executor(None, model_module.load, args.model, args.name, args.threads)
        except Exception as e:
            log.error("cannot load the model from %s: %s", args.model, e, exc_info=log.isEnabledFor(logging.DEBUG))
            plane.load_error = f"cannot load the model: {e}"
            exit_code = 1
            stop.set()
            return
        plane.set_model(served)
        freeze_heap()
        log.info("model %s version %s is ready", served.name, served.version)

    loader = asyncio.create_task(load())
    await stop.wait()
    plane.shutting_down = True
    log.info("shutting down: finishing requests in flight (at most %.0fs)", args.shutdown_timeout)
    if grpc_server is not None:
        await grpc_server.stop(args.shutdown_timeout)
    await runner.cleanup()
    if not loader.done():
        loader.cancel()
    log.info("stopped")
    return exit_code


def loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop ``--event-loop`` names: uvloop's (``auto``: when it is installed) or None, the standard
    library's. uvloop runs the selector and aiohttp's socket transports in C (docs/performance.md: what it saves)."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise SystemExit("--event-loop uvloop: the package uvloop is not installed (pip install uvloop)") from None
        return None
    return uvloop.new_event_loop


def loop_name(loop: asyncio.AbstractEventLoop) -> str:
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.print_openapi:
        from .openapi import document

        print(json.dumps(document(args.name), indent=2))
        return 0
    prometheus_client.disable_created_metrics()  # no *_created series: they double the scrape for nothing
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("aiohttp.server").addFilter(QuietClientErrors())
    # The event loop and the model thread share the GIL; a 1 ms switch interval (default 5 ms) keeps one
    # from holding up the other for long under load (it lowered the p99 at concurrency 16 in our runs).
    sys.setswitchinterval(0.001)
    factory = loop_factory(args.event_loop)
    with asyncio.Runner(loop_factory=factory) as runner:
        code = runner.run(serve(args))
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM while the interpreter exits changes nothing
    return code
