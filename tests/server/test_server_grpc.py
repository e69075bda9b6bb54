"""The Open Inference Protocol over gRPC against a real server process: a stock client (``tritonclient.grpc``),
typed contents by hand, and fuzzed ModelInferRequests that must never get an internal error."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_artifacts import digits
from server_harness import ServerProcess, http

grpcclient = pytest.importorskip("tritonclient.grpc")
grpc = pytest.importorskip("grpc")
from tritonclient.grpc import service_pb2 as pb  # noqa: E402
from tritonclient.grpc import service_pb2_grpc as pb_grpc  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

# The hand-made requests use Triton's own messages (a superset of the v2 protocol's, with the same package and
# field numbers), not the server's: a client built elsewhere. Both cannot live in one process (one
# descriptor pool, same package), so the server's generated modules are never imported here.

X, _ = digits()


def test_generated_code_does_not_drift(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    from aiaas.server import grpc_codegen  # imports no generated module

    for fresh in grpc_codegen.generate(tmp_path):
        checked_in = grpc_codegen.HERE / fresh.name
        assert fresh.read_text() == checked_in.read_text(), (
            f"{checked_in.name} differs from what grpc_predict_v2.proto generates; "
            "run python -m aiaas.server.grpc_codegen"
        )


@pytest.fixture
def client(server: ServerProcess) -> Any:
    c = grpcclient.InferenceServerClient(server.grpc_address)
    yield c
    c.close()


@pytest.fixture
def stub(server: ServerProcess) -> Any:
    channel = grpc.insecure_channel(server.grpc_address)
    yield pb_grpc.GRPCInferenceServiceStub(channel)
    channel.close()


def test_health_and_metadata(client: Any, cnn_version: str) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("digits") and client.is_model_ready("digits", cnn_version)
    assert not client.is_model_ready("digits", "2") and not client.is_model_ready("other")
    assert client.get_server_metadata().name == "aiaas"
    meta = client.get_model_metadata("digits", as_json=True)
    assert meta["inputs"][0] == {"name": "input", "datatype": "FP32", "shape": ["-1", "1", "8", "8"]}
    assert {o["name"] for o in meta["outputs"]} == {"probabilities", "predicted_class"}


def test_infer_with_raw_contents(client: Any, reference: Any, cnn_version: str) -> None:
    x = X[:16].reshape(16, 1, 8, 8)
    tensor = grpcclient.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)  # tritonclient sends raw_input_contents
    result = client.infer("digits", [tensor], request_id="g-1")
    probs, classes = reference(x)
    np.testing.assert_allclose(result.as_numpy("probabilities"), probs, atol=1e-5)
    np.testing.assert_array_equal(result.as_numpy("predicted_class"), classes)
    assert result.get_response().id == "g-1"
    outputs = [grpcclient.InferRequestedOutput("predicted_class")]
    result = client.infer("digits", [tensor], outputs=outputs, model_version=cnn_version)
    np.testing.assert_array_equal(result.as_numpy("predicted_class"), classes)
    assert result.as_numpy("probabilities") is None


def test_infer_with_typed_contents(stub: Any, reference: Any) -> None:
    x = X[:3].reshape(3, 1, 8, 8)
    request = pb.ModelInferRequest(model_name="digits", id="typed")
    request.inputs.add(name="input", datatype="FP32", shape=[3, 1, 8, 8]).contents.fp32_contents.extend(
        x.reshape(-1).tolist())
    response = stub.ModelInfer(request, timeout=60)
    index = [o.name for o in response.outputs].index("predicted_class")
    classes = np.frombuffer(response.raw_output_contents[index], dtype="<i8")
    np.testing.assert_array_equal(classes, reference(x)[1])


@pytest.mark.parametrize(("datatype", "shape", "model", "code", "reason"), [
    ("FP64", [2, 1, 8, 8], "digits", "INVALID_ARGUMENT", "does not match the model's FP32"),
    ("FP32", [2, 1, 8, 9], "digits", "INVALID_ARGUMENT", "dimension 3"),
    ("FP32", [2, 1, 8, 8], "mnist", "NOT_FOUND", "not found"),
])
def test_errors_reach_the_client(client: Any, datatype: str, shape: list[int], model: str, code: str,
                                 reason: str) -> None:
    tensor = grpcclient.InferInput("input", shape, datatype)
    tensor.set_data_from_numpy(np.zeros(shape, dtype=np.float64 if datatype == "FP64" else np.float32))
    with pytest.raises(InferenceServerException, match=reason) as e:
        client.infer(model, [tensor])
    assert e.value.status() == f"StatusCode.{code}"


def test_grpc_requests_are_counted(client: Any, server: ServerProcess) -> None:
    client.get_server_metadata()
    text = http("GET", server.url + "/metrics")[2].decode()
    assert re.search(r'aiaas_server_requests_total\{endpoint="grpc_ServerMetadata",model="digits",status="200"\} '
                     r'[1-9]', text)


# --- fuzzing ----------------------------------------------------------------------------------------------

DATATYPES = ["FP32", "FP64", "FP16", "INT64", "INT32", "INT8", "UINT8", "UINT64", "BOOL", "BYTES", "fp32", ""]
CONTENT_FIELDS = ["bool_contents", "int_contents", "int64_contents", "uint_contents", "uint64_contents",
                  "fp32_contents", "fp64_contents", "bytes_contents"]


@st.composite
def infer_requests(draw: st.DrawFn) -> Any:
    request = pb.ModelInferRequest(model_name=draw(st.sampled_from(["digits", "digits", "other", ""])),
                                   model_version=draw(st.sampled_from(["", "1", "2"])),
                                   id=draw(st.text(max_size=5)))
    for _ in range(draw(st.integers(0, 2))):
        shape = draw(st.one_of(st.just([1, 1, 8, 8]), st.lists(st.integers(-2**40, 70), max_size=5)))
        tensor = request.inputs.add(name=draw(st.sampled_from(["input", "input", "x"])),
                                    datatype=draw(st.sampled_from(DATATYPES)), shape=shape)
        field = draw(st.sampled_from(CONTENT_FIELDS))
        values: Any = {
            "bool_contents": st.booleans(), "int_contents": st.integers(-2**31, 2**31 - 1),
            "int64_contents": st.integers(-2**63, 2**63 - 1), "uint_contents": st.integers(0, 2**32 - 1),
            "uint64_contents": st.integers(0, 2**64 - 1), "fp32_contents": st.floats(width=32),
            "fp64_contents": st.floats(), "bytes_contents": st.binary(max_size=4),
        }[field]
        getattr(tensor.contents, field).extend(draw(st.lists(values, max_size=70)))
        if draw(st.booleans()):
            tensor.parameters["p"].int64_param = draw(st.integers(-5, 5))
    if draw(st.booleans()):
        raw = draw(st.lists(st.binary(max_size=300), max_size=3))
        if draw(st.booleans()) and raw:
            raw[0] = np.random.default_rng(len(raw)).random(64, dtype=np.float32).tobytes()
        request.raw_input_contents.extend(raw)
    for name in draw(st.lists(st.sampled_from(["probabilities", "predicted_class", "nope"]), max_size=3)):
        request.outputs.add(name=name)
    return request


@given(request=infer_requests())
@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck), database=None)
def test_fuzzed_infer_requests_never_fail_inside(stub: Any, request: Any) -> None:
    try:
        response = stub.ModelInfer(request, timeout=60)
    except grpc.RpcError as e:
        assert e.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), (e.code(), e.details())
        assert e.details()
    else:
        assert len(response.raw_output_contents) == len(response.outputs) >= 1


def test_server_survived_the_fuzzing(server: ServerProcess, client: Any) -> None:
    assert server.alive() and client.is_server_ready()
    assert "Traceback" not in server.log(), server.log()
