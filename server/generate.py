"""Text generation with an exported language model (the Open Inference Protocol's generate extension).

``POST /v2/models/{name}/generate`` with ``{"text_input": "...", "parameters": {"max_tokens": N,
"temperature": t, "seed": s}}`` answers ``{"model_name", "model_version", "text_output"}``. What lives here:
the model's vocabulary (characters or bytes, from the artifact's manifest), the request's validation, and the
sampling loop. Each new token is one forward pass submitted to the model's batcher, so generation runs on the
same model thread as ``/infer`` (concurrent generations of the same length share forward passes) and never
blocks the event loop. No HTTP here (the route is in :mod:`.app`).

Bounds: a prompt of at most the model's context (the sequence length it was trained on), at most
:data:`MAX_TOKENS_CAP` new tokens; the model always sees the last ``context`` tokens.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .model import LANGUAGE_MODELS, ServedModel, output_kind
from .protocol import ProtocolError, bad_request, loads

MAX_TOKENS_CAP = 1024  # new tokens one request may ask for
DEFAULT_MAX_TOKENS = 64
MAX_TEMPERATURE = 100.0
PARAMETERS = ("max_tokens", "temperature", "seed")


@dataclass(frozen=True)
class Vocabulary:
    """Token ids <-> text: ``labels[i]`` is the character of id ``i`` (character models), or, without labels
    and 256 ids, the ids are UTF-8 bytes."""

    labels: tuple[str, ...] | None
    size: int

    @classmethod
    def of(cls, manifest: Mapping[str, Any]) -> Vocabulary:
        info = manifest.get("input") or {}
        size = int(info.get("vocabSize") or 0)
        labels = info.get("labels") or manifest.get("labels")
        if labels and len(labels) == size and all(isinstance(c, str) and len(c) == 1 for c in labels):
            return cls(tuple(labels), size)
        if size == 256:
            return cls(None, size)
        raise ValueError(f"the artifact's manifest names no characters for its {size} token ids")

    def encode(self, text: str) -> list[int]:
        if self.labels is None:
            return list(text.encode())
        index = {c: i for i, c in enumerate(self.labels)}
        unknown = sorted({c for c in text if c not in index})
        if unknown:
            raise bad_request(
                f"text_input has characters the model never saw: {''.join(unknown)!r}; it knows these "
                f"{self.size}: {''.join(self.labels)!r}"
            )
        return [index[c] for c in text]

    def decode(self, ids: list[int]) -> str:
        if self.labels is None:
            return bytes(ids).decode(errors="replace")
        return "".join(self.labels[i] for i in ids)


@dataclass(frozen=True)
class GenerateRequest:
    prompt: list[int]
    max_tokens: int
    temperature: float
    seed: int | None


def _number(params: Mapping[str, Any], key: str, kind: type, default: Any, low: float, high: float) -> Any:
    value = params.get(key)
    if value is None:
        return default
    ok = isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool)
    if not ok or (kind is float and not math.isfinite(value)) or not low <= value <= high:
        what = "an integer" if kind is int else "a number"
        raise bad_request(f"parameters.{key} must be {what} from {low:g} to {high:g}, got {value!r}")
    return kind(value)


def parse_request(body: bytes, vocabulary: Vocabulary, context: int) -> GenerateRequest:
    """Validate a generate request; anything wrong is a 400 that says what and how to fix it."""
    obj = loads(body)
    if not isinstance(obj, dict):
        raise bad_request('the request body must be a JSON object: {"text_input": "...", "parameters": {...}}')
    text = obj.get("text_input")
    if not isinstance(text, str) or not text:
        raise bad_request("text_input must be a non-empty string: the text the model continues")
    params = obj.get("parameters", {})
    if not isinstance(params, dict):
        raise bad_request(f"parameters must be an object with any of {', '.join(PARAMETERS)}")
    unknown = sorted(set(params) - set(PARAMETERS))
    if unknown:
        raise bad_request(f"unknown parameters {unknown}; this server understands {', '.join(PARAMETERS)}")
    prompt = vocabulary.encode(text)
    if len(prompt) > context:
        raise bad_request(
            f"text_input is {len(prompt)} tokens long; this model reads at most {context} (its context): "
            "send its last part"
        )
    return GenerateRequest(
        prompt=prompt,
        max_tokens=_number(params, "max_tokens", int, DEFAULT_MAX_TOKENS, 1, MAX_TOKENS_CAP),
        temperature=_number(params, "temperature", float, 1.0, 0.0, MAX_TEMPERATURE),
        seed=_number(params, "seed", int, None, 0, 2**63 - 1),
    )


def sample(probabilities: np.ndarray, temperature: float, rng: np.random.Generator) -> int:
    """One token id from a next-token distribution: the most likely at temperature 0, else drawn from
    ``softmax(log(p) / temperature)``."""
    p = np.asarray(probabilities, dtype=np.float64)
    if temperature == 0.0:
        return int(p.argmax())
    with np.errstate(divide="ignore"):
        logits = np.log(p) / temperature
    weights = np.exp(logits - logits.max())
    return int(rng.choice(len(weights), p=weights / weights.sum()))


NextToken = Callable[[np.ndarray], Awaitable[np.ndarray]]  # ids [1, steps] -> probabilities [1, vocab]


async def generate(request: GenerateRequest, context: int, next_token: NextToken) -> list[int]:
    """The new token ids: ``max_tokens`` forward passes, each over the last ``context`` tokens."""
    rng = np.random.default_rng(request.seed)
    ids = list(request.prompt)
    for _ in range(request.max_tokens):
        window = np.asarray([ids[-context:]], dtype=np.int64)
        probabilities = await next_token(window)
        ids.append(sample(probabilities[0], request.temperature, rng))
    return ids[len(request.prompt):]


def require_language_model(model: ServedModel) -> int:
    """The model's context (tokens it reads at most); a 400 when it is not a language model."""
    if model.context is None:
        arch = (model.manifest.get("model") or {}).get("architecture")
        raise ProtocolError(
            400, f"model {model.name!r} ({arch}) is not a language model: generate needs an artifact of model "
            f"architecture {' or '.join(LANGUAGE_MODELS)}; use /v2/models/{model.name}/infer"
        )
    return model.context


Infer = Callable[[list[np.ndarray]], Awaitable[dict[str, np.ndarray]]]


async def answer(model: ServedModel, body: bytes, infer: Infer) -> str:
    """The text a generate request's body asks for; ``infer`` runs one batch on the model's thread."""
    context = require_language_model(model)
    vocabulary = Vocabulary.of(model.manifest)
    request = parse_request(body, vocabulary, context)
    probabilities = next((s.name for s in model.outputs if output_kind(s) == "probabilities"), None)
    if probabilities is None:
        raise ProtocolError(400, f"model {model.name!r} declares no probabilities output to sample from")

    async def next_token(window: np.ndarray) -> np.ndarray:
        return (await infer([window]))[probabilities]

    return vocabulary.decode(await generate(request, context, next_token))
