"""The networks: LeNet-5 and the recurrent sequence classifiers (RNN, LSTM, GRU).

Every network is an :class:`torch.nn.Sequential` of *named* layers, so that

* the state-dict keys are the classic ones (``conv1.weight``, ``fc3.bias``, ``rnn0.weight_ih_l0``, ...),
* a pipeline stage is just a contiguous slice of the layers (:func:`split_stages`) whose state-dict keys are a
  subset of the full model's, so gathering the stages back into one model is a dict union,
* the exported artifact is self-contained: the input normalisation is a layer (:class:`Normalize`, two
  buffers), so a model server feeds raw inputs (digits pixels 0..16, MNIST pixels 0..255, token ids).

Inputs (what :class:`InputSpec` describes and the artifact manifest records):

* ``image``:    float ``[batch, channels, height, width]``          (cnn)
* ``sequence``: float ``[batch, steps, features]``, e.g. digits as 8 rows of 8 pixels  (rnn/lstm/gru)
* ``tokens``:   int64 ``[batch, steps]`` of character ids                             (rnn/lstm/gru)

All networks return logits ``[batch, num_classes]``.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from aiaas.contract.config import Architecture, ModelSpec

INPUT_IMAGE = "image"
INPUT_SEQUENCE = "sequence"
INPUT_TOKENS = "tokens"

LENET_SIZE = 32  # LeNet-5 was designed for 32x32 inputs; fc1 sees 16 x 5 x 5


@dataclass(frozen=True)
class InputSpec:
    """What one sample looks like; everything :func:`build_model` needs besides the :class:`ModelSpec`.

    ``shape`` is the per-sample shape (no batch dimension); ``mean``/``std`` are the normalisation the model
    applies to raw inputs; ``vocab_size`` is set for ``tokens`` inputs.
    """

    kind: str
    shape: tuple[int, ...]
    num_classes: int
    mean: float = 0.0
    std: float = 1.0
    vocab_size: int | None = None
    labels: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return {
            "kind": d["kind"],
            "shape": d["shape"],
            "numClasses": d["num_classes"],
            "mean": d["mean"],
            "std": d["std"],
            "vocabSize": d["vocab_size"],
            "labels": d["labels"],
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> InputSpec:
        return cls(
            kind=d["kind"],
            shape=tuple(int(s) for s in d["shape"]),
            num_classes=int(d["numClasses"]),
            mean=float(d.get("mean", 0.0)),
            std=float(d.get("std", 1.0)),
            vocab_size=d.get("vocabSize"),
            labels=list(d.get("labels") or []),
        )


class Normalize(nn.Module):
    """``(x - mean) / std`` with the statistics of the training split stored as buffers (exported with the
    weights, so the served model takes raw inputs)."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: float, std: float) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(float(mean)))
        self.register_buffer("std", torch.tensor(float(std) if std > 0 else 1.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean) / self.std


class Resize(nn.Module):
    """Bilinear resize of small images to LeNet-5's 32x32 (8x8 digits are upsampled 4x)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)

    def extra_repr(self) -> str:
        return f"size={self.size}"


class LeNet5(nn.Sequential):
    """LeNet-5 as in the classic PyTorch CNN sketch::

        x = max_pool2d(relu(conv1(x)), 2)   # conv1 = nn.Conv2d(1, 6, 5)
        x = max_pool2d(relu(conv2(x)), 2)   # conv2 = nn.Conv2d(6, 16, 5)
        x = flatten(x, 1)                   # 16 * 5 * 5
        x = relu(fc1(x)); x = relu(fc2(x))  # fc1 = nn.Linear(16 * 5 * 5, 120); fc2 = nn.Linear(120, 84)
        return fc3(x)                       # fc3 = nn.Linear(84, num_classes)

    written as named layers so it can be cut into pipeline stages. The input is brought to 32x32 first:
    28x28 MNIST is zero-padded by 2 (as in the original paper's setup), any other size (8x8 digits) is
    bilinearly upsampled, which trains better on digits than padding 8x8 into a 32x32 canvas.
    """

    def __init__(self, in_channels: int = 1, image_size: int = LENET_SIZE, num_classes: int = 10,
                 mean: float = 0.0, std: float = 1.0) -> None:
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        layers["norm"] = Normalize(mean, std)
        if image_size == 28:
            layers["pad"] = nn.ZeroPad2d(2)
        elif image_size != LENET_SIZE:
            layers["resize"] = Resize(LENET_SIZE)
        layers["conv1"] = nn.Conv2d(in_channels, 6, 5)
        layers["relu1"] = nn.ReLU()
        layers["pool1"] = nn.MaxPool2d(2)
        layers["conv2"] = nn.Conv2d(6, 16, 5)
        layers["relu2"] = nn.ReLU()
        layers["pool2"] = nn.MaxPool2d(2)
        layers["flatten"] = nn.Flatten(1)
        layers["fc1"] = nn.Linear(16 * 5 * 5, 120)
        layers["relu3"] = nn.ReLU()
        layers["fc2"] = nn.Linear(120, 84)
        layers["relu4"] = nn.ReLU()
        layers["fc3"] = nn.Linear(84, num_classes)
        super().__init__(layers)


class RNNLayer(nn.RNN):
    """One ``nn.RNN`` layer (batch first, tanh) that returns the output sequence ``[batch, steps, hidden]``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(x)[0]


class LSTMLayer(nn.LSTM):
    """One ``nn.LSTM`` layer (batch first) that returns the output sequence."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(x)[0]


class GRULayer(nn.GRU):
    """One ``nn.GRU`` layer (batch first) that returns the output sequence."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(x)[0]


RECURRENT_LAYERS: dict[str, type[nn.Module]] = {"rnn": RNNLayer, "lstm": LSTMLayer, "gru": GRULayer}


class LastStep(nn.Module):
    """``output[:, -1]``: the last hidden state of the top layer."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, -1]


class SequenceClassifier(nn.Sequential):
    """The classic ``nn.RNN`` classifier: recurrent layers over the sequence, last hidden state -> linear.

    ``num_layers`` stacked layers are separate modules (``rnn0``, ``rnn1``, ...) — mathematically the same
    as ``nn.RNN(num_layers=n, dropout=p)`` — so a pipeline can cut between them. ``cell`` is rnn, lstm or gru.
    Token inputs (character ids) go through an embedding of ``hidden_size`` first.
    """

    def __init__(self, cell: str, input_size: int, hidden_size: int, num_layers: int, num_classes: int,
                 dropout: float = 0.0, vocab_size: int | None = None, mean: float = 0.0,
                 std: float = 1.0) -> None:
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        if vocab_size is not None:
            layers["embed"] = nn.Embedding(vocab_size, hidden_size)
            size = hidden_size
        else:
            layers["norm"] = Normalize(mean, std)
            size = input_size
        layer_cls = RECURRENT_LAYERS[cell]
        for i in range(num_layers):
            layers[f"{cell}{i}"] = layer_cls(size, hidden_size, batch_first=True)
            size = hidden_size
            if dropout > 0 and i < num_layers - 1:
                layers[f"dropout{i}"] = nn.Dropout(dropout)
        layers["last"] = LastStep()
        if dropout > 0:
            layers["dropout"] = nn.Dropout(dropout)
        layers["fc"] = nn.Linear(hidden_size, num_classes)
        super().__init__(layers)


def input_spec_error(spec: ModelSpec, inputs: InputSpec) -> str | None:
    """Why ``spec`` cannot consume ``inputs`` (None when it can)."""
    arch = Architecture(spec.architecture).value
    if arch == "cnn" and inputs.kind != INPUT_IMAGE:
        return f"model architecture cnn needs image inputs, but the dataset gives {inputs.kind} inputs " \
               "(use rnn, lstm or gru for text)"
    if arch != "cnn" and inputs.kind == INPUT_IMAGE:
        return f"model architecture {arch} needs sequence inputs, but got images"
    return None


def build_model(spec: ModelSpec, inputs: InputSpec) -> nn.Module:
    """The network for ``spec`` sized for ``inputs`` (random init from the current torch RNG)."""
    problem = input_spec_error(spec, inputs)
    if problem:
        raise ValueError(problem)
    arch = Architecture(spec.architecture).value
    if arch == "cnn":
        channels, height, width = inputs.shape
        if height != width:
            raise ValueError(f"LeNet-5 needs square images, got {height}x{width}")
        return LeNet5(channels, height, inputs.num_classes, inputs.mean, inputs.std)
    input_size = inputs.shape[-1] if inputs.kind == INPUT_SEQUENCE else 0
    return SequenceClassifier(
        arch, input_size, spec.hidden_size, spec.num_layers, inputs.num_classes, spec.dropout,
        vocab_size=inputs.vocab_size if inputs.kind == INPUT_TOKENS else None, mean=inputs.mean, std=inputs.std,
    )


def _has_params(m: nn.Module) -> bool:
    return any(True for _ in m.parameters(recurse=True))


def pipeline_units(model: nn.Sequential) -> list[list[str]]:
    """Group the layers into the units a pipeline may not cut through: each parameterised layer together
    with the parameter-free layers that follow it (the leading parameter-free layers join the first unit)."""
    units: list[list[str]] = []
    pending: list[str] = []
    pending_has_params = False
    for name, child in model.named_children():
        if _has_params(child):
            if pending_has_params:
                units.append(pending)
                pending = []
            pending_has_params = True
        pending.append(name)
    units.append(pending)
    return units


def _param_layer(model: nn.Sequential, unit: list[str]) -> str:
    return next((n for n in unit if _has_params(model.get_submodule(n))), unit[0])


def max_stages(model: nn.Sequential) -> int:
    """The most pipeline stages ``model`` can be cut into."""
    return len(pipeline_units(model))


def split_stages(model: nn.Sequential, num_stages: int) -> list[nn.Sequential]:
    """Cut ``model`` into ``num_stages`` contiguous stages with (nearly) equal numbers of parameterised layers.

    Each stage keeps the original layer names, so its ``state_dict`` keys are those of the full model.
    The stages share the modules (and parameters) of ``model``.
    """
    units = pipeline_units(model)
    if not 1 <= num_stages <= len(units):
        raise ValueError(
            f"cannot split the model into {num_stages} pipeline stages: it has {len(units)} layers with "
            f"parameters ({', '.join(_param_layer(model, u) for u in units)}); "
            f"use parallelism.model <= {len(units)}"
        )
    stages = []
    for s in range(num_stages):
        lo, hi = s * len(units) // num_stages, (s + 1) * len(units) // num_stages
        names = [n for u in units[lo:hi] for n in u]
        stages.append(nn.Sequential(OrderedDict((n, model.get_submodule(n)) for n in names)))
    return stages


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
