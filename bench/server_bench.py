"""Model server benchmark: our Open Inference Protocol endpoints against a bare HTTP endpoint, same model, same run.

    python bench/server_bench.py [--model DIR] [--requests 2000] [--repeat 3] [--concurrency 1 16]

What runs (all on loopback, each server its own process, this process is the load generator):

* ``baseline`` — the floor: a minimal asyncio HTTP/1.1 endpoint in this file that takes the raw float32 bytes
  of one sample, calls the same torch module inline and returns the class as 8 bytes. No JSON, no validation,
  no batching, no metrics: only HTTP framing and the forward pass.
* ``bare-uvloop`` — ``bare`` on uvloop's event loop, as our server runs by default (the goals stay against ``bare``).
* ``v2-json`` — ``POST /v2/models/{name}/infer`` with a JSON tensor (what curl and most clients send).
* ``v2-binary`` — the same with the binary tensor data extension (``tritonclient``'s default).
* ``v1`` — ``POST /v1/models/{name}:predict`` with ``{"instances": [...]}``.
* ``bare-grpc`` — the gRPC yardstick: a grpc.aio ModelInfer that calls the same model inline (what one would
  write without our server), so ``grpc`` is measured against its own stack too.
* ``grpc-floor`` — the gRPC stack's floor: grpc.aio answering every call with a cached reply (no parsing, no
  model). Its p50 plus one forward pass (timed in this process) is the least any grpc.aio server's p50 can be.
* ``grpc`` — ``inference.GRPCInferenceService/ModelInfer`` with ``raw_input_contents`` (grpc.aio client).
* ``explain`` — ``POST /v2/models/{name}/explain`` (Integrated Gradients, default steps), one at a time.

Goals printed at the end (issue 14.4): REST at concurrency 1 >= 0.9x the bare endpoint's requests/s; at
concurrency 16 >= 2.5x (batching); gRPC's p50 at concurrency 1 next to REST's, and gRPC's bound (above).

Each request carries one digit (batch 1), so the server's dynamic batcher is what groups them at concurrency 16.
The load generator speaks HTTP/1.1 keep-alive over raw asyncio streams with prebuilt requests, so it costs
little next to the servers (it shares the machine's cores with them all the same). Every response is checked.
Independent clients instead: ``--client wrk`` (HTTP only) or ``--client go`` (hey for HTTP, ghz for gRPC; build
them with ``hack/bench/load-generators.sh build`` and put its directory on PATH); with ``--pin`` the servers run
on the last CPU and the client on the others.
For each endpoint and concurrency: mean/p50/p99 latency and requests/s, and the ratios against the baseline.
Anchors: Seldon MLServer's v2 CI gates on a small model are mean < 5 ms, p99 < 10 ms, > 300 requests/s.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# --- the baseline server ----------------------------------------------------------------------------------


def baseline_serve(model_dir: str, port: int, threads: int) -> None:
    """A bare HTTP/1.1 endpoint: body = one sample's float32 bytes, response = int64 class."""
    import torch

    from aiaas.trainer.export import load_artifact

    torch.set_num_threads(threads)
    model, manifest = load_artifact(model_dir)
    sample_shape = tuple(manifest["inputs"][0]["shape"][1:])

    def run(body: bytes) -> bytes:
        x = torch.frombuffer(bytearray(body), dtype=torch.float32).reshape(-1, *sample_shape)
        with torch.inference_mode():
            return model(x).argmax(-1).numpy().astype("<i8").tobytes()

    run(np.zeros(int(np.prod(sample_shape)), dtype=np.float32).tobytes())

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line[:15].lower() == b"content-length:":
                        length = int(line[15:])
                body = await reader.readexactly(length)
                out = run(body) if head.startswith(b"POST") else b"ok"
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: "
                             + str(len(out)).encode() + b"\r\n\r\n" + out)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=1024)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


def bare_serve(model_dir: str, port: int, threads: int, uvloop: bool = False) -> None:
    """What one would write without our server: aiohttp, a v2 JSON request in, the model called inline, the class
    out as a v2 JSON response. orjson like our server, no validation, batching, metrics or middleware. With
    ``uvloop`` (the ``bare-uvloop`` yardstick) on uvloop's event loop, as our server runs by default."""
    import orjson
    import torch
    from aiohttp import web

    from aiaas.trainer.export import load_artifact

    torch.set_num_threads(threads)
    model, manifest = load_artifact(model_dir)
    sample_shape = tuple(manifest["inputs"][0]["shape"][1:])

    async def infer(request: web.Request) -> web.Response:
        tensor = orjson.loads(await request.read())["inputs"][0]
        x = torch.from_numpy(np.asarray(tensor["data"], dtype=np.float32).reshape(-1, *sample_shape))
        with torch.inference_mode():
            classes = model(x).argmax(-1).numpy()
        return web.Response(body=orjson.dumps({"model_name": manifest["name"], "outputs": [
            {"name": "predicted_class", "datatype": "INT64", "shape": [len(classes)], "data": classes.tolist()}]}),
            content_type="application/json")

    async def ready(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/v2/models/{name}/infer", infer)
    app.router.add_get("/", ready)
    loop = None
    if uvloop:
        import uvloop as uvloop_module

        loop = uvloop_module.new_event_loop()
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None, loop=loop)


# the servers of this file, each a process of its own
YARDSTICKS = ("floor", "bare", "bare-uvloop", "bare-grpc", "grpc-floor")


# --- the load generator -----------------------------------------------------------------------------------


@dataclass
class Endpoint:
    name: str
    port: int
    requests: list[bytes]  # complete HTTP requests, used round-robin
    check: Any  # (response body, index) -> bool


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n"):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    return status, await reader.readexactly(length)


async def _load(endpoint: Endpoint, total: int, concurrency: int) -> tuple[list[float], float]:
    latencies: list[float] = []
    next_index = 0
    failures: list[str] = []

    async def worker() -> None:
        nonlocal next_index
        reader, writer = await asyncio.open_connection("127.0.0.1", endpoint.port)
        writer.transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            while next_index < total:
                i = next_index
                next_index += 1
                request = endpoint.requests[i % len(endpoint.requests)]
                start = time.perf_counter()
                writer.write(request)
                status, body = await _read_response(reader)
                latencies.append(time.perf_counter() - start)
                if status != 200 or not endpoint.check(body, i % len(endpoint.requests)):
                    failures.append(f"{endpoint.name} request {i}: {status} {body[:200]!r}")
        finally:
            writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    if failures:
        raise SystemExit(f"{len(failures)} wrong responses, e.g. {failures[0]}")
    return latencies, elapsed


async def _load_grpc(address: str, requests: list[Any], total: int, concurrency: int) -> tuple[list[float], float]:
    """The same closed loop over gRPC: ``concurrency`` callers on one channel, each waiting for its answer."""
    import grpc

    from aiaas.server import grpc_predict_v2_pb2_grpc as pb_grpc

    latencies: list[float] = []
    next_index = 0
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)

        async def worker() -> None:
            nonlocal next_index
            while next_index < total:
                i = next_index
                next_index += 1
                start = time.perf_counter()
                response = await stub.ModelInfer(requests[i % len(requests)])
                latencies.append(time.perf_counter() - start)
                if not response.raw_output_contents:
                    raise SystemExit(f"grpc request {i}: no outputs")

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return latencies, time.perf_counter() - start


def grpc_requests(model_name: str, x: np.ndarray) -> list[Any]:
    from aiaas.server import grpc_predict_v2_pb2 as pb

    out = []
    for i in range(len(x)):
        request = pb.ModelInferRequest(model_name=model_name)
        request.inputs.add(name="input", datatype="FP32", shape=[1, *x.shape[1:]])
        request.outputs.add(name="predicted_class")
        request.raw_input_contents.append(x[i].astype("<f4").tobytes())
        out.append(request)
    return out


def forward_pass_ms(model: Any, sample: np.ndarray, threads: int, passes: int = 300) -> float:
    """The median time of one forward pass of ``sample`` in this process (before the servers start), as the
    yardsticks run it: eager, inference mode, ``threads`` torch threads."""
    import torch

    torch.set_num_threads(threads)
    x = torch.from_numpy(np.ascontiguousarray(sample))
    times = []
    with torch.inference_mode():
        for _ in range(passes):
            start = time.perf_counter()
            model(x).argmax(-1)
            times.append(time.perf_counter() - start)
    return statistics.median(times[passes // 10:]) * 1000  # the first passes warm up


def explain_latencies(port: int, model_name: str, x: np.ndarray, count: int) -> list[float]:
    """Sequential explain requests of one sample each; seconds per request."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    out = []
    for i in range(count):
        body = json.dumps({"inputs": [{"name": "input", "shape": [1, *x.shape[1:]], "datatype": "FP32",
                                       "data": x[i % len(x)].reshape(-1).tolist()}]})
        start = time.perf_counter()
        conn.request("POST", f"/v2/models/{model_name}/explain", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        raw = response.read()
        out.append(time.perf_counter() - start)
        if response.status != 200:
            raise SystemExit(f"explain: {response.status} {raw[:200]!r}")
    conn.close()
    return out


def http_request(path: str, body: bytes, headers: dict[str, str] | None = None) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Length: {len(body)}",
             "Content-Type: application/json"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def bare_grpc_model(model_dir: str, threads: int) -> Any:
    """ModelInfer as one would write it without our server: read ``raw_input_contents``, call the model inline,
    answer the class as raw output; no validation, batching, metrics, auth or interceptors."""
    import torch

    from aiaas.server import grpc_predict_v2_pb2 as pb
    from aiaas.trainer.export import load_artifact

    torch.set_num_threads(threads)
    model, manifest = load_artifact(model_dir)
    sample_shape = tuple(manifest["inputs"][0]["shape"][1:])

    def infer(request: Any) -> Any:
        raw = bytearray(request.raw_input_contents[0])  # torch wants writable memory
        x = torch.frombuffer(raw, dtype=torch.float32).reshape(-1, *sample_shape)
        with torch.inference_mode():
            classes = model(x).argmax(-1).numpy()
        response = pb.ModelInferResponse(model_name=manifest["name"])
        response.outputs.add(name="predicted_class", datatype="INT64", shape=[len(classes)])
        response.raw_output_contents.append(classes.astype("<i8").tobytes())
        return response

    return infer


def serve_grpc(handler: Any, port: int, **handler_options: Any) -> None:
    """A grpc.aio server (default options, default event loop) whose ModelInfer is ``handler``."""
    import grpc
    from grpc import aio

    methods = {"ModelInfer": grpc.unary_unary_rpc_method_handler(handler, **handler_options)}

    async def main() -> None:
        server = aio.server()
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("inference.GRPCInferenceService",
                                                                             methods),))
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    asyncio.run(main())


def bare_grpc_serve(model_dir: str, port: int, threads: int) -> None:
    """The gRPC counterpart of ``bare``: :func:`bare_grpc_model` behind grpc.aio."""
    from aiaas.server import grpc_predict_v2_pb2 as pb

    infer = bare_grpc_model(model_dir, threads)

    async def model_infer(request: Any, context: Any) -> Any:
        return infer(request)

    serve_grpc(model_infer, port, request_deserializer=pb.ModelInferRequest.FromString,
               response_serializer=pb.ModelInferResponse.SerializeToString)


def grpc_floor_serve(model_dir: str, port: int, threads: int) -> None:
    """The gRPC stack's floor: grpc.aio answering every ModelInfer with the reply's bytes it computed for the
    first call (:func:`bare_grpc_model`), so per call it parses nothing and runs no model: what a Python gRPC
    server pays before doing any work. (Right for the one request ghz sends; the Python client's other
    samples get the first one's class, which it does not check.)"""
    from aiaas.server import grpc_predict_v2_pb2 as pb

    infer = bare_grpc_model(model_dir, threads)
    reply: list[bytes] = []

    async def model_infer(request: bytes, context: Any) -> bytes:
        if not reply:
            reply.append(infer(pb.ModelInferRequest.FromString(request)).SerializeToString())
        return reply[0]

    serve_grpc(model_infer, port)  # no (de)serializers: bytes in, bytes out


def build_endpoints(model_name: str, ports: dict[str, int], x: np.ndarray, classes: np.ndarray) -> list[Endpoint]:
    n = len(x)
    v2_json = [http_request(f"/v2/models/{model_name}/infer", json.dumps(
        {"inputs": [{"name": "input", "shape": [1, *x.shape[1:]], "datatype": "FP32", "data": x[i].reshape(-1).tolist()}],
         "outputs": [{"name": "predicted_class"}]}).encode()) for i in range(n)]
    v2_binary = []
    for i in range(n):
        raw = x[i].astype("<f4").tobytes()
        header = json.dumps({"inputs": [{"name": "input", "shape": [1, *x.shape[1:]], "datatype": "FP32",
                                         "parameters": {"binary_data_size": len(raw)}}],
                             "outputs": [{"name": "predicted_class", "parameters": {"binary_data": True}}]}).encode()
        v2_binary.append(http_request(f"/v2/models/{model_name}/infer", header + raw,
                                      {"Inference-Header-Content-Length": str(len(header))}))
    v1 = [http_request(f"/v1/models/{model_name}:predict",
                       json.dumps({"instances": [x[i].reshape(-1).tolist()]}).encode()) for i in range(n)]
    floor = [http_request("/", x[i].astype("<f4").tobytes()) for i in range(n)]

    # Byte comparisons: the load generator shares the CPUs with the servers, so its checks must be cheap.
    # (The formats are checked once, fully, by build_endpoints' caller; the tests check them exhaustively.)
    want_json = [b'"data":[%d]' % c for c in classes]
    want_binary = [int(c).to_bytes(8, "little", signed=True) for c in classes]
    want_v1 = [b'{"predictions":[%d],' % c for c in classes]

    def check_json(body: bytes, i: int) -> bool:
        return body.endswith(want_json[i] + b"}]}")

    def check_binary(body: bytes, i: int) -> bool:
        return body.endswith(want_binary[i])

    def check_v1(body: bytes, i: int) -> bool:
        return body.startswith(want_v1[i])

    return [
        Endpoint("floor", ports["floor"], floor, check_binary),
        Endpoint("bare", ports["bare"], v2_json, check_json),
        Endpoint("bare-uvloop", ports["bare-uvloop"], v2_json, check_json),
        Endpoint("v2-json", ports["server"], v2_json, check_json),
        Endpoint("v2-binary", ports["server"], v2_binary, check_binary),
        Endpoint("v1", ports["server"], v1, check_v1),
    ]


def check_formats(endpoints: list[Endpoint], classes: np.ndarray) -> None:
    """Parse one response of each endpoint in full, so the byte checks of the load runs rest on real formats."""
    import http.client

    for endpoint in endpoints:
        head, body = endpoint.requests[0].split(b"\r\n\r\n", 1)
        lines = head.decode().split("\r\n")
        headers = dict(line.split(": ", 1) for line in lines[1:])
        conn = http.client.HTTPConnection("127.0.0.1", endpoint.port, timeout=30)
        conn.request("POST", lines[0].split()[1], body, headers)
        response = conn.getresponse()
        raw = response.read()
        conn.close()
        assert response.status == 200, (endpoint.name, raw)
        if endpoint.name in ("v2-json", "bare", "bare-uvloop"):
            assert json.loads(raw)["outputs"][0]["data"] == [int(classes[0])], raw
        elif endpoint.name == "v1":
            assert json.loads(raw)["predictions"] == [int(classes[0])], raw
        elif endpoint.name == "v2-binary":
            length = int(response.headers["Inference-Header-Content-Length"])
            assert json.loads(raw[:length])["outputs"][0]["parameters"]["binary_data_size"] == 8, raw
        assert endpoint.check(raw, 0), (endpoint.name, raw)


def check_grpc(addresses: dict[str, str], request: Any, want_class: int, timeout: float = 120) -> None:
    """Wait for each gRPC server, then check that it answers ``request`` with the class the model gives."""
    import grpc

    from aiaas.server import grpc_predict_v2_pb2_grpc as pb_grpc

    for name, address in addresses.items():
        with grpc.insecure_channel(address) as channel:
            grpc.channel_ready_future(channel).result(timeout=timeout)
            response = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
        got = int.from_bytes(response.raw_output_contents[0], "little", signed=True)
        assert got == want_class, (name, got, want_class)


# --- orchestration ----------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{url}: the server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"{url} not ready after {timeout}s")


def train_model(out: Path) -> Path:
    config = {"jobName": "digits", "model": {"architecture": "cnn"}, "dataset": {"kind": "digits"},
              "hyperparameters": {"epochs": 3, "batchSize": 64, "learningRate": 0.003},
              "checkpoint": {"enabled": False}, "checkpointDir": str(out / "ckpt"),
              "artifactDir": str(out / "artifact"), "metricsPort": 0}
    env = {**os.environ, "AIAAS_TRAINER_CONFIG": json.dumps(config), "AIAAS_TERMINATION_LOG": str(out / "term")}
    print("training a LeNet-5 on digits with python -m aiaas.trainer ...", flush=True)
    subprocess.run([sys.executable, "-m", "aiaas.trainer"], env=env, check=True, stdout=subprocess.DEVNULL)
    return out / "artifact"


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads), from /proc; 0 where there is no /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def summary(latencies: list[float], elapsed: float, cpu: list[float]) -> dict[str, float]:
    """Latency and throughput of one run; ``cpu``: the server's CPU seconds per request in each window of it."""
    ms = sorted(v * 1000 for v in latencies)
    return {
        "server_cpu_us": statistics.fmean(cpu) * 1e6,
        "best_cpu_us": min(cpu) * 1e6,  # the window least disturbed by other work on the machine
        "mean_ms": statistics.fmean(ms),
        "p50_ms": ms[len(ms) // 2],
        "p99_ms": ms[min(len(ms) - 1, int(len(ms) * 0.99))],
        "rps": len(ms) / elapsed,
    }


def measure(load: Any, pid: int, total: int, windows: int) -> dict[str, float]:
    """Run ``load(n)`` (-> latencies, seconds) as ``windows`` slices of ``total`` requests, reading the server's
    CPU time around each."""
    latencies: list[float] = []
    elapsed = 0.0
    cpu: list[float] = []
    per = max(1, total // windows)
    for _ in range(windows):
        before = cpu_seconds(pid)
        lat, seconds = load(per)
        cpu.append((cpu_seconds(pid) - before) / max(1, len(lat)))  # wrk decides how many it sends
        latencies += lat
        elapsed += seconds
    return summary(latencies, elapsed, cpu)


def wrk_load(endpoint: Endpoint, concurrency: int, seconds: int, cpus: str | None) -> tuple[list[float], float]:
    """``wrk`` (an independent C load generator) on one prebuilt request; latencies come back as its percentiles
    (mean, p50 and p99 are then wrk's), requests/s as measured by it."""
    path, headers, body = split_request(endpoint.requests[0])
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(f"wrk.method = 'POST'\nwrk.body = {lua_string(body)}\n"
                     + "".join(f"wrk.headers[{lua_string(k.encode())}] = {lua_string(v.encode())}\n"
                               for k, v in headers.items()))
    command = ["wrk", "-t1", f"-c{concurrency}", f"-d{seconds}s", "--latency", "-s", script.name,
               f"http://127.0.0.1:{endpoint.port}{path}"]
    if cpus:
        command = ["taskset", "-c", cpus, *command]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    os.unlink(script.name)
    if "Non-2xx" in out:
        raise SystemExit(f"wrk on {endpoint.name}: some responses were not 200:\n{out}")
    rps = float(out.split("Requests/sec:")[1].split()[0])
    total = int(out.split(" requests in ")[0].split()[-1])
    percentiles = {line.split()[0]: wrk_ms(line.split()[1]) for line in out.splitlines()
                   if line.strip().startswith(("50%", "99%"))}
    # a latency list with wrk's percentiles in the right places, so summary() reads them back
    latencies = [percentiles["50%"] / 1000] * (total - total // 100) + [percentiles["99%"] / 1000] * (total // 100)
    return latencies, total / rps


def hey_load(endpoint: Endpoint, concurrency: int, seconds: int, cpus: str | None) -> tuple[list[float], float]:
    """``hey`` (a Go HTTP load generator, ``hack/bench/load-generators.sh``) on one prebuilt request for
    ``seconds``: every request's latency from its CSV output."""
    path, headers, body = split_request(endpoint.requests[0])
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "body").write_bytes(body)
        command = ["hey", "-z", f"{seconds}s", "-c", str(concurrency), "-m", "POST", "-D", f"{tmp}/body",
                   "-o", "csv", "-T", headers.pop("Content-Type", "application/json"),
                   *[arg for k, v in headers.items() for arg in ("-H", f"{k}: {v}")],
                   f"http://127.0.0.1:{endpoint.port}{path}"]
        out = go_tool(command, cpus)
    rows = [line.split(",") for line in out.splitlines()[1:] if line]  # response-time,...,status-code,offset
    if not rows or any(row[6] != "200" for row in rows):
        raise SystemExit(f"hey on {endpoint.name}: no responses or some not 200:\n{out[:500]}")
    return [float(row[0]) for row in rows], max(float(row[7]) + float(row[0]) for row in rows)


def ghz_load(address: str, request: Any, concurrency: int, seconds: int, cpus: str | None) -> tuple[list[float], float]:
    """``ghz`` (a Go gRPC load generator) sending one prebuilt ModelInferRequest over one connection for
    ``seconds``: every request's latency from its JSON report."""
    from google.protobuf import descriptor_pb2

    from aiaas.server import grpc_predict_v2_pb2 as pb

    protoset = descriptor_pb2.FileDescriptorSet()
    pb.DESCRIPTOR.CopyToProto(protoset.file.add())  # the service as our server has it, no .proto file needed
    method = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods_by_name["ModelInfer"].full_name
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "request.bin").write_bytes(request.SerializeToString())
        (Path(tmp) / "v2.protoset").write_bytes(protoset.SerializeToString())
        command = ["ghz", "--insecure", "--protoset", f"{tmp}/v2.protoset", "--call", method,
                   "-B", f"{tmp}/request.bin", "-c", str(concurrency), "-z", f"{seconds}s", "-O", "json", address]
        report = json.loads(go_tool(command, cpus))
    details = report.get("details") or []
    ok = [d["latency"] / 1e9 for d in details if d.get("status") == "OK"]
    # the calls in flight when the time is up end with "... is closing"; any other error is a failure
    failed = [d for d in details if d.get("status") != "OK" and "is closing" not in d.get("error", "")]
    if not ok or failed:
        raise SystemExit(f"ghz: no responses or some not OK: {report.get('errorDistribution')}")
    return ok, report["total"] / 1e9


def go_tool(command: list[str], cpus: str | None) -> str:
    """Run a load generator, on ``cpus`` (and as many Go threads) when given; its stdout."""
    if cpus:
        command = ["taskset", "-c", cpus, *command]
    env = {**os.environ, **({"GOMAXPROCS": str(len(cpus.split(",")))} if cpus else {})}
    return subprocess.run(command, capture_output=True, text=True, check=True, env=env).stdout


def split_request(raw: bytes) -> tuple[str, dict[str, str], bytes]:
    """(path, headers but Host and Content-Length, body) of a prebuilt HTTP request."""
    head, body = raw.split(b"\r\n\r\n", 1)
    lines = head.decode().split("\r\n")
    headers = {k: v for k, v in (line.split(": ", 1) for line in lines[1:]) if k not in ("Host", "Content-Length")}
    return lines[0].split()[1], headers, body


def lua_string(raw: bytes) -> str:
    return '"' + "".join(f"\\{b:03d}" for b in raw) + '"'


def wrk_ms(text: str) -> float:
    for unit, factor in (("us", 1e-3), ("ms", 1.0), ("s", 1000.0)):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * factor
    return float(text)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="artifact directory (default: train one on digits first)")
    p.add_argument("--requests", type=int, default=2000, help="requests per endpoint, concurrency and repeat")
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--repeat", type=int, default=3, help="runs of each measurement; the median is reported")
    p.add_argument("--windows", type=int, default=5, help="slices of each run whose server CPU time is read")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    p.add_argument("--threads", type=int, default=1, help="torch threads of the servers")
    p.add_argument("--pin", action="store_true",
                   help="servers on the last CPU, the load generator on the others (taskset / sched_setaffinity)")
    p.add_argument("--client", choices=["python", "wrk", "go"], default="python",
                   help="load generator: this file's (checks every response; gRPC: a grpc.aio client); wrk "
                   "(apt-get install wrk; one request body per endpoint; gRPC stays on the Python client); go: "
                   "hey for HTTP and ghz for gRPC (hack/bench/load-generators.sh build; one request each)")
    p.add_argument("--wrk-seconds", type=int, default=5,
                   help="duration of one wrk/hey/ghz run (split into the windows)")
    p.add_argument("--server-arg", action="append", default=[], help="extra argument for aiaas.server")
    p.add_argument("--explains", type=int, default=20, help="explain requests to time (after 3 warm-ups)")
    p.add_argument("--json", help="also write the results to this file")
    p.add_argument("--serve", nargs=3, metavar=("KIND", "DIR", "PORT"), help=argparse.SUPPRESS)
    return p.parse_args()


def start_servers(args: argparse.Namespace, model_dir: Path, ports: dict[str, int]) -> dict[str, Any]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs = {
        "server": subprocess.Popen(
            [sys.executable, "-m", "aiaas.server", "--model", str(model_dir), "--host", "127.0.0.1",
             "--port", str(ports["server"]), "--threads", str(args.threads), "--log-level", "WARNING",
             "--grpc-port", str(ports["grpc"]), "--explain-method", "integrated-gradients", *args.server_arg], env=env),
        **{kind: subprocess.Popen([sys.executable, __file__, "--serve", kind, str(model_dir), str(ports[kind]),
                                   "--threads", str(args.threads)], env=env) for kind in YARDSTICKS},
    }
    if args.pin and (os.cpu_count() or 1) > 1:
        last = (os.cpu_count() or 2) - 1
        for proc in procs.values():
            os.sched_setaffinity(proc.pid, {last})  # the threads it starts later inherit this
        os.sched_setaffinity(0, set(range(last)))
    return procs


def run_all(args: argparse.Namespace, procs: dict[str, Any], endpoints: list[Endpoint], grpc_reqs: list[Any],
            grpc_addresses: dict[str, str]) -> dict[tuple[str, int], list[dict[str, float]]]:
    """Every endpoint at every concurrency, ``repeat`` times, interleaved so that a burst of other load hits every
    endpoint alike."""
    client_cpus = None
    if args.pin and (os.cpu_count() or 1) > 1:
        client_cpus = ",".join(str(c) for c in range((os.cpu_count() or 2) - 1))
    runs: dict[tuple[str, int], list[dict[str, float]]] = {}
    for _ in range(args.repeat):
        for c in args.concurrency:
            loads = {e.name: http_load(args, e, c, client_cpus) for e in endpoints}
            for name, address in grpc_addresses.items():
                loads[name] = grpc_load(args, address, grpc_reqs, c, client_cpus)
            for name, (warm_up, load, timed) in loads.items():
                pid = procs[name if name in YARDSTICKS else "server"].pid
                warm_up()
                total = args.windows if timed else args.requests  # a timed client: one run per window
                runs.setdefault((name, c), []).append(measure(load, pid, total, args.windows))
    return runs


def http_load(args: argparse.Namespace, endpoint: Endpoint, c: int, cpus: str | None) -> tuple[Any, Any, bool]:
    """(warm up, load(n) -> latencies and seconds, whether the client runs for a time) for an HTTP endpoint."""
    if args.client in ("wrk", "go"):
        run = wrk_load if args.client == "wrk" else hey_load
        seconds = window_seconds(args)
        return (lambda: run(endpoint, c, 1, cpus)), (lambda n: run(endpoint, c, seconds, cpus)), True
    return (lambda: asyncio.run(_load(endpoint, args.warmup, c))), (lambda n: asyncio.run(_load(endpoint, n, c))), False


def window_seconds(args: argparse.Namespace) -> int:
    """How long a timed client (wrk, hey, ghz) runs per window: whole seconds, as they take them."""
    return max(1, round(args.wrk_seconds / args.windows))


def grpc_load(args: argparse.Namespace, address: str, requests: list[Any], c: int,
              cpus: str | None) -> tuple[Any, Any, bool]:
    """The same for gRPC: ghz with ``--client go``, else the grpc.aio client."""
    if args.client == "go":
        seconds = window_seconds(args)
        return ((lambda: ghz_load(address, requests[0], c, 1, cpus)),
                (lambda n: ghz_load(address, requests[0], c, seconds, cpus)), True)
    return ((lambda: asyncio.run(_load_grpc(address, requests, args.warmup, c))),
            (lambda n: asyncio.run(_load_grpc(address, requests, n, c))), False)


# The goals (issue 14.4) and yardstick ratios printed at the end: (label, numerator endpoint, denominator endpoint,
# concurrency, figure, goal or None). A ratio is of the medians over the repeats; the ratios of each repeat's
# pair (measured within seconds of each other) follow it, to show how much the machine moved in between.
GOALS: list[tuple[str, str, str, int, str, float | None]] = [
    ("REST JSON c1 >= 0.9x bare", "v2-json", "bare", 1, "rps", 0.9),
    ("REST JSON c1 vs the bare endpoint on uvloop (as the server runs)", "v2-json", "bare-uvloop", 1, "rps", None),
    ("gRPC p50 <= REST JSON p50 at c1", "v2-json", "grpc", 1, "p50_ms", 1.0),
    ("the bare endpoints at c1, bare aiohttp p50 / bare grpc.aio p50", "bare", "bare-grpc", 1, "p50_ms", None),
    ("gRPC c1 req/s vs the bare grpc.aio endpoint", "grpc", "bare-grpc", 1, "rps", None),
    ("REST JSON c16 >= 2.5x bare", "v2-json", "bare", 16, "rps", 2.5),
    ("REST JSON c16 vs the bare endpoint on uvloop", "v2-json", "bare-uvloop", 16, "rps", None),
]


def report(args: argparse.Namespace, results: dict[str, dict[int, dict[str, float]]],
           runs: dict[tuple[str, int], list[dict[str, float]]], names: list[str], metrics: str,
           explain_ms: list[float], load: tuple[float, float], pass_ms: float) -> None:
    header = f"{'endpoint':<10} {'conc':>4} {'mean ms':>8} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>8} " \
             f"{'cpu us/req':>10} {'best':>5}   {'p50 x':>6} {'req/s x':>7} {'cpu x':>6} {'vs floor':>8}"
    print("\n" + header + "\n" + "-" * len(header))
    for c in args.concurrency:
        bare, floor = results["bare"][c], results["floor"][c]
        for name in names:
            r = results[name][c]
            print(f"{name:<10} {c:>4} {r['mean_ms']:>8.2f} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} {r['rps']:>8.0f} "
                  f"{r['server_cpu_us']:>10.0f} {r['best_cpu_us']:>5.0f}   {r['p50_ms'] / bare['p50_ms']:>6.2f} "
                  f"{r['rps'] / bare['rps']:>7.2f} {r['server_cpu_us'] / max(bare['server_cpu_us'], 1e-9):>6.2f} "
                  f"{r['rps'] / floor['rps']:>8.2f}")
    print("(x = ratio to the bare aiohttp endpoint in this run, vs floor = req/s ratio to the raw asyncio one; "
          "cpu us/req: the server process's CPU time per request, mean and best of the windows of each run)")
    count = sum(float(line.split()[-1]) for line in metrics.splitlines()
                if line.startswith("aiaas_server_batch_size_count"))
    total = sum(float(line.split()[-1]) for line in metrics.splitlines()
                if line.startswith("aiaas_server_batch_size_sum"))
    if count:
        print(f"server: {total:.0f} samples in {count:.0f} forward passes (mean batch {total / count:.2f})")
    print(f"explain (integrated gradients, 1 sample, default steps): p50 {explain_ms[len(explain_ms) // 2]:.1f} ms, "
          f"max {explain_ms[-1]:.1f} ms over {len(explain_ms)} requests")
    for label, numerator, denominator, c, key, goal in GOALS:
        if c not in results["bare"]:
            continue
        ratio = results[numerator][c][key] / results[denominator][c][key]
        paired = [a[key] / b[key] for a, b in zip(runs[(numerator, c)], runs[(denominator, c)], strict=True)]
        print(f"{label}: {ratio:.2f}x" + ("" if goal is None else (" met" if ratio >= goal else " MISSED"))
              + f"  (each repeat: {', '.join(f'{r:.2f}' for r in paired)})")
    if 1 in results["grpc-floor"]:
        floor_ms, rest_ms = results["grpc-floor"][1]["p50_ms"], results["v2-json"][1]["p50_ms"]
        print(f"gRPC's bound at c1: grpc.aio's floor p50 {floor_ms:.2f} ms + one forward pass {pass_ms:.2f} ms "
              f"(in this process) = {floor_ms + pass_ms:.2f} ms, against REST JSON's p50 {rest_ms:.2f} ms")
    print(f"load average: {load[0]:.1f} before, {load[1]:.1f} after ({os.cpu_count()} CPUs)")
    v2 = results["v2-json"]
    gates = [("mean < 5 ms", all(r["mean_ms"] < 5 for r in v2.values())),
             ("p99 < 10 ms", all(r["p99_ms"] < 10 for r in v2.values())),
             ("> 300 req/s", all(r["rps"] > 300 for r in v2.values()))]
    print("MLServer's v2 CI gates for v2-json at every concurrency: "
          + ", ".join(f"{gate}: {'met' if ok else 'MISSED'}" for gate, ok in gates))


def main() -> int:
    args = parse_args()
    if args.serve:
        kind, model_dir, port = args.serve
        serve = {"floor": baseline_serve, "bare": bare_serve, "bare-grpc": bare_grpc_serve,
                 "grpc-floor": grpc_floor_serve, "bare-uvloop": functools.partial(bare_serve, uvloop=True)}[kind]
        serve(model_dir, int(port), args.threads)
        return 0

    from sklearn.datasets import load_digits

    from aiaas.trainer.export import load_artifact, predict

    tmp = tempfile.TemporaryDirectory(prefix="server-bench-")
    model_dir = Path(args.model) if args.model else train_model(Path(tmp.name))
    model, manifest = load_artifact(model_dir)
    x = load_digits().images.astype(np.float32)[:256].reshape(-1, 1, 8, 8)
    classes = predict(model, manifest, x)["predicted_class"].numpy()
    name = manifest["name"]
    pass_ms = forward_pass_ms(model, x[:1], args.threads)

    ports = {kind: free_port() for kind in ("server", "grpc", *YARDSTICKS)}
    procs = start_servers(args, model_dir, ports)
    load_before = os.getloadavg()[0]
    try:
        wait_http(f"http://127.0.0.1:{ports['server']}/v2/health/ready", procs["server"])
        for kind in ("floor", "bare", "bare-uvloop"):
            wait_http(f"http://127.0.0.1:{ports[kind]}/", procs[kind])
        grpc_addresses = {kind: f"127.0.0.1:{ports[kind]}" for kind in ("grpc-floor", "bare-grpc", "grpc")}
        grpc_reqs = grpc_requests(name, x)
        check_grpc(grpc_addresses, grpc_reqs[0], int(classes[0]))
        endpoints = build_endpoints(name, ports, x, classes)
        check_formats(endpoints, classes)
        print(f"model {name} ({manifest['model']['architecture']}), {args.requests} requests of one sample per run "
              f"({args.client} client{', pinned' if args.pin else ''}), median of {args.repeat} runs, "
              f"{os.cpu_count()} CPUs (load average {load_before:.1f} before), torch threads {args.threads}",
              flush=True)
        runs = run_all(args, procs, endpoints, grpc_reqs, grpc_addresses)
        explain_ms = sorted(v * 1000 for v in explain_latencies(ports["server"], name, x, 3 + args.explains)[3:])
        results: dict[str, dict[int, dict[str, float]]] = {}
        for (endpoint_name, c), summaries in runs.items():  # the median of each figure over the repeats
            results.setdefault(endpoint_name, {})[c] = {key: statistics.median(s[key] for s in summaries)
                                                        for key in summaries[0]}
        with urllib.request.urlopen(f"http://127.0.0.1:{ports['server']}/metrics") as r:
            metrics = r.read().decode()
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            proc.wait(30)
        tmp.cleanup()
    report(args, results, runs, [e.name for e in endpoints] + list(grpc_addresses), metrics, explain_ms,
           (load_before, os.getloadavg()[0]), pass_ms)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
