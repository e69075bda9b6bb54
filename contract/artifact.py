"""The layout of an exported model artifact (a directory), written by the trainer and read by the server."""

from __future__ import annotations

WEIGHTS_FILE = "model.pt"  # torch state_dict of the full (unsharded, unpipelined) model
MANIFEST_FILE = "model.json"  # {"name", "version", "platform", "model": ModelSpec, "inputs": [...], "outputs": [...]}
METRICS_FILE = "metrics.json"  # evaluation results: {"accuracy", "loss", "steps", "epochs", ...}
DONE_FILE = "DONE"  # written last: an artifact without it is incomplete
