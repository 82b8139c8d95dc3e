"""What the service hands a trial: a frozen `TrialPlan`, built once per stage of a sweep.

It crosses one boundary typed: the Tune trial reads it, applies its sampled values and hands
each Ray Train worker a `WorkerPlan`. Nothing on the way is turned back into dicts or validated
again.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from simpo_sweep.spec.models import ResourcesSpec, SweepSpec, TrialConfig
from simpo_sweep.tracking.mlflow_runs import DatasetRecord


@dataclass(frozen=True)
class Placement:
    """Where a trial runs and what it holds."""

    num_workers: int
    cpus_per_worker: float
    gpus_per_worker: float
    # A single-worker trial's loop runs inside the Tune trial (Ray Train local mode): no
    # worker group to start, 20 s or more saved per trial.
    loop_in_trial: bool
    driver_cpus: float
    max_failures: int

    @classmethod
    def of(cls, resources: ResourcesSpec) -> Placement:
        return cls(
            num_workers=resources.num_workers,
            cpus_per_worker=resources.cpus_per_worker,
            gpus_per_worker=resources.gpus_per_worker,
            loop_in_trial=resources.loop_in_trial,
            driver_cpus=resources.driver_cpus,
            max_failures=resources.max_failures,
        )

    def tune_resources(self) -> dict[str, float]:
        """What the Tune trial itself holds: with the loop inside it, the worker's share."""
        if self.loop_in_trial:
            return {"cpu": self.cpus_per_worker, "gpu": self.gpus_per_worker}
        return {"cpu": self.driver_cpus, "gpu": 0.0}


@dataclass(frozen=True)
class DataLocation:
    """The prepared (tokenised) data every trial of the sweep reads."""

    path: str  # the prepared folder, where every node sees it (local runs, shared mounts)
    object_ref: Any = None  # with bucket storage: a Ray ObjectRef of the PreparedData


@dataclass(frozen=True)
class TrialPlan:
    sweep_id: str
    spec: SweepSpec  # this stage's spec: its fixed values, each trial's sampled ones on top
    data: DataLocation
    train_storage: str  # URI or absolute path where Ray Train keeps trial runs and checkpoints
    tracking_uri: str | None
    experiment: str
    # MLflow credentials of the sweep's driver, for trial processes on nodes that lack them;
    # they travel pickled with the plan, never in job metadata, and are never printed.
    tracking_env: Mapping[str, str] = field(default_factory=dict, repr=False)
    dataset: DatasetRecord | None = None  # recorded on every trial's run (MLflow Datasets)

    @property
    def metric(self) -> str:
        return self.spec.search.metric

    @property
    def placement(self) -> Placement:
        return Placement.of(self.spec.resources)


@dataclass(frozen=True)
class WorkerPlan:
    """What every Ray Train worker of one trial trains with."""

    config: TrialConfig
    data: DataLocation
    tracking_uri: str | None
    run_id: str | None  # the trial's MLflow child run; rank 0 logs to it
    loop_in_trial: bool
    trial_started_at: float
    metric: str
    # ddp or fsdp, resolved for this trial (resources.strategy; auto by the memory plan)
    strategy: str = "ddp"
    tracking_env: Mapping[str, str] = field(default_factory=dict, repr=False)
