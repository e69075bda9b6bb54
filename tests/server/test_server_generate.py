"""A language model served as text: next-token probabilities over /infer and the generate extension.

The artifact is a tiny decoder-only Transformer trained here by the real trainer on a generated text; the
server is a real process. Greedy generation is checked token by token against the model's own forward pass in
the test process (the trainer's loader), so a wrong window, offset or vocabulary shows up as a mismatch.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from server_artifacts import TEXT, artifact_step, train
from server_harness import ServerProcess, http

CONTEXT = 16


@pytest.fixture(scope="module")
def lm_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("lm")
    (out / "text.txt").write_text(TEXT)
    return train(out, "tiny-lm", {"architecture": "transformer", "hiddenSize": 32, "numLayers": 2, "numHeads": 4},
                 {"kind": "text", "path": str(out / "text.txt"), "seqLength": CONTEXT, "evalFraction": 0.05},
                 epochs=1, max_steps=40)


@pytest.fixture(scope="module")
def lm_server(lm_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = ServerProcess(lm_artifact, tmp_path_factory.mktemp("lm-logs") / "server.log").wait_ready()
    yield proc
    assert proc.stop() == 0, proc.log()
    assert "Traceback" not in proc.log(), proc.log()


@pytest.fixture(scope="module")
def reference(lm_artifact: Path) -> Any:
    """The next-token distribution after ``ids``, from the model itself in this process."""
    import torch

    from aiaas.trainer.export import load_artifact

    model, manifest = load_artifact(lm_artifact)

    def next_probabilities(ids: list[int]) -> np.ndarray:
        with torch.no_grad():
            logits = model(torch.tensor([ids[-CONTEXT:]]))[0, -1]
        return torch.softmax(logits.float(), -1).numpy()

    next_probabilities.labels = manifest["input"]["labels"]  # type: ignore[attr-defined]
    return next_probabilities


def generate(server: ServerProcess, body: Any, name: str = "tiny-lm") -> tuple[int, dict[str, Any]]:
    status, _, raw = http("POST", f"{server.url}/v2/models/{name}/generate",
                          json.dumps(body).encode() if not isinstance(body, bytes) else body)
    return status, json.loads(raw)


def test_greedy_generation_follows_the_models_own_argmax(lm_server: ServerProcess, reference: Any,
                                                        lm_artifact: Path) -> None:
    prompt = "the quick brown fox jumps"  # longer than the context: only its last 16 characters matter
    status, body = generate(lm_server, {"text_input": prompt[-CONTEXT:], "parameters": {"max_tokens": 40,
                                                                                         "temperature": 0}})
    assert status == 200, body
    assert set(body) == {"model_name", "model_version", "text_output"}
    assert (body["model_name"], body["model_version"]) == ("tiny-lm", artifact_step(lm_artifact))
    labels = reference.labels
    ids = [labels.index(c) for c in prompt[-CONTEXT:]]
    for _ in range(40):  # the window slides past the context after the first token
        ids.append(int(reference(ids).argmax()))
    assert body["text_output"] == "".join(labels[i] for i in ids[CONTEXT:])


def test_sampling_with_a_seed_is_reproducible(lm_server: ServerProcess) -> None:
    request = {"text_input": "pack my box", "parameters": {"max_tokens": 50, "temperature": 0.8, "seed": 42}}
    status, first = generate(lm_server, request)
    assert status == 200, first
    assert len(first["text_output"]) == 50
    with ThreadPoolExecutor(4) as pool:  # concurrent requests share the model thread, each with its own sampler
        others = list(pool.map(lambda _: generate(lm_server, request), range(4)))
    assert all(o == (200, first) for o in others)
    outputs = {generate(lm_server, {**request, "parameters": {**request["parameters"], "seed": s}})[1]["text_output"]
               for s in range(5)}
    assert len(outputs) > 1  # the seed matters


def test_next_token_probabilities_over_infer(lm_server: ServerProcess, reference: Any) -> None:
    status, _, raw = http("GET", f"{lm_server.url}/v2/models/tiny-lm")
    meta = json.loads(raw)
    assert meta["inputs"] == [{"name": "input", "datatype": "INT64", "shape": [-1, -1]}]
    ids = [reference.labels.index(c) for c in "the lazy"]
    request = {"inputs": [{"name": "input", "datatype": "INT64", "shape": [1, len(ids)], "data": ids}]}
    status, _, raw = http("POST", f"{lm_server.url}/v2/models/tiny-lm/infer", request)
    assert status == 200, raw
    out = {o["name"]: o for o in json.loads(raw)["outputs"]}
    np.testing.assert_allclose(out["probabilities"]["data"], reference(ids), atol=1e-5)
    assert out["predicted_class"]["data"] == [int(reference(ids).argmax())]
    too_long = {"inputs": [{"name": "input", "datatype": "INT64", "shape": [1, CONTEXT + 1],
                            "data": [0] * (CONTEXT + 1)}]}
    status, _, raw = http("POST", f"{lm_server.url}/v2/models/tiny-lm/infer", too_long)
    assert status == 400 and f"at most {CONTEXT} (its context)" in json.loads(raw)["error"]


@pytest.mark.parametrize(("body", "message"), [
    ({"text_input": "The fox"}, "characters the model never saw: 'T'"),
    ({"text_input": ""}, "text_input must be a non-empty string"),
    ({"parameters": {"max_tokens": 3}}, "text_input must be a non-empty string"),
    ({"text_input": "a" * (CONTEXT + 1)}, f"this model reads at most {CONTEXT}"),
    ({"text_input": "the", "parameters": {"max_tokens": 0}}, "max_tokens must be an integer from 1 to 1024"),
    ({"text_input": "the", "parameters": {"max_tokens": 100000}}, "max_tokens must be an integer from 1 to 1024"),
    ({"text_input": "the", "parameters": {"max_tokens": "5"}}, "max_tokens must be an integer"),
    ({"text_input": "the", "parameters": {"max_tokens": True}}, "max_tokens must be an integer"),
    ({"text_input": "the", "parameters": {"temperature": -0.5}}, "temperature must be a number from 0 to 100"),
    ({"text_input": "the", "parameters": {"temperature": "hot"}}, "temperature must be a number"),
    ({"text_input": "the", "parameters": {"seed": -1}}, "seed must be an integer from 0"),
    ({"text_input": "the", "parameters": {"top_p": 0.9}}, "unknown parameters ['top_p']"),
    ({"text_input": "the", "parameters": [1]}, "parameters must be an object"),
    (["the"], "must be a JSON object"),
    (b"{not json", "not valid JSON"),
])
def test_bad_generate_requests_get_400_saying_what_is_wrong(lm_server: ServerProcess, body: Any,
                                                            message: str) -> None:
    status, answer = generate(lm_server, body)
    assert status == 400 and message in answer["error"], answer


def test_generate_on_a_classifier_is_refused(server: ServerProcess) -> None:
    status, answer = generate(server, {"text_input": "1"}, name="digits")
    assert status == 400 and "is not a language model" in answer["error"], answer
    status, answer = generate(server, {"text_input": "1"}, name="nope")
    assert status == 404
