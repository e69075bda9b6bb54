"""A stock Open Inference Protocol client (``tritonclient.http``) works against the server unchanged."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from server_artifacts import digits
from server_harness import ServerProcess

httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

X, Y = digits()


@pytest.fixture
def client(server: ServerProcess) -> Any:
    c = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
    yield c
    c.close()


def test_health_and_metadata(client: Any, cnn_version: str) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("digits") and client.is_model_ready("digits", cnn_version)
    assert not client.is_model_ready("digits", "2") and not client.is_model_ready("other")
    assert client.get_server_metadata()["name"] == "aiaas"
    meta = client.get_model_metadata("digits")
    assert meta["inputs"][0] == {"name": "input", "datatype": "FP32", "shape": [-1, 1, 8, 8]}
    config = client.get_model_config("digits")
    assert config["input"][0]["dims"] == [1, 8, 8]


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_infer(client: Any, reference: Any, binary: bool, cnn_version: str) -> None:
    x = X[:16].reshape(16, 1, 8, 8)
    tensor = httpclient.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    result = client.infer("digits", [tensor], request_id="t-1")
    probs, classes = reference(x)
    np.testing.assert_allclose(result.as_numpy("probabilities"), probs, atol=1e-5)
    np.testing.assert_array_equal(result.as_numpy("predicted_class"), classes)
    assert result.get_response()["id"] == "t-1"

    outputs = [httpclient.InferRequestedOutput("predicted_class", binary_data=not binary)]
    result = client.infer("digits", [tensor], outputs=outputs, model_version=cnn_version)
    np.testing.assert_array_equal(result.as_numpy("predicted_class"), classes)
    assert result.as_numpy("probabilities") is None


def test_compression(client: Any, reference: Any) -> None:
    x = X[:8].reshape(8, 1, 8, 8)
    tensor = httpclient.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    for algorithm in ("gzip", "deflate"):
        result = client.infer("digits", [tensor], request_compression_algorithm=algorithm,
                              response_compression_algorithm=algorithm)
        np.testing.assert_array_equal(result.as_numpy("predicted_class"), reference(x)[1])


def test_errors_reach_the_client(client: Any) -> None:
    tensor = httpclient.InferInput("input", [2, 1, 8, 8], "FP64")
    tensor.set_data_from_numpy(X[:2].reshape(2, 1, 8, 8).astype(np.float64))
    with pytest.raises(InferenceServerException, match="does not match the model's FP32") as e:
        client.infer("digits", [tensor])
    assert e.value.status() == "400"
    tensor = httpclient.InferInput("input", [2, 1, 8, 8], "FP32")
    tensor.set_data_from_numpy(X[:2].reshape(2, 1, 8, 8))
    with pytest.raises(InferenceServerException, match="not found") as e:
        client.infer("mnist", [tensor])
    assert e.value.status() == "404"
    assert client.is_server_ready()


def test_asyncio_client(server: ServerProcess, reference: Any) -> None:
    """``tritonclient.http.aio`` (aiohttp underneath), many requests in flight at once."""
    import asyncio

    aio = pytest.importorskip("tritonclient.http.aio")

    async def main() -> list[Any]:
        client = aio.InferenceServerClient(server.url.removeprefix("http://"))
        try:
            assert await client.is_model_ready("digits")

            async def one(i: int) -> Any:
                tensor = aio.InferInput("input", [1, 1, 8, 8], "FP32")
                tensor.set_data_from_numpy(X[i : i + 1].reshape(1, 1, 8, 8))
                result = await client.infer("digits", [tensor])
                return result.as_numpy("predicted_class")[0]

            return list(await asyncio.gather(*(one(i) for i in range(48))))
        finally:
            await client.close()

    classes = asyncio.run(main())
    assert classes == reference(X[:48].reshape(48, 1, 8, 8))[1].tolist()
