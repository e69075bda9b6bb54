"""The outcome of a training process: the names, their order, and how to read one back.

Every trainer worker writes a one-line JSON outcome to its termination log (``trainer/termination.py``); the
operator reads it from the pod's container status and ``aiaas run`` from the local file. Both sides use this
module, so the names and the reading rules exist once. Standard library only.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .launch import EXIT_PERMANENT, EXIT_PREEMPTED, EXIT_RETRYABLE, EXIT_SUCCESS

SUCCEEDED = "Succeeded"
PERMANENT = "PermanentError"
RETRYABLE = "RetryableError"
PREEMPTED = "Preempted"
OUTCOMES = (SUCCEEDED, PERMANENT, RETRYABLE, PREEMPTED)

EXIT_CODES = {SUCCEEDED: EXIT_SUCCESS, PERMANENT: EXIT_PERMANENT, RETRYABLE: EXIT_RETRYABLE,
              PREEMPTED: EXIT_PREEMPTED}
# An outcome only replaces a strictly less severe one: the first real failure of a gang wins.
SEVERITY = {SUCCEEDED: 0, PREEMPTED: 1, RETRYABLE: 2, PERMANENT: 3}


def parse_message(raw: str) -> dict[str, Any]:
    """The JSON object of a termination message ({} when the message is not one, e.g. a log tail)."""
    raw = raw.strip()
    if not raw.startswith("{"):
        return {}
    try:
        parsed = json.loads(raw.splitlines()[0])
    except ValueError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def classify(written: str | None, exit_code: int) -> str:
    """The outcome of a process: what it wrote, else what its exit code says. Exit code 78 is permanent
    whatever a peer wrote (torchrun reports the first failing worker's code)."""
    if written not in OUTCOMES:
        if exit_code == EXIT_SUCCESS:
            return SUCCEEDED
        if exit_code == EXIT_PERMANENT:
            return PERMANENT
        if exit_code == EXIT_PREEMPTED:
            return PREEMPTED
        return RETRYABLE
    if exit_code == EXIT_PERMANENT and written == RETRYABLE:
        return PERMANENT
    return str(written)


def read_outcome(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The outcome a termination log holds (None: missing, empty or not JSON)."""
    try:
        data = json.loads(Path(path).read_text() or "null")
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def most_severe(outcomes: Iterable[dict[str, Any] | None]) -> dict[str, Any] | None:
    """The most severe of several outcomes (the first of equals); None when there is none."""
    worst: dict[str, Any] | None = None
    for data in outcomes:
        if data is not None and (worst is None or SEVERITY.get(data.get("outcome", ""), -1) >
                                 SEVERITY.get(worst.get("outcome", ""), -1)):
            worst = data
    return worst
