"""ResNet-18 adapted to 32x32 inputs: the architecture, its inputs (digits upsampled, MNIST padded,
synthetic 32x32), and real torchrun jobs under DDP, FSDP2 (with activation checkpointing) and a 2-stage
pipeline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from trainer_helpers import train

from aiaas.contract.config import DatasetSpec, ModelSpec
from aiaas.trainer.data import load_dataset
from aiaas.trainer.export import load_artifact
from aiaas.trainer.models import InputSpec, build_model, count_parameters, max_stages, split_stages


def test_resnet18_is_the_classic_network_on_32x32() -> None:
    model = build_model(ModelSpec(architecture="resnet"), InputSpec("image", (3, 32, 32), 10))
    assert 11.1e6 < count_parameters(model) < 11.2e6  # ResNet-18 for CIFAR-10 has 11.17 M parameters
    names = list(dict(model.named_children()))
    assert names == ["norm", "stem", "layer1_0", "layer1_1", "layer2_0", "layer2_1", "layer3_0", "layer3_1",
                     "layer4_0", "layer4_1", "pool", "flatten", "fc"]
    shapes = []
    x = torch.rand(2, 3, 32, 32)
    for name, layer in model.named_children():
        x = layer(x)
        shapes.append((name, tuple(x.shape[1:])))
    assert dict(shapes)["layer4_1"] == (512, 4, 4) and dict(shapes)["fc"] == (10,)


@pytest.mark.parametrize(("kind", "resize"), [("digits", "resize"), ("synthetic", None)])
def test_small_resnet_on_image_datasets(kind: str, resize: str | None) -> None:
    data = load_dataset(DatasetSpec(kind=kind, numSamples=64), "resnet")
    model = build_model(ModelSpec(architecture="resnet", preset="resnet18-small"), data.inputs)
    assert count_parameters(model) < 1e6
    assert (resize in dict(model.named_children())) if resize else "resize" not in dict(model.named_children())
    assert model(data.train_x[:4]).shape == (4, 10)
    assert max_stages(model) == 10  # stem, eight blocks, fc
    a, b = split_stages(model, 2)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(b(a(data.train_x[:4])), model(data.train_x[:4]))
    with pytest.raises(ValueError, match="not a resnet preset"):
        build_model(ModelSpec(architecture="resnet", preset="lm-1m"), data.inputs)


@pytest.mark.slow
@pytest.mark.parametrize("layout", [
    {"data": 2},
    {"data": 2, "strategy": "fsdp", "activationCheckpointing": True},
    {"data": 1, "model": 2, "microbatches": 2},
], ids=["ddp", "fsdp-ac", "pipeline"])
def test_small_resnet_trains_under_every_layout(tmp_path: Path, layout: dict[str, Any]) -> None:
    run = train(tmp_path, nproc=2, model={"architecture": "resnet", "preset": "resnet18-small"},
                dataset={"kind": "digits"}, parallelism=layout, logIntervalSteps=5,
                hyperparameters={"epochs": 1, "maxSteps": 30, "batchSize": 32, "learningRate": 0.003, "seed": 2})
    assert run.rc == 0, run.log[-4000:]
    assert run.outcome and run.outcome["outcome"] == "Succeeded"
    model, manifest = load_artifact(run.artifact)
    assert manifest["model"]["preset"] == "resnet18-small"
    data = load_dataset(DatasetSpec(kind="digits"), "resnet")
    with torch.no_grad():
        accuracy = float((model(data.eval_x).argmax(1) == data.eval_y).float().mean())
    assert accuracy >= 0.6, accuracy  # 30 steps; chance is 0.1
    assert abs(accuracy - run.metrics()["accuracy"]) < 1e-6
