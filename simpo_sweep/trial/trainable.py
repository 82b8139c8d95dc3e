"""One trial = one Ray Train (V2) TorchTrainer run for one sampled configuration.

The Tune trial is the Train driver: it resolves its configuration from the `TrialPlan`, opens
(or reopens) its MLflow child run, and runs a TorchTrainer whose run name is stable per trial,
so a retried trial restores from its last checkpoint.

Single-worker trials use Train's local mode (`num_workers=0`): the loop runs inside the trial
process, which Tune reuses between trials. That skips the worker-group start (about 20-40 s per
trial on a 2-core machine) that short demo trials cannot afford. Multi-worker trials start a
worker group and train with DDP or FSDP (resources.strategy; auto asks the memory plan).
"""

from __future__ import annotations

import os
import time
from typing import Any

import ray
import ray.train
import ray.tune
from ray.train.torch import TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback

from simpo_sweep.engine.memory import plan_trial, trial_strategy
from simpo_sweep.spec.loading import Problem, SpecError
from simpo_sweep.spec.models import SweepSpec
from simpo_sweep.spec.space import flat_params, largest_memory_trial, trial_config
from simpo_sweep.tracking.mlflow_runs import SweepTracking, trial_index, trial_run_name
from simpo_sweep.trial.plan import TrialPlan, WorkerPlan
from simpo_sweep.trial.worker import train_worker


def sampled_values(config: dict[str, Any]) -> dict[str, Any]:
    """Tune's config -> {config path: value}; grid points arrive as one dict under 'grid'."""
    values = {key: value for key, value in config.items() if key != "grid" and value is not None}
    values.update(config.get("grid", {}))
    return values


def _open_child_run(
    plan: TrialPlan, trial_id: str, sampled: dict[str, Any], params: dict[str, Any]
) -> str | None:
    if plan.tracking_uri is None:
        return None
    tracking = SweepTracking(plan.tracking_uri, plan.experiment, plan.spec.name, plan.sweep_id)
    # Named by what it tries, for chart legends; the Ray trial id stays its tag.
    run_name = trial_run_name(trial_index(trial_id), sampled)
    run_id = tracking.child_run(trial_id, params, run_name=run_name)
    if plan.dataset is not None:
        plan.dataset.log_to(tracking.client, run_id)
    # Where this attempt runs (Tune's own node_ip is the driver's in local mode).
    tracking.client.set_tag(run_id, "simpo_sweep.node_ip", ray.util.get_node_ip_address())
    tracking.client.set_tag(run_id, "simpo_sweep.node_id", ray.get_runtime_context().get_node_id())
    return run_id


def memory_problems(spec: SweepSpec) -> list[Problem]:
    """The memory plan of the sweep's largest trial against resources.gpu_memory_gb (nothing
    to check without it, or when the model's config cannot be read: the plan is then
    unknown, not refused)."""
    if spec.resources.gpu_memory_gb is None or spec.resources.gpus_per_worker == 0:
        return []
    largest, _ = largest_memory_trial(spec)
    try:
        memory = plan_trial(largest.model, largest.data, largest.training, largest.resources)
    except (OSError, ValueError):
        return []
    refusal = memory.refusal()
    return [Problem("resources.gpu_memory_gb", refusal)] if refusal else []


def make_trainable(plan: TrialPlan) -> Any:
    placement = plan.placement
    # A trial that cannot fit its GPU would fail with an out-of-memory error after minutes of
    # start-up: refuse the sweep instead (validate says the same).
    problems = memory_problems(plan.spec)
    if problems:
        raise SpecError("memory plan", problems)

    def run_trial(config: dict[str, Any]) -> None:
        started_at = time.time()
        os.environ.update(plan.tracking_env)
        trial_id = ray.tune.get_context().get_trial_id()
        sampled = sampled_values(config)
        resolved = trial_config(plan.spec, sampled)
        strategy = trial_strategy(
            resolved.model, resolved.data, resolved.training, plan.spec.resources
        )
        worker_plan = WorkerPlan(
            config=resolved,
            data=plan.data,
            tracking_uri=plan.tracking_uri,
            run_id=_open_child_run(plan, trial_id, sampled, flat_params(resolved)),
            loop_in_trial=placement.loop_in_trial,
            trial_started_at=started_at,
            metric=plan.metric,
            strategy=strategy,
            tracking_env=plan.tracking_env,
        )
        if placement.loop_in_trial:
            scaling = ray.train.ScalingConfig(num_workers=0)
            callbacks: list[Any] = []
        else:
            gpus = placement.gpus_per_worker
            scaling = ray.train.ScalingConfig(
                num_workers=placement.num_workers,
                use_gpu=gpus > 0,
                resources_per_worker={
                    "CPU": placement.cpus_per_worker,
                    **({"GPU": gpus} if gpus else {}),
                },
            )
            callbacks = [TuneReportCallback()]
        trainer = TorchTrainer(
            train_worker,
            train_loop_config={"plan": worker_plan},
            scaling_config=scaling,
            run_config=ray.train.RunConfig(
                name=f"{plan.sweep_id}-{trial_id}",
                storage_path=plan.train_storage,
                failure_config=ray.train.FailureConfig(max_failures=placement.max_failures),
                checkpoint_config=ray.train.CheckpointConfig(
                    num_to_keep=plan.spec.training.keep_checkpoints
                ),
                callbacks=callbacks,
            ),
        )
        trainer.fit()

    return ray.tune.with_resources(run_trial, placement.tune_resources())
