"""Explanations: Integrated Gradients (Captum) attributions of the model's target-class logit to its input.

* float inputs (the CNN's pixels, the RNNs' rows of pixels): attributions per input value, shaped like the input;
* token ids (a model with an ``nn.Embedding``): Layer Integrated Gradients on the embedding, summed over the
  embedding dimension, so again one attribution per input value (per token).

The baseline is a constant input: ``parameters.baseline`` (default 0: blank pixels, or token id 0). For each
sample the answer holds the target class (``parameters.target``, default the predicted class) and Captum's
convergence delta: ``sum(attributions) - (f(x) - f(baseline))`` for the target logit, which is small when
``steps`` suffice (completeness).

Cost is bounded: ``steps`` <= ``--explain-steps``, at most :data:`MAX_SAMPLES` samples per request, forward and
backward passes of at most ``--explain-internal-batch-size`` rows, computed in this module's own threads (one
per ``--explain-concurrency``) so explanations never occupy the batcher's model thread.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from .model import ServedModel
from .protocol import ProtocolError, bad_request

METHOD = "integrated-gradients"
MAX_SAMPLES = 32  # samples one explain request may hold


@dataclass
class Explanation:
    attributions: np.ndarray  # shaped like the input
    targets: np.ndarray  # int64 [batch]
    deltas: np.ndarray  # float32 [batch]
    steps: int
    baseline: float

    def v2_response(self, model: ServedModel, request_id: str | None) -> dict[str, Any]:
        batch = [int(self.targets.shape[0])]
        response: dict[str, Any] = {
            "model_name": model.name,
            "model_version": model.version,
            "parameters": {"method": METHOD, "steps": self.steps, "baseline": self.baseline},
            "outputs": [
                {"name": "attributions", "datatype": "FP32", "shape": list(self.attributions.shape),
                 "data": self.attributions.reshape(-1)},
                {"name": "target", "datatype": "INT64", "shape": batch, "data": self.targets},
                {"name": "convergence_delta", "datatype": "FP32", "shape": batch, "data": self.deltas},
            ],
        }
        if request_id is not None:
            response["id"] = request_id
        return response

    def v1_response(self, model: ServedModel) -> dict[str, Any]:
        return {
            "model_name": model.name,
            "model_version": model.version,
            "method": METHOD,
            "steps": self.steps,
            "baseline": self.baseline,
            "explanations": [
                {"target": int(t), "attributions": a.tolist(), "convergence_delta": float(d)}
                for a, t, d in zip(self.attributions, self.targets, self.deltas, strict=True)
            ],
        }


def _int_param(params: dict[str, Any], name: str, default: int, low: int, high: int) -> int:
    value = params.get(name, default)
    if type(value) is not int or not low <= value <= high:
        raise bad_request(f"parameter {name!r} must be an integer from {low} to {high}, got {value!r}")
    return value


class Explainer:
    def __init__(self, model: ServedModel, max_steps: int, internal_batch_size: int, concurrency: int = 1) -> None:
        import torch

        if model.module is None or len(model.inputs) != 1:
            raise ValueError("explanations need a torch model with exactly one input")
        self.model = model
        self.max_steps = max_steps
        self.internal_batch_size = internal_batch_size
        self.tokens = model.inputs[0].datatype.startswith(("INT", "UINT"))
        embeddings = [m for m in model.module.modules() if isinstance(m, torch.nn.Embedding)]
        if self.tokens and not embeddings:
            raise ValueError("a model with integer inputs needs an nn.Embedding layer to be explained")
        self.embedding = embeddings[0] if embeddings else None
        self.num_classes = len(model.manifest.get("input", {}).get("labels") or []) or None
        self._pool = ThreadPoolExecutor(max_workers=max(1, concurrency), thread_name_prefix="explain")

    def _targets(self, params: dict[str, Any], batch: int) -> list[int] | None:
        target = params.get("target")
        if target is None:
            return None
        targets = [target] * batch if not isinstance(target, list) else target
        high = (self.num_classes or 2**31) - 1
        if len(targets) != batch or not all(type(t) is int and 0 <= t <= high for t in targets):
            raise bad_request(
                f"parameter 'target' must be a class index (0 to {high}) or a list of one per sample ({batch})"
            )
        return targets

    async def explain(self, inputs: list[np.ndarray], params: dict[str, Any]) -> Explanation:
        """Validate the parameters, then compute in the explainer's own thread."""
        x = inputs[0]
        if x.shape[0] > MAX_SAMPLES:
            raise bad_request(f"an explain request may hold at most {MAX_SAMPLES} samples, got {x.shape[0]}")
        steps = _int_param(params, "steps", self.max_steps, 1, self.max_steps)
        baseline = params.get("baseline", 0)
        if self.tokens:
            vocab = self.model.vocab_size or 2**31
            baseline = _int_param(params, "baseline", 0, 0, vocab - 1)
        elif type(baseline) not in (int, float) or not np.isfinite(baseline):
            raise bad_request(f"parameter 'baseline' must be a number (a constant input), got {baseline!r}")
        targets = self._targets(params, int(x.shape[0]))
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._compute, x, targets, steps, float(baseline))

    def _compute(self, x: np.ndarray, targets: list[int] | None, steps: int, baseline: float) -> Explanation:
        import torch
        from captum.attr import IntegratedGradients, LayerIntegratedGradients

        module = self.model.module

        def forward(*args: torch.Tensor) -> torch.Tensor:
            out = module(*args)
            return out[0] if isinstance(out, (tuple, list)) else out

        inputs = torch.from_numpy(np.array(x))
        with torch.no_grad():
            logits = forward(inputs)
        if targets is not None and max(targets) >= logits.shape[-1]:
            raise ProtocolError(400, f"parameter 'target' must be below the number of classes, {logits.shape[-1]}")
        target = torch.tensor(targets) if targets is not None else logits.argmax(-1)
        base = torch.full_like(inputs, baseline if not self.tokens else int(baseline))
        method = LayerIntegratedGradients(forward, self.embedding) if self.tokens else IntegratedGradients(forward)
        attributions, delta = method.attribute(
            inputs if self.tokens else inputs.float(), baselines=base, target=target, n_steps=steps,
            internal_batch_size=self.internal_batch_size, return_convergence_delta=True,
        )
        if self.tokens:
            attributions = attributions.sum(-1)  # one attribution per token
        return Explanation(
            attributions=attributions.detach().float().numpy(),
            targets=target.numpy().astype(np.int64),
            deltas=delta.detach().float().numpy(),
            steps=steps,
            baseline=baseline,
        )
