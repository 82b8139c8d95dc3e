"""MLflow layout of a sweep: one parent run per sweep, one nested child run per trial.

Runs are found again by tags (sweep id, trial id), never created twice: a retried or resumed
trial continues its own child run, and steps it already logged are not logged again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import (
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_VAL_LENGTH,
    MAX_PARAMS_TAGS_PER_BATCH,
)

from simpo_sweep.tracking.redact import redact, redact_text

log = logging.getLogger(__name__)

TAG_SWEEP = "simpo_sweep.sweep"
TAG_SWEEP_ID = "simpo_sweep.sweep_id"
TAG_TRIAL_ID = "simpo_sweep.trial_id"
TAG_STATE = "simpo_sweep.state"
TAG_DIAGNOSIS = "simpo_sweep.diagnosis"
TAG_VERDICT = "simpo_sweep.verdict"
TAG_STATUS = "simpo_sweep.status"
TAG_PARENT = "mlflow.parentRunId"

# Final state of a trial -> MLflow run status.
TRIAL_STATES = {
    "completed": "FINISHED",
    "stopped_early": "KILLED",
    "degenerate": "KILLED",
    "failed": "FAILED",
    "unfinished": "KILLED",  # interrupted; `resume` sets it running again
}
# The metric whose history says which steps a run already holds.
PROGRESS_METRIC = "train/loss"


def default_tracking_uri(storage_path: str | Path) -> str:
    """The embedded store: a SQLite file beside the sweep's checkpoints (absolute, for workers)."""
    return f"sqlite:///{Path(storage_path).expanduser().resolve() / 'mlflow.db'}"


def is_local_store(tracking_uri: str) -> bool:
    """A store only this machine can write (workers on other nodes could not reach it)."""
    scheme = urlparse(tracking_uri).scheme
    return scheme in {"", "file", "sqlite"} or len(scheme) == 1  # "C:" paths


def _client(tracking_uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=tracking_uri)


def artifact_root(tracking_uri: str) -> str | None:
    """Artifacts of an embedded SQLite store live beside it, not in whatever folder the
    process happens to run in (MLflow's default); a server decides for itself."""
    parsed = urlparse(tracking_uri)
    if parsed.scheme != "sqlite":
        return None
    return (Path(parsed.path).parent / "mlartifacts").as_uri()


def ensure_experiment(client: MlflowClient, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            client.restore_experiment(experiment.experiment_id)
        return str(experiment.experiment_id)
    try:
        return str(
            client.create_experiment(name, artifact_location=artifact_root(client.tracking_uri))
        )
    except Exception:  # created concurrently by another process
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return str(experiment.experiment_id)


def _param_value(value: Any) -> str:
    return str(value)[:MAX_PARAM_VAL_LENGTH]


def _find_run(client: MlflowClient, experiment_id: str, tags: Mapping[str, str]) -> str | None:
    query = " and ".join(f"tags.`{key}` = '{value}'" for key, value in tags.items())
    runs = client.search_runs([experiment_id], filter_string=query, max_results=2)
    return runs[0].info.run_id if runs else None


def last_logged_step(client: MlflowClient, run_id: str) -> int:
    """The last step a run holds metrics for (0 for none yet)."""
    history = client.get_metric_history(run_id, PROGRESS_METRIC)
    return max((metric.step for metric in history), default=0)


def _log_params(client: MlflowClient, run_id: str, params: Mapping[str, Any]) -> None:
    existing = client.get_run(run_id).data.params
    fresh = [
        Param(key, _param_value(value))
        for key, value in redact(dict(params)).items()
        if key not in existing
    ]
    for start in range(0, len(fresh), MAX_PARAMS_TAGS_PER_BATCH):
        client.log_batch(run_id, params=fresh[start : start + MAX_PARAMS_TAGS_PER_BATCH])


class SweepTracking:
    """Driver side: the sweep's parent run, and get-or-create of its trials' child runs."""

    def __init__(self, tracking_uri: str, experiment: str, sweep_name: str, sweep_id: str):
        self.tracking_uri = tracking_uri
        self.client = _client(tracking_uri)
        self.experiment_id = ensure_experiment(self.client, experiment)
        self.sweep_name = sweep_name
        self.sweep_id = sweep_id
        self.parent_run_id = self._parent_run()

    def _parent_run(self) -> str:
        run_id = _find_run(
            self.client, self.experiment_id, {TAG_SWEEP_ID: self.sweep_id, TAG_TRIAL_ID: "sweep"}
        )
        if run_id is not None:
            return run_id
        run = self.client.create_run(
            self.experiment_id,
            run_name=self.sweep_id,
            tags={TAG_SWEEP: self.sweep_name, TAG_SWEEP_ID: self.sweep_id, TAG_TRIAL_ID: "sweep"},
        )
        return str(run.info.run_id)

    def log_sweep_settings(self, params: Mapping[str, Any], artifacts: Mapping[str, str]) -> None:
        """Params (flat) and text artifacts (name -> content), secrets redacted."""
        _log_params(self.client, self.parent_run_id, params)
        for name, text in artifacts.items():
            self.client.log_text(self.parent_run_id, redact_text(text), name)
        self.client.update_run(self.parent_run_id, status="RUNNING")  # again, on resume
        self.client.set_tag(self.parent_run_id, TAG_STATUS, "running")

    def child_run(self, trial_id: str, params: Mapping[str, Any]) -> str:
        run_id = self.run_id_for(trial_id)
        if run_id is None:
            run = self.client.create_run(
                self.experiment_id,
                run_name=trial_id,
                tags={
                    TAG_PARENT: self.parent_run_id,
                    TAG_SWEEP: self.sweep_name,
                    TAG_SWEEP_ID: self.sweep_id,
                    TAG_TRIAL_ID: trial_id,
                    TAG_STATE: "running",
                },
            )
            run_id = str(run.info.run_id)
        else:
            self.client.update_run(run_id, status="RUNNING")
            self.client.set_tag(run_id, TAG_STATE, "running")
        _log_params(self.client, run_id, params)
        return run_id

    def run_id_for(self, trial_id: str) -> str | None:
        return _find_run(
            self.client, self.experiment_id, {TAG_SWEEP_ID: self.sweep_id, TAG_TRIAL_ID: trial_id}
        )

    def child_runs(self) -> dict[str, Any]:
        """trial id -> mlflow Run, for every child run of this sweep."""
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{TAG_PARENT}` = '{self.parent_run_id}'",
            max_results=5000,
        )
        return {run.data.tags[TAG_TRIAL_ID]: run for run in runs}

    def finish_trial(self, run_id: str, state: str, diagnosis: str) -> None:
        """Label a trial's run; idempotent (the worker may already have done it)."""
        finish_run(self.client, run_id, state, diagnosis)

    def finish(self, status: str, artifacts: Mapping[str, str]) -> None:
        for name, text in artifacts.items():
            self.client.log_text(self.parent_run_id, redact_text(text), name)
        self.client.set_tag(self.parent_run_id, TAG_STATUS, status)
        mlflow_status = {"completed": "FINISHED", "interrupted": "KILLED"}.get(status, "FAILED")
        self.client.set_terminated(self.parent_run_id, status=mlflow_status)


def finish_run(client: MlflowClient, run_id: str, state: str, diagnosis: str) -> None:
    client.log_batch(
        run_id,
        tags=[RunTag(TAG_STATE, state), RunTag(TAG_DIAGNOSIS, redact_text(diagnosis)[:5000])],
    )
    client.set_terminated(run_id, status=TRIAL_STATES[state])


class MetricLogger:
    """Worker side: buffers a trial's metrics and writes them in batches from a background thread.

    A training step only appends to a list; the writes (one `log_batch` per flush) happen off
    the hot path. Steps the run already holds (a retry replaying from its checkpoint) are skipped.
    """

    def __init__(self, tracking_uri: str, run_id: str, *, flush_interval_s: float = 2.0):
        self.client = _client(tracking_uri)
        self.run_id = run_id
        self.flush_interval_s = flush_interval_s
        self.last_logged_step = last_logged_step(self.client, run_id)
        self._pending: list[Metric] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._flush_periodically, daemon=True)
        self._thread.start()
        self.seconds_writing = 0.0

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        if step <= self.last_logged_step:
            return
        timestamp = int(time.time() * 1000)
        fresh = [
            Metric(key, float(value), timestamp, step)
            for key, value in metrics.items()
            if isinstance(value, int | float) and not isinstance(value, bool)
        ]
        # MLflow stores NaN/inf; keep them, the verdict explains them.
        with self._lock:
            self._pending.extend(fresh)

    def flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        started = time.perf_counter()
        try:
            while pending:
                self.client.log_batch(self.run_id, metrics=pending[:MAX_METRICS_PER_BATCH])
                del pending[:MAX_METRICS_PER_BATCH]
        except Exception:
            with self._lock:  # keep what was not written for the next flush
                self._pending[:0] = pending
            raise
        finally:
            self.seconds_writing += time.perf_counter() - started

    def flush_quietly(self) -> None:
        try:
            self.flush()
        except Exception as error:  # a tracking hiccup must not kill training
            log.warning("MLflow flush failed, will retry: %s", error)

    def _flush_periodically(self) -> None:
        while not self._stop.wait(self.flush_interval_s):
            self.flush_quietly()

    def close(self, state: str | None = None, diagnosis: str = "") -> None:
        self._stop.set()
        self._thread.join()
        self.flush()
        if state is not None:
            finish_run(self.client, self.run_id, state, diagnosis)
