"""Fast in-process tests of the trainer's parts: models, artifact, data sharding, checkpoints, config,
termination outcome, metrics endpoint. Real files and sockets, no mocks."""

from __future__ import annotations

import json
import socket
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from aiaas.contract import metrics as names
from aiaas.contract.config import DatasetSpec, ModelSpec, TrainerConfig
from aiaas.trainer.checkpoint import MARKER, Checkpointer, list_checkpoints, valid_checkpoints
from aiaas.trainer.config import check_config, load_config, parse_config
from aiaas.trainer.data import ShardedLoader, eval_batches, load_dataset
from aiaas.trainer.distributed import DistEnv
from aiaas.trainer.errors import PermanentError
from aiaas.trainer.export import ArtifactError, load_artifact, make_manifest, predict, write_artifact
from aiaas.trainer.metrics import TrainerMetrics
from aiaas.trainer.models import InputSpec, LeNet5, build_model, max_stages, split_stages

DIGITS_IMG = InputSpec("image", (1, 8, 8), 10, mean=4.9, std=6.0, labels=[str(i) for i in range(10)])
DIGITS_SEQ = InputSpec("sequence", (8, 8), 10, mean=4.9, std=6.0)
TEXT = InputSpec("tokens", (16,), 30, vocab_size=30, labels=[chr(65 + i) for i in range(30)])


def world_of_one() -> DistEnv:
    return DistEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, node_rank=0,
                   device=torch.device("cpu"), backend=None)


# ---------------------------------------------------------------------------------------------- models
def test_lenet5_is_the_classic_network() -> None:
    m = build_model(ModelSpec(architecture="cnn"), DIGITS_IMG)
    assert isinstance(m, LeNet5)
    conv1, conv2 = m.get_submodule("conv1"), m.get_submodule("conv2")
    assert isinstance(conv1, nn.Conv2d) and isinstance(conv2, nn.Conv2d)
    assert (conv1.in_channels, conv1.out_channels, conv1.kernel_size) == (1, 6, (5, 5))
    assert (conv2.in_channels, conv2.out_channels, conv2.kernel_size) == (6, 16, (5, 5))
    shapes = [(m.get_submodule(f).in_features, m.get_submodule(f).out_features) for f in ("fc1", "fc2", "fc3")]
    assert shapes == [(16 * 5 * 5, 120), (120, 84), (84, 10)]
    for size in (8, 28, 32):
        net = LeNet5(1, size, 10)
        assert net(torch.rand(3, 1, size, size)).shape == (3, 10)


@pytest.mark.parametrize("arch", ["rnn", "lstm", "gru"])
def test_recurrent_classifiers(arch: str) -> None:
    m = build_model(ModelSpec(architecture=arch, num_layers=2, hidden_size=32), DIGITS_SEQ)
    assert m(torch.rand(5, 8, 8) * 16).shape == (5, 10)
    t = build_model(ModelSpec(architecture=arch), TEXT)
    assert t(torch.randint(0, 30, (5, 16))).shape == (5, 30)
    if arch == "rnn":
        assert isinstance(m.get_submodule("rnn0"), nn.RNN)


@pytest.mark.parametrize("arch,inputs", [("cnn", DIGITS_IMG), ("rnn", DIGITS_SEQ), ("lstm", DIGITS_SEQ),
                                         ("gru", TEXT)])
def test_pipeline_stages_compose_to_the_full_model(arch: str, inputs: InputSpec) -> None:
    torch.manual_seed(0)
    m = build_model(ModelSpec(architecture=arch, num_layers=2), inputs)
    m.eval()
    x = torch.randint(0, 30, (4, 16)) if inputs.kind == "tokens" else torch.rand(4, *inputs.shape) * 16
    for n in range(1, max_stages(m) + 1):  # type: ignore[arg-type]
        stages = split_stages(m, n)  # type: ignore[arg-type]
        assert len(stages) == n
        keys = [k for s in stages for k in s.state_dict()]
        assert sorted(keys) == sorted(m.state_dict())  # each key in exactly one stage, names unchanged
        h = x
        for s in stages:
            h = s(h)
        torch.testing.assert_close(h, m(x))


def test_too_many_stages_names_the_limit() -> None:
    m = build_model(ModelSpec(architecture="rnn"), DIGITS_SEQ)
    with pytest.raises(ValueError, match="cannot split the model into 3 pipeline stages.*parallelism.model <= 2"):
        split_stages(m, 3)  # type: ignore[arg-type]


def test_cnn_rejects_text() -> None:
    with pytest.raises(ValueError, match="cnn needs image inputs"):
        build_model(ModelSpec(architecture="cnn"), TEXT)


# -------------------------------------------------------------------------------------------- artifact
@pytest.mark.parametrize("arch,inputs", [("cnn", DIGITS_IMG), ("gru", TEXT)])
def test_artifact_round_trip(tmp_path: Path, arch: str, inputs: InputSpec) -> None:
    spec = ModelSpec(architecture=arch)
    model = build_model(spec, inputs)
    write_artifact(tmp_path, model.state_dict(), make_manifest("job", spec, inputs, {"kind": "digits"}),
                   {"accuracy": 0.5})
    loaded, manifest = load_artifact(tmp_path)
    assert not loaded.training
    assert manifest["inputs"][0]["shape"] == [-1, *inputs.shape]
    assert manifest["inputs"][0]["datatype"] == ("INT64" if arch == "gru" else "FP32")
    assert [o["name"] for o in manifest["outputs"]] == ["probabilities", "predicted_class"]
    assert manifest["numClasses"] == inputs.num_classes and manifest["labels"] == inputs.labels
    x = torch.randint(0, 30, (3, 16)) if arch == "gru" else torch.rand(3, 64) * 16  # flat rows are reshaped
    out = predict(loaded, manifest, x.tolist())
    assert out["probabilities"].shape == (3, inputs.num_classes)
    torch.testing.assert_close(out["probabilities"].sum(1), torch.ones(3))
    assert out["predicted_class"].dtype == torch.int64
    for k, v in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v)


def test_incomplete_or_tampered_artifact_is_refused(tmp_path: Path) -> None:
    spec = ModelSpec()
    model = build_model(spec, DIGITS_IMG)
    write_artifact(tmp_path, model.state_dict(), make_manifest("job", spec, DIGITS_IMG, {}), {})
    (tmp_path / "DONE").unlink()
    with pytest.raises(ArtifactError, match="incomplete: no DONE"):
        load_artifact(tmp_path)
    (tmp_path / "DONE").write_text("x")
    (tmp_path / "model.pt").write_bytes((tmp_path / "model.pt").read_bytes()[:-10])
    with pytest.raises(ArtifactError, match="sha256"):
        load_artifact(tmp_path)
    with pytest.raises(ArtifactError, match="does not exist"):
        load_artifact(tmp_path / "nope")


# ------------------------------------------------------------------------------------------------ data
def test_digits_shapes() -> None:
    cnn = load_dataset(DatasetSpec(), "cnn")
    assert cnn.train_x.shape[1:] == (1, 8, 8) and len(cnn.train_x) + len(cnn.eval_x) == 1797
    rnn = load_dataset(DatasetSpec(), "rnn")
    assert rnn.train_x.shape[1:] == (8, 8)
    assert set(cnn.eval_y.tolist()) == set(range(10))


def test_text_dataset(tmp_path: Path) -> None:
    f = tmp_path / "corpus.txt"
    f.write_text("hello world, " * 200)
    d = load_dataset(DatasetSpec(kind="text", path=str(f), seq_length=8), "gru")
    assert d.inputs.kind == "tokens" and d.inputs.vocab_size == len(set("hello world, "))
    assert d.train_x.shape[1] == 8
    assert int(d.train_y[0]) == int(d.train_x[1, -1])  # the label is the next character


def test_data_parallel_ranks_see_exactly_the_single_process_batches() -> None:
    x = torch.arange(103).float()
    y = torch.arange(103)
    single = ShardedLoader(x, y, 8, 1, 0, seed=5)
    ranks = [ShardedLoader(x, y, 8, 2, r, seed=5) for r in range(2)]
    assert single.steps_per_epoch == ranks[0].steps_per_epoch == 12
    for epoch in (0, 3):
        one = list(single.epoch(epoch))
        two = list(zip(*(r.epoch(epoch) for r in ranks), strict=True))
        assert len(one) == len(two)
        for (sx, _), ((ax, _), (bx, _)) in zip(one, two, strict=True):
            assert sorted(sx.tolist()) == sorted(ax.tolist() + bx.tolist())
        # resuming in the middle of an epoch yields the remaining batches
        assert [b[0].tolist() for b in single.epoch(epoch, 5)] == [b[0].tolist() for b in one[5:]]
    assert list(single.epoch(0))[0][0].tolist() != list(single.epoch(1))[0][0].tolist()


def test_eval_batches_cover_each_sample_once() -> None:
    x, y = torch.arange(11).float(), torch.arange(11)
    seen: list[int] = []
    for r in range(3):
        batches = list(eval_batches(x, y, 3, r, 2))
        assert len(batches) == 2  # every rank runs the same number of batches
        for bx, _, w in batches:
            seen += [int(v) for v, wi in zip(bx.tolist(), w.tolist(), strict=True) if wi > 0]
    assert sorted(seen) == list(range(11))


# ----------------------------------------------------------------------------------------- checkpoints
def test_checkpoints_atomic_pruned_verified_and_resumed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    model = build_model(ModelSpec(), DIGITS_IMG)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    ck = Checkpointer(tmp_path, keep_last=2, env=world_of_one())
    snapshots = {}
    for step in (10, 20, 30):
        loss = model(torch.rand(4, 1, 8, 8)).sum()
        loss.backward()
        opt.step()
        ck.save(step, model, opt, {"epoch": 0, "batchInEpoch": step})
        snapshots[step] = {k: v.clone() for k, v in model.state_dict().items()}
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000030", "step-00000020"]  # keep 2
    assert not list(tmp_path.glob(".tmp-*"))
    # corrupt the newest, add a half-written newer one: both are skipped, step 20 is loaded
    shard = next((tmp_path / "step-00000030").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-7] + b"garbage")
    (tmp_path / "step-00000040").mkdir()
    (tmp_path / "step-00000040" / "trainer.json").write_text('{"step": 40}')
    with caplog.at_level("WARNING"):
        assert [p.name for p in valid_checkpoints(tmp_path)] == ["step-00000020"]
    assert "step-00000040: no COMPLETE marker" in caplog.text
    assert "step-00000030: file" in caplog.text
    fresh = build_model(ModelSpec(), DIGITS_IMG)
    fresh_opt = torch.optim.Adam(fresh.parameters(), lr=1e-3)
    state = Checkpointer(tmp_path, 2, world_of_one()).resume(fresh, fresh_opt)
    assert state is not None and state["step"] == 20 and state["batchInEpoch"] == 20
    for k, v in snapshots[20].items():
        torch.testing.assert_close(fresh.state_dict()[k], v)
    assert int(next(iter(fresh_opt.state.values()))["step"]) == 2
    marker = json.loads((tmp_path / "step-00000020" / MARKER).read_text())
    assert marker["step"] == 20 and "trainer.json" in marker["files"]


def test_no_checkpoint_means_a_fresh_start(tmp_path: Path) -> None:
    model = build_model(ModelSpec(), DIGITS_IMG)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    assert Checkpointer(tmp_path / "none", 2, world_of_one()).resume(model, opt) is None


# ---------------------------------------------------------------------------------------------- config
def test_config_errors_name_the_field(tmp_path: Path) -> None:
    with pytest.raises(PermanentError, match=r"model.architecture: .*'mamba'"):
        parse_config({"model": {"architecture": "mamba"}})
    with pytest.raises(PermanentError, match="hyperparameters.batchSze|batchSze"):
        parse_config({"hyperparameters": {"batchSze": 3}})
    with pytest.raises(PermanentError, match="no trainer config"):
        load_config(environ={})
    f = tmp_path / "c.yaml"
    f.write_text("jobName: x\nhyperparameters: {epochs: 2}\n")
    assert load_config(str(f)).hyperparameters.epochs == 2
    assert load_config(environ={"AIAAS_TRAINER_CONFIG": '{"jobName": "y"}'}).job_name == "y"
    assert load_config(environ={"AIAAS_TRAINER_CONFIG_FILE": str(f)}).job_name == "x"


def test_check_config_against_the_world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = TrainerConfig.model_validate({"parallelism": {"data": 2, "model": 2}})
    with pytest.raises(PermanentError, match=r"= 4, but the job has 2 processes"):
        check_config(cfg, 2)
    check_config(cfg, 4)
    with pytest.raises(PermanentError, match="divisible by parallelism.data"):
        check_config(TrainerConfig.model_validate({"parallelism": {"data": 3}, "hyperparameters": {"batchSize": 32}}), 3)
    with pytest.raises(PermanentError, match="dataset.path is required"):
        check_config(TrainerConfig.model_validate({"dataset": {"kind": "text"}}), 1)
    with pytest.raises(PermanentError, match="cnn cannot read the text"):
        check_config(TrainerConfig.model_validate({"dataset": {"kind": "text", "path": str(tmp_path)}}), 1)
    monkeypatch.setenv("PET_NNODES", "1:3")  # elastic: the data degree follows the world
    elastic = TrainerConfig.model_validate({"parallelism": {"data": 3}, "hyperparameters": {"batchSize": 12}})
    check_config(elastic, 2)
    assert elastic.parallelism.data == 2
    # grown to a world the global batch does not split over: it trains on with the nearest smaller global batch
    grown = TrainerConfig.model_validate({"hyperparameters": {"batchSize": 64}})
    check_config(grown, 3)
    assert (grown.parallelism.data, grown.hyperparameters.batch_size) == (3, 63)


# ------------------------------------------------------------------------------------------------ metrics
def test_metrics_endpoint() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    m = TrainerMetrics("job-a", 3, port)
    m.step.set(7)
    m.checkpointed(1.0)
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert f'{names.TRAINER_STEP}{{job="job-a",rank="3"}} 7.0' in text
    for name in (names.TRAINER_LOSS, names.TRAINER_ACCURACY, names.TRAINER_SAMPLES_PER_SECOND,
                 names.TRAINER_TOTAL_STEPS, names.TRAINER_EPOCH, names.TRAINER_LAST_CHECKPOINT,
                 names.TRAINER_CHECKPOINT_AGE):
        assert name in text
    TrainerMetrics("job-a", 4, port)  # a taken port is reported, not fatal


def _write_idx(path: Path, arr: np.ndarray) -> None:
    import gzip
    import struct

    header = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype("uint8").tobytes())


def test_mnist_from_idx_and_npz(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (60, 28, 28)), rng.integers(0, 10, 60)
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", x)
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", y)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", x[:20])
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", y[:20])
    d = load_dataset(DatasetSpec(kind="mnist", path=str(tmp_path)), "cnn")
    assert d.train_x.shape == (60, 1, 28, 28) and d.eval_x.shape == (20, 1, 28, 28)  # t10k is the eval split
    assert torch.equal(d.train_y, torch.from_numpy(y))
    model = build_model(ModelSpec(), d.inputs)
    assert "pad" in dict(model.named_children())  # 28x28 is zero-padded to LeNet's 32x32
    assert model(d.train_x[:2]).shape == (2, 10)
    np.savez(tmp_path / "mnist.npz", x_train=x, y_train=y)
    d2 = load_dataset(DatasetSpec(kind="mnist", path=str(tmp_path / "mnist.npz"), eval_fraction=0.25), "rnn")
    assert d2.train_x.shape == (45, 28, 28) and len(d2.eval_x) == 15
    (tmp_path / "bad.npz").write_bytes(b"")
    np.savez(tmp_path / "bad.npz", images=x)
    with pytest.raises(PermanentError, match="expected x_train/y_train"):
        load_dataset(DatasetSpec(kind="mnist", path=str(tmp_path / "bad.npz")), "cnn")


@pytest.mark.parametrize("content", [
    b"\x00\x00\x08",  # shorter than the 4-byte magic
    b"\x00\x00\x08\x03\x00\x00\x00\x3c",  # 3 dimensions announced, 1 given
    b"\x00\x00\x08\x03\x00\x00\x00\x3c\x00\x00\x00\x1c\x00\x00\x00\x1c\x00",  # header whole, body cut
    b"\x1f\x8b\x08\x00",  # a cut gzip stream (the name ends in .gz)
])
def test_truncated_mnist_idx_is_permanent(tmp_path: Path, content: bytes) -> None:
    """A truncated file stays truncated however often the pod restarts: DataInvalid, exit 78, never a retry."""
    rng = np.random.default_rng(0)
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", rng.integers(0, 10, 60))
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(
        content if content.startswith(b"\x1f\x8b") else __import__("gzip").compress(content))
    with pytest.raises(PermanentError, match="truncated|cannot read|not an unsigned-byte") as e:
        load_dataset(DatasetSpec(kind="mnist", path=str(tmp_path)), "cnn")
    assert e.value.reason == "DataInvalid"
    (tmp_path / "cut.npz").write_bytes(b"PK\x03\x04" + b"\0" * 10)
    with pytest.raises(PermanentError, match="as an .npz archive"):
        load_dataset(DatasetSpec(kind="mnist", path=str(tmp_path / "cut.npz")), "cnn")


def test_learning_rate_schedule_is_a_pure_function_of_the_step() -> None:
    from aiaas.contract.config import Hyperparameters, TrainerConfig
    from aiaas.trainer.train import learning_rate_at

    cfg = TrainerConfig(hyperparameters=Hyperparameters(learning_rate=0.1, warmup_steps=10))
    lrs = [learning_rate_at(s, 110, cfg) for s in range(110)]
    assert lrs[0] == pytest.approx(0.01) and lrs[9] == pytest.approx(0.1)  # linear warm-up
    assert lrs[10] == pytest.approx(0.1)  # cosine starts at the base rate...
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))  # ...decays monotonically...
    assert lrs[-1] == pytest.approx(0.01, rel=0.01)  # ...to a tenth of it
    assert learning_rate_at(57, 110, cfg) == lrs[57]  # resuming at any step gives the same rate
    constant = TrainerConfig(hyperparameters=Hyperparameters(learning_rate=0.1, lr_schedule="constant"))
    assert {learning_rate_at(s, 50, constant) for s in range(50)} == {0.1}
