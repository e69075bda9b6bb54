"""The decoder-only Transformer language model: presets, causality, activation checkpointing, export, and
real torchrun jobs (DDP, FSDP2 with activation checkpointing, a 2-stage pipeline) that follow the same loss
curve from the same seed and data, with a checkpoint that resumes across layouts."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from trainer_helpers import Run, logged_losses, train, write_text

from aiaas.contract.config import DatasetSpec, ModelSpec
from aiaas.trainer.data import load_dataset
from aiaas.trainer.export import load_artifact, make_manifest, predict, write_artifact
from aiaas.trainer.models import (
    InputSpec,
    TransformerLM,
    build_model,
    count_parameters,
    max_stages,
    set_activation_checkpointing,
    split_stages,
)

VOCAB = InputSpec("tokens", (32,), 40, vocab_size=40, labels=[chr(48 + i) for i in range(40)])
# losses of the same run under different layouts differ only by float summation order
LOSS_TOLERANCE = 2e-3


@pytest.mark.parametrize(("preset", "low", "high"), [("lm-1m", 0.9e6, 1.2e6), ("lm-10m", 9e6, 12e6),
                                                    ("lm-50m", 45e6, 55e6)])
def test_presets_have_their_size(preset: str, low: float, high: float) -> None:
    model = build_model(ModelSpec(architecture="transformer", preset=preset), VOCAB)
    assert low <= count_parameters(model) <= high


def test_the_model_is_causal_and_cuts_into_named_stages() -> None:
    torch.manual_seed(0)
    model = build_model(ModelSpec(architecture="transformer", hiddenSize=32, numLayers=2, numHeads=4), VOCAB)
    model.eval()
    x = torch.randint(0, 40, (2, 32))
    y = x.clone()
    y[:, 20] = (y[:, 20] + 1) % 40
    a, b = model(x), model(y)
    assert a.shape == (2, 32, 40)
    torch.testing.assert_close(a[:, :20], b[:, :20])  # positions before 20 never see token 20
    assert not torch.allclose(a[:, 20:], b[:, 20:])
    assert max_stages(model) == 5  # embed, block0, block1, norm, head
    stages = split_stages(model, 2)
    assert [list(dict(s.named_children())) for s in stages] == [["embed", "block0"], ["block1", "norm", "head"]]
    with torch.no_grad():
        torch.testing.assert_close(stages[1](stages[0](x)), a)
    with pytest.raises(ValueError, match="divisible by model.numHeads"):
        build_model(ModelSpec(architecture="transformer", hiddenSize=30, numHeads=4), VOCAB)


def test_activation_checkpointing_gives_the_same_gradients() -> None:
    torch.manual_seed(0)
    model = TransformerLM(40, 32, 32, 2, 4)
    x = torch.randint(0, 40, (4, 32))

    def grads() -> list[torch.Tensor]:
        model.zero_grad()
        logits = model(x[:, :-1])
        F.cross_entropy(logits.reshape(-1, 40), x[:, 1:].reshape(-1)).backward()
        return [p.grad.clone() for p in model.parameters()]  # type: ignore[union-attr]

    plain = grads()
    assert set_activation_checkpointing(model, True) == 2
    for g, h in zip(plain, grads(), strict=True):
        torch.testing.assert_close(g, h)


def test_export_carries_the_spec_and_predicts_the_next_character(tmp_path: Path) -> None:
    text = write_text(tmp_path / "text.txt", 3000)
    spec = DatasetSpec(kind="text", path=str(text), seqLength=16)
    data = load_dataset(spec, "transformer")
    assert data.train_x.shape[1:] == data.train_y.shape[1:] == (16,)
    assert torch.equal(data.train_x[1:, -1], data.train_y[:-1, -1])  # labels are the inputs shifted by one
    model_spec = ModelSpec(architecture="transformer", preset="lm-1m")
    model = build_model(model_spec, data.inputs)
    write_artifact(tmp_path / "art", model.state_dict(), make_manifest("lm", model_spec, data.inputs, spec.dump()),
                   {})
    loaded, manifest = load_artifact(tmp_path / "art")
    assert manifest["model"]["architecture"] == "transformer" and manifest["model"]["preset"] == "lm-1m"
    out = predict(loaded, manifest, data.eval_x[:3].tolist())
    assert out["probabilities"].shape == (3, data.inputs.vocab_size) and out["predicted_class"].shape == (3,)


# ------------------------------------------------------------------------------------ distributed (torchrun)
def lm_job(text: Path, **parallelism: Any) -> dict[str, Any]:
    return {
        "model": {"architecture": "transformer", "preset": "lm-1m"},
        "dataset": {"kind": "text", "path": str(text), "seqLength": 32, "evalFraction": 0.05},
        "hyperparameters": {"epochs": 1, "maxSteps": 8, "batchSize": 16, "learningRate": 0.003, "seed": 5,
                            "lrSchedule": "constant"},
        "parallelism": parallelism,
        "checkpoint": {"intervalSteps": 4, "keepLast": 5},
        "logIntervalSteps": 1,
    }


@pytest.fixture(scope="module")
def text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_text(tmp_path_factory.mktemp("text") / "corpus.txt", 8000)


@pytest.fixture(scope="module")
def lm_ddp(tmp_path_factory: pytest.TempPathFactory, text: Path) -> Run:
    return train(tmp_path_factory.mktemp("lm-ddp"), nproc=2, **lm_job(text, data=2))


def losses_of(run: Run) -> dict[int, float]:
    assert run.rc == 0, run.log[-4000:]
    assert run.outcome and run.outcome["outcome"] == "Succeeded"
    losses = logged_losses(run.log)
    assert sorted(losses) == list(range(1, 9)), run.log[-2000:]
    return losses


@pytest.mark.slow
@pytest.mark.parametrize("layout", [
    {"data": 2, "strategy": "fsdp", "activationCheckpointing": True},
    {"data": 1, "model": 2, "microbatches": 2},
], ids=["fsdp-ac", "pipeline"])
def test_layouts_follow_the_same_loss_curve(tmp_path: Path, text: Path, lm_ddp: Run,
                                            layout: dict[str, Any]) -> None:
    reference = losses_of(lm_ddp)
    assert reference[8] < reference[1] - 0.3, reference  # it learns
    losses = losses_of(train(tmp_path, nproc=2, **lm_job(text, **layout)))
    for step, loss in reference.items():
        assert abs(losses[step] - loss) <= LOSS_TOLERANCE, (step, losses, reference)


@pytest.mark.slow
def test_a_ddp_checkpoint_resumes_in_a_pipeline(tmp_path: Path, text: Path, lm_ddp: Run) -> None:
    """Stop the DDP run's history at step 4 and continue it as a 2-stage pipeline: steps 5-8 have the losses
    of the uninterrupted DDP run, and the exported artifact serves."""
    shutil.copytree(lm_ddp.checkpoints / "step-00000004", tmp_path / "checkpoints" / "step-00000004")
    run = train(tmp_path, nproc=2, **lm_job(text, data=1, model=2, microbatches=2))
    assert run.rc == 0, run.log[-4000:]
    assert run.metrics()["resumedFromStep"] == 4
    losses, reference = logged_losses(run.log), losses_of(lm_ddp)
    assert sorted(losses) == [5, 6, 7, 8]
    for step in (5, 6, 7, 8):
        assert abs(losses[step] - reference[step]) <= LOSS_TOLERANCE, (step, losses, reference)
    model, manifest = load_artifact(run.artifact)
    assert predict(model, manifest, [[1] * 32])["probabilities"].shape[0] == 1
