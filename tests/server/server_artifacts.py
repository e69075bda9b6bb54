"""Small trained artifacts for the server tests, made by the real trainer (``python -m aiaas.trainer``).

Each trains on data that needs no network (scikit-learn's digits, a generated text file) in a few seconds and
leaves exactly the artifact a TrainingJob would leave behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

TEXT = "the quick brown fox jumps over the lazy dog. pack my box with five dozen liquor jugs.\n" * 60


def digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    return data.images.astype(np.float32), data.target.astype(np.int64)


def train(out: Path, name: str, model: dict[str, Any], dataset: dict[str, Any], epochs: int = 3,
          max_steps: int | None = None) -> Path:
    """Run the trainer on one process and return its artifact directory (``out/artifact``)."""
    out.mkdir(parents=True, exist_ok=True)
    hyper: dict[str, Any] = {"epochs": epochs, "batchSize": 64, "learningRate": 0.003, "seed": 0}
    if max_steps:
        hyper["maxSteps"] = max_steps
    config = {
        "jobName": name, "model": model, "dataset": dataset, "hyperparameters": hyper,
        "checkpoint": {"enabled": False}, "checkpointDir": str(out / "checkpoints"),
        "artifactDir": str(out / "artifact"), "metricsPort": 0,
    }
    env = {**os.environ, "AIAAS_TRAINER_CONFIG": json.dumps(config),
           "AIAAS_TERMINATION_LOG": str(out / "termination-log")}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    result = subprocess.run([sys.executable, "-m", "aiaas.trainer"], env=env, capture_output=True, text=True,
                            timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f"the trainer failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return out / "artifact"


def artifact_step(artifact: Path) -> str:
    """The training step the trainer recorded in the artifact's manifest (what the server reports as its version)."""
    return str(json.loads((artifact / "model.json").read_text())["training"]["steps"])


def train_digits_artifact(out: Path, architecture: str = "cnn", name: str = "digits") -> Path:
    """cnn: LeNet-5 on [1, 8, 8] images; rnn/lstm/gru: 8 steps of 8 pixels."""
    return train(out, name, {"architecture": architecture, "hiddenSize": 32}, {"kind": "digits"},
                 epochs=3 if architecture == "cnn" else 5)


def train_text_artifact(out: Path, name: str = "chars") -> Path:
    """A GRU that predicts the next character from 8 character ids (INT64 input, a vocabulary)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "text.txt").write_text(TEXT)
    return train(out, name, {"architecture": "gru", "hiddenSize": 32},
                 {"kind": "text", "path": str(out / "text.txt"), "seqLength": 8}, epochs=1, max_steps=30)
