"""Fixtures for the model server tests: trained artifacts and real server processes on loopback."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from server_artifacts import artifact_step, train_digits_artifact, train_text_artifact  # noqa: E402
from server_harness import ServerProcess  # noqa: E402


@pytest.fixture(scope="session")
def cnn_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_digits_artifact(tmp_path_factory.mktemp("cnn"), "cnn", name="digits")


@pytest.fixture(scope="session")
def rnn_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_digits_artifact(tmp_path_factory.mktemp("rnn"), "rnn", name="rnn-digits")


@pytest.fixture(scope="session")
def text_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_text_artifact(tmp_path_factory.mktemp("text"), name="chars")


@pytest.fixture(scope="session")
def cnn_version(cnn_artifact: Path) -> str:
    """The CNN artifact's version as served: the training step the trainer exported it at."""
    return artifact_step(cnn_artifact)


@pytest.fixture(scope="session")
def server(cnn_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One CNN server shared by the read-mostly tests (the model is called ``digits``)."""
    proc = ServerProcess(cnn_artifact, tmp_path_factory.mktemp("logs") / "server.log").wait_ready()
    yield proc
    code = proc.stop()
    assert code == 0, proc.log()
    assert "Traceback" not in proc.log(), proc.log()


@pytest.fixture(scope="session")
def reference(cnn_artifact: Path) -> Any:
    """The model's own forward pass, in the test process: ``reference(x) -> (probabilities, classes)``."""
    from aiaas.trainer.export import load_artifact, predict

    model, manifest = load_artifact(cnn_artifact)

    def run(x: Any) -> tuple[Any, Any]:
        out = predict(model, manifest, x)
        return out["probabilities"].numpy(), out["predicted_class"].numpy()

    return run
