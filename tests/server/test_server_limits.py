"""Load shedding and failures against real server processes: bounded memory under a flood of large uploads,
slow clients timed out, full server answered 503 with Retry-After, 500s that leak nothing."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from server_artifacts import digits
from server_harness import ServerProcess, http

X, _ = digits()
INFER = "/v2/models/digits/infer"
MIB = 1024 * 1024
GOOD = {"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": X[0].reshape(-1).tolist()}]}


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"{field} not in /proc/{pid}/status")


async def upload(port: int, size: int, chunk: bytes) -> int | None:
    """POST ``size`` bytes of a body that is not valid JSON; the status, or None if the server hung up first."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {size}\r\n\r\n".encode())
        sent = 0
        while sent < size:
            piece = chunk[: size - sent]
            writer.write(piece)
            await writer.drain()
            sent += len(piece)
        status_line = await asyncio.wait_for(reader.readline(), 120)
        return int(status_line.split()[1]) if status_line else None
    except (ConnectionError, asyncio.IncompleteReadError):
        return None
    finally:
        writer.close()


def ordinary_requests(server: ServerProcess, stop: threading.Event, statuses: list[int]) -> None:
    while not stop.is_set():
        statuses.append(http("POST", server.url + INFER, GOOD, timeout=60)[0])
        statuses.append(http("GET", server.url + "/v2/health/ready", timeout=60)[0])
        time.sleep(0.05)


def test_a_flood_of_large_uploads_leaves_memory_bounded(cnn_artifact: Path, tmp_path: Path) -> None:
    """64 concurrent 15 MiB uploads with 32 MiB allowed in flight: two are read at a time, the rest get 503
    (or the connection closed), the server's peak RSS grows by well under the 960 MiB the flood carries, and
    ordinary requests are answered all along."""
    limit = 32 * MIB
    server = ServerProcess(cnn_artifact, tmp_path / "server.log", "--max-inflight-bytes", str(limit)).wait_ready()
    try:
        assert http("POST", server.url + INFER, GOOD)[0] == 200
        before = rss_kib(server.proc.pid)
        stop, statuses = threading.Event(), []
        background = threading.Thread(target=ordinary_requests, args=(server, stop, statuses))
        background.start()

        async def flood() -> list[int | None]:
            chunk = b" " * MIB
            return list(await asyncio.gather(*(upload(server.port, 15 * MIB, chunk) for _ in range(64))))

        try:
            results = asyncio.run(flood())
        finally:
            stop.set()
            background.join()
        peak = rss_kib(server.proc.pid, "VmHWM")
        growth_mib = (peak - before) / 1024
        print(f"flood: {results.count(400)} read and refused as bad JSON, {results.count(503)} shed with 503, "
              f"{results.count(None)} closed; RSS before {before / 1024:.0f} MiB, peak {peak / 1024:.0f} MiB "
              f"(+{growth_mib:.0f} MiB)")
        assert set(results) <= {400, 503, None}, results
        assert results.count(400) >= 1 and results.count(503) >= 1, results
        assert growth_mib < 4 * limit / MIB, f"peak RSS grew by {growth_mib:.0f} MiB"
        assert statuses and set(statuses) == {200}, statuses
        assert http("POST", server.url + INFER, GOOD)[0] == 200
    finally:
        assert server.stop() == 0
    assert "Traceback" not in server.log(), server.log()


def test_slow_clients_are_timed_out_and_do_not_block_others(cnn_artifact: Path, tmp_path: Path) -> None:
    server = ServerProcess(cnn_artifact, tmp_path / "server.log", "--body-timeout", "3").wait_ready()
    slow_body = socket.create_connection(("127.0.0.1", server.port), timeout=60)
    slow_headers = socket.create_connection(("127.0.0.1", server.port), timeout=60)
    try:
        slow_body.sendall(f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{{".encode())
        slow_headers.sendall(b"POST /v2/models/digits/infer HTTP/1.1\r\nHo")
        started = time.monotonic()
        response = b""
        while b"\r\n\r\n" not in response and time.monotonic() - started < 60:
            slow_body.sendall(b" ")  # one byte at a time: a slow loris
            slow_headers.sendall(b"s")
            assert http("POST", server.url + INFER, GOOD)[0] == 200  # others are served meanwhile
            slow_body.settimeout(0.3)
            with contextlib.suppress(TimeoutError):
                response += slow_body.recv(65536)
        assert response.startswith(b"HTTP/1.1 408"), response
        assert b"did not arrive within 3 seconds" in response
        assert http("GET", server.url + "/v2/health/ready")[0] == 200
    finally:
        slow_body.close()
        slow_headers.close()
        assert server.stop() == 0


def test_a_full_server_answers_503_with_retry_after(cnn_artifact: Path, tmp_path: Path) -> None:
    """Two requests whose bodies are still arriving fill --max-inflight-requests 2: the third is refused."""
    server = ServerProcess(cnn_artifact, tmp_path / "server.log", "--max-inflight-requests", "2").wait_ready()
    holders = [socket.create_connection(("127.0.0.1", server.port), timeout=60) for _ in range(2)]
    try:
        for sock in holders:
            sock.sendall(f"POST {INFER} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{{".encode())
        deadline = time.monotonic() + 60
        while True:
            status, headers, body = http("POST", server.url + INFER, GOOD)
            if status == 503 or time.monotonic() > deadline:
                break
            time.sleep(0.1)  # until the server has taken both holders in
        assert status == 503, body
        assert headers["Retry-After"] == "1" and "retry later" in json.loads(body)["error"]
        assert http("GET", server.url + "/v2/health/ready")[0] == 200  # health is never shed
    finally:
        for sock in holders:
            sock.close()
    try:
        deadline = time.monotonic() + 60
        while http("POST", server.url + INFER, GOOD)[0] != 200:  # places free again once the holders are gone
            assert time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        assert server.stop() == 0


def test_a_500_names_a_request_id_and_no_exception_text(cnn_artifact: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A model that fails (a fault no valid request can cause in a real model, so it is injected here) answers
    500 with a generic message and the request id; the exception text goes only to the log."""
    from aiohttp.test_utils import TestClient, TestServer

    from aiaas.server.app import PLANE_KEY, ServerConfig, build_app
    from aiaas.server.model import load

    served = load(cnn_artifact)

    def broken(arrays: list[Any]) -> Any:
        raise RuntimeError("secret detail: /var/run/aiaas/weights.pt is corrupt")

    served.predict_fn = broken

    async def main() -> tuple[int, str | None, dict[str, Any]]:
        app = build_app(ServerConfig())
        async with TestClient(TestServer(app, host="127.0.0.1")) as client:
            app[PLANE_KEY].set_model(served)
            response = await client.post(INFER, json=GOOD, headers={"X-Request-Id": "req-123"})
            return response.status, response.headers.get("X-Request-Id"), await response.json()

    status, request_id, body = asyncio.run(main())
    assert status == 500
    assert "secret" not in json.dumps(body) and "RuntimeError" not in json.dumps(body)
    assert "req-123" in body["error"] and request_id == "req-123"
    logged = "\n".join(r.getMessage() + (str(r.exc_info[1]) if r.exc_info else "") for r in caplog.records)
    assert "req-123" in logged and "secret detail" in logged


def test_request_ids_are_generated_or_echoed(server: ServerProcess) -> None:
    _, headers, _ = http("GET", server.url + "/v2/health/live")
    assert len(headers["X-Request-Id"]) == 16
    _, headers, _ = http("GET", server.url + "/v2", headers={"X-Request-Id": "abc-1"})
    assert headers["X-Request-Id"] == "abc-1"
    _, headers, _ = http("GET", server.url + "/v2", headers={"X-Request-Id": "bad id\twith spaces"})
    assert headers["X-Request-Id"] != "bad id\twith spaces"
