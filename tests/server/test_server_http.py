"""The Open Inference Protocol over plain HTTP against a real server process."""

from __future__ import annotations

import gzip
import json
import re
import struct
from typing import Any

import numpy as np
import pytest
from server_artifacts import digits
from server_harness import ServerProcess, http

X, Y = digits()
INFER = "/v2/models/digits/infer"


def infer_body(x: np.ndarray, **extra: Any) -> dict[str, Any]:
    return {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                        "data": x.reshape(-1).tolist()}], **extra}


def post_json(server: ServerProcess, path: str, body: Any) -> tuple[int, dict[str, Any]]:
    status, _, raw = http("POST", server.url + path, body if isinstance(body, (dict, bytes)) else json.dumps(body).encode())
    return status, json.loads(raw)


def test_health_and_metadata(server: ServerProcess, cnn_version: str) -> None:
    assert http("GET", server.url + "/v2/health/live")[0] == 200
    status, _, body = http("GET", server.url + "/v2/health/ready")
    assert (status, json.loads(body)) == (200, {"ready": True})
    meta = json.loads(http("GET", server.url + "/v2")[2])
    assert meta["name"] == "aiaas" and "binary_tensor_data" in meta["extensions"]
    model = json.loads(http("GET", server.url + "/v2/models/digits")[2])
    assert model["name"] == "digits" and model["versions"] == [cnn_version] and model["platform"] == "pytorch"
    assert model["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
    assert {o["name"] for o in model["outputs"]} == {"probabilities", "predicted_class"}
    assert json.loads(http("GET", server.url + f"/v2/models/digits/versions/{cnn_version}")[2]) == model
    for path in ("/v2/models/digits/ready", f"/v2/models/digits/versions/{cnn_version}/ready", "/v1/models/digits"):
        status, _, body = http("GET", server.url + path)
        assert (status, json.loads(body)) == (200, {"name": "digits", "ready": True}), path
    assert json.loads(http("GET", server.url + "/v1/models")[2]) == {"models": ["digits"]}


def test_infer_matches_forward_pass(server: ServerProcess, reference: Any, cnn_version: str) -> None:
    x = X[:20].reshape(20, 1, 8, 8)
    status, body = post_json(server, INFER, infer_body(x, id="req-42"))
    assert status == 200, body
    assert body["id"] == "req-42" and body["model_name"] == "digits" and body["model_version"] == cnn_version
    outputs = {o["name"]: o for o in body["outputs"]}
    probs, classes = reference(x)
    assert outputs["probabilities"]["shape"] == [20, 10] and outputs["probabilities"]["datatype"] == "FP32"
    np.testing.assert_allclose(np.array(outputs["probabilities"]["data"]).reshape(20, 10), probs, atol=1e-5)
    assert outputs["predicted_class"] == {"name": "predicted_class", "datatype": "INT64", "shape": [20],
                                          "data": classes.tolist()}
    assert (classes == Y[:20]).mean() > 0.8  # the model really learned digits


def test_nested_data_versions_and_requested_outputs(server: ServerProcess, reference: Any, cnn_version: str) -> None:
    x = X[:3].reshape(3, 1, 8, 8)
    body = {"inputs": [{"name": "input", "shape": [3, 1, 8, 8], "datatype": "FP32", "data": x.tolist()}],
            "outputs": [{"name": "predicted_class"}]}
    status, out = post_json(server, f"/v2/models/digits/versions/{cnn_version}/infer", body)
    assert status == 200, out
    assert [o["name"] for o in out["outputs"]] == ["predicted_class"]
    assert out["outputs"][0]["data"] == reference(x)[1].tolist()
    assert "id" not in out


def test_served_artifact_reports_the_step_it_was_exported_at(server: ServerProcess, cnn_artifact: Any) -> None:
    """model_version is the training step recorded in the artifact (the TrainingJob's status.artifact.version),
    on every endpoint; the old constant "1" is no version of this model."""
    step = json.loads((cnn_artifact / "model.json").read_text())["training"]["steps"]
    assert step > 1
    version = str(step)
    assert json.loads(http("GET", server.url + "/v2/models/digits")[2])["versions"] == [version]
    x = X[:2].reshape(2, 1, 8, 8)
    for path in (INFER, f"/v2/models/digits/versions/{version}/infer"):
        status, body = post_json(server, path, infer_body(x))
        assert (status, body["model_version"]) == (200, version), body
    status, body = post_json(server, "/v1/models/digits:predict", {"instances": X[:2].tolist()})
    assert (status, body["model_version"]) == (200, version), body
    assert http("GET", server.url + f"/v2/models/digits/versions/{version}/ready")[0] == 200
    status, body = post_json(server, "/v2/models/digits/versions/1/infer", infer_body(x))
    assert status == 404 and f"available versions: ['{version}']" in body["error"], body


def test_artifact_version_falls_back_to_the_manifest_then_1() -> None:
    from aiaas.server.model import artifact_version

    assert artifact_version({"version": "1", "training": {"steps": 120}}) == "120"
    assert artifact_version({"version": "7", "training": {}}) == "7"  # a hand-made artifact records no step
    assert artifact_version({"version": 3}) == "3"
    assert artifact_version({}) == "1"
    assert artifact_version({"version": "", "training": {"steps": "x"}}) == "1"


def test_integers_are_accepted_as_fp32(server: ServerProcess, reference: Any) -> None:
    x = X[:2].reshape(2, 1, 8, 8)
    body = infer_body(x)
    body["inputs"][0]["data"] = [int(v) for v in x.reshape(-1)]  # digits pixels are whole numbers
    status, out = post_json(server, INFER, body)
    assert status == 200
    assert out["outputs"][1]["data"] == reference(x)[1].tolist()


def test_v1_predict(server: ServerProcess, reference: Any, cnn_version: str) -> None:
    x = X[:5]
    status, out = post_json(server, "/v1/models/digits:predict", {"instances": x.tolist()})
    assert status == 200, out
    assert out == {"predictions": reference(x.reshape(5, 1, 8, 8))[1].tolist(), "model_name": "digits",
                   "model_version": cnn_version}
    flat = {"instances": [row.reshape(-1).tolist() for row in x]}  # flat instances work too
    assert post_json(server, "/v1/models/digits:predict", flat) == (200, out)


def test_binary_tensor_extension_by_hand(server: ServerProcess, reference: Any) -> None:
    """The binary tensor data extension without tritonclient: JSON header, then raw little-endian tensors."""
    x = X[:4].reshape(4, 1, 8, 8)
    raw = x.astype("<f4").tobytes()
    header = json.dumps({"inputs": [{"name": "input", "shape": [4, 1, 8, 8], "datatype": "FP32",
                                     "parameters": {"binary_data_size": len(raw)}}],
                         "outputs": [{"name": "predicted_class", "parameters": {"binary_data": True}},
                                     {"name": "probabilities"}]}).encode()
    status, headers, body = http("POST", server.url + INFER, header + raw,
                                 {"Inference-Header-Content-Length": str(len(header))})
    assert status == 200
    json_len = int(headers["Inference-Header-Content-Length"])
    meta = json.loads(body[:json_len])
    assert meta["outputs"][0]["parameters"] == {"binary_data_size": 32}
    classes = struct.unpack("<4q", body[json_len:])
    assert list(classes) == reference(x)[1].tolist()
    assert len(meta["outputs"][1]["data"]) == 40


def test_gzip_request_body(server: ServerProcess, reference: Any) -> None:
    x = X[:2].reshape(2, 1, 8, 8)
    body = gzip.compress(json.dumps(infer_body(x)).encode())
    status, _, out = http("POST", server.url + INFER, body, {"Content-Encoding": "gzip"})
    assert status == 200
    assert json.loads(out)["outputs"][1]["data"] == reference(x)[1].tolist()
    status, _, out = http("POST", server.url + INFER, b"not gzip at all", {"Content-Encoding": "gzip"})
    assert status == 400 and "cannot be read" in json.loads(out)["error"], out


GOOD = infer_body(X[:1].reshape(1, 1, 8, 8))


def _with_input(**changes: Any) -> dict[str, Any]:
    body = json.loads(json.dumps(GOOD))
    body["inputs"][0].update(changes)
    return body


BAD_REQUESTS: list[tuple[str, str, bytes | dict[str, Any], int, str]] = [
    ("malformed json", INFER, b'{"inputs": [', 400, "not valid JSON"),
    ("empty body", INFER, b"", 400, "empty"),
    ("not an object", INFER, b"[1, 2]", 400, "JSON object"),
    ("no inputs", INFER, {"outputs": []}, 400, "'inputs'"),
    ("inputs not a list", INFER, {"inputs": {"name": "input"}}, 400, "'inputs'"),
    ("unknown input", INFER, _with_input(name="image"), 400, "not an input of the model"),
    ("wrong datatype", INFER, _with_input(datatype="INT64"), 400, "does not match the model's FP32"),
    ("unknown datatype", INFER, _with_input(datatype="FLOAT"), 400, "datatype"),
    ("wrong rank", INFER, _with_input(shape=[1, 64]), 400, "dimensions"),
    ("wrong dimension", INFER, _with_input(shape=[1, 1, 8, 9]), 400, "dimension 3"),
    ("zero batch", INFER, _with_input(shape=[0, 1, 8, 8], data=[]), 400, "at least 1"),
    ("shape not ints", INFER, _with_input(shape=[1, 1, 8, "8"]), 400, "list of integers"),
    ("too few values", INFER, _with_input(data=[1.0] * 63), 400, "has 63 values"),
    ("too many values", INFER, _with_input(shape=[2, 1, 8, 8]), 400, "needs 128"),
    ("string values", INFER, _with_input(data=["1"] * 64), 400, "only number values"),
    ("bool values", INFER, _with_input(data=[True] * 64), 400, "only number values"),
    ("null values", INFER, _with_input(data=[None] * 64), 400, "only number values"),
    ("out of fp32 range", INFER, _with_input(data=[1e300] * 64), 400, "range of FP32"),
    ("one value below fp32's range", INFER, _with_input(data=[0.0] * 63 + [-3.5e38]), 400, "range of FP32"),
    ("beyond fp32 in nested data", INFER, _with_input(data=[[0.0] * 32, [0.5] * 31 + [1e39]]), 400,
     "range of FP32"),
    ("NaN", INFER, b'{"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [NaN]}]}',
     400, "not valid JSON"),
    ("Infinity as a number", INFER, b'{"inputs": [{"name": "input", "shape": [1], "datatype": "FP32", "data": [1e999]}]}',
     400, "not valid JSON"),
    ("v1 beyond fp32", "/v1/models/digits:predict", {"instances": [[0.0] * 63 + [1e39]]}, 400, "range of FP32"),
    ("ragged nesting", INFER, _with_input(data=[[1.0] * 60, [1.0] * 3]), 400, "has 63 values"),
    ("data missing", INFER, {"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "FP32"}]}, 400,
     "'data' is missing"),
    ("id not a string", INFER, {**GOOD, "id": 7}, 400, "'id' must be a string"),
    ("unknown output", INFER, {**GOOD, "outputs": [{"name": "logits"}]}, 400, "not an output"),
    ("binary size without header", INFER, _with_input(parameters={"binary_data_size": 256}), 400,
     "Inference-Header-Content-Length"),
    ("unknown model", "/v2/models/mnist/infer", GOOD, 404, "not found"),
    ("unknown version", "/v2/models/digits/versions/7/infer", GOOD, 404, "version '7'"),
    ("unknown path", "/v2/models/digits/explanation", GOOD, 404, "no such endpoint"),
    ("explain not enabled", "/v2/models/digits/explain", GOOD, 404, "--explain-method"),
    ("v1 no instances", "/v1/models/digits:predict", {"inputs": []}, 400, "instances"),
    ("v1 wrong size", "/v1/models/digits:predict", {"instances": [[1.0, 2.0]]}, 400, "needs 64"),
    ("v1 unknown model", "/v1/models/other:predict", {"instances": [[0.0] * 64]}, 404, "not found"),
]


@pytest.mark.parametrize(("path", "body", "status", "reason"), [b[1:] for b in BAD_REQUESTS],
                         ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_get_a_reason(server: ServerProcess, path: str, body: Any, status: int, reason: str) -> None:
    got, headers, raw = http("POST", server.url + path, body)
    assert got == status, raw
    assert headers["Content-Type"].startswith("application/json")
    error = json.loads(raw)["error"]
    assert reason in error, error
    assert http("GET", server.url + "/v2/health/ready")[0] == 200


def test_binary_size_mismatches(server: ServerProcess) -> None:
    raw = X[:1].astype("<f4").tobytes()
    for size, extra, reason in [(100, b"", "needs 256"), (256, b"xx", "no input claims"),
                                (256, b"", None)]:
        header = json.dumps(_with_input(parameters={"binary_data_size": size}, data=None)).encode()
        header = header.replace(b', "data": null', b"")
        status, _, body = http("POST", server.url + INFER, header + raw + extra,
                               {"Inference-Header-Content-Length": str(len(header))})
        if reason is None:
            assert status == 200, body
        else:
            assert status == 400 and reason in json.loads(body)["error"], body
    for value in ("abc", "0", "999999"):
        status, _, body = http("POST", server.url + INFER, json.dumps(GOOD).encode(),
                               {"Inference-Header-Content-Length": value})
        assert status == 400, body


def test_wrong_method_and_oversized_payload(server: ServerProcess) -> None:
    status, headers, body = http("GET", server.url + INFER)
    assert status == 405 and headers["Allow"] == "POST" and "not allowed" in json.loads(body)["error"]
    big = b'{"inputs": [' + b" " * (17 * 1024 * 1024) + b"]}"
    status, _, body = http("POST", server.url + INFER, big)
    assert status == 413 and "larger than the limit" in json.loads(body)["error"]
    bomb = gzip.compress(b" " * (64 * 1024 * 1024))  # 64 MiB of spaces in 64 KiB of gzip
    status, _, body = http("POST", server.url + INFER, bomb, {"Content-Encoding": "gzip"})
    assert status == 413, body
    # a bomb small enough to arrive in one read (the limit holds on either path that takes the body in)
    one_read_bomb = gzip.compress(b" " * (17 * 1024 * 1024))
    assert len(one_read_bomb) < 32 * 1024
    status, _, body = http("POST", server.url + INFER, one_read_bomb, {"Content-Encoding": "gzip"})
    assert status == 413 and "larger than the limit" in json.loads(body)["error"], body
    assert http("GET", server.url + "/v2/health/ready")[0] == 200


def test_metrics_and_openapi(server: ServerProcess) -> None:
    http("POST", server.url + INFER, GOOD)
    http("POST", server.url + "/v2/models/nope/infer", GOOD)
    status, headers, body = http("GET", server.url + "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    text = body.decode()
    assert re.search(r'aiaas_server_requests_total\{endpoint="infer",model="digits",status="200"\} [1-9]', text)
    assert re.search(r'aiaas_server_requests_total\{endpoint="infer",model="digits",status="404"\} [1-9]', text)
    assert re.search(r'aiaas_server_request_duration_seconds_count\{model="digits"\} [1-9]', text)
    assert re.search(r'aiaas_server_batch_size_count\{model="digits"\} [1-9]', text)
    assert re.search(r'aiaas_server_model_load_seconds\{model="digits"\} [0-9.e-]+', text)
    doc = json.loads(http("GET", server.url + "/v2/openapi.json")[2])
    assert doc["openapi"].startswith("3.") and "/v2/models/{model_name}/infer" in doc["paths"]
    example = doc["paths"]["/v2/models/{model_name}/infer"]["post"]["requestBody"]["content"]["application/json"]
    status, _, _ = http("POST", server.url + INFER, example["schema"]["example"])
    assert status == 200


def test_print_openapi_matches_the_served_document(server: ServerProcess) -> None:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "aiaas.server", "--print-openapi"], capture_output=True, text=True,
                         check=True, timeout=60)
    printed = json.loads(out.stdout)
    served = json.loads(http("GET", server.url + "/v2/openapi.json")[2])
    assert printed["paths"].keys() == served["paths"].keys()
    assert printed["components"] == served["components"]
