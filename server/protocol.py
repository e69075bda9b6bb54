"""The Open Inference Protocol (KServe v2) on the wire: pure parsing, validation and encoding.

Nothing here does I/O. A request body (JSON, optionally followed by raw tensors as in the binary tensor data
extension that ``tritonclient`` uses by default) is turned into numpy arrays checked against the model's
signature; results are turned back into a v2 response. Every problem a client can cause raises
:class:`ProtocolError` with the HTTP status and a message that says what is wrong and how to fix it.

Status codes (the same as KServe's and MLServer's):

* 400 — malformed JSON, a missing or wrongly typed field, a tensor whose name, datatype, shape or data does
  not match the model's signature;
* 404 — an unknown model name or version (and unknown paths);
* 405 — a known path with the wrong HTTP method;
* 401 — a bearer token is required and missing or wrong;
* 408 — the request body did not arrive within the server's deadline;
* 413 — a request body larger than the server's limit;
* 503 — the model is still loading, the server is shutting down, or it is full (requests, bytes or queued
  samples at their limits; then with ``Retry-After``) — never caused by what the request holds.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

# Header of the binary tensor data extension: the length of the JSON part at the start of the body.
HEADER_CONTENT_LENGTH = "Inference-Header-Content-Length"

# v2 datatypes we can hold in a numpy array (BYTES and BF16 are not used by our models' signatures).
DATATYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
ALL_DATATYPES = (*DATATYPES, "BYTES", "BF16")
# the largest magnitude each float datatype holds (a larger JSON number would become infinity)
_FLOAT_LIMITS = {name: float(np.finfo(dtype).max) for name, dtype in DATATYPES.items() if dtype.kind == "f"}
_NUMBER_TYPES = frozenset({float, int})  # the leaves a JSON number parses to

_DUMPS_OPTIONS = orjson.OPT_SERIALIZE_NUMPY


class ProtocolError(Exception):
    """A request the server refuses, with the HTTP status to answer and a message for the client.

    ``retry_after`` (seconds) is set when the server is overloaded (503): the client may try again then."""

    def __init__(self, status: int, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after


def bad_request(message: str) -> ProtocolError:
    return ProtocolError(400, message)


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of a model's signature; ``-1`` in ``shape`` means "any size" (the first is the batch)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> TensorSpec:
        name, datatype, shape = obj.get("name"), obj.get("datatype"), obj.get("shape")
        if not isinstance(name, str) or not name:
            raise ValueError(f"tensor spec {obj!r} has no name")
        if datatype not in ALL_DATATYPES:
            raise ValueError(f"tensor {name!r} has unknown datatype {datatype!r}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= -1 for d in shape):
            raise ValueError(f"tensor {name!r} has an invalid shape {shape!r}")
        return cls(name=name, datatype=datatype, shape=tuple(shape))

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}

    @property
    def dtype(self) -> np.dtype:
        return DATATYPES[self.datatype]


@dataclass
class RequestedOutput:
    name: str
    binary: bool


@dataclass
class InferRequest:
    """A validated v2 inference request: one array per model input, in signature order."""

    inputs: list[np.ndarray]
    outputs: list[RequestedOutput]
    id: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return int(self.inputs[0].shape[0])

    @property
    def wanted(self) -> frozenset[str]:
        """The names of the outputs to compute."""
        return frozenset(o.name for o in self.outputs)


def loads(body: bytes | memoryview) -> Any:
    """Parse JSON strictly (no NaN/Infinity, valid UTF-8); a failure is a 400 with the parser's reason."""
    if len(body) == 0:
        raise bad_request("the request body is empty; send a JSON object")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise bad_request(f"the request body is not valid JSON: {e}") from None


def dumps(obj: Any) -> bytes:
    return orjson.dumps(obj, option=_DUMPS_OPTIONS)


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_shape(where: str, spec: TensorSpec, shape: Any) -> tuple[int, ...]:
    if not isinstance(shape, list) or not all(type(d) is int for d in shape):
        raise bad_request(f"{where}: 'shape' must be a list of integers, got {_describe(shape)}")
    if len(shape) != len(spec.shape):
        raise bad_request(
            f"{where}: shape {shape} has {len(shape)} dimensions but the model expects "
            f"{len(spec.shape)}: {list(spec.shape)} (-1 means any size)"
        )
    for i, (got, want) in enumerate(zip(shape, spec.shape, strict=True)):
        if got < 1:
            raise bad_request(f"{where}: dimension {i} of shape {shape} must be at least 1")
        if want != -1 and got != want:
            raise bad_request(
                f"{where}: shape {shape} does not match the model's {list(spec.shape)} "
                f"in dimension {i} (expected {want}, got {got})"
            )
    return tuple(shape)


def _leaf_kind(datatype: str) -> str:
    if datatype == "BOOL":
        return "bool"
    if datatype.startswith("FP"):
        return "number"
    return "integer"


def _flatten(data: Any, kind: str, out: list[Any]) -> None:
    """Append the leaves of a (possibly nested) list to ``out``, checking each leaf's JSON type."""
    for item in data:
        t = type(item)
        if t is list:
            _flatten(item, kind, out)
        elif (
            (kind == "number" and (t is float or t is int))
            or (kind == "integer" and t is int)
            or (kind == "bool" and t is bool)
        ):
            out.append(item)
        else:
            raise ValueError(_describe(item))


def json_tensor(where: str, spec: TensorSpec, shape: tuple[int, ...], data: Any) -> np.ndarray:
    """The array for JSON ``data`` (flat or nested, row-major) of the given shape and the spec's datatype."""
    if not isinstance(data, list):
        raise bad_request(f"{where}: 'data' must be a list (flat or nested) of values, got {_describe(data)}")
    kind = _leaf_kind(spec.datatype)
    flat: list[Any]
    if kind == "number" and _NUMBER_TYPES.issuperset(map(type, data)):
        flat = data  # the common case: a flat list of numbers (bool is a type of its own, so it is not one)
    else:
        flat = []
        try:
            _flatten(data, kind, flat)
        except ValueError as e:
            raise bad_request(
                f"{where}: 'data' must hold only {kind} values for datatype {spec.datatype}, found {e}"
            ) from None
        except RecursionError:
            raise bad_request(f"{where}: 'data' is nested too deeply") from None
    count = math.prod(shape)
    if len(flat) != count:
        raise bad_request(
            f"{where}: 'data' has {len(flat)} values but shape {list(shape)} needs {count}"
        )
    if kind == "number":
        return _float_array(where, spec, flat).reshape(shape)
    try:
        with np.errstate(over="ignore", invalid="ignore"):
            array = np.array(flat, dtype=spec.dtype)
    except (OverflowError, ValueError, TypeError) as e:
        raise bad_request(f"{where}: 'data' does not fit datatype {spec.datatype}: {e}") from None
    return array.reshape(shape)


def _float_array(where: str, spec: TensorSpec, flat: list[Any]) -> np.ndarray:
    """JSON numbers (finite: the parser refuses NaN and Infinity) as a float datatype. One beyond the datatype's
    largest value would become infinity and is refused instead. Comparing with ``min`` and ``max`` of the list
    costs a fraction of checking the array with ``np.isfinite`` under ``np.errstate``, on every request."""
    limit = _FLOAT_LIMITS.get(spec.datatype, math.inf)
    if flat and (max(flat) > limit or min(flat) < -limit):
        raise bad_request(f"{where}: 'data' has values outside the range of {spec.datatype} (at most {limit:g})")
    return np.array(flat, dtype=spec.dtype)


def input_header(
    index: int, name: Any, datatype: Any, shape: Any, by_name: Mapping[str, TensorSpec], seen: Mapping[str, Any]
) -> tuple[TensorSpec, tuple[int, ...]]:
    """Check one input's name, datatype and shape against the signature (REST and gRPC alike)."""
    if not isinstance(name, str):
        raise bad_request(f"inputs[{index}]: 'name' must be a string, got {_describe(name)}")
    where = f"input {name!r}"
    spec = by_name.get(name)
    if spec is None:
        raise bad_request(f"{where} is not an input of the model; its inputs are {sorted(by_name)}")
    if name in seen:
        raise bad_request(f"{where} is given more than once")
    if datatype != spec.datatype:
        raise bad_request(f"{where}: datatype {_describe(datatype)} does not match the model's {spec.datatype}")
    return spec, _check_shape(where, spec, shape)


def binary_tensor(
    where: str, spec: TensorSpec, shape: tuple[int, ...], raw: bytes | memoryview, what: str
) -> np.ndarray:
    """The array for raw little-endian bytes (``what`` names where their size came from, for the message)."""
    expected = math.prod(shape) * spec.dtype.itemsize
    if len(raw) != expected:
        raise bad_request(
            f"{where}: {what} is {len(raw)} bytes but shape {list(shape)} of {spec.datatype} needs {expected}"
        )
    array = np.frombuffer(raw, dtype=spec.dtype).reshape(shape)
    if spec.datatype.startswith("FP") and not np.isfinite(array).all():
        raise bad_request(f"{where}: the binary data has values that are not finite")
    return array


def ordered_inputs(arrays: Mapping[str, np.ndarray], inputs: Sequence[TensorSpec]) -> list[np.ndarray]:
    """The arrays in signature order; every input present, all with the same batch size."""
    missing = [spec.name for spec in inputs if spec.name not in arrays]
    if missing:
        raise bad_request(f"the request lacks the model's inputs {missing}")
    ordered = [arrays[spec.name] for spec in inputs]
    batch = ordered[0].shape[0]
    if any(a.shape[0] != batch for a in ordered):
        raise bad_request("all inputs must have the same batch size (the first dimension)")
    return ordered


def _check_parameters(where: str, params: Any) -> dict[str, Any]:
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise bad_request(f"{where}: 'parameters' must be an object, got {_describe(params)}")
    return params


def parse_infer_request(
    body: bytes,
    header_length: str | None,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
) -> InferRequest:
    """Validate a v2 inference request body against a signature; raise :class:`ProtocolError` if invalid."""
    view = memoryview(body)
    binary: memoryview | None = None
    if header_length is not None:
        try:
            json_length = int(header_length)
        except ValueError:
            raise bad_request(f"header {HEADER_CONTENT_LENGTH} must be an integer, got {header_length!r}") from None
        if not 0 < json_length <= len(body):
            raise bad_request(
                f"header {HEADER_CONTENT_LENGTH}={json_length} must be between 1 and the body length {len(body)}"
            )
        binary = view[json_length:]
        view = view[:json_length]
    request = loads(view)
    if not isinstance(request, dict):
        raise bad_request("the request body must be a JSON object with an 'inputs' list")
    request_id = request.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise bad_request(f"'id' must be a string, got {_describe(request_id)}")
    params = _check_parameters("request", request.get("parameters"))
    raw_inputs = request.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise bad_request(
            "the request must have a non-empty 'inputs' list, e.g. "
            f'{{"inputs": [{{"name": "{inputs[0].name}", "shape": [...], '
            f'"datatype": "{inputs[0].datatype}", "data": [...]}}]}}'
        )
    by_name = {spec.name: spec for spec in inputs}
    arrays: dict[str, np.ndarray] = {}
    offset = 0
    for index, raw in enumerate(raw_inputs):
        if not isinstance(raw, dict):
            raise bad_request(f"inputs[{index}] must be an object with name, shape, datatype and data")
        spec, shape = input_header(index, raw.get("name"), raw.get("datatype"), raw.get("shape"), by_name, arrays)
        where = f"input {spec.name!r}"
        in_params = _check_parameters(where, raw.get("parameters"))
        size = in_params.get("binary_data_size")
        if size is not None:
            if binary is None:
                raise bad_request(
                    f"{where}: 'binary_data_size' is set but the request has no {HEADER_CONTENT_LENGTH} header"
                )
            if type(size) is not int or size < 0:
                raise bad_request(f"{where}: 'binary_data_size' must be a non-negative integer")
            if offset + size > len(binary):
                raise bad_request(f"{where}: the body ends before its {size} bytes of binary data")
            if "data" in raw:
                raise bad_request(f"{where}: give either 'data' or 'binary_data_size', not both")
            array = binary_tensor(where, spec, shape, binary[offset : offset + size], "'binary_data_size'")
            offset += size
        else:
            if "data" not in raw:
                raise bad_request(f"{where}: 'data' is missing")
            array = json_tensor(where, spec, shape, raw["data"])
        arrays[spec.name] = array
    if binary is not None and offset != len(binary):
        raise bad_request(
            f"the body has {len(binary) - offset} bytes of binary data that no input claims "
            f"(check the inputs' 'binary_data_size')"
        )
    ordered = ordered_inputs(arrays, inputs)

    binary_default = bool(params.get("binary_data_output", False))
    requested = _requested_outputs(request.get("outputs"), outputs, binary_default)
    return InferRequest(inputs=ordered, outputs=requested, id=request_id, parameters=params)


def _requested_outputs(raw: Any, outputs: Sequence[TensorSpec], binary_default: bool) -> list[RequestedOutput]:
    names = [spec.name for spec in outputs]
    if raw is None or raw == []:  # like Triton: no outputs named means all of them
        return [RequestedOutput(name, binary_default) for name in names]
    if not isinstance(raw, list):
        raise bad_request(f"'outputs' must be a list of objects with a 'name', got {_describe(raw)}")
    result: list[RequestedOutput] = []
    seen: set[str] = set()
    for index, item in enumerate(raw):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise bad_request(f"outputs[{index}] must be an object with a string 'name'")
        name = item["name"]
        if name not in names:
            raise bad_request(f"output {name!r} is not an output of the model; its outputs are {names}")
        if name in seen:
            raise bad_request(f"output {name!r} is requested more than once")
        seen.add(name)
        out_params = _check_parameters(f"output {name!r}", item.get("parameters"))
        if "classification" in out_params:
            raise bad_request(
                f"output {name!r}: the 'classification' extension is not supported; "
                "request the class and probability outputs instead"
            )
        result.append(RequestedOutput(name, bool(out_params.get("binary_data", binary_default))))
    return result


def encode_infer_response(
    model_name: str,
    model_version: str,
    request: InferRequest,
    specs: Mapping[str, TensorSpec],
    results: Mapping[str, np.ndarray],
) -> tuple[bytes, int | None]:
    """The response body and, when some output is sent as binary, the length of its JSON part."""
    outputs: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for wanted in request.outputs:
        spec = specs[wanted.name]
        array = np.ascontiguousarray(results[wanted.name], dtype=spec.dtype)
        entry: dict[str, Any] = {"name": spec.name, "datatype": spec.datatype, "shape": list(array.shape)}
        if wanted.binary:
            raw = array.tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = array.reshape(-1)
        outputs.append(entry)
    response: dict[str, Any] = {"model_name": model_name, "model_version": model_version, "outputs": outputs}
    if request.id is not None:
        response["id"] = request.id
    header = dumps(response)
    if not chunks:
        return header, None
    return b"".join([header, *chunks]), len(header)


def v1_instances(body: bytes, spec: TensorSpec) -> np.ndarray:
    """KServe v1 ``{"instances": [...]}``: each instance holds one sample (nested or flat, row-major)."""
    request = loads(body)
    if not isinstance(request, dict) or not isinstance(request.get("instances"), list):
        raise bad_request('the request body must be a JSON object {"instances": [instance, ...]}')
    instances = request["instances"]
    if not instances:
        raise bad_request("'instances' must hold at least one instance")
    sample_shape = spec.shape[1:]
    if any(d == -1 for d in sample_shape):
        raise bad_request(
            f"this model's input has variable dimensions {list(spec.shape)}; use the v2 infer endpoint"
        )
    per_sample = math.prod(sample_shape)
    flat: list[Any] = []
    kind = _leaf_kind(spec.datatype)
    for index, instance in enumerate(instances):
        before = len(flat)
        try:
            if isinstance(instance, list):
                _flatten(instance, kind, flat)
            else:
                _flatten([instance], kind, flat)
        except ValueError as e:
            raise bad_request(f"instances[{index}] must hold only {kind} values, found {e}") from None
        except RecursionError:
            raise bad_request(f"instances[{index}] is nested too deeply") from None
        if len(flat) - before != per_sample:
            raise bad_request(
                f"instances[{index}] has {len(flat) - before} values but one sample of shape "
                f"{list(sample_shape)} needs {per_sample}"
            )
    shape = (len(instances), *sample_shape)
    return json_tensor("instances", spec, shape, flat)


def v1_predictions(model_name: str, model_version: str, classes: np.ndarray) -> bytes:
    """KServe v1's ``{"predictions": [...]}``, with the model's name and version like every v2 response."""
    return dumps({"predictions": classes.reshape(-1), "model_name": model_name, "model_version": model_version})


def error_body(message: str) -> bytes:
    return dumps({"error": message})


def flat_names(specs: Iterable[TensorSpec]) -> list[str]:
    return [spec.name for spec in specs]
