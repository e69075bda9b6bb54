"""Fixtures of the trainer tests (helpers live in trainer_helpers.py)."""

from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture(scope="session")
def digits_cnn() -> dict[str, Any]:
    """The reference job of these tests: LeNet-5 on digits, 6 epochs of global batch 32 (264 steps)."""
    return {
        "model": {"architecture": "cnn"},
        "dataset": {"kind": "digits"},
        "hyperparameters": {"epochs": 6, "batchSize": 32, "learningRate": 0.002, "seed": 7},
    }
