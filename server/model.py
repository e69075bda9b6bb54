"""The served model: an exported artifact loaded with the trainer's own loader, wrapped with its signature.

The network returns logits; the server derives every output the manifest declares from them:

* an integer output (e.g. ``class``, INT64 ``[-1]``) is the predicted class, ``argmax(logits)``;
* a float output whose name mentions ``logit`` is the raw logits;
* any other float output (e.g. ``probabilities``, FP32 ``[-1, numClasses]``) is ``softmax(logits)``.

A language model (``transformer``) returns logits at every position; the outputs are those of the last one, the
next token after the input, and its input takes any number of tokens up to its context (``[-1, -1]``; the
manifest's sequence length is the most). :mod:`.generate` builds text generation on that.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .protocol import DATATYPES, ProtocolError, TensorSpec

log = logging.getLogger(__name__)

LANGUAGE_MODELS = ("transformer",)  # architectures whose network predicts the next token at every position

# Used when a manifest lacks an output signature.
DEFAULT_OUTPUTS = (
    TensorSpec("class", "INT64", (-1,)),
    TensorSpec("probabilities", "FP32", (-1, -1)),
)


def output_kind(spec: TensorSpec) -> str:
    """What an output holds: 'class', 'logits' or 'probabilities'."""
    if spec.datatype.startswith(("INT", "UINT")):
        return "class"
    if "logit" in spec.name.lower():
        return "logits"
    return "probabilities"


@dataclass
class ServedModel:
    """A loaded model: its name, version, signature and a ``predict`` that maps input arrays to output arrays."""

    name: str
    version: str
    platform: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    predict_fn: Callable[[list[np.ndarray]], np.ndarray]  # inputs (batch first) -> logits [batch, classes]
    manifest: dict[str, Any] = field(default_factory=dict)
    load_seconds: float = 0.0
    vocab_size: int | None = None  # integer (token id) inputs must lie in [0, vocab_size)
    context: int | None = None  # a language model: the most tokens one input may have (any fewer will do)
    module: Any = None  # the torch module behind predict_fn (explanations need its gradients)

    def __post_init__(self) -> None:
        self.output_specs = {spec.name: spec for spec in self.outputs}
        for spec in self.inputs:
            if spec.datatype not in DATATYPES:
                raise ValueError(f"input {spec.name!r} has datatype {spec.datatype}, which the server cannot hold")
            if not spec.shape or spec.shape[0] != -1:
                raise ValueError(f"input {spec.name!r} must have a variable batch dimension first: {spec.shape}")
        for spec in self.outputs:
            if spec.datatype not in DATATYPES:
                raise ValueError(f"output {spec.name!r} has datatype {spec.datatype}, which the server cannot hold")

    def check(self, inputs: list[np.ndarray]) -> None:
        """Refuse values the network cannot take (token ids outside the vocabulary) with a 400."""
        if self.context is not None and inputs and inputs[0].ndim == 2 and inputs[0].shape[1] > self.context:
            raise ProtocolError(
                400, f"input {self.inputs[0].name!r} has {inputs[0].shape[1]} tokens per sample; this language "
                f"model reads at most {self.context} (its context)",
            )
        if self.vocab_size is None:
            return
        for spec, array in zip(self.inputs, inputs, strict=True):
            if spec.datatype.startswith(("INT", "UINT")) and array.size:
                low, high = int(array.min()), int(array.max())
                if low < 0 or high >= self.vocab_size:
                    raise ProtocolError(
                        400,
                        f"input {spec.name!r}: token ids must lie in [0, {self.vocab_size}), "
                        f"got values from {low} to {high}",
                    )

    @property
    def versions(self) -> list[str]:
        return [self.version]

    def predict(self, inputs: list[np.ndarray], wanted: Collection[str] | None = None) -> dict[str, np.ndarray]:
        """Run one batch. Returns the ``wanted`` outputs of the signature (None: all of them): what no request
        asked for is not computed (probabilities cost a softmax per pass)."""
        logits = np.asarray(self.predict_fn(inputs), dtype=np.float32)
        if logits.ndim == 1:
            logits = logits[:, None]
        batch = logits.shape[0]
        results: dict[str, np.ndarray] = {}
        probabilities: np.ndarray | None = None
        for spec in self.outputs:
            if wanted is not None and spec.name not in wanted:
                continue
            kind = output_kind(spec)
            if kind == "class":
                value = logits.argmax(axis=-1)
            elif kind == "logits":
                value = logits
            else:
                if probabilities is None:
                    shifted = logits - logits.max(axis=-1, keepdims=True)
                    exp = np.exp(shifted)
                    probabilities = exp / exp.sum(axis=-1, keepdims=True)
                value = probabilities
            shape = [batch, *spec.shape[1:]]
            if shape.count(-1) > 1:
                shape = list(value.shape)
            results[spec.name] = value.astype(spec.dtype, copy=False).reshape(shape)
        return results

    def metadata(self) -> dict[str, Any]:
        """The v2 model metadata response."""
        return {
            "name": self.name,
            "versions": self.versions,
            "platform": self.platform,
            "inputs": [spec.to_json() for spec in self.inputs],
            "outputs": [spec.to_json() for spec in self.outputs],
        }


def _specs(manifest: Mapping[str, Any], key: str, default: tuple[TensorSpec, ...] | None) -> list[TensorSpec]:
    raw = manifest.get(key)
    if raw is None:
        if default is None:
            raise ValueError(f"the artifact's manifest has no '{key}' signature")
        return list(default)
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"the artifact's manifest has an invalid '{key}' signature: {raw!r}")
    return [TensorSpec.from_json(item) for item in raw]


def artifact_version(manifest: Mapping[str, Any]) -> str:
    """The artifact's version: the training step it was exported at (``training.steps`` in the manifest, the
    same step the operator reports as ``status.artifact.version`` of the TrainingJob); for an artifact that
    records no step, the manifest's own ``version``; ``"1"`` when it has neither."""
    training = manifest.get("training")
    steps = training.get("steps") if isinstance(training, Mapping) else None
    if type(steps) is int and steps >= 0:
        return str(steps)
    version = manifest.get("version")
    if isinstance(version, (str, int)) and not isinstance(version, bool) and str(version).strip():
        return str(version).strip()
    return "1"


def from_module(
    module: Any, manifest: Mapping[str, Any], name: str | None = None, load_seconds: float = 0.0
) -> ServedModel:
    """Wrap a torch module (in eval mode) and its manifest."""
    import torch

    def predict_fn(arrays: list[np.ndarray]) -> np.ndarray:
        with torch.inference_mode():
            tensors = [torch.from_numpy(a) for a in arrays]
            out = module(*tensors)
            if isinstance(out, (tuple, list)):
                out = out[0]
            if out.dim() == 3:  # a language model's logits at every position: the next token after the input
                out = out[:, -1]
            return out.float().numpy()

    input_info = manifest.get("input") if isinstance(manifest.get("input"), dict) else {}
    vocab = input_info.get("vocabSize") if input_info else None
    inputs = _specs(manifest, "inputs", None)
    context = None
    if (manifest.get("model") or {}).get("architecture") in LANGUAGE_MODELS and len(inputs) == 1:
        # a language model reads any number of tokens up to the sequence length it was trained on
        context = int(inputs[0].shape[1])
        inputs = [TensorSpec(inputs[0].name, inputs[0].datatype, (-1, -1))]
    return ServedModel(
        name=name or str(manifest.get("name") or "model"),
        version=artifact_version(manifest),
        platform=str(manifest.get("platform") or "pytorch_torchscript"),
        inputs=inputs,
        context=context,
        outputs=_specs(manifest, "outputs", DEFAULT_OUTPUTS),
        predict_fn=predict_fn,
        manifest=dict(manifest),
        load_seconds=load_seconds,
        vocab_size=int(vocab) if isinstance(vocab, int) and vocab > 0 else None,
        module=module,
    )


def load(model_dir: str | Path, name: str | None = None, threads: int | None = None) -> ServedModel:
    """Load an artifact directory with the trainer's loader, and warm the model up with one batch."""
    start = time.perf_counter()
    import torch

    from aiaas.trainer.export import load_artifact

    if threads:
        torch.set_num_threads(threads)
    path = Path(model_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {path} does not exist; pass --model DIR of an exported artifact")
    module, manifest = load_artifact(path)
    module.eval()
    served = from_module(module, manifest, name=name)
    warm = [np.zeros([1, *(d if d > 0 else 1 for d in spec.shape[1:])], dtype=spec.dtype) for spec in served.inputs]
    served.predict(warm)
    served.load_seconds = time.perf_counter() - start
    log.info("loaded model %s version %s from %s in %.2fs", served.name, served.version, path, served.load_seconds)
    return served
