"""The SimPO training loop: usable on its own, plugged into Ray Train by the trial layer.

One optimizer step = `gradient_accumulation_steps` micro-batches of `batch_size` pairs on every
worker. Under torch.distributed the global micro-batch is split across ranks, so N workers with
batch b see exactly the pairs one worker with batch N*b would, and every metric is averaged over
all workers. Everything a resumed run needs (weights, optimizer, scheduler, step, data position,
RNG) is in the checkpoint, so a stopped-and-resumed run ends with the same metrics.
"""

from __future__ import annotations

import contextlib
import functools
import math
import random
import resource
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from simpo_sweep.engine.batching import (
    Layout,
    PairBatch,
    PairExample,
    choose_layout,
    collate_layout,
)
from simpo_sweep.engine.logps import PolicyLogps
from simpo_sweep.engine.metrics import (
    PAIR_SUMS,
    Diagnosis,
    diagnose,
    simpo_objective,
    sums_to_means,
)
from simpo_sweep.spec.models import DiagnosticsSpec, SimPOSpec, TrainingSpec

CHECKPOINT_FILE = "trainer_state.pt"


class PairDataset(Protocol):
    """Token-id columns of tokenised pairs (engine.data.TokenizedSplit is one)."""

    @property
    def prompt_ids(self) -> Sequence[Sequence[int]]: ...
    @property
    def chosen_ids(self) -> Sequence[Sequence[int]]: ...
    @property
    def rejected_ids(self) -> Sequence[Sequence[int]]: ...
    def __len__(self) -> int: ...


@runtime_checkable
class CountedColumn(Protocol):
    """A token-id column that knows every pair's token count without building its lists
    (engine.data.TokenIdColumn, from its arrow offsets)."""

    def lengths(self) -> np.ndarray: ...


def pair_at(data: PairDataset, index: int) -> PairExample:
    return PairExample(data.prompt_ids[index], data.chosen_ids[index], data.rejected_ids[index])


def column_lengths(column: Sequence[Sequence[int]]) -> np.ndarray:
    """Token count of every pair in a column (int64)."""
    if isinstance(column, CountedColumn):
        return column.lengths()
    return np.fromiter((len(ids) for ids in column), dtype=np.int64, count=len(column))


@dataclass
class StepEvent:
    """What the loop tells its callback after an optimizer step."""

    step: int
    max_steps: int
    train_metrics: dict[str, float]
    eval_metrics: dict[str, float] | None = None
    checkpoint_dir: Path | None = None  # written by this rank (rank 0 only), this step
    diagnosis: Diagnosis = field(default_factory=Diagnosis)

    @property
    def is_last(self) -> bool:
        return self.step >= self.max_steps

    @property
    def metrics(self) -> dict[str, float]:
        return {**self.train_metrics, **(self.eval_metrics or {})}


# Returns a reason to stop early, or None to go on.
StepCallback = Callable[[StepEvent], str | None]


@dataclass
class TrainResult:
    step: int
    metrics: dict[str, float]
    stopped_reason: str | None
    diagnosis: Diagnosis


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    if _world()[1] > 1:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def _lr_lambda(training: TrainingSpec) -> Callable[[int], float]:
    warmup = int(training.warmup_ratio * training.max_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, training.max_steps - warmup)
        if training.lr_scheduler == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        if training.lr_scheduler == "linear":
            return max(0.0, 1 - progress)
        return 1.0

    return factor


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class SimPOTrainer:
    def __init__(
        self,
        model: nn.Module,
        train_data: PairDataset,
        eval_data: PairDataset,
        *,
        training: TrainingSpec,
        simpo: SimPOSpec,
        diagnostics: DiagnosticsSpec | None = None,
        pad_token_id: int,
        device: torch.device | str | None = None,
        checkpoint_root: Path | None = None,
        layout: Layout | None = None,
    ):
        self.training = training
        self.simpo = simpo
        self.diagnostics = diagnostics or DiagnosticsSpec()
        self.rank, self.world_size = _world()
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.train_data = train_data
        self.eval_data = eval_data
        self.pad_token_id = pad_token_id
        self.checkpoint_root = checkpoint_root
        if len(train_data) < self.global_micro_batch:
            raise ValueError(
                f"{len(train_data)} training pairs cannot fill one micro-batch of "
                f"{self.global_micro_batch} pairs (batch_size x workers)"
            )
        if len(eval_data) == 0:
            raise ValueError("the eval split is empty: evaluation metrics are means over its pairs")

        torch.manual_seed(training.seed)
        self.model = model.to(self.device)
        # `layout` overrides the choice from padding_free and the attention implementation.
        self.layout: Layout = layout or choose_layout(
            training.padding_free, self._attention_implementation()
        )
        self.policy: nn.Module = PolicyLogps(self.model, chunk_tokens=training.logprob_chunk_tokens)
        if self.world_size > 1:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            self.policy = nn.parallel.DistributedDataParallel(self.policy, device_ids=device_ids)
        self.optimizer = torch.optim.AdamW(
            self._parameter_groups(),
            lr=training.learning_rate,
            betas=(training.adam_beta1, training.adam_beta2),
            eps=training.adam_epsilon,
            # One kernel for the whole update on CUDA (TRL's default there too).
            fused=self.device.type == "cuda",
        )
        if training.compile_layers:
            _compile_decoder_layers(self.model)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _lr_lambda(training))
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        # auto: bf16 where it is fast (CUDA); an explicit bf16 is honoured on any device.
        self.autocast_bf16 = training.mixed_precision == "bf16" or (
            training.mixed_precision == "auto" and self.device.type == "cuda"
        )

    # ---- set-up ----------------------------------------------------------------------------

    @property
    def global_micro_batch(self) -> int:
        return self.training.batch_size * self.world_size

    @property
    def packed(self) -> bool:
        return self.layout != "padded"

    def _attention_implementation(self) -> str | None:
        config = getattr(self.model, "config", None)
        attention = getattr(config, "_attn_implementation", None)
        return attention if isinstance(attention, str) else None

    def _parameter_groups(self) -> list[dict[str, Any]]:
        decay: list[nn.Parameter] = []
        no_decay: list[nn.Parameter] = []
        for name, parameter in self.model.named_parameters():
            if not parameter.requires_grad:
                continue
            (no_decay if parameter.ndim < 2 or "norm" in name.lower() else decay).append(parameter)
        return [
            {"params": decay, "weight_decay": self.training.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]

    # ---- data ------------------------------------------------------------------------------

    def _epoch_order(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.training.seed * 100_003 + epoch)
        order = torch.randperm(len(self.train_data), generator=generator).tolist()
        if not self.training.group_by_length:
            return order
        # Sort within windows of 32 micro-batches, then shuffle the micro-batches: padded
        # batches of similar lengths without a fixed length curriculum.
        window = 32 * self.global_micro_batch
        grouped: list[list[int]] = []
        pair_lengths = self._train_pair_lengths
        for start in range(0, len(order), window):
            chunk = sorted(order[start : start + window], key=pair_lengths.__getitem__)
            grouped += [
                chunk[i : i + self.global_micro_batch]
                for i in range(0, len(chunk), self.global_micro_batch)
            ]
        random.Random(self.training.seed * 100_003 + epoch).shuffle(grouped)
        return [index for batch in grouped for index in batch]

    @functools.cached_property
    def _train_pair_lengths(self) -> list[int]:
        """Padded length of each training pair (prompt + longer response), counted once:
        arrow-backed columns count from their offsets without building any pair's lists."""
        data = self.train_data
        longer_response = np.maximum(
            column_lengths(data.chosen_ids), column_lengths(data.rejected_ids)
        )
        lengths: list[int] = (column_lengths(data.prompt_ids) + longer_response).tolist()
        return lengths

    def _collate(self, examples: Sequence[PairExample]) -> PairBatch:
        batch = collate_layout(examples, self.layout, self.pad_token_id)
        return batch.to(self.device)

    def _train_micro_batches(self) -> Iterator[PairBatch]:
        """This rank's share of successive global micro-batches, resuming mid-epoch."""
        while True:
            order = self._epoch_order(self.epoch)
            batches_per_epoch = len(order) // self.global_micro_batch
            while self.batch_in_epoch < batches_per_epoch:
                start = (
                    self.batch_in_epoch * self.global_micro_batch
                    + self.rank * self.training.batch_size
                )
                self.batch_in_epoch += 1
                indices = order[start : start + self.training.batch_size]
                yield self._collate([pair_at(self.train_data, i) for i in indices])
            self.epoch += 1
            self.batch_in_epoch = 0

    # ---- steps -----------------------------------------------------------------------------

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.autocast_bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _reduce(
        self, sums: dict[str, torch.Tensor], num_pairs: int, prefix: str, num_tokens: int = 0
    ) -> tuple[dict[str, float], float]:
        """Means of the summed metrics over all workers' pairs, and all workers' token count.

        One tensor, so one collective and one device-to-host copy per step.
        """
        stacked = torch.stack([*(sums[name].float() for name in PAIR_SUMS)])
        counts = torch.tensor([float(num_pairs), float(num_tokens)], device=stacked.device)
        totals: list[float] = _all_reduce_sum(torch.cat([stacked, counts])).tolist()
        *metric_totals, total_pairs, total_tokens = totals
        means = sums_to_means(dict(zip(PAIR_SUMS, metric_totals, strict=True)), total_pairs, prefix)
        return means, total_tokens

    def train_step(self, micro_batches: Iterator[PairBatch]) -> dict[str, float]:
        self.model.train()
        started = time.perf_counter()
        accumulation = self.training.gradient_accumulation_steps
        sums = {name: torch.zeros((), device=self.device) for name in PAIR_SUMS}
        num_pairs = num_tokens = 0
        for micro_step in range(accumulation):
            batch = next(micro_batches)
            is_last_micro = micro_step == accumulation - 1
            sync = (
                contextlib.nullcontext()
                if is_last_micro or not isinstance(self.policy, nn.parallel.DistributedDataParallel)
                else self.policy.no_sync()
            )
            with sync:
                with self._autocast():
                    loss, batch_sums = simpo_objective(self.policy(batch), self.simpo)
                # Each micro-batch's loss is a mean over its pairs: dividing by the number of
                # micro-batches makes the accumulated gradient the mean over the whole step.
                (loss / accumulation).backward()
            for name in PAIR_SUMS:
                sums[name] += batch_sums[name]
            num_pairs += batch.num_pairs
            num_tokens += batch.num_tokens
        if self.training.max_grad_norm is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(
                self.model.parameters(), self.training.max_grad_norm
            )
        else:
            grad_norm = torch.linalg.vector_norm(
                torch.stack([p.grad.norm() for p in self.model.parameters() if p.grad is not None])
            )
        learning_rate = float(self.scheduler.get_last_lr()[0])
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        metrics, total_tokens = self._reduce(sums, num_pairs, "train", num_tokens)
        if not self.simpo.sft_weight:
            metrics.pop("train/sft_loss")
        elapsed = time.perf_counter() - started
        metrics.update(
            {
                "train/grad_norm": float(grad_norm),
                "train/learning_rate": learning_rate,
                "perf/step_time_s": elapsed,
                "perf/tokens_per_s": total_tokens / elapsed,
                "perf/peak_memory_mb": _peak_memory_mb(self.device),
            }
        )
        return metrics

    @property
    def _unwrapped_policy(self) -> nn.Module:
        """The PolicyLogps without its DistributedDataParallel wrapper (when it has one)."""
        if isinstance(self.policy, nn.parallel.DistributedDataParallel):
            module: nn.Module = self.policy.module
            return module
        return self.policy

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        self.model.eval()
        # Not through DDP: its first forward after a training step broadcasts buffers, a
        # collective that a rank without an eval batch would never join (a hang). Unwrapped,
        # the only collective here is the metrics' all_reduce, which every rank reaches.
        policy = self._unwrapped_policy
        sums = {name: torch.zeros((), device=self.device) for name in PAIR_SUMS}
        num_pairs = 0
        size = self.training.eval_batch_size
        # Rank r evaluates every world_size-th batch; all ranks together cover the whole split.
        for start in range(self.rank * size, len(self.eval_data), size * self.world_size):
            examples = [
                pair_at(self.eval_data, i)
                for i in range(start, min(start + size, len(self.eval_data)))
            ]
            with self._autocast():
                _, batch_sums = simpo_objective(policy(self._collate(examples)), self.simpo)
            for name in PAIR_SUMS:
                sums[name] += batch_sums[name]
            num_pairs += len(examples)
        metrics, _ = self._reduce(sums, num_pairs, "eval")
        if not self.simpo.sft_weight:
            metrics.pop("eval/sft_loss")
        return metrics

    # ---- checkpoints -----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "python": random.getstate(),
            },
        }

    def save_checkpoint(self, directory: Path) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        torch.save(self.state_dict(), directory / CHECKPOINT_FILE)
        return directory

    def load_checkpoint(self, directory: Path) -> None:
        # Loaded on the CPU: RNG states must stay CPU byte tensors, and load_state_dict copies
        # weights and optimizer state onto their parameters' devices anyway.
        state = torch.load(directory / CHECKPOINT_FILE, map_location="cpu", weights_only=False)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.epoch = state["step"], state["epoch"]
        self.batch_in_epoch = state["batch_in_epoch"]
        torch.set_rng_state(state["rng"]["torch"])
        if state["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        random.setstate(state["rng"]["python"])

    # ---- the loop --------------------------------------------------------------------------

    def fit(
        self, callback: StepCallback | None = None, resume_from: Path | None = None
    ) -> TrainResult:
        if resume_from is not None:
            self.load_checkpoint(resume_from)
        micro_batches = self._train_micro_batches()
        training = self.training
        metrics: dict[str, float] = {}
        diagnosis = Diagnosis()
        stopped_reason: str | None = None
        while self.step < training.max_steps:
            train_metrics = self.train_step(micro_batches)
            done = self.step >= training.max_steps
            event = StepEvent(self.step, training.max_steps, train_metrics)
            if self.step % training.eval_every == 0 or done:
                event.eval_metrics = self.evaluate()
            diagnosis = diagnose(
                train_metrics,
                step=self.step,
                max_steps=training.max_steps,
                rules=self.diagnostics,
                length_averaged=self.simpo.average_log_prob,
            )
            event.diagnosis = diagnosis
            degenerate = bool(diagnosis.degenerate) and self.diagnostics.stop_degenerate
            checkpoint_due = self.step % training.checkpoint_every == 0 or done
            if checkpoint_due and not degenerate and self.rank == 0 and self.checkpoint_root:
                event.checkpoint_dir = self.save_checkpoint(
                    self.checkpoint_root / f"step_{self.step:06d}"
                )
            metrics.update(event.metrics)
            stopped_reason = callback(event) if callback is not None else None
            if degenerate:
                stopped_reason = stopped_reason or f"degenerate: {diagnosis.summary()}"
            if stopped_reason:
                break
        return TrainResult(self.step, metrics, stopped_reason, diagnosis)


def _compile_decoder_layers(model: nn.Module) -> None:
    """Compile layer by layer: one graph per layer compiles fast and is reused by all of them."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(
            f"training.compile_layers: {type(model).__name__} has no model.layers to compile"
        )
    for layer in layers:
        layer.compile(dynamic=True)
