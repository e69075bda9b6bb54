"""The Open Inference Protocol's gRPC messages <-> numpy: pure conversion and validation, no I/O, no grpc.

The same checks as the REST body (:mod:`.protocol`: names, datatypes, shapes, sizes, finite values, outputs);
a problem raises :class:`~.protocol.ProtocolError` with the status the gRPC front end maps to a code.
Inputs come as typed ``contents`` (the field for their datatype) or, for all inputs at once, as
``raw_input_contents`` (little-endian, row-major; the only way to send FP16). Outputs go back as
``raw_output_contents``, as Triton does (every v2 gRPC client reads them).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from . import grpc_predict_v2_pb2 as pb
from .protocol import (
    InferRequest,
    ProtocolError,
    RequestedOutput,
    TensorSpec,
    bad_request,
    binary_tensor,
    input_header,
    ordered_inputs,
)

# datatype -> the InferTensorContents field that carries it
CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}

# ProtocolError status -> grpc.StatusCode name
GRPC_CODES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    404: "NOT_FOUND",
    408: "DEADLINE_EXCEEDED",
    413: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
}


def parameters(params: Mapping[str, pb.InferParameter]) -> dict[str, Any]:
    """An InferParameter map as plain values."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        choice = value.WhichOneof("parameter_choice")
        out[key] = getattr(value, choice) if choice else None
    return out


def typed_tensor(where: str, spec: TensorSpec, shape: tuple[int, ...], contents: pb.InferTensorContents) -> np.ndarray:
    field = CONTENTS_FIELD.get(spec.datatype)
    if field is None:
        raise bad_request(f"{where}: datatype {spec.datatype} can only be sent in raw_input_contents")
    values = getattr(contents, field)
    count = int(np.prod(shape))
    if len(values) != count:
        raise bad_request(
            f"{where}: {field} has {len(values)} values but shape {list(shape)} needs {count} "
            f"(datatype {spec.datatype} goes in {field})"
        )
    wide = np.asarray(values)
    if spec.datatype.startswith(("INT", "UINT")) and wide.size:
        info = np.iinfo(spec.dtype)
        if wide.min() < info.min or wide.max() > info.max:
            raise bad_request(f"{where}: {field} has values outside the range of {spec.datatype}")
    with np.errstate(over="ignore", invalid="ignore"):
        array = wide.astype(spec.dtype).reshape(shape)
    if spec.datatype.startswith("FP") and not np.isfinite(array).all():
        raise bad_request(f"{where}: {field} has values that are not finite")
    return array


def _requested(request: pb.ModelInferRequest, outputs: Sequence[TensorSpec]) -> list[RequestedOutput]:
    names = [spec.name for spec in outputs]
    if not request.outputs:
        return [RequestedOutput(name, True) for name in names]
    seen: list[str] = []
    for item in request.outputs:
        if item.name not in names:
            raise bad_request(f"output {item.name!r} is not an output of the model; its outputs are {names}")
        if item.name in seen:
            raise bad_request(f"output {item.name!r} is requested more than once")
        if "classification" in item.parameters:
            raise bad_request(f"output {item.name!r}: the 'classification' extension is not supported")
        seen.append(item.name)
    return [RequestedOutput(name, True) for name in seen]


def parse_model_infer(
    request: pb.ModelInferRequest, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]
) -> InferRequest:
    """Validate a ModelInferRequest against a signature; raise :class:`ProtocolError` if invalid."""
    if not request.inputs:
        raise bad_request(f"the request must have at least one input; the model's inputs are {[s.name for s in inputs]}")
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise bad_request(
            f"raw_input_contents has {len(raw)} entries but the request has {len(request.inputs)} inputs; "
            "give one entry per input, in the same order"
        )
    by_name = {spec.name: spec for spec in inputs}
    arrays: dict[str, np.ndarray] = {}
    for index, tensor in enumerate(request.inputs):
        spec, shape = input_header(index, tensor.name, tensor.datatype, list(tensor.shape), by_name, arrays)
        where = f"input {spec.name!r}"
        if raw:
            if tensor.HasField("contents"):
                raise bad_request(f"{where}: give either contents or raw_input_contents, not both")
            arrays[spec.name] = binary_tensor(where, spec, shape, raw[index], f"raw_input_contents[{index}]")
        else:
            arrays[spec.name] = typed_tensor(where, spec, shape, tensor.contents)
    return InferRequest(
        inputs=ordered_inputs(arrays, inputs),
        outputs=_requested(request, outputs),
        id=request.id or None,
        parameters=parameters(request.parameters),
    )


def model_infer_response(
    model_name: str,
    model_version: str,
    request: InferRequest,
    specs: Mapping[str, TensorSpec],
    results: Mapping[str, np.ndarray],
) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(model_name=model_name, model_version=model_version, id=request.id or "")
    for wanted in request.outputs:
        spec = specs[wanted.name]
        array = np.ascontiguousarray(results[wanted.name], dtype=spec.dtype)
        response.outputs.add(name=spec.name, datatype=spec.datatype, shape=list(array.shape))
        response.raw_output_contents.append(array.tobytes())
    return response


def tensor_metadata(specs: Sequence[TensorSpec]) -> list[pb.ModelMetadataResponse.TensorMetadata]:
    return [pb.ModelMetadataResponse.TensorMetadata(name=s.name, datatype=s.datatype, shape=list(s.shape))
            for s in specs]


def grpc_code_name(error: ProtocolError) -> str:
    return GRPC_CODES.get(error.status, "INVALID_ARGUMENT" if error.status < 500 else "INTERNAL")
