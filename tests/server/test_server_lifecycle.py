"""Dynamic batching, graceful shutdown, readiness and load failures, with real server processes."""

from __future__ import annotations

import json
import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.client import HTTPConnection
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from server_artifacts import digits
from server_harness import ServerProcess, http

X, Y = digits()


def infer(url: str, x: np.ndarray, name: str = "digits", timeout: float = 60.0) -> tuple[int, dict[str, Any]]:
    body = {"id": str(len(x)), "inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                           "data": x.reshape(-1).tolist()}]}
    status, _, raw = http("POST", f"{url}/v2/models/{name}/infer", body, timeout=timeout)
    return status, json.loads(raw)


def metric(url: str, pattern: str) -> float:
    text = http("GET", url + "/metrics")[2].decode()
    match = re.search(pattern + r" ([0-9.e+-]+)", text)
    assert match, f"{pattern} not in\n{text}"
    return float(match.group(1))


def test_concurrent_requests_are_batched_and_answered(server: ServerProcess, reference: Any) -> None:
    count_before = metric(server.url, r'aiaas_server_batch_size_count\{model="digits"\}')
    sum_before = metric(server.url, r'aiaas_server_batch_size_sum\{model="digits"\}')
    n = 96
    samples = [X[i % len(X)].reshape(1, 1, 8, 8) for i in range(n)]
    barrier = threading.Barrier(32)

    def one(i: int) -> tuple[int, dict[str, Any]]:
        if i < 32:
            barrier.wait()
        return infer(server.url, samples[i])

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, range(n)))
    _, expected = reference(np.concatenate(samples))
    for i, (status, body) in enumerate(results):
        assert status == 200, body
        assert body["outputs"][1]["data"] == [int(expected[i])]
    batches = metric(server.url, r'aiaas_server_batch_size_count\{model="digits"\}') - count_before
    rows = metric(server.url, r'aiaas_server_batch_size_sum\{model="digits"\}') - sum_before
    assert rows == n
    assert batches < n, "no two concurrent requests shared a forward pass"


def test_concurrent_grpc_calls_on_one_channel_are_batched(server: ServerProcess, reference: Any) -> None:
    """gRPC multiplexes calls on one connection, so they cannot be told apart by connection as REST clients are;
    calls in flight together still share forward passes."""
    grpc = pytest.importorskip("grpc")
    from tritonclient.grpc import service_pb2 as pb
    from tritonclient.grpc import service_pb2_grpc as pb_grpc

    count_before = metric(server.url, r'aiaas_server_batch_size_count\{model="digits"\}')
    sum_before = metric(server.url, r'aiaas_server_batch_size_sum\{model="digits"\}')
    n = 96
    samples = [X[i % len(X)].reshape(1, 1, 8, 8).astype("<f4") for i in range(n)]
    barrier = threading.Barrier(32)
    with grpc.insecure_channel(server.grpc_address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)

        def one(i: int) -> int:
            request = pb.ModelInferRequest(model_name="digits", outputs=[{"name": "predicted_class"}])
            request.inputs.add(name="input", datatype="FP32", shape=[1, 1, 8, 8])
            request.raw_input_contents.append(samples[i].tobytes())
            if i < 32:
                barrier.wait()
            response = stub.ModelInfer(request, timeout=60)
            return int(np.frombuffer(response.raw_output_contents[0], dtype="<i8")[0])

        with ThreadPoolExecutor(32) as pool:
            classes = list(pool.map(one, range(n)))
    _, expected = reference(np.concatenate(samples))
    assert classes == [int(c) for c in expected]
    batches = metric(server.url, r'aiaas_server_batch_size_count\{model="digits"\}') - count_before
    rows = metric(server.url, r'aiaas_server_batch_size_sum\{model="digits"\}') - sum_before
    assert rows == n
    assert batches < n, "no two concurrent gRPC calls shared a forward pass"


def test_sigterm_finishes_requests_in_flight(cnn_artifact: Path, tmp_path: Path, reference: Any) -> None:
    """Requests the server has received when SIGTERM comes are all answered; then it exits 0."""
    proc = ServerProcess(cnn_artifact, tmp_path / "server.log", "--max-batch-size", "8").wait_ready()
    big = [X[i * 30 : i * 30 + 1500].reshape(-1, 1, 8, 8) for i in range(8)]  # ~8 x 0.1 s of work, one by one
    bodies = [json.dumps({"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                      "data": x.reshape(-1).tolist()}]}).encode() for x in big]
    sent = threading.Semaphore(0)

    def call(body: bytes) -> tuple[int, dict[str, Any]]:
        conn = HTTPConnection("127.0.0.1", proc.port, timeout=120)
        try:
            conn.request("POST", "/v2/models/digits/infer", body)  # returns once the body is written
            sent.release()
            response = conn.getresponse()
            return response.status, json.loads(response.read())
        finally:
            conn.close()

    with ThreadPoolExecutor(len(bodies)) as pool:
        futures = [pool.submit(call, body) for body in bodies]
        for _ in bodies:
            assert sent.acquire(timeout=60)
        time.sleep(0.2)  # let the server read them; the model works through them one by one
        in_flight = sum(not f.done() for f in futures)
        proc.proc.send_signal(signal.SIGTERM)
        results = [f.result() for f in futures]
        code = proc.proc.wait(60)
    proc.stop()
    assert in_flight > 0, "the requests finished before SIGTERM; make them bigger"
    for x, (status, body) in zip(big, results, strict=True):
        assert status == 200, body
        assert body["outputs"][1]["data"] == reference(x)[1].tolist()
    assert code == 0, proc.log()
    assert "shutting down" in proc.log()


def test_not_ready_while_loading_then_ready(cnn_artifact: Path, tmp_path: Path) -> None:
    proc = ServerProcess(cnn_artifact, tmp_path / "server.log")
    try:
        deadline = time.monotonic() + 60
        seen: list[int] = []
        while time.monotonic() < deadline:
            try:
                live = http("GET", proc.url + "/v2/health/live", timeout=2)[0]
                ready = http("GET", proc.url + "/v2/health/ready", timeout=2)[0]
            except OSError:
                time.sleep(0.05)
                continue
            assert live == 200
            seen.append(ready)
            if ready == 200:
                break
            status, body = infer(proc.url, X[:1].reshape(1, 1, 8, 8))
            if status != 200:  # the model may finish loading between the two calls
                assert status == 503 and "loading" in body["error"], body
            time.sleep(0.02)
        assert seen and seen[-1] == 200
        assert seen[0] == 503, "the port should open before the model is loaded"
    finally:
        assert proc.stop() == 0


def test_incomplete_artifact_fails_with_a_reason(cnn_artifact: Path, tmp_path: Path) -> None:
    broken = tmp_path / "artifact"
    broken.mkdir()
    for f in cnn_artifact.iterdir():
        if f.name != "DONE":
            (broken / f.name).write_bytes(f.read_bytes())
    proc = ServerProcess(broken, tmp_path / "server.log")
    assert proc.proc.wait(120) == 1
    assert "incomplete" in proc.log() and "DONE" in proc.log()
    proc.stop()


def test_rnn_model(rnn_artifact: Path, tmp_path: Path) -> None:
    from aiaas.trainer.export import load_artifact, predict

    model, manifest = load_artifact(rnn_artifact)
    proc = ServerProcess(rnn_artifact, tmp_path / "server.log", "--name", "seq").wait_ready()
    try:
        meta = json.loads(http("GET", proc.url + "/v2/models/seq")[2])
        assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 8, 8]}]
        x = X[:32]
        status, body = infer(proc.url, x, name="seq")
        assert status == 200, body
        expected = predict(model, manifest, x)
        outputs = {o["name"]: o for o in body["outputs"]}
        np.testing.assert_allclose(np.array(outputs["probabilities"]["data"]).reshape(32, 10),
                                   expected["probabilities"].numpy(), atol=1e-5)
        assert outputs["predicted_class"]["data"] == expected["predicted_class"].tolist()
        status, body = infer(proc.url, X[:1].reshape(1, 1, 8, 8), name="seq")
        assert status == 400 and "dimensions" in body["error"]
        assert infer(proc.url, x, name="rnn-digits")[0] == 404
    finally:
        assert proc.stop() == 0


def test_text_model_with_token_ids(text_artifact: Path, tmp_path: Path) -> None:
    """INT64 character ids: integers only, and only ids inside the vocabulary."""
    from aiaas.trainer.export import load_artifact, predict

    model, manifest = load_artifact(text_artifact)
    labels = manifest["labels"]
    ids = [[labels.index(c) for c in text] for text in ("the quic", "lazy do", "five doz")]
    ids[1].insert(0, labels.index(" "))
    proc = ServerProcess(text_artifact, tmp_path / "server.log").wait_ready()
    try:
        def post(data: Any, datatype: str = "INT64") -> tuple[int, dict[str, Any]]:
            body = {"inputs": [{"name": "input", "shape": [len(data), 8], "datatype": datatype, "data": data}]}
            status, _, raw = http("POST", proc.url + "/v2/models/chars/infer", body)
            return status, json.loads(raw)

        status, body = post(ids)
        assert status == 200, body
        expected = predict(model, manifest, np.array(ids))["predicted_class"].tolist()
        assert body["outputs"][1]["data"] == expected
        status, body = post([[0.5] * 8])
        assert status == 400 and "only integer values" in body["error"]
        status, body = post([[len(labels)] * 8])
        assert status == 400 and f"[0, {len(labels)})" in body["error"]
        status, body = post([[-1] * 8])
        assert status == 400 and "token ids" in body["error"]
        status, body = post([[2**63] * 8])
        assert status == 400 and "does not fit datatype INT64" in body["error"]
        status, body = post([ids[0]], "FP32")
        assert status == 400 and "does not match the model's INT64" in body["error"]
    finally:
        assert proc.stop() == 0
    assert "Traceback" not in proc.log()


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_both_event_loops_serve_rest_and_grpc_and_stop(loop: str, cnn_artifact: Path, tmp_path: Path,
                                                         reference: Any) -> None:
    """The server runs on uvloop by default and on the standard library's loop when asked: REST, gRPC and a
    graceful stop work on each."""
    from tritonclient.grpc import InferenceServerClient, InferInput

    proc = ServerProcess(cnn_artifact, tmp_path / "server.log", "--event-loop", loop).wait_ready()
    try:
        x = X[:3].reshape(3, 1, 8, 8)
        _, expected = reference(x)
        status, body = infer(proc.url, x)
        assert status == 200 and body["outputs"][1]["data"] == [int(c) for c in expected]
        tensor = InferInput("input", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        with InferenceServerClient(proc.grpc_address) as client:
            result = client.infer("digits", [tensor])
        assert result.as_numpy("predicted_class").tolist() == [int(c) for c in expected]
    finally:
        assert proc.stop() == 0
    assert f"event loop: {loop}" in proc.log()
    assert "Traceback" not in proc.log()


def test_the_uvloop_choice_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """uvloop cannot be uninstalled from under the test run, so its absence is simulated; ``auto`` falls back."""
    import sys

    from aiaas.server.main import loop_factory

    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop now raises ImportError
    with pytest.raises(SystemExit, match="pip install uvloop"):
        loop_factory("uvloop")
    assert loop_factory("auto") is None
    assert loop_factory("asyncio") is None


def test_an_event_loop_from_the_environment_is_checked(monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from aiaas.server.main import parse_args

    monkeypatch.setenv("AIAAS_SERVER_EVENT_LOOP", "trio")
    with pytest.raises(SystemExit) as exit_:
        parse_args([])
    assert exit_.value.code == 2
    assert "--event-loop must be one of auto, uvloop, asyncio" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--max-batch-size", "0"], ["--port", "70000"]])
def test_cli_rejects_bad_flags(argv: list[str], cnn_artifact: Path, tmp_path: Path) -> None:
    proc = ServerProcess(cnn_artifact, tmp_path / "server.log", *argv)
    assert proc.proc.wait(60) == 2
    assert "must" in proc.log()
    proc.stop()
