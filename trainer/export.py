"""The exported model artifact: written by the trainer at the end of a run, loaded by the model server.

Layout (names from :mod:`aiaas.contract.artifact`), one directory::

    model.pt      state_dict of the full model (gathered from FSDP shards / pipeline stages), CPU tensors
    model.json    the manifest (below)
    metrics.json  evaluation results: {"accuracy", "loss", "evalSamples", "steps", "epochs", ...}
    DONE          written last; an artifact without it is incomplete and is not loaded

The manifest (``model.json``)::

    {
      "name": "cnn-digits",                # the TrainingJob's name
      "version": "1",
      "platform": "pytorch",
      "model": {"architecture": "cnn", "hiddenSize": 64, "numLayers": 1, "dropout": 0.0},   # ModelSpec
      "numClasses": 10,
      "labels": ["0", "1", ..., "9"],     # class index -> label (characters for text models)
      "dataset": {"kind": "digits", ...},  # DatasetSpec
      "input": {"kind": "image", "shape": [1, 8, 8], "numClasses": 10, "mean": .., "std": ..,
                "vocabSize": null, "labels": [...]},            # what build_model needs (InputSpec)
      "inputs":  [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 8, 8]}],        # KServe v2 form
      "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]},
                  {"name": "predicted_class", "datatype": "INT64", "shape": [-1]}],
      "framework": {"torch": "2.x"}, "createdAt": "2026-...Z", "training": {"steps": .., "epochs": ..}
    }

Inputs are *raw* values (digits pixels 0..16, MNIST pixels 0..255, character ids for text: ``labels[i]`` is
the character of id ``i``); the network normalises them itself. The network returns logits (a language model
``{"architecture": "transformer", ...}`` at every position); :func:`predict` turns them into the manifest's
outputs (for a language model: the distribution of the character that follows the input).

Public API (stable, used by ``aiaas.server``)::

    model, manifest = load_artifact("/mnt/models")    # nn.Module in eval mode on CPU, manifest dict
    outputs = predict(model, manifest, batch)           # {"probabilities": [B, C] float, "predicted_class": [B] int64}
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from aiaas.contract.artifact import DONE_FILE, MANIFEST_FILE, METRICS_FILE, WEIGHTS_FILE
from aiaas.contract.config import ModelSpec

from .fsio import fsync_path, sha256_file, write_atomic
from .models import INPUT_TOKENS, InputSpec, build_model

PLATFORM = "pytorch"
INPUT_NAME = "input"
OUTPUT_PROBABILITIES = "probabilities"
OUTPUT_CLASS = "predicted_class"


class ArtifactError(Exception):
    """The directory is not a complete, loadable artifact; the message says what is missing or wrong."""


def signature(inputs: InputSpec) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The KServe v2 (Open Inference Protocol) input and output tensor metadata for ``inputs``."""
    datatype = "INT64" if inputs.kind == INPUT_TOKENS else "FP32"
    ins = [{"name": INPUT_NAME, "datatype": datatype, "shape": [-1, *inputs.shape]}]
    outs = [
        {"name": OUTPUT_PROBABILITIES, "datatype": "FP32", "shape": [-1, inputs.num_classes]},
        {"name": OUTPUT_CLASS, "datatype": "INT64", "shape": [-1]},
    ]
    return ins, outs


def make_manifest(name: str, spec: ModelSpec, inputs: InputSpec, dataset: Mapping[str, Any],
                  training: Mapping[str, Any] | None = None, version: str = "1") -> dict[str, Any]:
    ins, outs = signature(inputs)
    return {
        "name": name,
        "version": version,
        "platform": PLATFORM,
        "model": spec.dump(),
        "numClasses": inputs.num_classes,
        "labels": list(inputs.labels),
        "dataset": dict(dataset),
        "input": inputs.to_json(),
        "inputs": ins,
        "outputs": outs,
        "framework": {"torch": torch.__version__.split("+")[0]},
        "createdAt": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "training": dict(training or {}),
    }


def write_artifact(directory: str | os.PathLike[str], state_dict: Mapping[str, torch.Tensor],
                   manifest: Mapping[str, Any], metrics: Mapping[str, Any]) -> Path:
    """Write an artifact into ``directory`` (created if needed; an older artifact there is replaced).

    ``DONE`` is removed first and written last, each file is written to a temp name, fsynced and renamed,
    so a reader never sees a half-written artifact as complete.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    (out / DONE_FILE).unlink(missing_ok=True)
    weights = out / WEIGHTS_FILE
    tmp = weights.with_name(f".{WEIGHTS_FILE}.tmp-{os.getpid()}")
    torch.save({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, weights)
    manifest = dict(manifest)
    manifest["weights"] = {"file": WEIGHTS_FILE, "sha256": sha256_file(weights)}
    write_atomic(out / MANIFEST_FILE, (json.dumps(manifest, indent=2) + "\n").encode())
    write_atomic(out / METRICS_FILE, (json.dumps(dict(metrics), indent=2) + "\n").encode())
    fsync_path(out)
    write_atomic(out / DONE_FILE, (manifest.get("createdAt", "") + "\n").encode())
    fsync_path(out)
    return out


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of the artifact at ``path``, checking the artifact is complete (``DONE`` present)."""
    root = Path(path)
    if not root.is_dir():
        raise ArtifactError(f"model artifact {root} does not exist or is not a directory")
    if not (root / DONE_FILE).exists():
        raise ArtifactError(
            f"model artifact {root} is incomplete: no {DONE_FILE} file (the training job has not finished "
            "exporting, or failed while exporting)"
        )
    try:
        manifest: dict[str, Any] = json.loads((root / MANIFEST_FILE).read_text())
    except (OSError, ValueError) as e:
        raise ArtifactError(f"model artifact {root}: cannot read {MANIFEST_FILE}: {e}") from e
    for key in ("name", "model", "input", "inputs", "outputs"):
        if key not in manifest:
            raise ArtifactError(f"model artifact {root}: {MANIFEST_FILE} has no {key!r}")
    return manifest


def read_metrics(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The evaluation results recorded with the artifact (``{}`` when there are none)."""
    f = Path(path) / METRICS_FILE
    return json.loads(f.read_text()) if f.exists() else {}


def load_artifact(path: str | os.PathLike[str], map_location: str | torch.device = "cpu",
                  verify: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """Load the artifact directory ``path``: the full network in eval mode and its manifest.

    Rebuilds the network from ``manifest["model"]`` (a ModelSpec) and ``manifest["input"]`` (an InputSpec),
    loads ``model.pt`` strictly (``weights_only``), and returns ``(model, manifest)``. ``model(x)`` takes a
    batch shaped like ``manifest["inputs"][0]["shape"]`` (raw values; FP32, or INT64 ids for text) and
    returns logits ``[batch, numClasses]``; :func:`predict` gives the manifest's named outputs.
    With ``verify``, the weights' sha256 is checked against the manifest.
    Raises :class:`ArtifactError` with a readable message when the artifact is incomplete or inconsistent.
    """
    root = Path(path)
    manifest = read_manifest(root)
    weights = root / WEIGHTS_FILE
    if not weights.exists():
        raise ArtifactError(f"model artifact {root}: {WEIGHTS_FILE} is missing")
    expected = (manifest.get("weights") or {}).get("sha256")
    if verify and expected and sha256_file(weights) != expected:
        raise ArtifactError(f"model artifact {root}: {WEIGHTS_FILE} does not match its sha256 in {MANIFEST_FILE}")
    try:
        spec = ModelSpec.model_validate(manifest["model"])
        inputs = InputSpec.from_json(manifest["input"])
        model = build_model(spec, inputs)
        state = torch.load(weights, map_location=map_location, weights_only=True)
        model.load_state_dict(state, strict=True)
    except ArtifactError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure here means the artifact is unusable
        raise ArtifactError(f"model artifact {root}: cannot build the model from it: {e}") from e
    model.to(map_location)
    model.eval()
    return model, manifest


def as_input_tensor(manifest: Mapping[str, Any], data: Any) -> torch.Tensor:
    """Convert ``data`` (nested lists, numpy array or tensor) into the model input: the manifest's dtype, and
    the manifest's per-sample shape (a flat batch of ``prod(shape)`` values per sample is reshaped)."""
    spec = manifest["inputs"][0]
    dtype = torch.int64 if spec["datatype"].startswith("INT") else torch.float32
    t = data if isinstance(data, torch.Tensor) else torch.as_tensor(np.asarray(data))
    t = t.to(dtype)
    sample_shape = [int(s) for s in spec["shape"][1:]]
    return t.reshape(-1, *sample_shape)


@torch.no_grad()
def predict(model: nn.Module, manifest: Mapping[str, Any], data: Any) -> dict[str, torch.Tensor]:
    """Run ``model`` on a batch and return the manifest's outputs by name:
    ``{"probabilities": float32 [B, numClasses], "predicted_class": int64 [B]}``."""
    x = as_input_tensor(manifest, data)
    device = next(model.parameters()).device
    logits = model(x.to(device)).float()
    if logits.dim() == 3:  # a language model: the next token after the whole input
        logits = logits[:, -1]
    probs = torch.softmax(logits, dim=-1)
    return {OUTPUT_PROBABILITIES: probs.cpu(), OUTPUT_CLASS: probs.argmax(dim=-1).cpu()}
