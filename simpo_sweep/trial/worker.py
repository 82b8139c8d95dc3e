"""The training function every Ray Train worker of a trial runs.

Rank 0 writes the trial's MLflow child run (metrics already averaged over workers by the engine)
and the checkpoints; every rank reports to Ray at the same steps, because `ray.train.report`
is a barrier. In Train's local mode (a single-worker trial, see trial.trainable) the loop runs
inside the Tune trial itself and reports through Tune.
"""

from __future__ import annotations

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
from simpo_sweep.spec.models import TrialConfig
from simpo_sweep.tracking.mlflow_runs import MetricLogger

# Keys of what a trial reports to Tune, besides the metrics.
STEP = "step"
VERDICT = "verdict"
DIAGNOSIS = "diagnosis"
STARTUP = "perf/trial_start_to_first_step_s"
FIT_TIME = "perf/fit_time_s"


class _RayReporting:
    """ray.train.* on Train workers, ray.tune.* when the loop runs inside the Tune trial."""

    def __init__(self, local_mode: bool):
        self.local_mode = local_mode
        if local_mode:
            self.rank, self.world_size = 0, 1
        else:
            context = ray.train.get_context()
            self.rank, self.world_size = context.get_world_rank(), context.get_world_size()

    def latest_checkpoint(self) -> Any:
        return ray.tune.get_checkpoint() if self.local_mode else ray.train.get_checkpoint()

    def report(self, metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        if self.local_mode:
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
    config = TrialConfig.model_validate(loop_config["trial"])
    ray_io = _RayReporting(local_mode=loop_config["local_mode"])
    device = _device()
    data_ref = loop_config.get("data_ref")
    prepared = (
        ray.get(data_ref) if data_ref is not None else load_prepared(loop_config["data_path"])
    )
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
    if ray_io.rank == 0 and loop_config.get("run_id"):
        logger = MetricLogger(loop_config["tracking_uri"], loop_config["run_id"])
        logger.client.set_tag(
            loop_config["run_id"], "simpo_sweep.padding_free", str(trainer.packed).lower()
        )

    checkpoint = ray_io.latest_checkpoint()
    last_eval: dict[str, float] = {}
    # Orchestration overhead, as bench/orchestration.py reads it: the time before the first
    # optimizer step, and the time spent inside the training loop.
    timing: dict[str, float] = {}

    def on_step(event: StepEvent) -> str | None:
        now = time.time()
        if not timing:
            timing[STARTUP] = now - float(loop_config["trial_started_at"])
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
            report.setdefault(loop_config["metric"], float("nan"))
            if logger is not None and event.checkpoint_dir is not None:
                # Every step up to a checkpoint is in MLflow before the checkpoint exists: a
                # retry resumes from it and must find no gap behind it.
                logger.flush_quietly()
            ray_io.report(report, event.checkpoint_dir)
            if event.checkpoint_dir is not None:
                shutil.rmtree(event.checkpoint_dir, ignore_errors=True)
        return None

    state, diagnosis = "failed", "worker raised"
    try:
        if checkpoint is not None:
            with checkpoint.as_directory() as directory:
                trainer.load_checkpoint(Path(directory))
            print(f"resumed from the checkpoint of step {trainer.step}", flush=True)
            if logger is not None:
                logger.client.set_tag(
                    loop_config["run_id"], "simpo_sweep.resumed_from_step", str(trainer.step)
                )
        fit_started_at = time.time()
        result = trainer.fit(callback=on_step)
        state = "degenerate" if result.stopped_reason else "completed"
        diagnosis = result.stopped_reason or result.diagnosis.summary()
    finally:
        if logger is not None:
            # A failed attempt leaves the run open: the retry continues it, or the driver labels it.
            logger.close(state if state != "failed" else None, diagnosis)
        shutil.rmtree(checkpoint_root, ignore_errors=True)


def _device() -> torch.device:
    if torch.cuda.is_available():
        # Ray sets CUDA_VISIBLE_DEVICES per worker: its first visible device is its own.
        return torch.device("cuda", 0)
    return torch.device("cpu")
