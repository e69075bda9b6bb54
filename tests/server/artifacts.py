"""Small trained artifacts for the server tests: real models trained on scikit-learn's digits in seconds.

The artifact is written with the trainer's own export code (``aiaas.trainer.export``), so the server loads
exactly what a TrainingJob would leave behind.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    return data.images.astype(np.float32), data.target.astype(np.int64)


def train_digits_artifact(out: Path, architecture: str = "cnn", name: str = "digits", steps: int = 150) -> Path:
    """Train ``architecture`` (cnn: LeNet-5 on [1, 8, 8]; rnn/lstm/gru: 8 steps of 8 pixels) and export it."""
    import torch

    from aiaas.contract.config import DatasetSpec, ModelSpec
    from aiaas.trainer.export import make_manifest, write_artifact
    from aiaas.trainer.models import INPUT_IMAGE, INPUT_SEQUENCE, InputSpec, build_model

    torch.manual_seed(0)
    images, labels = digits()
    kind = INPUT_IMAGE if architecture == "cnn" else INPUT_SEQUENCE
    shape = (1, 8, 8) if architecture == "cnn" else (8, 8)
    inputs = InputSpec(kind=kind, shape=shape, num_classes=10, mean=float(images.mean()),
                       std=float(images.std()), labels=[str(i) for i in range(10)])
    spec = ModelSpec(architecture=architecture, hidden_size=32)
    model = build_model(spec, inputs)
    x = torch.from_numpy(images.reshape(-1, *shape))
    y = torch.from_numpy(labels)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        accuracy = float((model(x).argmax(-1) == y).float().mean())
    manifest = make_manifest(name, spec, inputs, DatasetSpec(kind="digits").dump(), {"steps": steps})
    return write_artifact(out, model.state_dict(), manifest, {"accuracy": accuracy, "steps": steps})
