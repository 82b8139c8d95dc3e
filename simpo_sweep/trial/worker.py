"""The training function every Ray Train worker of a trial runs.

Rank 0 writes the trial's MLflow child run (metrics already averaged over workers by the engine);
every rank writes its part of each checkpoint (its DCP shard: Ray merges the ranks' folders into
one checkpoint) and reports to Ray at the same steps, because `ray.train.report`
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
import ray.util
import torch
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from simpo_sweep.engine import process_memory
from simpo_sweep.engine.data import PreparedData, load_prepared
from simpo_sweep.engine.generation import (
    GENERATION_TIME,
    GENERATION_TOTAL_TIME,
    GenerationEvaluation,
    GenerationEvaluator,
    select_prompts,
)
from simpo_sweep.engine.models import load_model, load_tokenizer, resolve_precision
from simpo_sweep.engine.scorers import build_scorer
from simpo_sweep.engine.train import SimPOTrainer, StepEvent, settle_collectives
from simpo_sweep.tracking.mlflow_runs import MetricLogger, generations_artifact, log_table
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


class _GenerationHook:
    """The trial's generation evaluation (engine.generation): at the start, at its steps and
    at the end, on every rank; rank 0 logs each evaluation's table to the child run.

    Its metrics join the step's eval metrics (so they are logged, reported to Tune and kept
    for later reports like the others), and its degenerate reasons join the step's diagnosis:
    the trainer has judged the step before its callback runs, so the hook returns the reason
    to stop, which SimPOTrainer.fit honours.
    """

    def __init__(
        self, evaluator: GenerationEvaluator, plan: WorkerPlan, logger: MetricLogger | None
    ):
        self.evaluator = evaluator
        self.plan = plan
        self.logger = logger

    @classmethod
    def create(
        cls,
        plan: WorkerPlan,
        prepared: PreparedData,
        tokenizer: PreTrainedTokenizerBase,
        device: torch.device,
        logger: MetricLogger | None,
    ) -> _GenerationHook | None:
        settings = plan.config.evaluation
        if not settings.enabled:
            return None
        prompts = select_prompts(
            prepared.eval.prompt_ids,
            prepared.eval.chosen_ids,
            tokenizer,
            num_prompts=settings.num_prompts,
            seed=settings.seed,
        )
        evaluator = GenerationEvaluator(
            prompts,
            settings,
            tokenizer,
            build_scorer(settings, device),  # a reward model: loaded once, here
            every=settings.every_steps(plan.config.training),
            device=device,
        )
        return cls(evaluator, plan, logger)

    def _log_table(self, evaluation: GenerationEvaluation) -> None:
        if self.logger is not None:
            log_table(
                self.logger.client,
                self.logger.run_id,
                evaluation.table(),
                generations_artifact(evaluation.step),
            )

    def start(self, model: torch.nn.Module) -> None:
        """The generations before any update: the start the verdict compares with. Computed
        from the freshly loaded model before a checkpoint is restored, so a retried trial
        compares with the same start."""
        self._log_table(self.evaluator.set_baseline(model))

    def at_step(self, event: StepEvent, model: torch.nn.Module) -> str | None:
        if not self.evaluator.due(event.step, event.max_steps):
            return None
        evaluation = self.evaluator.evaluate(model, event.step)
        event.eval_metrics = {
            **(event.eval_metrics or {}),
            **evaluation.metrics,
            GENERATION_TIME: evaluation.seconds,
            GENERATION_TOTAL_TIME: self.evaluator.total_seconds,
        }
        self._log_table(evaluation)
        reasons = self.evaluator.degenerate_reasons(evaluation)
        # Every rank holds every record (all_gather_object), so all reach the same verdict
        # and stop at the same step.
        event.diagnosis.degenerate.extend(reasons)
        if reasons and self.plan.config.diagnostics.stop_degenerate:
            return f"degenerate: {event.diagnosis.summary()}"
        return None


def train_worker(loop_config: dict[str, Any]) -> None:
    """One trial's training on this worker. Tune reuses a single-worker trial's process for
    the next trial, so what this trial allocated is handed back when it ends (and whatever
    an earlier one left, before it starts): the N-th trial of a process holds what the first
    did (engine.process_memory)."""
    device = _device()
    process_memory.release(device)
    try:
        _train(loop_config["plan"], device)
    finally:
        # Out of _train's frame: the trial's model, optimizer, data loaders and scorer are
        # unreachable now, so their memory can go back.
        process_memory.release(device)


def _train(plan: WorkerPlan, device: torch.device) -> None:
    os.environ.update(plan.tracking_env)  # MLflow's client reads its credentials there
    config = plan.config
    ray_io = _RayReporting(loop_in_trial=plan.loop_in_trial)
    data = plan.data
    prepared = ray.get(data.object_ref) if data.object_ref is not None else load_prepared(data.path)
    tokenizer = load_tokenizer(config.model)
    torch.manual_seed(config.training.seed)
    precision = resolve_precision(config.training.precision, device)
    model = load_model(
        config.model, tokenizer, device, seed=config.training.seed, precision=precision
    )
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
        strategy="fsdp" if plan.strategy == "fsdp" else "ddp",
        checkpoint_info={
            "model": config.model.name,
            "lora": config.model.lora.model_dump() if config.model.lora else None,
        },
    )
    logger = None
    if ray_io.rank == 0 and plan.run_id is not None and plan.tracking_uri is not None:
        logger = MetricLogger(plan.tracking_uri, plan.run_id)
        # How the batches are laid out, and where the trial ran (its rank-0 worker), for whoever
        # debugs a multi-node sweep; a retry on another node overwrites them.
        tags = {
            "simpo_sweep.padding_free": str(trainer.packed).lower(),
            "simpo_sweep.layout": trainer.layout,
            "simpo_sweep.node_ip": ray.util.get_node_ip_address(),
            "simpo_sweep.ray_node_id": ray.get_runtime_context().get_node_id(),
        }
        logger.set_tags(tags)

    generations = _GenerationHook.create(plan, prepared, tokenizer, device, logger)
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
        stop_reason = generations.at_step(event, trainer.model) if generations else None
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
        return stop_reason

    try:
        if generations is not None:
            generations.start(trainer.model)
        if checkpoint is not None:
            with checkpoint.as_directory() as directory:
                trainer.load_checkpoint(Path(directory))
            print(f"resumed from the checkpoint of step {trainer.step}", flush=True)
            if logger is not None:
                logger.set_tags({"simpo_sweep.resumed_from_step": str(trainer.step)})
        fit_started_at = time.time()
        trainer.fit(callback=on_step)
        settle_collectives()
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
