"""Sweep lifecycle: prepare once, run (or resume) the Tuner, label every trial, write the results.

Layout of a sweep on storage (`storage.path/<sweep id>/`):
    spec.yaml            the spec as run (overrides applied): what `resume` reads
    <Tune state>         Tune's experiment state and one folder per trial
    train/<trial id>/    each trial's Ray Train run and checkpoints
    results.csv, results.md, best_config.yaml    written at the end
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import ray
import yaml
from ray import tune

from simpo_sweep.engine.data import prepare_data
from simpo_sweep.service.errors import SweepError
from simpo_sweep.service.progress import SweepProgress, read_final_states
from simpo_sweep.service.results import (
    STATE_UNFINISHED,
    TrialRow,
    best_row,
    trial_rows,
    write_results,
)
from simpo_sweep.service.search import param_space, scheduler, search_algorithm
from simpo_sweep.spec.loading import Problem, SpecError, check_resources, load_spec
from simpo_sweep.spec.models import SweepSpec
from simpo_sweep.spec.space import (
    count_trials,
    describe_space,
    searched_keys,
    spec_with_trial,
    stage_specs,
)
from simpo_sweep.tracking.mlflow_runs import SweepTracking, default_tracking_uri, is_local_store
from simpo_sweep.tracking.redact import redact_text
from simpo_sweep.trial.trainable import TrialContext, make_trainable

SPEC_FILE = "spec.yaml"
LOCAL_DATA_CACHE = Path.home() / ".cache" / "simpo-sweep" / "data"
REMOTE_STORAGE_SCHEMES = {"s3", "gs", "gcs", "abfs", "az", "hdfs"}

Printer = Callable[[str], None]


@dataclass
class SweepOutcome:
    sweep_id: str
    sweep_dir: Path
    status: str  # completed | interrupted
    rows: list[TrialRow]
    best: TrialRow | None
    files: dict[str, Path] = field(default_factory=dict)


def new_sweep_id(name: str) -> str:
    return f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def storage_root(spec: SweepSpec) -> str:
    """Absolute storage path (URIs kept as they are): Ray workers run in other folders."""
    if urlparse(spec.storage.path).scheme in REMOTE_STORAGE_SCHEMES:
        return spec.storage.path
    return str(Path(spec.storage.path).expanduser().resolve())


def tracking_uri(spec: SweepSpec) -> str | None:
    if not spec.tracking.enabled:
        return None
    return (
        spec.tracking.tracking_uri
        or os.environ.get("MLFLOW_TRACKING_URI")
        or default_tracking_uri(storage_root(spec))
    )


def connect(address: str | None) -> None:
    """Local Ray by default; an existing cluster when an address is given."""
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    try:
        if address:
            ray.init(address=address, log_to_driver=True)
        else:
            ray.init(include_dashboard=False)
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


def check_cluster(spec: SweepSpec, storage: str, uri: str | None) -> None:
    """Refuse what can never work on the connected cluster, before anything is recorded."""
    nodes = alive_nodes()
    problems = check_resources(spec, cluster_resources(nodes), "the Ray cluster")
    hosts = {node["NodeManagerAddress"] for node in nodes}
    if len(hosts) > 1:
        # Several machines: what trials write must be reachable from every one of them.
        remote = urlparse(storage).scheme in REMOTE_STORAGE_SCHEMES
        if not remote and not spec.storage.shared_filesystem:
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


def _tuner(spec: SweepSpec, tune_dir: Path, trainable: Any, progress: SweepProgress) -> tune.Tuner:
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
            storage_path=str(tune_dir.parent),
            failure_config=tune.FailureConfig(max_failures=spec.resources.max_failures),
            callbacks=[progress],
            verbose=0,
        ),
    )


def run_sweep(
    spec: SweepSpec,
    *,
    spec_text: str | None = None,
    address: str | None = None,
    sweep_id: str | None = None,
    resume: bool = False,
    printer: Printer = print,
) -> SweepOutcome:
    """Run (or resume) a sweep; a staged search runs its stages in order, each from the best."""
    storage = storage_root(spec)
    sweep_id = sweep_id or new_sweep_id(spec.name)
    sweep_dir = Path(storage) / sweep_id
    uri = tracking_uri(spec)
    connect(address)
    _treat_sigterm_as_ctrl_c()
    check_cluster(spec, storage, uri)

    sweep_dir.mkdir(parents=True, exist_ok=True)
    spec_yaml = spec_text or yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=False)
    if not resume:
        (sweep_dir / SPEC_FILE).write_text(spec_yaml)

    printer(f"sweep {sweep_id}: preparing data ({spec.data.source}) ...")
    remote_storage = urlparse(storage).scheme in REMOTE_STORAGE_SCHEMES
    default_cache = LOCAL_DATA_CACHE if remote_storage else Path(storage) / "data_cache"
    prepared = prepare_data(spec.model, spec.data, spec.data.cache_dir or default_cache)
    # Trials read the prepared folder where every node sees it (local runs, shared mounts);
    # with bucket storage the splits travel through Ray's object store instead.
    data_ref = ray.put(prepared) if remote_storage else None
    tracking_args = None
    tracking = None
    if uri is not None:
        experiment = spec.experiment_name
        tracking_args = (uri, experiment, spec.name, sweep_id)
        tracking = SweepTracking(*tracking_args)
        tracking.log_sweep_settings(
            _sweep_params(spec),
            {"spec.yaml": spec_yaml, "search_space.txt": _describe_space(spec)},
        )
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
    for index, stage in enumerate(stages):
        stage_spec = next_stage_spec(stage, stage_spec, rows)
        if len(stages) > 1:
            tune_dir = sweep_dir / f"stage{index + 1}-{spec.search.stages[index].name}"
            printer(f"stage {index + 1}/{len(stages)} '{spec.search.stages[index].name}'")
        else:
            tune_dir = sweep_dir
        context = TrialContext(
            spec=stage_spec.model_dump(mode="json"),
            sweep_id=sweep_id,
            data_path=str(prepared.path),
            data_ref=data_ref,
            storage_path=str(sweep_dir / "train"),
            tracking_uri=uri,
            experiment=spec.experiment_name,
        )
        trainable = make_trainable(context)
        if tune.Tuner.can_restore(str(tune_dir)):
            if not resume:
                raise SweepError(
                    f"{tune_dir} already holds a sweep; `simpo-sweep resume` continues it"
                )
            tuner = tune.Tuner.restore(
                str(tune_dir), trainable=trainable, resume_unfinished=True, resume_errored=True
            )
        else:
            progress = SweepProgress(stage_spec, sweep_dir, tracking_args, printer)
            tuner = _tuner(stage_spec, tune_dir, trainable, progress)
        results = tuner.fit()
        rows = trial_rows(stage_spec, results, read_final_states(sweep_dir))
        # Ctrl-C before every trial started leaves fewer trials than the search asked for.
        never_started = search_unfinished(stage_spec, len(rows))
        interrupted = never_started or any(row.state == STATE_UNFINISHED for row in rows)
        if interrupted:
            break

    status = "interrupted" if interrupted else "completed"
    files = write_results(stage_spec, rows, sweep_dir)
    if tracking is not None:
        from simpo_sweep.service.report import write_report  # report builds on this module

        for row in rows:
            run_id = tracking.run_id_for(row.trial_id) if row.state == STATE_UNFINISHED else None
            if run_id is not None:
                tracking.finish_trial(run_id, row.state, row.diagnosis)
        if rows:
            files.update(
                (f"report/{path.name}", path) for path in write_report(spec, sweep_dir, tracking)[1]
            )
        tracking.finish(
            status,
            {
                name: path.read_text()
                for name, path in files.items()
                if path.suffix in {".md", ".csv", ".yaml"} and "/" not in name
            },
        )
    return SweepOutcome(sweep_id, sweep_dir, status, rows, best_row(rows), files)


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


def load_sweep_spec(sweep_dir: Path) -> SweepSpec:
    """The spec a sweep ran with; its storage is where the sweep was found, whatever the
    current folder (the spec may hold a relative path)."""
    spec = load_spec(sweep_dir / SPEC_FILE)
    storage = spec.storage.model_copy(update={"path": str(sweep_dir.parent)})
    return spec.model_copy(update={"storage": storage})


def find_sweep_dir(sweep: str, storage_path: str = "simpo_runs") -> Path:
    """A sweep named by its folder, or by its id under the default storage path."""
    for candidate in (Path(sweep), Path(storage_path) / sweep):
        if (candidate / SPEC_FILE).is_file():
            return candidate.resolve()
    raise SweepError(
        f"no sweep at {sweep!r}: give the sweep's folder (it holds {SPEC_FILE}) "
        f"or its id under {storage_path}/"
    )
