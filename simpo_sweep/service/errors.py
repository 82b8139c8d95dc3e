"""Errors that mean bad input or an unreachable dependency: printed as one line, no traceback."""

from __future__ import annotations


class SweepError(RuntimeError):
    """A sweep that cannot start or continue; the message says why and what to change."""


class JobError(RuntimeError):
    """A Ray Job that cannot be submitted, found or followed."""


def user_errors() -> tuple[type[Exception], ...]:
    """Called only once an error is in hand: the data module imports torch and transformers,
    which commands like `status` never need."""
    from simpo_sweep.engine.data import DataError
    from simpo_sweep.tracking.mlflow_runs import TrackingError

    return (SweepError, JobError, DataError, TrackingError)
