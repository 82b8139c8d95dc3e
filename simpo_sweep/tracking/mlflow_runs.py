"""MLflow layout of a sweep: one parent run per sweep, one nested child run per trial.

Runs are found again by tags (sweep id, trial id), never created twice: a retried or resumed
trial continues its own child run, and steps it already logged are not logged again. A child
run is named after what it tried (`03 lr=1.2e-3 beta=1.86 sigmoid`); the parent run carries
the sweep's outcome (best value, best trial, trials per state) so sweeps rank in the
experiment view.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_LOGGED_ARTIFACTS
from mlflow.utils.validation import (
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_VAL_LENGTH,
    MAX_PARAMS_TAGS_PER_BATCH,
)

from simpo_sweep.spec.space import NOT_APPLICABLE
from simpo_sweep.tracking.redact import redact, redact_text

log = logging.getLogger(__name__)

# What MLflow's client reads to authenticate to a server (basic auth, or a bearer token).
CREDENTIAL_VARIABLES = (
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
)


class TrackingError(RuntimeError):
    """The tracking server cannot be used: unreachable, or it refused the credentials."""


def tracking_credentials(environ: Mapping[str, str]) -> dict[str, str]:
    """The MLflow credentials set in `environ`, to hand to trial processes on other nodes."""
    return {key: environ[key] for key in CREDENTIAL_VARIABLES if environ.get(key)}


def check_tracking_server(tracking_uri: str) -> None:
    """One cheap call to a tracking server before anything starts: a wrong password or an
    unreachable server is said in one line, not as a trial's traceback minutes later."""
    if urlparse(tracking_uri).scheme not in {"http", "https"}:
        return
    from mlflow.exceptions import MlflowException

    shown = redact_text(tracking_uri)
    try:
        _client(tracking_uri).search_experiments(max_results=1)
    except MlflowException as error:
        text = str(error)
        if any(code in text for code in ("401", "403", "Unauthorized", "Permission")):
            given = (
                "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD"
                if "MLFLOW_TRACKING_USERNAME" in os.environ
                else "no credentials (set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD)"
            )
            raise TrackingError(
                f"the MLflow server at {shown} refused the credentials: {given}"
            ) from None
        raise TrackingError(
            f"cannot use the MLflow server at {shown}: {redact_text(text.splitlines()[0])}"
        ) from None


TAG_SWEEP = "simpo_sweep.sweep"
TAG_SWEEP_ID = "simpo_sweep.sweep_id"
TAG_TRIAL_ID = "simpo_sweep.trial_id"
TAG_STATE = "simpo_sweep.state"
TAG_DIAGNOSIS = "simpo_sweep.diagnosis"
TAG_VERDICT = "simpo_sweep.verdict"
TAG_STATUS = "simpo_sweep.status"
TAG_PARENT = "mlflow.parentRunId"
TAG_BEST_TRIAL_ID = "simpo_sweep.best_trial_id"

# Final state of a trial -> MLflow run status. A trial the scheduler stopped early ended
# normally (that is how ASHA works: its state tag says stopped_early); KILLED is for runs cut
# short, by an interruption or by their own diagnosis; FAILED for crashes.
TRIAL_STATES = {
    "completed": "FINISHED",
    "stopped_early": "FINISHED",
    "degenerate": "KILLED",
    "failed": "FAILED",
    "unfinished": "KILLED",  # interrupted; `resume` sets it running again
}
# The metric whose history says which steps a run already holds.
PROGRESS_METRIC = "train/loss"
# Where the parent run's summary goes: `best/<metric>`, `best.<knob>` tags, `trials/<state>`.
BEST_METRIC_PREFIX = "best/"
BEST_KNOB_TAG_PREFIX = "best."
TRIAL_COUNT_PREFIX = "trials/"

# Searched knobs as run names show them; any other knob goes by its field name.
RUN_NAME_KNOBS = {
    "learning_rate": "lr",
    "beta": "beta",
    "gamma_beta_ratio": "gbr",
    "label_smoothing": "ls",
    "sft_weight": "sft",
}
# Its value alone says which it is (`sigmoid`, `hinge`): it ends the name.
RUN_NAME_BARE_KNOBS = ("loss_type",)
MAX_RUN_NAME_LENGTH = 250


def default_tracking_uri(storage_path: str | Path) -> str:
    """The embedded store: a SQLite file beside the sweep's checkpoints. Absolute
    (`sqlite:////abs/mlflow.db`), so workers in other folders open the same file. The path
    is not percent-quoted: MLflow creates the database's folder from the URI's text as it is
    (a quoted `a%20b` folder), while SQLAlchemy would open the unquoted `a b`."""
    return f"sqlite:///{Path(storage_path).expanduser().resolve() / 'mlflow.db'}"


def sqlite_database(tracking_uri: str) -> Path | None:
    """The database file of a `sqlite:` tracking URI, made absolute; None for other stores and
    in-memory databases. As SQLAlchemy reads it: `sqlite:///relative/path.db` is relative to
    the current folder, `sqlite:////abs/path.db` absolute, the path percent-unquoted."""
    scheme = urlparse(tracking_uri).scheme
    _, separator, rest = tracking_uri.partition(":///")
    if scheme.split("+")[0] != "sqlite" or not separator:
        return None
    database = unquote(rest.split("?", 1)[0])
    if database in {"", ":memory:"}:
        return None
    return Path(database).expanduser().resolve()


def is_local_store(tracking_uri: str) -> bool:
    """A store only this machine can write (workers on other nodes could not reach it)."""
    scheme = urlparse(tracking_uri).scheme
    return scheme in {"", "file", "sqlite"} or len(scheme) == 1  # "C:" paths


def _client(tracking_uri: str) -> MlflowClient:
    return MlflowClient(tracking_uri=tracking_uri)


def artifact_root(tracking_uri: str) -> str | None:
    """Artifacts of an embedded SQLite store live beside it (`<folder of mlflow.db>/mlartifacts`),
    not in whatever folder the process happens to run in (MLflow's default); a server decides
    for itself. A `file:///abs` URI: MLflow stores it as the experiment's artifact location."""
    database = sqlite_database(tracking_uri)
    if database is None:
        return None
    return (database.parent / "mlartifacts").as_uri()


def ensure_experiment(client: MlflowClient, name: str, artifact_location: str | None = None) -> str:
    """The experiment's id, created if need be with its artifacts at `artifact_location` (by
    default: artifact_root of the store). An existing experiment keeps the location it has."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            client.restore_experiment(experiment.experiment_id)
        return str(experiment.experiment_id)
    location = artifact_location or artifact_root(client.tracking_uri)
    try:
        return str(client.create_experiment(name, artifact_location=location))
    except Exception:  # created concurrently by another process
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return str(experiment.experiment_id)


def _param_value(value: Any) -> str:
    return str(value)[:MAX_PARAM_VAL_LENGTH]


def _state_name(state: Any) -> str:
    """A trial state as MLflow spells it, given a plain string or a string enum member."""
    return str(getattr(state, "value", state))


def trial_index(trial_id: str) -> int | None:
    """The 1-based number of a Tune trial within its search, from the 0-based counter its id
    ends with (`a8692_00011` -> 12); None for an id without one."""
    _, separator, counter = trial_id.rpartition("_")
    return int(counter) + 1 if separator and counter.isdigit() else None


def trial_run_name(index: int | None, sampled: Mapping[str, Any]) -> str:
    """A child run's name that says what the trial tried: `03 lr=1.2e-3 beta=1.86 gbr=0.05
    sigmoid`. `sampled`: the searched knobs by config path (or field name); unsampled (None)
    ones are left out."""
    by_name = {path.rsplit(".", 1)[-1]: value for path, value in sampled.items()}
    known = [name for name in RUN_NAME_KNOBS if name in by_name]
    others = [name for name in by_name if name not in RUN_NAME_KNOBS]
    parts = [] if index is None else [f"{index:02d}"]
    for name in [*known, *(name for name in others if name not in RUN_NAME_BARE_KNOBS)]:
        if by_name[name] is not None:
            parts.append(f"{RUN_NAME_KNOBS.get(name, name)}={_short_number(by_name[name])}")
    parts += [str(by_name[name]) for name in RUN_NAME_BARE_KNOBS if by_name.get(name) is not None]
    return " ".join(parts)[:MAX_RUN_NAME_LENGTH]


def _short_number(value: Any) -> str:
    """2-3 significant digits, small and large floats as `1.2e-3`; anything else as it is."""
    if not isinstance(value, float):
        return str(value)
    if value != 0 and not 1e-2 <= abs(value) < 1e4:
        mantissa, _, exponent = f"{value:.2e}".partition("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    return f"{value:.3g}"


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


def _log_changes(
    client: MlflowClient, run_id: str, metrics: Mapping[str, float], tags: Mapping[str, str]
) -> None:
    """Metrics (at step 0) and tags whose current value differs from the given one: logging the
    same again adds nothing, a new value becomes the metric's latest."""
    data = client.get_run(run_id).data
    timestamp = int(time.time() * 1000)
    fresh_metrics = [
        Metric(key, value, timestamp, 0)
        for key, value in metrics.items()
        if key not in data.metrics or not _same_number(data.metrics[key], value)
    ]
    fresh_tags = [RunTag(key, value) for key, value in tags.items() if data.tags.get(key) != value]
    for start in range(0, len(fresh_metrics), MAX_METRICS_PER_BATCH):
        client.log_batch(run_id, metrics=fresh_metrics[start : start + MAX_METRICS_PER_BATCH])
    for start in range(0, len(fresh_tags), MAX_PARAMS_TAGS_PER_BATCH):
        client.log_batch(run_id, tags=fresh_tags[start : start + MAX_PARAMS_TAGS_PER_BATCH])


def _same_number(logged: float, value: float) -> bool:
    return logged == value or (math.isnan(logged) and math.isnan(value))


class SweepTracking:
    """Driver side: the sweep's parent run, and get-or-create of its trials' child runs."""

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        sweep_name: str,
        sweep_id: str,
        *,
        artifact_location: str | None = None,  # for a new experiment; see ensure_experiment
    ):
        self.tracking_uri = tracking_uri
        self.client = _client(tracking_uri)
        self.experiment_id = ensure_experiment(self.client, experiment, artifact_location)
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

    def child_run(
        self, trial_id: str, params: Mapping[str, Any], run_name: str | None = None
    ) -> str:
        """The trial's run, created or reopened (RUNNING again); named `run_name` (see
        trial_run_name), else by the trial id, which is always its TAG_TRIAL_ID tag."""
        run_id = self.run_id_for(trial_id)
        if run_id is None:
            run = self.client.create_run(
                self.experiment_id,
                run_name=run_name or trial_id,
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
            self.client.update_run(run_id, status="RUNNING", name=run_name)
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

    def log_sweep_summary(
        self,
        metric_name: str,
        best_value: float | None,
        best_trial_id: str | None,
        best_params: Mapping[str, Any],
        counts: Mapping[Any, int],
    ) -> None:
        """The sweep's outcome on its parent run, so sweeps rank against each other in the
        experiment view: the best value as a metric under the metric's own name and under
        `best/<metric>`, the best trial's id and knobs as tags (`best.<knob>`), and the trials
        per final state as metrics `trials/<state>` (every state, 0 included).

        Tags for the knobs, not params: params cannot change once logged, and a resumed sweep
        may find another best. Not metrics either: a knob the new best does not use
        (label_smoothing under hinge) could not take its metric away, and would show the old
        best's value. Idempotent: what already holds the given value is not logged again.
        """
        by_state = {_state_name(state): count for state, count in counts.items()}
        states = [*TRIAL_STATES, *(state for state in by_state if state not in TRIAL_STATES)]
        metrics = {
            f"{TRIAL_COUNT_PREFIX}{state}": float(by_state.get(state, 0)) for state in states
        }
        tags: dict[str, str] = {}
        if best_value is not None and best_trial_id is not None:
            metrics[metric_name] = float(best_value)
            metrics[f"{BEST_METRIC_PREFIX}{metric_name}"] = float(best_value)
            tags[TAG_BEST_TRIAL_ID] = best_trial_id
            for knob, value in redact(dict(best_params)).items():
                shown = NOT_APPLICABLE if value is None else value
                tags[f"{BEST_KNOB_TAG_PREFIX}{knob}"] = _param_value(shown)
        _log_changes(self.client, self.parent_run_id, metrics, tags)

    def finish(self, status: str, artifacts: Mapping[str, str]) -> None:
        for name, text in artifacts.items():
            self.client.log_text(self.parent_run_id, redact_text(text), name)
        self.client.set_tag(self.parent_run_id, TAG_STATUS, status)
        mlflow_status = {"completed": "FINISHED", "interrupted": "KILLED"}.get(status, "FAILED")
        self.client.set_terminated(self.parent_run_id, status=mlflow_status)


def finish_run(client: MlflowClient, run_id: str, state: str, diagnosis: str) -> None:
    state = _state_name(state)
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

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Tags of the trial's run, in one request."""
        self.client.log_batch(self.run_id, tags=[RunTag(key, value) for key, value in tags.items()])

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


@dataclass(frozen=True)
class DatasetRecord:
    """What a sweep trained on, as MLflow's Datasets column shows it: recorded with
    `log_inputs` on the parent run and on every trial's run (context train)."""

    name: str
    digest: str  # the prepared data's fingerprint: same digest, same tokenised pairs
    source: str
    source_type: str  # builtin | local | hub
    schema: str  # JSON: the columns trials read
    profile: str  # JSON: rows and pairs, as the data summary counts them

    def log_to(self, client: MlflowClient, run_id: str, context: str = "train") -> None:
        inputs = client.get_run(run_id).inputs
        logged = (inputs.dataset_inputs if inputs is not None else None) or []
        if any(item.dataset.digest == self.digest for item in logged):
            return  # a retried or resumed trial: recorded already
        dataset = Dataset(
            name=self.name,
            digest=self.digest,
            source_type=self.source_type,
            source=redact_text(self.source),
            schema=self.schema,
            profile=self.profile,
        )
        tags = [InputTag(key="mlflow.data.context", value=context)]
        client.log_inputs(run_id, datasets=[DatasetInput(dataset=dataset, tags=tags)])


# ---- tables --------------------------------------------------------------------------------

# A trial's generations, one table per evaluation step: generations/step_000150.json.
GENERATIONS_FOLDER = "generations"


def generations_artifact(step: int) -> str:
    return f"{GENERATIONS_FOLDER}/step_{step:06d}.json"


def log_table(
    client: MlflowClient, run_id: str, columns: Mapping[str, list[Any]], artifact_file: str
) -> None:
    """A table artifact as `MlflowClient.log_table` writes it (pandas' "split" JSON, listed
    in the `mlflow.loggedArtifacts` tag, so the UI shows it as a table), without pandas, and
    replacing an existing file where log_table would append to it: a retried trial writes the
    same evaluation again and must not double its rows."""
    names = list(columns)
    rows = [list(values) for values in zip(*(columns[name] for name in names), strict=True)]
    document = {"columns": names, "data": rows}
    client.log_text(run_id, redact_text(json.dumps(document, ensure_ascii=False)), artifact_file)
    logged = json.loads(client.get_run(run_id).data.tags.get(MLFLOW_LOGGED_ARTIFACTS, "[]"))
    entry = {"path": artifact_file, "type": "table"}
    if entry not in logged:
        client.set_tag(run_id, MLFLOW_LOGGED_ARTIFACTS, json.dumps([*logged, entry]))


def read_table(client: MlflowClient, run_id: str, artifact_file: str) -> list[dict[str, Any]]:
    """The rows of a table written by log_table (or MLflow's own), as dicts."""
    with tempfile.TemporaryDirectory() as folder:
        local = client.download_artifacts(run_id, artifact_file, folder)
        document = json.loads(Path(local).read_text())
    names = document["columns"]
    return [dict(zip(names, row, strict=True)) for row in document["data"]]


def latest_generations(
    client: MlflowClient, run_id: str
) -> tuple[int, list[dict[str, Any]]] | None:
    """The step and rows of a run's last generations table; None when it has none."""
    steps = []
    for entry in client.list_artifacts(run_id, GENERATIONS_FOLDER):
        name = Path(entry.path).name
        if name.startswith("step_") and name.endswith(".json"):
            steps.append(int(name.removeprefix("step_").removesuffix(".json")))
    if not steps:
        return None
    step = max(steps)
    return step, read_table(client, run_id, generations_artifact(step))
