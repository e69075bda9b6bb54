"""What a training process is told to do. The operator renders a :class:`TrainerConfig` from the TrainingJob's
spec into the pod's environment (``AIAAS_TRAINER_CONFIG``); the trainer parses it back. The building blocks
(model, dataset, hyper-parameters, parallelism, checkpoint policy) are also the TrainingJob API's own types,
so a field is described once and means the same on both sides."""

from __future__ import annotations

from enum import Enum

from pydantic import Field

from .base import Model
from .launch import ARTIFACT_DIR, CHECKPOINT_DIR, METRICS_PORT


class Architecture(str, Enum):
    cnn = "cnn"
    rnn = "rnn"
    lstm = "lstm"
    gru = "gru"
    transformer = "transformer"
    resnet = "resnet"


class Preset(str, Enum):
    """Named sizes; a preset sets the width, depth and heads (transformer) or the width (resnet)."""

    lm_1m = "lm-1m"  # transformer: width 128, 5 blocks, 4 heads (~1 M parameters)
    lm_10m = "lm-10m"  # transformer: width 384, 6 blocks, 6 heads (~10.6 M)
    lm_50m = "lm-50m"  # transformer: width 512, 16 blocks, 8 heads (~50 M)
    resnet18 = "resnet18"  # ResNet-18, widths 64-128-256-512 (~11 M)
    resnet18_small = "resnet18-small"  # ResNet-18, widths 16-32-64-128 (~0.7 M), for tests


class DatasetKind(str, Enum):
    digits = "digits"
    mnist = "mnist"
    text = "text"
    synthetic = "synthetic"


class OptimizerName(str, Enum):
    sgd = "sgd"
    adam = "adam"
    adamw = "adamw"


class LRSchedule(str, Enum):
    constant = "constant"
    cosine = "cosine"


class Strategy(str, Enum):
    ddp = "ddp"
    fsdp = "fsdp"


class Precision(str, Enum):
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"


class ModelSpec(Model):
    """Which network to train."""

    architecture: Architecture = Field(
        Architecture.cnn,
        description="Network to train: cnn (LeNet-5), rnn (nn.RNN sequence classifier), lstm, gru, transformer "
        "(decoder-only language model over the text dataset's characters) or resnet (ResNet-18 for images).",
    )
    preset: Preset | None = Field(
        None, description="A named size that sets hiddenSize/numLayers/numHeads (transformer: lm-1m, lm-10m, "
        "lm-50m) or the width (resnet: resnet18, resnet18-small).",
    )
    hidden_size: int = Field(
        64, ge=1, le=8192, description="Hidden state size of the rnn/lstm/gru layers; the width of a transformer."
    )
    num_layers: int = Field(
        1, ge=1, le=64, description="Number of stacked recurrent layers (rnn/lstm/gru) or transformer blocks."
    )
    num_heads: int = Field(4, ge=1, le=128, description="Attention heads of a transformer (divides hiddenSize).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout probability between layers.")


class DatasetSpec(Model):
    """Where the training data comes from. Nothing is downloaded at run time."""

    kind: DatasetKind = Field(
        DatasetKind.digits,
        description="digits: scikit-learn's bundled 8x8 digits; mnist: IDX or .npz files at `path`; "
        "text: a character-level text file at `path`; synthetic: generated data for benchmarks.",
    )
    path: str | None = Field(
        None, description="File or directory with the data, inside the pod (required for mnist and text)."
    )
    eval_fraction: float = Field(
        0.2, gt=0.0, lt=1.0, description="Fraction of the data held out for evaluation."
    )
    seq_length: int = Field(32, ge=2, le=4096, description="Sequence length for the text dataset.")
    num_samples: int = Field(4096, ge=16, le=10_000_000, description="Number of samples of the synthetic dataset.")


class Hyperparameters(Model):
    """Optimisation settings. ``batchSize`` is the global batch, split across data-parallel ranks."""

    epochs: int = Field(10, ge=1, le=100_000, description="Passes over the training split.")
    batch_size: int = Field(
        64, ge=1, le=1_000_000,
        description="Global batch size per optimizer step, divided evenly across the data-parallel ranks.",
    )
    learning_rate: float = Field(1e-3, gt=0.0, le=10.0, description="Optimizer learning rate.")
    optimizer: OptimizerName = Field(OptimizerName.adam, description="Optimizer: sgd, adam or adamw.")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="Momentum (sgd only).")
    weight_decay: float = Field(0.0, ge=0.0, le=1.0, description="Weight decay.")
    lr_schedule: LRSchedule = Field(
        LRSchedule.cosine,
        description="constant, or cosine: decay from learningRate to a tenth of it over the run, after warmupSteps.",
    )
    warmup_steps: int = Field(0, ge=0, description="Steps of linear learning-rate warm-up from zero.")
    seed: int = Field(42, ge=0, description="Random seed; the same seed gives the same run.")
    max_steps: int | None = Field(
        None, ge=1, description="Stop after this many optimizer steps (overrides epochs when reached first)."
    )


class Parallelism(Model):
    """How the world of processes is split: ``data`` x ``model`` must equal nodes x nprocPerNode."""

    data: int = Field(1, ge=1, le=4096, description="Data-parallel degree (replicas of the model).")
    model: int = Field(
        1, ge=1, le=64, description="Model-parallel (pipeline) degree: the model is split into this many stages."
    )
    strategy: Strategy = Field(
        Strategy.ddp, description="Data-parallel strategy: ddp (replicated) or fsdp (fully sharded)."
    )
    microbatches: int = Field(
        4, ge=1, le=1024, description="Micro-batches per step when the model is pipelined (model > 1)."
    )
    activation_checkpointing: bool = Field(
        False, description="Recompute each transformer block's / residual stage's activations in the backward "
        "pass instead of keeping them (less memory, about a third more compute).",
    )


class CheckpointPolicy(Model):
    """When checkpoints are written and how many are kept."""

    enabled: bool = Field(True, description="Write checkpoints and resume from the newest one on start.")
    interval_steps: int = Field(50, ge=1, description="Write a checkpoint every this many optimizer steps.")
    interval_seconds: int | None = Field(
        None, ge=1, description="Also write one when this many seconds passed since the last."
    )
    keep_last: int = Field(3, ge=1, le=1000, description="How many checkpoints to keep; older ones are deleted.")


class TrainerConfig(Model):
    """Everything one training process needs; rendered by the operator, read by ``python -m aiaas.trainer``."""

    job_name: str = Field("local", description="Name of the TrainingJob.")
    model: ModelSpec = Field(default_factory=ModelSpec, description="The network.")
    dataset: DatasetSpec = Field(default_factory=DatasetSpec, description="The data.")
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters, description="Optimisation.")
    parallelism: Parallelism = Field(default_factory=Parallelism, description="Data/model parallel split.")
    checkpoint: CheckpointPolicy = Field(default_factory=CheckpointPolicy, description="Checkpointing.")
    precision: Precision = Field(Precision.auto, description="auto: bf16 autocast on CUDA with bf16, else fp32.")
    checkpoint_dir: str = Field(CHECKPOINT_DIR, description="Directory for checkpoints (shared by all ranks).")
    artifact_dir: str = Field(ARTIFACT_DIR, description="Directory for the exported model artifact.")
    metrics_port: int = Field(
        METRICS_PORT, ge=0, le=65535, description="Prometheus port of local rank 0 (rank r uses +r); 0 disables."
    )
    log_interval_steps: int = Field(10, ge=1, description="Rank 0 logs a progress line every this many steps.")
