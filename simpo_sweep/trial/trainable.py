"""One trial = one Ray Train (V2) TorchTrainer run for one sampled configuration.

The Tune trial is the Train driver: it resolves its configuration, opens (or reopens) its MLflow
child run, and runs a TorchTrainer whose run name is stable per trial, so a retried trial
restores from its last checkpoint.

Single-worker trials use Train's local mode (`num_workers=0`): the loop runs inside the trial
process, which Tune reuses between trials. That skips the worker-group start (about 20-40 s per
trial on a 2-core machine) that short demo trials cannot afford. Multi-worker trials start a
worker group and train with DDP.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import ray
import ray.train
import ray.tune
from ray.train.torch import TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback

from simpo_sweep.spec.models import ResourcesSpec, SweepSpec
from simpo_sweep.spec.space import flat_params, trial_config
from simpo_sweep.tracking.mlflow_runs import SweepTracking
from simpo_sweep.trial.worker import train_worker


@dataclass(frozen=True)
class TrialContext:
    """What every trial of a sweep shares (pickled into the trainable)."""

    spec: dict[str, Any]  # SweepSpec as a dict: small and picklable
    sweep_id: str
    data_path: str
    data_ref: Any  # ray ObjectRef of the PreparedData when storage is a bucket, else None
    storage_path: str  # absolute
    tracking_uri: str | None
    experiment: str


def trial_resources(resources: ResourcesSpec) -> dict[str, float]:
    """What the Tune trial itself holds: in local mode it is the worker, else only the driver."""
    if resources.loop_in_trial:
        return {"cpu": resources.cpus_per_worker, "gpu": resources.gpus_per_worker}
    return {"cpu": resources.driver_cpus, "gpu": 0.0}


def sampled_values(config: dict[str, Any]) -> dict[str, Any]:
    """Tune's config -> {config path: value}; grid points arrive as one dict under 'grid'."""
    values = {key: value for key, value in config.items() if key != "grid" and value is not None}
    values.update(config.get("grid", {}))
    return values


def make_trainable(context: TrialContext) -> Any:
    spec = SweepSpec.model_validate(context.spec)

    def run_trial(config: dict[str, Any]) -> None:
        started_at = time.time()
        trial_id = ray.tune.get_context().get_trial_id()
        resolved = trial_config(spec, sampled_values(config))
        run_id = None
        if context.tracking_uri is not None:
            tracking = SweepTracking(
                context.tracking_uri, context.experiment, spec.name, context.sweep_id
            )
            run_id = tracking.child_run(trial_id, flat_params(resolved))
            # Where this attempt runs (Tune's own node_ip is the driver's in local mode).
            tracking.client.set_tag(run_id, "simpo_sweep.node_ip", ray.util.get_node_ip_address())
            tracking.client.set_tag(
                run_id, "simpo_sweep.node_id", ray.get_runtime_context().get_node_id()
            )
        local_mode = spec.resources.loop_in_trial
        loop_config = {
            "trial": resolved.model_dump(),
            "data_path": context.data_path,
            "data_ref": context.data_ref,
            "tracking_uri": context.tracking_uri,
            "run_id": run_id,
            "local_mode": local_mode,
            "trial_started_at": started_at,
            "metric": spec.search.metric,
        }
        resources = spec.resources
        if local_mode:
            scaling = ray.train.ScalingConfig(num_workers=0)
            callbacks: list[Any] = []
        else:
            scaling = ray.train.ScalingConfig(
                num_workers=resources.num_workers,
                use_gpu=resources.gpus_per_worker > 0,
                resources_per_worker={
                    "CPU": resources.cpus_per_worker,
                    **({"GPU": resources.gpus_per_worker} if resources.gpus_per_worker else {}),
                },
            )
            callbacks = [TuneReportCallback()]
        trainer = TorchTrainer(
            train_worker,
            train_loop_config=loop_config,
            scaling_config=scaling,
            run_config=ray.train.RunConfig(
                name=f"{context.sweep_id}-{trial_id}",
                storage_path=context.storage_path,
                failure_config=ray.train.FailureConfig(max_failures=resources.max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
                callbacks=callbacks,
            ),
        )
        trainer.fit()

    return ray.tune.with_resources(run_trial, trial_resources(spec.resources))
