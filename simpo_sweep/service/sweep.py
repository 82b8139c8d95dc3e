"""Sweep lifecycle: prepare once, run (or resume) the Tuner, label every trial, write the results.

Layout of a sweep on storage (`storage.path/<sweep id>/`):
    spec.yaml            the spec as run (overrides applied): what `resume` reads
    <Tune state>         Tune's experiment state and one folder per trial
    train/<trial id>/    each trial's Ray Train run and checkpoints
    checkpoint_retention.json   ended trials and what retention freed (service.retention)
    results.csv, results.md, best_config.yaml    written at the end
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import yaml
from mlflow.entities import Metric
from ray import tune

from simpo_sweep.engine.data import PreparedData, prepare_data
from simpo_sweep.service.errors import SweepError
from simpo_sweep.service.export import (
    EXPORT_FOLDER,
    ExportedModel,
    checkpoint_bytes,
    export_to,
    read_trials,
    register_best,
)
from simpo_sweep.service.progress import LiveView, SweepProgress, read_outcomes
from simpo_sweep.service.report import write_report
from simpo_sweep.service.results import (
    STATE_UNFINISHED,
    Cost,
    TrialRow,
    best_row,
    sweep_cost,
    trial_rows,
    write_results,
)
from simpo_sweep.service.retention import apply_retention
from simpo_sweep.service.search import param_space, scheduler, search_algorithm
from simpo_sweep.service.storage import (
    LOCAL_HOME,
    SPEC_FILE,
    StorageLocation,
    artifact_location,
    storage_location,
    tracking_uri,
)
from simpo_sweep.spec.loading import Problem, SpecError, check_resources
from simpo_sweep.spec.models import SweepSpec
from simpo_sweep.spec.space import (
    count_trials,
    describe_space,
    searched_keys,
    spec_with_trial,
    stage_specs,
)
from simpo_sweep.tracking.mlflow_runs import (
    DatasetRecord,
    SweepTracking,
    check_tracking_server,
    is_local_store,
    tracking_credentials,
)
from simpo_sweep.tracking.redact import redact_text
from simpo_sweep.trial.plan import DataLocation, TrialPlan
from simpo_sweep.trial.trainable import make_trainable, memory_problems

Printer = Callable[[str], None]


@dataclass
class SweepOutcome:
    sweep_id: str
    location: StorageLocation  # the sweep's folder: local or in a bucket
    status: str  # completed | interrupted
    rows: list[TrialRow]
    best: TrialRow | None
    files: dict[str, StorageLocation] = field(default_factory=dict)
    cost: Cost | None = None
    checkpoint_bytes: int = 0  # what the trials' checkpoints hold on storage
    exported: ExportedModel | None = None

    @property
    def sweep_dir(self) -> Path:
        """The sweep's folder on this machine (a bucket sweep has none: use `location`)."""
        if self.location.local_path is None:
            raise SweepError(f"sweep {self.sweep_id} is in a bucket: {self.location}")
        return self.location.local_path


def new_sweep_id(name: str) -> str:
    """Readable and unique: two sweeps of one spec started in the same second (two
    submissions to one cluster, storage and MLflow server) never share a folder or runs."""
    return f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def quiet_ray(verbose: bool) -> None:
    """Ray's banners, Tune's configuration box and per-checkpoint lines off unless verbose:
    the sweep prints one line per trial event of its own."""
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    if verbose:
        return
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    for name in ("ray", "ray.tune", "ray.train", "ray.data"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # "Creating initial MLflow database tables..." and the like.
    logging.getLogger("mlflow").setLevel(logging.WARNING)


def connect(address: str | None, *, verbose: bool = True) -> None:
    """Local Ray by default; an existing cluster when an address is given."""
    if ray.is_initialized():
        return
    quiet_ray(verbose)
    # Trial processes' output (Ray Train's local-mode notice, "Checkpoint successfully
    # created at ...") reaches this terminal only when asked for: trial errors are reported
    # by the sweep itself, with the trial's error file.
    options: dict[str, Any] = {
        "log_to_driver": verbose,
        "logging_level": logging.INFO if verbose else logging.ERROR,
    }
    try:
        if address:
            ray.init(address=address, **options)
        else:
            ray.init(include_dashboard=False, **options)
    except ConnectionError as error:
        raise SweepError(f"cannot reach the Ray cluster at {address}: {error}") from error


def _treat_sigterm_as_ctrl_c() -> None:
    """`simpo-sweep stop` (Ray Jobs) and Kubernetes send SIGTERM: end the sweep as Ctrl-C does,
    resumable, with its MLflow runs marked interrupted. Installed after ray.init, which sets
    a handler of its own that would end the process at once."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda _signum, _frame: signal.raise_signal(signal.SIGINT))


def alive_nodes() -> list[dict[str, Any]]:
    """The connected cluster's live nodes, as ray.nodes() describes them."""
    return [node for node in ray.nodes() if node.get("Alive")]


def cluster_resources(nodes: list[dict[str, Any]]) -> dict[str, float]:
    """What check_resources compares a trial's request with: the largest node's CPUs and GPUs
    (one worker must fit on one node) and the cluster's totals."""
    resources = [node["Resources"] for node in nodes]
    return {
        "CPU": max(node.get("CPU", 0.0) for node in resources),
        "GPU": max(node.get("GPU", 0.0) for node in resources),
        "total_CPU": sum(node.get("CPU", 0.0) for node in resources),
        "total_GPU": sum(node.get("GPU", 0.0) for node in resources),
    }


def check_cluster(spec: SweepSpec, storage: StorageLocation, uri: str | None) -> None:
    """Refuse what can never work on the connected cluster, before anything is recorded."""
    nodes = alive_nodes()
    problems = check_resources(spec, cluster_resources(nodes), "the Ray cluster")
    problems += memory_problems(spec)  # a trial that cannot fit its GPUs never starts
    hosts = {node["NodeManagerAddress"] for node in nodes}
    if len(hosts) > 1:
        # Several machines: what trials write must be reachable from every one of them.
        if not storage.is_remote and not spec.storage.shared_filesystem:
            problems.append(
                Problem(
                    "storage.path",
                    f"{storage} is a local path but the cluster spans {len(hosts)} hosts; "
                    "use storage every node reaches: s3://... or gs://..., or an NFS mount "
                    "present on every node (then set storage.shared_filesystem: true)",
                )
            )
        if uri is not None and is_local_store(uri):
            problems.append(
                Problem(
                    "tracking.tracking_uri",
                    f"{uri} is a store on this machine only; workers on other hosts cannot "
                    "write to it: run `mlflow server` and give its http:// URI",
                )
            )
    if problems:
        raise SpecError("spec", problems)


def _describe_space(spec: SweepSpec) -> str:
    lines = describe_space(spec)
    lines.append(f"trials: {count_trials(spec)} (algorithm {spec.search.algorithm})")
    return "\n".join(lines) + "\n"


def _tuner(
    spec: SweepSpec, tune_dir: StorageLocation, trainable: Any, progress: SweepProgress
) -> tune.Tuner:
    search = spec.search
    return tune.Tuner(
        trainable,
        param_space=param_space(spec, search) if search.algorithm != "optuna" else {},
        tune_config=tune.TuneConfig(
            metric=search.metric,
            mode=search.mode,
            search_alg=search_algorithm(spec, search),
            scheduler=scheduler(spec, search),
            num_samples=search.num_samples,
            max_concurrent_trials=(
                search.max_concurrent_trials if search.algorithm == "optuna" else None
            ),
            time_budget_s=search.time_budget_s,
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=tune_dir.name,
            storage_path=tune_dir.parent.uri,
            failure_config=tune.FailureConfig(max_failures=spec.resources.max_failures),
            # Single-worker trials checkpoint through Tune: the same retention as Train's.
            checkpoint_config=tune.CheckpointConfig(num_to_keep=spec.training.keep_checkpoints),
            callbacks=[progress],
            verbose=0,
        ),
    )


def prepare_sweep_data(spec: SweepSpec, storage: StorageLocation) -> PreparedData:
    """Tokenised once per sweep, cached under the storage (`data_cache/`): tokenised on this
    machine, and with bucket storage a copy of the prepared folder kept in the bucket."""
    cache = (
        StorageLocation.parse(spec.data.cache_dir)
        if spec.data.cache_dir
        else storage / "data_cache"
    )
    local_cache = cache.local_path or LOCAL_HOME / "data"
    prepared = prepare_data(spec.model, spec.data, local_cache)
    if cache.is_remote and prepared.path is not None:
        copy = cache / prepared.path.name
        if not copy.exists():
            copy.upload_folder(prepared.path)
    return prepared


def run_sweep(
    spec: SweepSpec,
    *,
    spec_text: str | None = None,
    address: str | None = None,
    sweep_id: str | None = None,
    resume: bool = False,
    printer: Printer = print,
    live: bool = False,
    verbose: bool = True,
) -> SweepOutcome:
    """Run (or resume) a sweep; a staged search runs its stages in order, each from the best.
    `live`: a rich progress panel on the terminal; `verbose`: Ray's own output too."""
    storage = storage_location(spec)
    sweep_id = sweep_id or new_sweep_id(spec.name)
    sweep_dir = storage / sweep_id
    uri = tracking_uri(spec)
    if uri is not None:
        check_tracking_server(uri)  # before Ray starts: a refused password is one line
    # The data before Ray and before the sweep's folder: a missing file or a broken row is
    # said in seconds, and leaves no half-made sweep behind.
    printer(f"sweep {sweep_id}: preparing data ({spec.data.source}) ...")
    prepared = prepare_sweep_data(spec, storage)
    printer(prepared.summary.format())
    connect(address, verbose=verbose)
    _treat_sigterm_as_ctrl_c()
    check_cluster(spec, storage, uri)

    sweep_dir.mkdirs()
    spec_yaml = spec_text or yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
    if not resume:
        (sweep_dir / SPEC_FILE).write_text(spec_yaml)
    # Trials read the prepared folder where every node sees it (local runs, shared mounts);
    # with bucket storage the splits travel through Ray's object store instead.
    data = DataLocation(
        path=str(prepared.path), object_ref=ray.put(prepared) if storage.is_remote else None
    )
    dataset = dataset_record(spec, prepared)
    tracking_args = None
    tracking = None
    if uri is not None:
        experiment = spec.experiment_name
        tracking_args = (uri, experiment, spec.name, sweep_id)
        tracking = SweepTracking(*tracking_args, artifact_location=artifact_location(spec))
        tracking.log_sweep_settings(
            {**_sweep_params(spec), **prepared.summary.params()},
            {
                "spec.yaml": spec_yaml,
                "search_space.txt": _describe_space(spec),
                "data_summary.txt": prepared.summary.format() + "\n",
            },
        )
        if not resume:  # logged once: a resumed sweep's data is the same data
            tracking.client.log_batch(
                tracking.parent_run_id,
                metrics=[
                    Metric(key, float(value), int(time.time() * 1000), 0)
                    for key, value in prepared.summary.metrics().items()
                ],
            )
        dataset.log_to(tracking.client, tracking.parent_run_id)
        printer(
            f"MLflow: {redact_text(uri)} "
            f"(experiment {experiment}, parent run {tracking.parent_run_id})"
        )
    printer(f"sweep {sweep_id}: {count_trials(spec)} trials, storage {sweep_dir}")

    stages = stage_specs(spec)
    rows: list[TrialRow] = []
    # Each stage runs from the fixed values the stage before ran with, its best trial's applied:
    # the winners of every earlier stage carry on to the last stage and to best_config.yaml.
    stage_spec = spec
    interrupted = False
    view = LiveView(count_trials(spec), spec.search.metric) if live else None
    try:
        for index, stage in enumerate(stages):
            stage_spec = next_stage_spec(stage, stage_spec, rows)
            if len(stages) > 1:
                tune_dir = sweep_dir / f"stage{index + 1}-{spec.search.stages[index].name}"
                printer(f"stage {index + 1}/{len(stages)} '{spec.search.stages[index].name}'")
            else:
                tune_dir = sweep_dir
            plan = TrialPlan(
                sweep_id=sweep_id,
                spec=stage_spec,
                data=data,
                train_storage=(sweep_dir / "train").uri,
                tracking_uri=uri,
                experiment=spec.experiment_name,
                tracking_env=tracking_credentials(os.environ),
                dataset=dataset,
            )
            trainable = make_trainable(plan)
            if tune.Tuner.can_restore(tune_dir.uri):
                if not resume:
                    raise SweepError(
                        f"{tune_dir} already holds a sweep; `simpo-sweep resume` continues it"
                    )
                tuner = tune.Tuner.restore(
                    tune_dir.uri, trainable=trainable, resume_unfinished=True, resume_errored=True
                )
            else:
                progress = SweepProgress(stage_spec, sweep_dir, tracking_args, printer, view)
                tuner = _tuner(stage_spec, tune_dir, trainable, progress)
            results = tuner.fit()
            rows = trial_rows(stage_spec, results, read_outcomes(sweep_dir))
            # Ctrl-C before every trial started leaves fewer trials than the search asked for.
            never_started = search_unfinished(stage_spec, len(rows))
            interrupted = never_started or any(row.state == STATE_UNFINISHED for row in rows)
            if interrupted:
                break
    finally:
        if view is not None:
            view.stop()

    status = "interrupted" if interrupted else "completed"
    files = write_results(stage_spec, rows, sweep_dir)
    cost = sweep_cost(stage_spec, rows)
    retention = apply_retention(sweep_dir, spec)
    printer(retention.format())
    held_bytes = checkpoint_bytes(sweep_dir)
    best = best_row(rows)
    exported = None
    if status == "completed" and best is not None and spec.export.best:
        printer(f"exporting the best trial {best.trial_id} ...")
        exported = export_best(stage_spec, sweep_dir, best, tracking, printer)
    if tracking is not None:
        for row in rows:
            run_id = tracking.run_id_for(row.trial_id) if row.state == STATE_UNFINISHED else None
            if run_id is not None:
                tracking.finish_trial(run_id, row.state, row.diagnosis)
        tracking.log_sweep_summary(
            spec.search.metric,
            best.metric if best is not None else None,
            best.trial_id if best is not None else None,
            best.params if best is not None else {},
            Counter(row.state for row in rows),
        )
        log_cost(tracking, cost, held_bytes, retention.freed_bytes)
        if rows:
            files.update(
                (f"report/{location.name}", location)
                for location in write_report(spec, sweep_dir, tracking)[1]
            )
        tracking.finish(
            status,
            {
                name: location.read_text()
                for name, location in files.items()
                if location.name.rsplit(".", 1)[-1] in {"md", "csv", "yaml"} and "/" not in name
            },
        )
    return SweepOutcome(
        sweep_id,
        sweep_dir,
        status,
        rows,
        best,
        files,
        cost=cost,
        checkpoint_bytes=held_bytes,
        exported=exported,
    )


def export_best(
    spec: SweepSpec,
    sweep_dir: StorageLocation,
    best: TrialRow,
    tracking: SweepTracking | None,
    printer: Printer,
) -> ExportedModel:
    """The winner as a Hugging Face folder under <sweep>/export/, logged to its trial's run
    and registered (models:/NAME/VERSION) when the spec asks for it."""
    trial = next(
        record for record in read_trials(spec, sweep_dir) if record.trial_id == best.trial_id
    )
    local = sweep_dir.local_path
    with tempfile.TemporaryDirectory(prefix="simpo-export-") as staging:
        target = (local or Path(staging)) / EXPORT_FOLDER / best.trial_id
        exported = export_to(spec, sweep_dir, trial, target, merge=spec.export.merge_lora)
        if local is None:  # a bucket sweep keeps its export in the bucket too
            (sweep_dir / EXPORT_FOLDER / best.trial_id).upload_folder(target)
        printer(f"exported {best.trial_id} to {sweep_dir / EXPORT_FOLDER / best.trial_id}")
        run_id = tracking.run_id_for(best.trial_id) if tracking is not None else None
        if spec.export.register_model and run_id is not None:
            name = spec.export.model_name or spec.experiment_name
            version = register_best(spec, sweep_dir, exported, run_id, name)
            printer(f"registered in MLflow as models:/{name}/{version}")
    return exported


def log_cost(tracking: SweepTracking, cost: Cost, held_bytes: int, freed_bytes: int) -> None:
    """Each trial's resource-hours on its run; the sweep's total, what early stops saved, the
    disk its checkpoints hold and what checkpoint retention freed, on the parent."""
    now = int(time.time() * 1000)
    key = f"cost/{cost.name}"
    for trial_id, hours in cost.per_trial.items():
        run_id = tracking.run_id_for(trial_id)
        if run_id is not None:
            tracking.client.log_batch(run_id, metrics=[Metric(key, hours, now, 0)])
    tracking.client.log_batch(
        tracking.parent_run_id,
        metrics=[
            Metric(key, cost.total, now, 0),
            Metric(f"cost/{cost.name}_saved_by_early_stops", cost.saved_by_early_stops, now, 0),
            Metric("storage/checkpoint_gb", held_bytes / 1e9, now, 0),
            Metric("storage/freed_gb", freed_bytes / 1e9, now, 0),
        ],
    )


def dataset_record(spec: SweepSpec, prepared: PreparedData) -> DatasetRecord:
    """The prepared data as MLflow records a dataset: its fingerprint is the digest."""
    source = spec.data.source
    source_type = (
        "builtin"
        if source.startswith("builtin:")
        else "local"
        if "://" in source or Path(source).expanduser().exists()
        else "hub"
    )
    summary = prepared.summary
    columns = ["prompt", "chosen", "rejected"]
    schema = {"mlflow_colspec": [{"name": name, "type": "string"} for name in columns]}
    profile = {
        "rows_read": summary.rows_read,
        "train_pairs": summary.train.pairs,
        "eval_pairs": summary.eval.pairs,
        "shape": summary.shape,
    }
    return DatasetRecord(
        name=source.removeprefix("builtin:").rstrip("/").rsplit("/", 1)[-1] or source,
        digest=prepared.fingerprint[:36],
        source=source,
        source_type=source_type,
        schema=json.dumps(schema),
        profile=json.dumps(profile),
    )


def search_unfinished(spec: SweepSpec, trials_run: int) -> bool:
    """Fewer trials than the search asks for, and no time budget that explains it."""
    return spec.search.time_budget_s is None and trials_run < count_trials(spec)


def next_stage_spec(
    stage: SweepSpec, previous: SweepSpec, previous_rows: list[TrialRow]
) -> SweepSpec:
    """The stage's search over the fixed values the previous stage ran with (`previous`, which
    already carries every earlier stage's winner), updated by the previous stage's best trial.
    For the first stage, `previous` is the sweep's spec and `previous_rows` is empty."""
    best = best_row(previous_rows)
    fixed = spec_with_trial(previous, best.sampled) if best is not None else previous
    return fixed.model_copy(update={"search": stage.search})


def _sweep_params(spec: SweepSpec) -> dict[str, Any]:
    search = spec.search
    return {
        "sweep.algorithm": search.algorithm,
        "sweep.scheduler": search.scheduler.type,
        "sweep.metric": search.metric,
        "sweep.mode": search.mode,
        "sweep.num_samples": search.num_samples,
        "sweep.trials": count_trials(spec),
        "sweep.max_concurrent_trials": search.max_concurrent_trials,
        "sweep.searched": ", ".join(searched_keys(spec)),
        "model.name": spec.model.name,
        "data.source": spec.data.source,
        "resources.num_workers": spec.resources.num_workers,
        "resources.cpus_per_worker": spec.resources.cpus_per_worker,
        "resources.gpus_per_worker": spec.resources.gpus_per_worker,
    }
