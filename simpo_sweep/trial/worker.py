"""The training function every Ray Train worker of a trial runs.

Rank 0 writes the trial's MLflow child run (metrics already averaged over workers by the engine)
and the checkpoints; every rank reports to Ray at the same steps, because `ray.train.report`
is a barrier. In Train's local mode (a single-worker trial, see trial.trainable) the loop runs
inside the Tune trial itself and reports through Tune.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.tune
import torch

from simpo_sweep.engine.data import load_prepared
from simpo_sweep.engine.models import load_model, load_tokenizer
from simpo_sweep.engine.train import SimPOTrainer, StepEvent
from simpo_sweep.tracking.mlflow_runs import MetricLogger
from simpo_sweep.trial.outcome import DIAGNOSIS, STEP, VERDICT
from simpo_sweep.trial.plan import WorkerPlan

# Orchestration overhead, as bench/orchestration.py reads it.
STARTUP = "perf/trial_start_to_first_step_s"
FIT_TIME = "perf/fit_time_s"


class _RayReporting:
    """ray.train.* on Train workers, ray.tune.* when the loop runs inside the Tune trial."""

    def __init__(self, loop_in_trial: bool):
        self.loop_in_trial = loop_in_trial
        if loop_in_trial:
            self.rank, self.world_size = 0, 1
        else:
            context = ray.train.get_context()
            self.rank, self.world_size = context.get_world_rank(), context.get_world_size()

    def latest_checkpoint(self) -> Any:
        return ray.tune.get_checkpoint() if self.loop_in_trial else ray.train.get_checkpoint()

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        if self.loop_in_trial:
            checkpoint = (
                ray.tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
            )
            ray.tune.report(metrics, checkpoint=checkpoint)
        else:
            checkpoint = (
                ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
            )
            ray.train.report(metrics, checkpoint=checkpoint)


def train_worker(loop_config: dict[str, Any]) -> None:
    plan: WorkerPlan = loop_config["plan"]
    os.environ.update(plan.tracking_env)  # MLflow's client reads its credentials there
    config = plan.config
    ray_io = _RayReporting(loop_in_trial=plan.loop_in_trial)
    device = _device()
    data = plan.data
    prepared = ray.get(data.object_ref) if data.object_ref is not None else load_prepared(data.path)
    tokenizer = load_tokenizer(config.model)
    torch.manual_seed(config.training.seed)
    model = load_model(config.model, tokenizer, device, seed=config.training.seed)
    checkpoint_root = Path(tempfile.mkdtemp(prefix="simpo-ckpt-"))
    trainer = SimPOTrainer(
        model,
        prepared.train,
        prepared.eval,
        training=config.training,
        simpo=config.simpo,
        diagnostics=config.diagnostics,
        pad_token_id=int(tokenizer.pad_token_id),
        device=device,
        checkpoint_root=checkpoint_root,
    )
    logger = None
    if ray_io.rank == 0 and plan.run_id is not None and plan.tracking_uri is not None:
        logger = MetricLogger(plan.tracking_uri, plan.run_id)
        logger.client.set_tag(plan.run_id, "simpo_sweep.padding_free", str(trainer.packed).lower())

    checkpoint = ray_io.latest_checkpoint()
    last_eval: dict[str, float] = {}
    # Orchestration overhead, as bench/orchestration.py reads it: the time before the first
    # optimizer step, and the time spent inside the training loop.
    timing: dict[str, float] = {}

    def on_step(event: StepEvent) -> str | None:
        now = time.time()
        if not timing:
            timing[STARTUP] = now - plan.trial_started_at
            if logger is not None:
                logger.log(event.step, {STARTUP: timing[STARTUP]})
        timing[FIT_TIME] = now - fit_started_at
        if logger is not None:
            logger.log(event.step, event.metrics)
        if event.eval_metrics:
            last_eval.update(event.eval_metrics)
        due = (
            event.eval_metrics is not None
            or event.checkpoint_dir is not None
            or event.is_last
            or event.diagnosis.degenerate
        )
        if due:
            report = {
                **event.train_metrics,
                **last_eval,
                **timing,
                STEP: event.step,
                VERDICT: event.diagnosis.verdict,
                DIAGNOSIS: event.diagnosis.summary(),
            }
            # Tune requires the searched metric in every report; a trial stopped as degenerate
            # before its first evaluation has none, and NaN ranks it last.
            report.setdefault(plan.metric, float("nan"))
            if logger is not None and event.checkpoint_dir is not None:
                # Every step up to a checkpoint is in MLflow before the checkpoint exists: a
                # retry resumes from it and must find no gap behind it.
                logger.flush_quietly()
            ray_io.report(report, event.checkpoint_dir)
            if event.checkpoint_dir is not None:
                shutil.rmtree(event.checkpoint_dir, ignore_errors=True)
        return None

    try:
        if checkpoint is not None:
            with checkpoint.as_directory() as directory:
                trainer.load_checkpoint(Path(directory))
            print(f"resumed from the checkpoint of step {trainer.step}", flush=True)
            if logger is not None:
                logger.client.set_tag(
                    logger.run_id, "simpo_sweep.resumed_from_step", str(trainer.step)
                )
        fit_started_at = time.time()
        trainer.fit(callback=on_step)
    finally:
        if logger is not None:
            # The run stays open: the driver decides the trial's state from what was reported
            # (trial.outcome) and labels it; a retry continues it.
            logger.close()
        shutil.rmtree(checkpoint_root, ignore_errors=True)


def _device() -> torch.device:
    if torch.cuda.is_available():
        # Ray sets CUDA_VISIBLE_DEVICES per worker: its first visible device is its own.
        return torch.device("cuda", 0)
    return torch.device("cpu")
