"""Datasets that need no network, and the sharded loaders over them.

* ``digits``: scikit-learn's bundled 8x8 handwritten digits (1797 samples, pixels 0..16) — images
  ``[1, 8, 8]`` for the CNN, sequences of 8 rows x 8 pixels for the recurrent models;
* ``mnist``: IDX files (``train-images-idx3-ubyte[.gz]``, ``train-labels-idx1-ubyte[.gz]``, optional
  ``t10k-*`` used as the eval split) in a directory, or an ``.npz`` with ``x_train``/``y_train``
  (+ ``x_test``/``y_test``), as Keras ships it;
* ``text``: a character-level text file; each sample is ``seqLength`` characters, the label the next one
  (for the transformer language model: the ``seqLength`` characters shifted by one, a label per position);
  the last ``evalFraction`` of the text is held out;
* ``synthetic``: Gaussian inputs labelled by a fixed random linear teacher, for benchmarks.

The whole dataset sits in memory as tensors; a batch is one fancy-indexing operation.
:class:`ShardedLoader` splits every *global* batch across the data-parallel ranks with a
:class:`~torch.utils.data.DistributedSampler` (``set_epoch`` per epoch, ``drop_last``), so ``dp`` ranks
together see exactly the samples a single process would see in the same step, and a restarted process can
resume in the middle of an epoch from (epoch, batch index).
"""

from __future__ import annotations

import gzip
import math
import struct
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DistributedSampler

from aiaas.contract.config import Architecture, DatasetKind, DatasetSpec

from .errors import PermanentError
from .models import IMAGE_MODELS, INPUT_IMAGE, INPUT_SEQUENCE, INPUT_TOKENS, InputSpec

SPLIT_SEED = 1234  # the train/eval split does not change with the training seed


@dataclass
class Dataset:
    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    eval_x: torch.Tensor
    eval_y: torch.Tensor
    inputs: InputSpec

    def __post_init__(self) -> None:
        if len(self.train_x) == 0 or len(self.eval_x) == 0:
            raise PermanentError(f"dataset {self.name} has an empty train or eval split "
                                 f"({len(self.train_x)} / {len(self.eval_x)} samples)", reason="DataInvalid")


def _split(n: int, eval_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_eval = max(1, int(round(n * eval_fraction)))
    return perm[n_eval:], perm[:n_eval]


def _stats(x: torch.Tensor) -> tuple[float, float]:
    xf = x.float()
    return float(xf.mean()), float(xf.std())


def _images(name: str, x: torch.Tensor, y: torch.Tensor, ex: torch.Tensor, ey: torch.Tensor,
            arch: Architecture, num_classes: int) -> Dataset:
    """``x``: [N, H, W] raw pixels; shaped for the architecture."""
    mean, std = _stats(x)
    labels = [str(i) for i in range(num_classes)]
    if arch.value in IMAGE_MODELS:
        shape: tuple[int, ...] = (1, x.shape[1], x.shape[2])
        kind = INPUT_IMAGE
        x, ex = x.unsqueeze(1), ex.unsqueeze(1)
    else:
        shape, kind = (x.shape[1], x.shape[2]), INPUT_SEQUENCE
    return Dataset(name, x, y.long(), ex, ey.long(),
                   InputSpec(kind, shape, num_classes, mean=mean, std=std, labels=labels))


def load_digits(spec: DatasetSpec, arch: Architecture) -> Dataset:
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    x = torch.tensor(d.images, dtype=torch.float32)  # [1797, 8, 8], 0..16
    y = torch.tensor(d.target, dtype=torch.int64)
    tr, ev = _split(len(x), spec.eval_fraction)
    return _images("digits", x[tr], y[tr], x[ev], y[ev], arch, 10)


def _read_idx(path: Path) -> np.ndarray:
    """An unsigned-byte IDX array; anything malformed (a short header or body, a bad gzip stream) is a
    :class:`PermanentError`: re-reading the same file cannot fix it."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError; a cut gzip stream an EOFError
        raise PermanentError(f"cannot read {path}: {e}", reason="DataInvalid") from e
    if len(data) < 4:
        raise PermanentError(f"{path} is truncated: {len(data)} bytes, shorter than the 4-byte IDX header",
                             reason="DataInvalid")
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08 or ndim == 0:
        raise PermanentError(f"{path} is not an unsigned-byte IDX file", reason="DataInvalid")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise PermanentError(f"{path} is truncated: its IDX header needs {header} bytes for {ndim} dimensions, "
                             f"the file has {len(data)}", reason="DataInvalid")
    dims = struct.unpack(">" + "I" * ndim, data[4:header])
    arr = np.frombuffer(bytearray(data), dtype=np.uint8, offset=header)  # writable for torch
    if arr.size != math.prod(dims):
        raise PermanentError(f"{path} is truncated: expected {math.prod(dims)} values, found {arr.size}",
                             reason="DataInvalid")
    return arr.reshape(dims)


def _find(root: Path, stem: str) -> Path | None:
    for cand in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (root / cand).exists():
            return root / cand
    return None


def load_mnist(spec: DatasetSpec, arch: Architecture) -> Dataset:
    assert spec.path
    p = Path(spec.path)
    x_test = y_test = None
    if p.is_file() and p.suffix == ".npz":
        try:
            with np.load(p) as z:
                keys = set(z.files)
                xk, yk = ("x_train", "y_train") if "x_train" in keys else ("x", "y")
                if xk not in keys or yk not in keys:
                    raise PermanentError(f"{p} has arrays {sorted(keys)}; expected x_train/y_train (and "
                                         "optionally x_test/y_test)", reason="DataInvalid")
                x_train, y_train = z[xk], z[yk]
                if "x_test" in keys and "y_test" in keys:
                    x_test, y_test = z["x_test"], z["y_test"]
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:  # a cut or corrupt archive
            raise PermanentError(f"cannot read {p} as an .npz archive: {e}", reason="DataInvalid") from e
    elif p.is_dir():
        xi, yi = _find(p, "train-images-idx3-ubyte"), _find(p, "train-labels-idx1-ubyte")
        if not xi or not yi:
            raise PermanentError(f"{p} has no train-images-idx3-ubyte[.gz] / train-labels-idx1-ubyte[.gz]",
                                 reason="DataNotFound")
        x_train, y_train = _read_idx(xi), _read_idx(yi)
        xt, yt = _find(p, "t10k-images-idx3-ubyte"), _find(p, "t10k-labels-idx1-ubyte")
        if xt and yt:
            x_test, y_test = _read_idx(xt), _read_idx(yt)
    else:
        raise PermanentError(f"dataset.path {p} must be a directory of IDX files or an .npz file",
                             reason="DataNotFound")
    if x_train.ndim != 3 or len(x_train) != len(y_train):
        raise PermanentError(f"MNIST images must be [N, H, W] with N labels; got {x_train.shape} and "
                             f"{y_train.shape}", reason="DataInvalid")
    x = torch.from_numpy(np.ascontiguousarray(x_train)).float()
    y = torch.from_numpy(np.ascontiguousarray(y_train).astype(np.int64))
    if x_test is None or y_test is None:
        tr, ev = _split(len(x), spec.eval_fraction)
        x, ex, y, ey = x[tr], x[ev], y[tr], y[ev]
    else:
        ex = torch.from_numpy(np.ascontiguousarray(x_test)).float()
        ey = torch.from_numpy(np.ascontiguousarray(y_test).astype(np.int64))
    num_classes = int(max(int(y.max()), int(ey.max())) + 1)
    return _images("mnist", x, y, ex, ey, arch, max(num_classes, 10))


def load_text(spec: DatasetSpec, arch: Architecture) -> Dataset:
    assert spec.path
    p = Path(spec.path)
    try:
        text = p.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise PermanentError(f"cannot read text dataset {p}: {e}", reason="DataNotFound") from e
    vocab = sorted(set(text))
    if len(text) < 2 * (spec.seq_length + 1):
        raise PermanentError(f"text dataset {p} has {len(text)} characters; it needs at least "
                             f"{2 * (spec.seq_length + 1)} for dataset.seqLength {spec.seq_length}",
                             reason="DataInvalid")
    index = {c: i for i, c in enumerate(vocab)}
    ids = torch.tensor([index[c] for c in text], dtype=torch.int64)
    n_eval_chars = max(spec.seq_length + 1, int(len(ids) * spec.eval_fraction))
    train_ids, eval_ids = ids[: len(ids) - n_eval_chars], ids[len(ids) - n_eval_chars:]

    def windows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = t.unfold(0, spec.seq_length, 1)[:-1]  # a view: [n - L, L]
        if arch == Architecture.transformer:  # next character at every position: [n - L, L]
            return x, t[1:].unfold(0, spec.seq_length, 1)
        return x, t[spec.seq_length:]

    x, y = windows(train_ids)
    ex, ey = windows(eval_ids)
    inputs = InputSpec(INPUT_TOKENS, (spec.seq_length,), len(vocab), vocab_size=len(vocab), labels=vocab)
    return Dataset("text", x, y, ex, ey, inputs)


def load_synthetic(spec: DatasetSpec, arch: Architecture, num_classes: int = 10) -> Dataset:
    g = torch.Generator().manual_seed(SPLIT_SEED)
    shape: tuple[int, ...] = (1, 32, 32) if arch.value in IMAGE_MODELS else (16, 16)
    x = torch.randn(spec.num_samples, *shape, generator=g)
    teacher = torch.randn(math.prod(shape), num_classes, generator=g)
    y = (x.flatten(1) @ teacher).argmax(dim=1)
    tr, ev = _split(len(x), spec.eval_fraction)
    kind = INPUT_IMAGE if arch.value in IMAGE_MODELS else INPUT_SEQUENCE
    inputs = InputSpec(kind, shape, num_classes, labels=[str(i) for i in range(num_classes)])
    return Dataset("synthetic", x[tr], y[tr], x[ev], y[ev], inputs)


def load_dataset(spec: DatasetSpec, arch: Architecture | str) -> Dataset:
    """The dataset ``spec`` describes, shaped for ``arch``."""
    arch = Architecture(arch)
    kind = DatasetKind(spec.kind)
    if kind == DatasetKind.digits:
        return load_digits(spec, arch)
    if kind == DatasetKind.mnist:
        return load_mnist(spec, arch)
    if kind == DatasetKind.text:
        if arch.value in IMAGE_MODELS:
            raise PermanentError(f"model.architecture {arch.value} cannot read the text dataset; use rnn, lstm, "
                                 "gru or transformer")
        return load_text(spec, arch)
    return load_synthetic(spec, arch)


class ShardedLoader:
    """Global batches of ``global_batch`` samples, each split into ``dp_size`` local batches.

    ``epoch(e, start)`` yields this rank's local batches ``start, start+1, ...`` of epoch ``e``; the order
    depends only on (seed, epoch), never on the number of ranks. The last incomplete global batch is dropped.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, global_batch: int, dp_size: int, dp_rank: int,
                 seed: int) -> None:
        if global_batch > len(x):
            raise PermanentError(f"hyperparameters.batchSize ({global_batch}) is larger than the training split "
                                 f"({len(x)} samples)", reason="InvalidConfig")
        self.x, self.y = x, y
        self.global_batch = global_batch
        self.local_batch = global_batch // dp_size
        self.steps_per_epoch = len(x) // global_batch
        self.sampler: DistributedSampler[int] = DistributedSampler(
            range(len(x)),  # type: ignore[arg-type]  # only its length is used
            num_replicas=dp_size, rank=dp_rank, shuffle=True, seed=seed, drop_last=True)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.sampler.set_epoch(epoch)
        idx = torch.tensor(list(iter(self.sampler)), dtype=torch.int64)
        for b in range(start, self.steps_per_epoch):
            sl = idx[b * self.local_batch:(b + 1) * self.local_batch]
            yield self.x[sl], self.y[sl]


def eval_batches(x: torch.Tensor, y: torch.Tensor, dp_size: int, dp_rank: int, batch: int
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """This rank's share of the eval split as (x, y, weight) batches; every rank gets the same number of
    batches of the same sizes (padding carries weight 0), so sharded models can run them in lockstep."""
    n = len(x)
    per_rank = math.ceil(n / dp_size)
    idx = torch.arange(dp_rank * per_rank, (dp_rank + 1) * per_rank)
    weight = (idx < n).float()
    idx = torch.where(idx < n, idx, torch.zeros_like(idx))
    for s in range(0, per_rank, batch):
        sl = idx[s:s + batch]
        yield x[sl], y[sl], weight[s:s + batch]
