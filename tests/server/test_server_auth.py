"""Bearer-token authentication (--auth-token-file): stock v2 clients over REST and gRPC with and without it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from server_artifacts import digits
from server_harness import ServerProcess, http

httpclient = pytest.importorskip("tritonclient.http")
grpcclient = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

TOKEN = "s3cr3t-token-for-tests"
X, _ = digits()


@pytest.fixture(scope="module")
def secured(cnn_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("auth")
    (folder / "token").write_text(TOKEN + "\n")  # as a Secret mounts it, with a trailing newline
    proc = ServerProcess(cnn_artifact, folder / "server.log", "--auth-token-file", str(folder / "token")).wait_ready()
    yield proc
    assert proc.stop() == 0
    assert TOKEN not in proc.log()


def tensor(module: object, x: np.ndarray) -> object:
    t = module.InferInput("input", list(x.shape), "FP32")  # type: ignore[attr-defined]
    t.set_data_from_numpy(x)
    return t


def test_rest_with_and_without_the_token(secured: ServerProcess) -> None:
    x = X[:2].reshape(2, 1, 8, 8)
    client = httpclient.InferenceServerClient(secured.url.removeprefix("http://"))
    try:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        result = client.infer("digits", [tensor(httpclient, x)], headers=headers)
        assert result.as_numpy("predicted_class").shape == (2,)
        assert client.get_model_metadata("digits", headers=headers)["name"] == "digits"
        for wrong in ({}, {"Authorization": "Bearer nope"}, {"Authorization": TOKEN}):
            with pytest.raises(InferenceServerException, match="bearer token") as e:
                client.infer("digits", [tensor(httpclient, x)], headers=wrong)
            assert e.value.status() == "401"
        assert client.is_server_live() and client.is_server_ready()  # the probes need no token
    finally:
        client.close()
    assert http("GET", secured.url + "/v2/models/digits")[0] == 401
    assert http("GET", secured.url + "/metrics")[0] == 200
    status, _, body = http("POST", secured.url + "/v1/models/digits:predict", {"instances": [[0.0] * 64]})
    assert status == 401 and "Authorization: Bearer" in json.loads(body)["error"]


def test_grpc_with_and_without_the_token(secured: ServerProcess) -> None:
    x = X[:2].reshape(2, 1, 8, 8)
    client = grpcclient.InferenceServerClient(secured.grpc_address)
    try:
        headers = {"authorization": f"Bearer {TOKEN}"}
        result = client.infer("digits", [tensor(grpcclient, x)], headers=headers)
        assert result.as_numpy("predicted_class").shape == (2,)
        assert client.is_model_ready("digits", headers=headers)
        for wrong in ({}, {"authorization": "Bearer nope"}):
            with pytest.raises(InferenceServerException, match="bearer token") as e:
                client.infer("digits", [tensor(grpcclient, x)], headers=wrong)
            assert e.value.status() == "StatusCode.UNAUTHENTICATED"
        with pytest.raises(InferenceServerException) as e:
            client.get_model_metadata("digits")
        assert e.value.status() == "StatusCode.UNAUTHENTICATED"
        assert client.is_server_live() and client.is_server_ready()
    finally:
        client.close()


def test_an_empty_token_file_is_refused(cnn_artifact: Path, tmp_path: Path) -> None:
    (tmp_path / "token").write_text("\n")
    proc = ServerProcess(cnn_artifact, tmp_path / "server.log", "--auth-token-file", str(tmp_path / "token"))
    assert proc.proc.wait(60) == 2
    assert "must hold one token" in proc.log()
    proc.stop()
