"""Real torchrun jobs on CPU (gloo): DDP, FSDP, pipeline, data x pipeline, a SIGKILLed rank, bad configs.

Every job trains on scikit-learn's digits and is judged on the held-out split through the exported
artifact (``load_artifact``), not on the trainer's own report alone.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from trainer_helpers import Run, finish, job_config, start, train, worker_pids, worker_rank

from aiaas.contract.launch import EXIT_PERMANENT
from aiaas.trainer.checkpoint import MARKER, list_checkpoints
from aiaas.trainer.data import load_dataset
from aiaas.trainer.export import load_artifact

pytestmark = pytest.mark.slow


def held_out_accuracy(artifact: Path) -> float:
    """Accuracy of the exported model on the eval split, computed here from the artifact."""
    model, manifest = load_artifact(artifact)
    from aiaas.contract.config import DatasetSpec

    data = load_dataset(DatasetSpec.model_validate(manifest["dataset"]), manifest["model"]["architecture"])
    with torch.no_grad():
        pred = model(data.eval_x).argmax(dim=1)
    return float((pred == data.eval_y).float().mean())


def assert_succeeded(run: Run, steps: int) -> dict[str, Any]:
    assert run.rc == 0, run.log[-4000:]
    assert run.outcome and run.outcome["outcome"] == "Succeeded", run.outcome
    m = run.metrics()
    assert m["steps"] == steps and m["optimizerSteps"] == steps, m
    assert (run.artifact / "DONE").exists()
    return m


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory, digits_cnn: dict[str, Any]) -> Run:
    return train(tmp_path_factory.mktemp("single"), nproc=0, checkpoint={"intervalSteps": 20, "keepLast": 20},
                 **digits_cnn)


@pytest.fixture(scope="module")
def ddp(tmp_path_factory: pytest.TempPathFactory, digits_cnn: dict[str, Any]) -> Run:
    return train(tmp_path_factory.mktemp("ddp"), nproc=2, parallelism={"data": 2},
                 checkpoint={"intervalSteps": 20, "keepLast": 20}, **digits_cnn)


def checkpoint_weights(run: Run, step: int, tmp: Path) -> dict[str, torch.Tensor]:
    """The model weights in the DCP checkpoint of ``step``."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = tmp / f"{run.dir.name}-{step}.pt"
    dcp_to_torch_save(run.checkpoints / f"step-{step:08d}", out)
    return torch.load(out, weights_only=True)["model"]


def test_single_process_cnn_reaches_accuracy(single: Run) -> None:
    m = assert_succeeded(single, 264)
    assert held_out_accuracy(single.artifact) >= 0.95
    assert abs(held_out_accuracy(single.artifact) - m["accuracy"]) < 1e-6


def test_ddp_matches_single_process(single: Run, ddp: Run, tmp_path: Path) -> None:
    """2 data-parallel ranks with the same global batch and seed follow the single-process trajectory: the
    same weights after 20 and 40 steps (up to float summation order, which later steps amplify), and the
    same final accuracy and loss within a small tolerance."""
    m = assert_succeeded(ddp, 264)
    acc = held_out_accuracy(ddp.artifact)
    assert acc >= 0.95
    assert abs(acc - single.metrics()["accuracy"]) <= 0.015
    assert abs(m["loss"] - single.metrics()["loss"]) <= 0.03
    for step in (20, 40):
        a, b = checkpoint_weights(single, step, tmp_path), checkpoint_weights(ddp, step, tmp_path)
        assert a.keys() == b.keys()
        for k in a:  # relative distance of each tensor (Adam amplifies rounding noise in near-zero elements)
            rel = float((b[k].float() - a[k].float()).norm() / a[k].float().norm().clamp_min(1e-12))
            assert rel < 1e-3, f"step {step}: {k} differs by {rel:.2e} (relative)"


def test_fsdp(tmp_path: Path, digits_cnn: dict[str, Any]) -> None:
    run = train(tmp_path, nproc=2, parallelism={"data": 2, "strategy": "fsdp"}, **digits_cnn)
    assert_succeeded(run, 264)
    assert held_out_accuracy(run.artifact) >= 0.95
    # the checkpoint is sharded: each rank wrote its own DCP shard file
    ckpt = list_checkpoints(run.checkpoints)[0]
    assert len(list(ckpt.glob("*.distcp"))) == 2


def test_pipeline_two_stages(tmp_path: Path, digits_cnn: dict[str, Any]) -> None:
    run = train(tmp_path, nproc=2, parallelism={"data": 1, "model": 2, "microbatches": 4}, **digits_cnn)
    assert_succeeded(run, 264)
    assert held_out_accuracy(run.artifact) >= 0.95
    assert "data 1 x model 2" in run.log


def test_data_x_pipeline_lstm(tmp_path: Path) -> None:
    """4 ranks = 2 replicas x 2 stages of a 2-layer LSTM (stage 0: lstm0, stage 1: lstm1 + fc)."""
    run = train(tmp_path, nproc=4, parallelism={"data": 2, "model": 2, "microbatches": 2},
                model={"architecture": "lstm", "numLayers": 2, "hiddenSize": 64},
                hyperparameters={"epochs": 8, "batchSize": 32, "learningRate": 0.003, "seed": 3})
    assert_succeeded(run, 8 * 44)
    assert held_out_accuracy(run.artifact) >= 0.90


def test_rnn_pipeline(tmp_path: Path) -> None:
    """The plain nn.RNN classifier, cut into two stages (recurrent layer | linear head)."""
    run = train(tmp_path, nproc=2, parallelism={"data": 1, "model": 2, "microbatches": 2},
                model={"architecture": "rnn", "hiddenSize": 64},
                hyperparameters={"epochs": 8, "batchSize": 32, "learningRate": 0.003, "seed": 1})
    assert_succeeded(run, 8 * 44)
    assert held_out_accuracy(run.artifact) >= 0.90


def test_sigkill_a_rank_then_resume(tmp_path: Path, ddp: Run, digits_cnn: dict[str, Any]) -> None:
    """Kill rank 1 with SIGKILL mid-training; the restarted job skips a half-written and a corrupted
    checkpoint, resumes from the newest intact one, and ends with the same number of optimizer steps and
    the same weights as the uninterrupted run."""
    cfg = job_config(tmp_path, parallelism={"data": 2}, checkpoint={"intervalSteps": 20, "keepLast": 3},
                     **digits_cnn)
    t0 = time.monotonic()
    proc, _ = start(tmp_path, cfg, nproc=2)
    deadline = time.monotonic() + 120
    while not (tmp_path / "checkpoints" / "step-00000060" / MARKER).exists():
        assert proc.poll() is None, (tmp_path / "output.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    victims = [p for p in worker_pids(proc.pid) if worker_rank(p) == 1]
    assert victims, "rank 1 not found"
    os.kill(victims[0], signal.SIGKILL)
    first = finish(proc, tmp_path, cfg, 120, t0)
    assert first.rc != 0, "the job finished before the kill"
    assert first.outcome is None or first.outcome["outcome"] in ("RetryableError", "Preempted"), first.outcome

    ckpts = list_checkpoints(tmp_path / "checkpoints")
    newest_step = int(ckpts[0].name.split("-")[1])
    assert 60 <= newest_step < 264
    # a corrupted newest checkpoint and a half-written newer one must both be skipped
    shard = next(ckpts[0].glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(data)
    half = tmp_path / "checkpoints" / "step-00000263"
    half.mkdir()
    (half / "__0_0.distcp").write_bytes(b"\0" * 100)
    (half / "trainer.json").write_text(json.dumps({"step": 263, "epoch": 5, "batchInEpoch": 43}))

    (tmp_path / "termination-log").unlink(missing_ok=True)
    second = finish(*start(tmp_path, cfg, nproc=2)[:1], tmp_path, cfg, 180, time.monotonic())
    m = assert_succeeded(second, 264)
    assert "skipping checkpoint" in second.log and "step-00000263: no COMPLETE marker" in second.log
    assert "does not match its checksum" in second.log
    assert m["resumedFromStep"] == newest_step - 20
    assert held_out_accuracy(second.artifact) >= 0.95
    a = torch.load(ddp.artifact / "model.pt", weights_only=True)
    b = torch.load(second.artifact / "model.pt", weights_only=True)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=f"{k} differs from the uninterrupted run")


def test_runs_with_a_read_only_home(tmp_path: Path) -> None:
    """As in a pod with readOnlyRootFilesystem: $HOME lies under a regular file, so nothing (not even root)
    can create anything there; $TMPDIR is the only scratch space. A 2-process job trains, checkpoints and
    exports, and writes nothing besides its checkpoints, artifact, termination log and scratch files."""
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    run_dir, scratch = tmp_path / "run", tmp_path / "tmp"
    scratch.mkdir()
    env = {"HOME": str(blocker / "home"), "TMPDIR": str(scratch)}
    for name in ("XDG_CACHE_HOME", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "MPLCONFIGDIR"):
        env[name] = ""  # unset: the trainer's own defaults apply
    run = train(run_dir, nproc=2, extra_env=env, parallelism={"data": 2}, model={"architecture": "cnn"},
                hyperparameters={"epochs": 1, "maxSteps": 6, "batchSize": 32}, checkpoint={"intervalSteps": 3})
    assert_succeeded(run, 6)
    assert sorted(p.name for p in run_dir.iterdir()) == [".termination-log.lock", "artifact", "checkpoints", "output.log",
                                                         "termination-log"]
    assert blocker.read_text() == ""


# ------------------------------------------------------------------------------------------ bad configs
def assert_permanent(run: Run, *words: str) -> None:
    assert run.rc != 0
    assert run.outcome is not None, run.log[-3000:]
    assert run.outcome["outcome"] == "PermanentError", run.outcome
    assert run.outcome["exitCode"] == EXIT_PERMANENT
    for w in words:
        assert w in run.outcome["message"], run.outcome["message"]


def test_unknown_model_is_permanent(tmp_path: Path) -> None:
    run = train(tmp_path, nproc=0, model={"architecture": "mamba"})
    assert run.rc == EXIT_PERMANENT
    assert_permanent(run, "model.architecture", "mamba")


def test_missing_data_path_is_permanent(tmp_path: Path) -> None:
    run = train(tmp_path, nproc=0, dataset={"kind": "mnist", "path": str(tmp_path / "no-such-dir")})
    assert run.rc == EXIT_PERMANENT
    assert_permanent(run, "dataset.path", "no-such-dir", "does not exist")


def test_world_that_does_not_fit_the_parallelism_is_permanent(tmp_path: Path) -> None:
    run = train(tmp_path, nproc=2, parallelism={"data": 1, "model": 3})
    assert_permanent(run, "parallelism.data (1) x parallelism.model (3) = 3", "2 processes")
    assert "exitcode  : 78" in run.log or "exitcode: 78" in run.log.replace("  ", " ")


def test_checkpoint_reshards_from_ddp_to_a_pipeline(tmp_path: Path, ddp: Run, digits_cnn: dict[str, Any]) -> None:
    """DCP stores tensors by name, so a DDP checkpoint resumes into a 2-stage pipeline (as when an elastic or
    edited job comes back with another layout) and training continues from the same step."""
    import shutil

    shutil.copytree(ddp.checkpoints, tmp_path / "checkpoints")
    hp = {**digits_cnn["hyperparameters"], "epochs": 7}
    run = train(tmp_path, nproc=2, parallelism={"data": 1, "model": 2}, model=digits_cnn["model"],
                dataset=digits_cnn["dataset"], hyperparameters=hp)
    m = assert_succeeded(run, 7 * 44)
    assert m["resumedFromStep"] == 264 and "resumed from checkpoint step 264 (epoch 6, batch 0)" in run.log
    assert held_out_accuracy(run.artifact) >= 0.93  # one more epoch at a constant learning rate: it wobbles


@pytest.mark.parametrize("nproc", [0, 4], ids=["one-rank", "four-ranks"])
def test_checkpoint_of_two_ranks_resumes_with_another_world_size(tmp_path: Path, ddp: Run,
                                                                 digits_cnn: dict[str, Any], nproc: int) -> None:
    """What an elastic job does after a resize: a 2-rank DDP checkpoint resumes at the same step with one rank
    (no torchrun) and with four, and training finishes from there."""
    import shutil

    shutil.copytree(ddp.checkpoints, tmp_path / "checkpoints")
    hp = {**digits_cnn["hyperparameters"], "epochs": 7}
    run = train(tmp_path, nproc=nproc, parallelism={"data": max(nproc, 1)}, model=digits_cnn["model"],
                dataset=digits_cnn["dataset"], hyperparameters=hp)
    m = assert_succeeded(run, 7 * 44)
    assert m["resumedFromStep"] == 264 and "resumed from checkpoint step 264" in run.log
