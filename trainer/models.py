"""The networks: LeNet-5, the recurrent sequence classifiers (RNN, LSTM, GRU), a decoder-only Transformer
language model and ResNet-18.

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

The classifiers return logits ``[batch, num_classes]``; the language model returns next-token logits at every
position, ``[batch, steps, vocab]`` (its labels are the inputs shifted by one).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from aiaas.contract.config import Architecture, ModelSpec, Preset

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


def input_layers(image_size: int, mean: float, std: float) -> OrderedDict[str, nn.Module]:
    """The first layers of the 32x32 image networks: ``norm``, then ``pad`` (28x28 MNIST, by 2) or ``resize``
    (any other size) to 32x32."""
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    layers["norm"] = Normalize(mean, std)
    if image_size == 28:
        layers["pad"] = nn.ZeroPad2d(2)
    elif image_size != LENET_SIZE:
        layers["resize"] = Resize(LENET_SIZE)
    return layers


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
        layers = input_layers(image_size, mean, std)
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


# ------------------------------------------------------------------------------------------ transformer
# (width, blocks, heads) of each language-model preset
LM_PRESETS = {Preset.lm_1m: (128, 5, 4), Preset.lm_10m: (384, 6, 6), Preset.lm_50m: (512, 16, 8)}


class Checkpointed(nn.Module):
    """A layer whose activations can be recomputed in the backward pass (activation checkpointing): set
    ``checkpoint_activations`` and training-mode forwards keep only the layer's input."""

    checkpoint_activations = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.checkpoint_activations and self.training and torch.is_grad_enabled():
            out: torch.Tensor = checkpoint(self.compute, x, use_reentrant=False)
            return out
        return self.compute(x)

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class TokenEmbedding(nn.Module):
    """Token ids ``[batch, steps]`` -> token + learned position embeddings ``[batch, steps, width]``."""

    def __init__(self, vocab_size: int, context: int, width: int, dropout: float) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab_size, width)
        self.positions = nn.Embedding(context, width)
        self.drop = nn.Dropout(dropout)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(ids.shape[1], device=ids.device)
        return self.drop(self.tokens(ids) + self.positions(pos))


class Block(Checkpointed):
    """A pre-norm decoder block: ``x + attn(ln1(x))`` (causal, scaled-dot-product), then ``x + mlp(ln2(x))``."""

    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ln2 = nn.LayerNorm(width)
        self.fc = nn.Linear(width, 4 * width)
        self.out = nn.Linear(4 * width, width)
        self.dropout = dropout

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        p = self.dropout if self.training else 0.0
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)
        x = x + F.dropout(self.proj(a.transpose(1, 2).reshape(b, t, c)), p, self.training)
        return x + F.dropout(self.out(F.gelu(self.fc(self.ln2(x)))), p, self.training)


class TransformerLM(nn.Sequential):
    """A decoder-only (GPT-style) language model: ``embed``, ``block0`` .. ``block{n-1}``, ``norm``, ``head``.

    Every block is a pipeline unit and an FSDP unit; the head is not tied to the embedding, so the two may
    sit on different pipeline stages.
    """

    def __init__(self, vocab_size: int, context: int, width: int, blocks: int, heads: int,
                 dropout: float = 0.0) -> None:
        if width % heads:
            raise ValueError(f"model.hiddenSize ({width}) must be divisible by model.numHeads ({heads})")
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        layers["embed"] = TokenEmbedding(vocab_size, context, width, dropout)
        for i in range(blocks):
            layers[f"block{i}"] = Block(width, heads, dropout)
        layers["norm"] = nn.LayerNorm(width)
        layers["head"] = nn.Linear(width, vocab_size, bias=False)
        super().__init__(layers)
        for name, param in self.named_parameters():  # GPT-2's initialisation
            if name.endswith("weight") and param.dim() == 2:
                std = 0.02 / math.sqrt(2 * blocks) if name.endswith(("proj.weight", "out.weight")) else 0.02
                nn.init.normal_(param, 0.0, std)
            elif name.endswith("bias"):
                nn.init.zeros_(param)


def transformer_dims(spec: ModelSpec) -> tuple[int, int, int]:
    """(width, blocks, heads) of a transformer ``spec``: its preset's, else its own fields."""
    if spec.preset is not None:
        if Preset(spec.preset) not in LM_PRESETS:
            raise ValueError(f"model.preset {Preset(spec.preset).value} is not a transformer preset; use one of "
                             f"{', '.join(p.value for p in LM_PRESETS)}")
        return LM_PRESETS[Preset(spec.preset)]
    return spec.hidden_size, spec.num_layers, spec.num_heads


# --------------------------------------------------------------------------------------------------- resnet
RESNET_PRESETS = {Preset.resnet18: 64, Preset.resnet18_small: 16}  # width of the first stage


class BasicBlock(Checkpointed):
    """ResNet's basic block: two 3x3 conv-BN layers and the identity (or a 1x1 projection) shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def compute(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class Stem(nn.Module):
    """ResNet-18's stem for 32x32 inputs (CIFAR style): one 3x3 conv-BN-ReLU, no max-pool."""

    def __init__(self, c_in: int, width: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, width, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class ResNet18(nn.Sequential):
    """ResNet-18 adapted to 32x32 inputs: ``norm`` (+ ``resize``/``pad`` to 32x32), ``stem``, eight basic blocks
    ``layer1_0`` .. ``layer4_1`` (widths w, 2w, 4w, 8w; stride 2 at the first block of stages 2-4),
    global average pooling, ``fc``. ``width`` 64 is the classic network."""

    def __init__(self, in_channels: int, image_size: int, num_classes: int, width: int = 64,
                 mean: float = 0.0, std: float = 1.0) -> None:
        layers = input_layers(image_size, mean, std)
        layers["stem"] = Stem(in_channels, width)
        c = width
        for stage in range(4):
            c_out = width * 2 ** stage
            for i in range(2):
                layers[f"layer{stage + 1}_{i}"] = BasicBlock(c, c_out, 2 if stage > 0 and i == 0 else 1)
                c = c_out
        layers["pool"] = nn.AdaptiveAvgPool2d(1)
        layers["flatten"] = nn.Flatten(1)
        layers["fc"] = nn.Linear(c, num_classes)
        super().__init__(layers)


def resnet_width(spec: ModelSpec) -> int:
    if spec.preset is None:
        return RESNET_PRESETS[Preset.resnet18]
    if Preset(spec.preset) not in RESNET_PRESETS:
        raise ValueError(f"model.preset {Preset(spec.preset).value} is not a resnet preset; use one of "
                         f"{', '.join(p.value for p in RESNET_PRESETS)}")
    return RESNET_PRESETS[Preset(spec.preset)]


def set_activation_checkpointing(model: nn.Module, enabled: bool) -> int:
    """Turn activation checkpointing on or off for every checkpointable layer; returns how many there are."""
    layers = [m for m in model.modules() if isinstance(m, Checkpointed)]
    for m in layers:
        m.checkpoint_activations = enabled
    return len(layers)


# ------------------------------------------------------------------------------------------------ building
IMAGE_MODELS = ("cnn", "resnet")


def input_spec_error(spec: ModelSpec, inputs: InputSpec) -> str | None:
    """Why ``spec`` cannot consume ``inputs`` (None when it can)."""
    arch = Architecture(spec.architecture).value
    if arch in IMAGE_MODELS and inputs.kind != INPUT_IMAGE:
        return f"model architecture {arch} needs image inputs, but the dataset gives {inputs.kind} inputs " \
               "(use rnn, lstm, gru or transformer for text)"
    if arch not in IMAGE_MODELS and inputs.kind == INPUT_IMAGE:
        return f"model architecture {arch} needs sequence inputs, but got images"
    if arch == "transformer" and inputs.kind != INPUT_TOKENS:
        return "model architecture transformer is a language model: it needs the text dataset (dataset.kind text)"
    return None


def build_model(spec: ModelSpec, inputs: InputSpec) -> nn.Module:
    """The network for ``spec`` sized for ``inputs`` (random init from the current torch RNG)."""
    problem = input_spec_error(spec, inputs)
    if problem:
        raise ValueError(problem)
    arch = Architecture(spec.architecture).value
    if arch in IMAGE_MODELS:
        channels, height, width = inputs.shape
        if height != width:
            raise ValueError(f"{arch} needs square images, got {height}x{width}")
        if arch == "resnet":
            return ResNet18(channels, height, inputs.num_classes, resnet_width(spec), inputs.mean, inputs.std)
        return LeNet5(channels, height, inputs.num_classes, inputs.mean, inputs.std)
    if arch == "transformer":
        assert inputs.vocab_size is not None
        width, blocks, heads = transformer_dims(spec)
        return TransformerLM(inputs.vocab_size, inputs.shape[0], width, blocks, heads, spec.dropout)
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
