"""Errors that decide how a training process ends (see :mod:`aiaas.trainer.termination`)."""

from __future__ import annotations


class TrainerError(Exception):
    """Base class: ``reason`` is a CamelCase word for the operator's condition, ``str(e)`` says what to fix."""

    reason = "TrainerError"

    def __init__(self, message: str, reason: str | None = None, step: int | None = None) -> None:
        super().__init__(message)
        if reason:
            self.reason = reason
        self.step = step


class PermanentError(TrainerError):
    """Restarting cannot help: bad config, missing data, a parallel layout that does not fit the world."""

    reason = "InvalidConfig"


class RetryableError(TrainerError):
    """Something that may go away on a restart (a peer died, a transient I/O error)."""

    reason = "TrainerFailed"


class Preempted(TrainerError):
    """SIGTERM: the pod is being stopped (suspend, preemption, scale down); resume from the checkpoint later."""

    reason = "Preempted"
