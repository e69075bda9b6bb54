"""Schema-driven fuzzing of the HTTP API: no request, however odd, gets a 5xx or takes the server down.

Two layers, both bounded so the file runs in well under a minute:

* schemathesis reads the server's own OpenAPI document (``/v2/openapi.json``) and sends generated requests to
  every operation, checking status codes, content types and response bodies against the document; a second
  copy of the document pins ``model_name`` to the served model so the generated bodies reach the validation of
  real inference requests instead of stopping at 404;
* hypothesis mutates valid inference requests (shapes, datatypes, data, the binary extension's sizes), which
  reaches the corners a schema alone cannot describe.
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from server_harness import ServerProcess, http

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from schemathesis.specs.openapi.checks import positive_data_acceptance  # noqa: E402


@pytest.fixture(scope="module")
def api_schema(server: ServerProcess) -> Any:
    doc = json.loads(http("GET", server.url + "/v2/openapi.json")[2])
    return schemathesis.openapi.from_dict(doc)


@pytest.mark.parametrize("mode", ["positive", "negative"])
@pytest.mark.parametrize("pinned", [False, True], ids=["any-model", "served-model"])
def test_api_conforms_to_its_openapi(server: ServerProcess, api_schema: Any, mode: str, pinned: bool,
                                     cnn_version: str) -> None:
    """Generated requests to every operation; responses are checked against the document (50 per run).

    Every check runs except "a schema-valid request is accepted": JSON Schema cannot say that ``data`` must
    hold exactly as many numbers as ``shape`` asks for, so such requests rightly get a 400.
    """
    fixed = {"model_name": "digits", "model_version": cnn_version} if pinned else None
    strategy = api_schema.as_strategy(generation_mode=schemathesis.GenerationMode(mode), path_parameters=fixed)

    statuses: list[int] = []

    @given(case=strategy)
    @settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def run(case: Any) -> None:
        response = case.call_and_validate(base_url=server.url, timeout=30, excluded_checks=[positive_data_acceptance])
        statuses.append(response.status_code)
        assert response.status_code < 500, response.text
        if response.status_code >= 400:
            assert "error" in response.json()

    run()
    assert len(statuses) >= 50
    if pinned and mode == "positive":
        assert 200 in statuses


# --- mutations of a valid request ---------------------------------------------------------------------------

DATATYPES = ["FP32", "FP64", "FP16", "INT64", "INT32", "UINT8", "BOOL", "BYTES", "BF16", "fp32", ""]
json_leaf = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False), st.integers(-(2**70), 2**70), st.booleans(), st.none(),
    st.text(max_size=3),
)
shapes = st.lists(st.integers(-2, 70), min_size=0, max_size=5)


@st.composite
def mutated_requests(draw: st.DrawFn) -> tuple[dict[str, Any], bytes, dict[str, str]]:
    shape = draw(st.one_of(st.just([1, 1, 8, 8]), st.just([2, 1, 8, 8]), shapes))
    datatype = draw(st.one_of(st.just("FP32"), st.sampled_from(DATATYPES)))
    count = math.prod(d for d in shape if d > 0) if shape else 1
    count = min(count, 4096)
    data: Any = draw(st.one_of(
        st.lists(st.floats(0, 16, width=32), min_size=count, max_size=count),
        st.lists(json_leaf, max_size=70),
        st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=4), max_leaves=80),
    ))
    tensor: dict[str, Any] = {"name": draw(st.sampled_from(["input", "input", "x"])), "shape": shape,
                              "datatype": datatype, "data": data}
    body: dict[str, Any] = {"inputs": [tensor]}
    if draw(st.booleans()):
        body["outputs"] = draw(st.lists(st.fixed_dictionaries(
            {"name": st.sampled_from(["probabilities", "predicted_class", "nope"])},
            optional={"parameters": st.fixed_dictionaries({"binary_data": st.booleans()})}), max_size=3))
    if draw(st.booleans()):
        body["parameters"] = {"binary_data_output": draw(st.booleans())}
    if draw(st.booleans()):
        body["id"] = draw(st.one_of(st.text(max_size=8), st.integers()))
    headers: dict[str, str] = {}
    raw = b""
    if draw(st.booleans()):  # the binary tensor extension, sizes right or wrong
        del tensor["data"]
        raw = draw(st.binary(max_size=600))
        tensor["parameters"] = {"binary_data_size": draw(st.one_of(st.just(len(raw)), st.integers(-1, 700)))}
    header = json.dumps(body).encode()
    if raw or "parameters" in tensor:
        length = draw(st.one_of(st.just(len(header)), st.integers(-5, len(header) + 700)))
        headers["Inference-Header-Content-Length"] = str(length)
    return body, header + raw, headers


@given(request=mutated_requests(), path=st.sampled_from(["/v2/models/digits/infer",
                                                         "/v2/models/digits/versions/{version}/infer"]))
@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)
def test_mutated_infer_requests(server: ServerProcess, request: tuple[dict[str, Any], bytes, dict[str, str]],
                                path: str, cnn_version: str) -> None:
    _, body, headers = request
    status, response_headers, raw = http("POST", server.url + path.format(version=cnn_version), body, headers)
    assert status in (200, 400), raw
    if status == 400:
        assert json.loads(raw)["error"]
    elif "Inference-Header-Content-Length" not in response_headers:
        assert json.loads(raw)["outputs"]


@given(instances=st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=8), max_leaves=200))
@settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck), database=None)
def test_mutated_v1_requests(server: ServerProcess, instances: Any) -> None:
    status, _, raw = http("POST", server.url + "/v1/models/digits:predict", {"instances": instances})
    assert status in (200, 400), raw


def test_server_survived_the_fuzzing(server: ServerProcess) -> None:
    assert server.alive()
    assert http("GET", server.url + "/v2/health/ready")[0] == 200
    assert "Traceback" not in server.log(), server.log()


RAW_REQUESTS = [
    b"GARBAGE\r\n\r\n",
    b"GET /v2/health/ready HTTP/9.9\r\n\r\n",
    b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n{\"in",  # body cut short
    b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\n{\"inp\r\n0\r\n\r\n",
    b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 20000 + b"\r\n\r\n",
    b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n\r\nGET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n",  # pipelined
    b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Encoding: gzip\r\n\r\nzz",
    b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03",  # a TLS client hello
]


@pytest.mark.parametrize("raw", RAW_REQUESTS, ids=range(len(RAW_REQUESTS)))
def test_malformed_http_is_refused_and_harmless(server: ServerProcess, raw: bytes) -> None:
    """Broken HTTP gets a 4xx (or the connection closed), never a 5xx, and the server keeps serving."""
    import socket

    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(raw)
        sock.shutdown(socket.SHUT_WR)
        response = b""
        try:
            while chunk := sock.recv(65536):
                response += chunk
        except (ConnectionResetError, TimeoutError):
            pass
    for status_line in [line for line in response.split(b"\r\n") if line.startswith(b"HTTP/1.")]:
        assert int(status_line.split()[1]) < 500, response[:300]
    assert http("GET", server.url + "/v2/health/ready")[0] == 200
