"""The OpenAPI 3.0 description of the server's HTTP API, served at ``/v2/openapi.json``.

It follows KServe's description of the Open Inference Protocol REST API (``rest_predict_v2.yaml``), plus the v1
``:predict`` endpoint, Triton's ``config`` extension, ``/metrics`` and this document. When a model is loaded,
its name and a valid request for it are filled in as examples, so a schema-driven fuzzer starts from real
requests.
"""

from __future__ import annotations

from typing import Any

from .protocol import ALL_DATATYPES

JSON = "application/json"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": schema}}}


ERROR = _json(_ref("Error"), "The request was refused; 'error' says why.")
_ERRORS = {
    "400": ERROR,
    "404": _json(_ref("Error"), "No such model or version."),
    "413": _json(_ref("Error"), "The request body is larger than the server accepts."),
    "503": _json(_ref("Error"), "The model is not loaded yet, or the server is shutting down."),
}

_SCHEMAS: dict[str, Any] = {
    "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
    "Parameters": {"type": "object", "additionalProperties": True},
    "Datatype": {"type": "string", "enum": list(ALL_DATATYPES)},
    "TensorMetadata": {
        "type": "object",
        "required": ["name", "datatype", "shape"],
        "properties": {
            "name": {"type": "string"},
            "datatype": _ref("Datatype"),
            "shape": {"type": "array", "items": {"type": "integer"}},
        },
    },
    "ServerMetadata": {
        "type": "object",
        "required": ["name", "version", "extensions"],
        "properties": {
            "name": {"type": "string"},
            "version": {"type": "string"},
            "extensions": {"type": "array", "items": {"type": "string"}},
        },
    },
    "ModelMetadata": {
        "type": "object",
        "required": ["name", "platform", "inputs", "outputs"],
        "properties": {
            "name": {"type": "string"},
            "versions": {"type": "array", "items": {"type": "string"}},
            "platform": {"type": "string"},
            "inputs": {"type": "array", "items": _ref("TensorMetadata")},
            "outputs": {"type": "array", "items": _ref("TensorMetadata")},
        },
    },
    "Live": {"type": "object", "required": ["live"], "properties": {"live": {"type": "boolean"}}},
    "Ready": {"type": "object", "required": ["ready"], "properties": {"ready": {"type": "boolean"}}},
    "ModelReady": {
        "type": "object",
        "required": ["name", "ready"],
        "properties": {"name": {"type": "string"}, "ready": {"type": "boolean"}},
    },
    "RequestInput": {
        "type": "object",
        "required": ["name", "shape", "datatype"],
        "properties": {
            "name": {"type": "string"},
            "shape": {"type": "array", "items": {"type": "integer"}},
            "datatype": _ref("Datatype"),
            "parameters": _ref("Parameters"),
            "data": {
                "type": "array",
                "description": "Tensor values, flat or nested, in row-major order.",
                "items": {},
            },
        },
    },
    "RequestOutput": {
        "type": "object",
        "required": ["name"],
        "properties": {"name": {"type": "string"}, "parameters": _ref("Parameters")},
    },
    "InferenceRequest": {
        "type": "object",
        "required": ["inputs"],
        "properties": {
            "id": {"type": "string"},
            "parameters": _ref("Parameters"),
            "inputs": {"type": "array", "items": _ref("RequestInput")},
            "outputs": {"type": "array", "items": _ref("RequestOutput")},
        },
    },
    "ResponseOutput": {
        "type": "object",
        "required": ["name", "shape", "datatype"],
        "properties": {
            "name": {"type": "string"},
            "shape": {"type": "array", "items": {"type": "integer"}},
            "datatype": _ref("Datatype"),
            "parameters": _ref("Parameters"),
            "data": {"type": "array", "items": {}},
        },
    },
    "InferenceResponse": {
        "type": "object",
        "required": ["model_name", "outputs"],
        "properties": {
            "model_name": {"type": "string"},
            "model_version": {"type": "string"},
            "id": {"type": "string"},
            "parameters": _ref("Parameters"),
            "outputs": {"type": "array", "items": _ref("ResponseOutput")},
        },
    },
    "PredictRequest": {
        "type": "object",
        "required": ["instances"],
        "properties": {"instances": {"type": "array", "items": {}}},
    },
    "PredictResponse": {
        "type": "object",
        "required": ["predictions", "model_name", "model_version"],
        "properties": {
            "predictions": {"type": "array", "items": {"type": "integer"}},
            "model_name": {"type": "string"},
            "model_version": {"type": "string"},
        },
    },
    "ModelList": {
        "type": "object",
        "required": ["models"],
        "properties": {"models": {"type": "array", "items": {"type": "string"}}},
    },
    "ModelConfig": {"type": "object", "additionalProperties": True},
}


def _operation(
    op_id: str, summary: str, ok: dict[str, Any], errors: tuple[str, ...], body: dict[str, Any] | None = None
) -> dict[str, Any]:
    op: dict[str, Any] = {
        "operationId": op_id,
        "summary": summary,
        "responses": {"200": ok, **{code: _ERRORS[code] for code in errors}},
    }
    if body is not None:
        op["requestBody"] = {"required": True, "content": {JSON: {"schema": body}}}
    return op


def document(
    model_name: str | None = None,
    model_version: str | None = None,
    example_request: dict[str, Any] | None = None,
    example_instances: list[Any] | None = None,
) -> dict[str, Any]:
    """The OpenAPI document; with a loaded model, its name, version and a valid request are the examples."""
    name_param: dict[str, Any] = {
        "name": "model_name", "in": "path", "required": True, "schema": {"type": "string"},
    }
    version_param: dict[str, Any] = {
        "name": "model_version", "in": "path", "required": True, "schema": {"type": "string"},
    }
    if model_name:
        name_param["example"] = model_name
    if model_version:
        version_param["example"] = model_version
    infer_body: dict[str, Any] = _ref("InferenceRequest")
    predict_body: dict[str, Any] = _ref("PredictRequest")
    if example_request is not None:
        infer_body = {"allOf": [infer_body], "example": example_request}
    if example_instances is not None:
        predict_body = {"allOf": [predict_body], "example": {"instances": example_instances}}

    model_errors = ("404", "503")
    infer_errors = ("400", "404", "413", "503")
    infer_ok = _json(_ref("InferenceResponse"), "The model's outputs.")
    infer_ok["content"]["application/octet-stream"] = {
        "schema": {"type": "string", "format": "binary"},
    }
    paths: dict[str, Any] = {
        "/": {
            "get": _operation(
                "root", "Is the server alive? (KServe v1)",
                _json({"type": "object", "required": ["status"], "properties": {"status": {"type": "string"}}},
                      "Alive."), (),
            )
        },
        "/v2/health/live": {"get": _operation("serverLive", "Is the server alive?", _json(_ref("Live"), "Alive."), ())},
        "/v2/health/ready": {
            "get": _operation(
                "serverReady", "Is the model loaded and the server ready?", _json(_ref("Ready"), "Ready."), ("503",)
            )
        },
        "/v2": {
            "get": _operation(
                "serverMetadata", "Server name, version and protocol extensions.",
                _json(_ref("ServerMetadata"), "Server metadata."), (),
            )
        },
        "/v2/models/{model_name}": {
            "parameters": [name_param],
            "get": _operation(
                "modelMetadata", "The model's versions, platform and signature.",
                _json(_ref("ModelMetadata"), "Model metadata."), model_errors,
            ),
        },
        "/v2/models/{model_name}/ready": {
            "parameters": [name_param],
            "get": _operation("modelReady", "Is the model ready?", _json(_ref("ModelReady"), "Ready."), model_errors),
        },
        "/v2/models/{model_name}/config": {
            "parameters": [name_param],
            "get": _operation(
                "modelConfig", "Triton-style model configuration.", _json(_ref("ModelConfig"), "Config."),
                model_errors,
            ),
        },
        "/v2/models/{model_name}/infer": {
            "parameters": [name_param],
            "post": _operation("modelInfer", "Run inference.", infer_ok, infer_errors, infer_body),
        },
        "/v2/models/{model_name}/versions/{model_version}": {
            "parameters": [name_param, version_param],
            "get": _operation(
                "modelVersionMetadata", "Metadata of one version of the model.",
                _json(_ref("ModelMetadata"), "Model metadata."), model_errors,
            ),
        },
        "/v2/models/{model_name}/versions/{model_version}/ready": {
            "parameters": [name_param, version_param],
            "get": _operation(
                "modelVersionReady", "Is this version of the model ready?", _json(_ref("ModelReady"), "Ready."),
                model_errors,
            ),
        },
        "/v2/models/{model_name}/versions/{model_version}/infer": {
            "parameters": [name_param, version_param],
            "post": _operation(
                "modelVersionInfer", "Run inference on one version of the model.", infer_ok, infer_errors,
                infer_body,
            ),
        },
        "/v1/models": {
            "get": _operation("listModels", "Names of the served models (KServe v1).", _json(_ref("ModelList"), "Models."), ()),
        },
        "/v1/models/{model_name}": {
            "parameters": [name_param],
            "get": _operation(
                "modelStatusV1", "Is the model ready? (KServe v1)", _json(_ref("ModelReady"), "Status."), model_errors
            ),
        },
        "/v1/models/{model_name}:predict": {
            "parameters": [name_param],
            "post": _operation(
                "modelPredictV1", "Predict the class of each instance (KServe v1).",
                _json(_ref("PredictResponse"), "One predicted class per instance."), infer_errors, predict_body,
            ),
        },
        "/metrics": {
            "get": {
                "operationId": "metrics",
                "summary": "Prometheus metrics.",
                "responses": {"200": {"description": "Metrics.", "content": {"text/plain": {"schema": {"type": "string"}}}}},
            }
        },
        "/v2/openapi.json": {
            "get": {
                "operationId": "openapi",
                "summary": "This document.",
                "responses": {"200": _json({"type": "object"}, "The OpenAPI document.")},
            }
        },
    }
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "aiaas model server",
            "version": "2.0",
            "description": "The Open Inference Protocol (KServe v2) REST API, with the binary tensor data extension "
            "and KServe's v1 :predict. Errors are {\"error\": message} with status 400 (bad request), 404 "
            "(unknown model or version), 413 (body too large) or 503 (not ready).",
        },
        "paths": paths,
        "components": {"schemas": _SCHEMAS},
    }
