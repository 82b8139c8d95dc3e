"""The SimPO training loop: usable on its own, plugged into Ray Train by the trial layer.

One optimizer step = `gradient_accumulation_steps` micro-batches on every worker, each of
`batch_size` pairs or, with `max_tokens_per_batch`, of as many pairs as fit that many tokens.
Under torch.distributed the global micro-batch is split across ranks, so N workers with batch b
see exactly the pairs one worker with batch N*b would; the loss is the mean over all the step's
pairs whatever their micro-batches hold, and every metric is averaged over all workers.
Everything a resumed run needs (weights, optimizer, scheduler, step, data position, RNG) is in
the checkpoint, so a stopped-and-resumed run ends with the same metrics.

Several workers share a step by `strategy`: ddp (a whole replica each, gradients all-reduced)
or fsdp (FSDP2 `fully_shard` per decoder layer and at the root: every rank holds 1/N of the
weights, gradients and optimizer state). `training.precision` decides the dtype trained weights
are held in (engine.models.resolve_precision); under bf16-mixed they are float32 master weights
and only the compute runs in bf16 (autocast, or FSDP's MixedPrecisionPolicy).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import random
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from simpo_sweep.engine import checkpoint as checkpoints
from simpo_sweep.engine import process_memory
from simpo_sweep.engine.batching import (
    Layout,
    PairBatch,
    PairExample,
    choose_layout,
    collate_layout,
    pair_token_costs,
    pair_weighted_loss,
    token_budget_micro_batches,
)
from simpo_sweep.engine.logps import PolicyLogps
from simpo_sweep.engine.loss import simpo_objective
from simpo_sweep.engine.metrics import (
    PAIR_SUMS,
    Diagnosis,
    LogpsStart,
    MetricWindow,
    diagnose,
    sums_to_means,
)
from simpo_sweep.engine.models import Precision, lost_update_warning, resolve_precision
from simpo_sweep.spec.models import DiagnosticsSpec, SimPOSpec, TrainingSpec

# The file whose presence makes a folder a checkpoint (engine.checkpoint writes it last).
CHECKPOINT_FILE = checkpoints.COMPLETE_MARKER

Strategy = Literal["ddp", "fsdp"]


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
    # this rank's part of this step's checkpoint (every rank writes one: its DCP shard)
    checkpoint_dir: Path | None = None
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


def settle_collectives() -> None:
    """Call on every rank before the process group is destroyed (or the worker returns to
    Ray Train, which destroys it right away).

    After a collective completes, ProcessGroupGloo's worker thread still has to drop the
    work's tensors, and for a tensor made in Python that takes the GIL. The group's
    destructor joins that thread while holding the GIL (torch 2.13), so a group destroyed
    straight after a collective can deadlock, or abort with "terminate called without an
    active exception" (seen with two gloo ranks in tests, about one run in ten). A barrier
    and a moment with the GIL released let the worker threads finish first."""
    if _world()[1] > 1:
        dist.barrier()
        time.sleep(0.05)


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
        strategy: Strategy = "ddp",
        checkpoint_info: dict[str, Any] | None = None,
    ):
        """`strategy` applies under torch.distributed (without a process group there is nothing to
        shard or replicate).
        `checkpoint_info` is recorded in every checkpoint's marker (e.g. the LoRA settings)."""
        self.training = training
        self.simpo = simpo
        self.diagnostics = diagnostics or DiagnosticsSpec()
        self.rank, self.world_size = _world()
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.train_data = train_data
        self.eval_data = eval_data
        self.pad_token_id = pad_token_id
        self.checkpoint_root = checkpoint_root
        if len(eval_data) == 0:
            raise ValueError("the eval split is empty: evaluation metrics are means over its pairs")

        torch.manual_seed(training.seed)
        self.precision: Precision = resolve_precision(training.precision, self.device)
        if self.precision == "bf16-true":
            warnings.warn(lost_update_warning(training.learning_rate), stacklevel=2)
        # FSDP shards over whatever process group there is, one rank included (nothing to
        # divide then, but the same code path: bench/gpu_checks.py runs it on one GPU); without
        # a group there is nothing to wrap.
        distributed = dist.is_available() and dist.is_initialized()
        self.strategy: Strategy = strategy if distributed else "ddp"
        self.model = _hold_weights(model.to(self.device), self.precision)
        # perf/peak_memory_mb is this trainer's peak, not that of whatever the process ran
        # before it (earlier trials in a reused trial process).
        process_memory.reset_peak(self.device)
        # `layout` overrides the choice from padding_free and the attention implementation.
        self.layout: Layout = layout or choose_layout(
            training.padding_free, self._attention_implementation(), training.prefix_sharing
        )
        if self.layout == "shared_prefix":
            self._check_sliding_window()
        if training.max_tokens_per_batch is None and len(train_data) < self.global_micro_batch:
            raise ValueError(
                f"{len(train_data)} training pairs cannot fill one micro-batch of "
                f"{self.global_micro_batch} pairs (batch_size x workers)"
            )
        if len(self._epoch_micro_batches(0)) < self.world_size:
            raise ValueError(
                f"{len(train_data)} training pairs make fewer micro-batches of "
                f"{training.max_tokens_per_batch} tokens than there are workers "
                f"({self.world_size})"
            )
        if training.compile_layers:
            _compile_decoder_layers(self.model)
        self.policy: nn.Module = PolicyLogps(self.model, chunk_tokens=training.logprob_chunk_tokens)
        # bf16 compute over float32 weights: FSDP casts the gathered weights itself (its
        # MixedPrecisionPolicy); elsewhere autocast does. bf16-true weights are bf16 already.
        self.autocast_bf16 = self.precision == "bf16-mixed" and self.strategy != "fsdp"
        if self.strategy == "fsdp":
            _fully_shard(self.policy, self.model, self.device, self.precision)
        elif self.world_size > 1:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            # Gradients live in DDP's buckets instead of beside them: one gradient-sized
            # copy fewer (engine.memory counts one).
            self.policy = nn.parallel.DistributedDataParallel(
                self.policy, device_ids=device_ids, gradient_as_bucket_view=True
            )
        self.checkpoint_info = {
            "strategy": self.strategy,
            "precision": self.precision,
            **(checkpoint_info or {}),
        }
        # Created after sharding: FSDP replaces the parameters with their DTensor shards.
        self.optimizer = torch.optim.AdamW(
            self._parameter_groups(),
            lr=training.learning_rate,
            betas=(training.adam_beta1, training.adam_beta2),
            eps=training.adam_epsilon,
            # One kernel for the whole update on CUDA (TRL's default there too).
            fused=self.device.type == "cuda",
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _lr_lambda(training))
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        # The first step's log-probs (before any update): collapse is a fall from them.
        self.logps_start: LogpsStart | None = None

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

    def _check_sliding_window(self) -> None:
        """The shared-prefix mask is plain causal: right only where a sliding window never
        bites, i.e. no sequence of the unshared path is longer than the window (Mistral v0.1,
        Gemma2's local layers). transformers cannot be handed one custom mask per layer type."""
        config = getattr(self.model, "config", None)
        window = getattr(config, "sliding_window", None)
        if not isinstance(window, int) or getattr(config, "use_sliding_window", True) is False:
            return
        longest = max(_padded_pair_lengths(self.train_data) + _padded_pair_lengths(self.eval_data))
        if longest > window:
            raise ValueError(
                f"prefix_sharing=on: the model's sliding attention window ({window} tokens) is "
                f"shorter than the longest prompt + response ({longest}), which the shared "
                "prefix mask cannot express; use prefix_sharing off or a shorter data.max_length"
            )

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
        """Padded length of each training pair (prompt + longer response), counted once."""
        return _padded_pair_lengths(self.train_data)

    @functools.cached_property
    def _train_pair_costs(self) -> np.ndarray:
        """Each training pair's cost against max_tokens_per_batch in this trainer's layout."""
        data = self.train_data
        return pair_token_costs(
            column_lengths(data.prompt_ids),
            column_lengths(data.chosen_ids),
            column_lengths(data.rejected_ids),
            self.layout,
        )

    def _epoch_micro_batches(self, epoch: int) -> list[list[int]]:
        """The epoch's per-worker micro-batches in order; global micro-batch g is the
        world_size of them from g * world_size, rank r taking the r-th (a tail too short for
        a whole global micro-batch waits for the next epoch's shuffle). Deterministic in the
        epoch, so a resumed run finds its position again from `batch_in_epoch` alone."""
        order = self._epoch_order(epoch)
        budget = self.training.max_tokens_per_batch
        if budget is not None:
            padded = self.layout == "padded"
            return token_budget_micro_batches(order, self._train_pair_costs, budget, padded=padded)
        size = self.training.batch_size
        whole = len(order) // self.global_micro_batch * self.global_micro_batch
        return [order[start : start + size] for start in range(0, whole, size)]

    def _collate(self, examples: Sequence[PairExample]) -> PairBatch:
        batch = collate_layout(examples, self.layout, self.pad_token_id)
        return batch.to(self.device)

    def _train_micro_batches(self) -> Iterator[PairBatch]:
        """This rank's share of successive global micro-batches, resuming mid-epoch."""
        while True:
            micro_batches = self._epoch_micro_batches(self.epoch)
            batches_per_epoch = len(micro_batches) // self.world_size
            while self.batch_in_epoch < batches_per_epoch:
                indices = micro_batches[self.batch_in_epoch * self.world_size + self.rank]
                self.batch_in_epoch += 1
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

    def _budgeted_step_pairs(self, batches: Sequence[PairBatch]) -> int:
        """The pairs of a token-budget step over all ranks: micro-batches vary, so the ranks
        add theirs up (one small all-reduce, which waits for the device)."""
        local_pairs = sum(batch.num_pairs for batch in batches)
        if self.world_size == 1:
            return local_pairs
        total = _all_reduce_sum(torch.tensor(float(local_pairs), device=self.device))
        return int(total.item())

    def train_step(self, micro_batches: Iterator[PairBatch]) -> dict[str, float]:
        self.model.train()
        started = time.perf_counter()
        accumulation = self.training.gradient_accumulation_steps
        sums = {name: torch.zeros((), device=self.device) for name in PAIR_SUMS}
        num_pairs = num_tokens = 0
        batches: Iterable[PairBatch]
        step_pairs: int | None = None
        if self.training.max_tokens_per_batch is not None:
            # The step's pair count is needed before the first backward (each micro-batch's
            # share), so its micro-batches are collated up front.
            batches = [next(micro_batches) for _ in range(accumulation)]
            step_pairs = self._budgeted_step_pairs(batches)
        else:
            # Fixed batches: every micro-batch on every rank holds as many pairs; collated
            # one at a time, as they are used.
            batches = (next(micro_batches) for _ in range(accumulation))
        for micro_step, batch in enumerate(batches):
            is_last_micro = micro_step == accumulation - 1
            sync: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
            if isinstance(self.policy, nn.parallel.DistributedDataParallel) and not is_last_micro:
                sync = self.policy.no_sync()
            elif isinstance(self.policy, FSDPModule):
                # Reduce-scatter the gradients once per step, not once per micro-batch.
                self.policy.set_requires_gradient_sync(is_last_micro)
            with sync:
                with self._autocast():
                    loss, batch_sums = simpo_objective(self.policy(batch), self.simpo)
                # Each micro-batch's loss is a mean over its pairs: weighted by its share of
                # the step's pairs, the accumulated gradient is the mean over the whole step.
                pairs = step_pairs or batch.num_pairs * accumulation * self.world_size
                pair_weighted_loss(loss, batch.num_pairs, pairs, self.world_size).backward()
            for name in PAIR_SUMS:
                sums[name] += batch_sums[name]
            num_pairs += batch.num_pairs
            num_tokens += batch.num_tokens
        grad_norm = self._clip_gradients()
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
                "perf/peak_memory_mb": process_memory.peak_bytes(self.device) / 2**20,
            }
        )
        return metrics

    def _clip_gradients(self) -> torch.Tensor:
        """The global gradient norm (before clipping), gradients clipped to max_grad_norm.

        Under FSDP the gradients are DTensor shards: their norm is a partial one per rank
        until `full_tensor()` reduces it, so every rank clips by the same global norm
        (torchtitan's recipe).
        """
        parameters = [p for p in self.model.parameters() if p.grad is not None]
        total_norm = torch.nn.utils.get_total_norm([p.grad for p in parameters])  # type: ignore[misc]
        if isinstance(total_norm, DTensor):
            total_norm = total_norm.full_tensor()
        if self.training.max_grad_norm is not None:
            torch.nn.utils.clip_grads_with_norm_(
                parameters, self.training.max_grad_norm, total_norm
            )
        return total_norm

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
        # Under FSDP every forward all-gathers weights, so every rank must run the same number
        # of them: a rank out of batches repeats one and discards its sums.
        policy = self._unwrapped_policy
        sums = {name: torch.zeros((), device=self.device) for name in PAIR_SUMS}
        num_pairs = 0
        size = self.training.eval_batch_size
        # Rank r evaluates every world_size-th batch; all ranks together cover the whole split.
        starts = list(range(self.rank * size, len(self.eval_data), size * self.world_size))
        rounds = len(starts)
        if self.strategy == "fsdp":
            rounds = math.ceil(math.ceil(len(self.eval_data) / size) / self.world_size)
        for round_index in range(rounds):
            counted = round_index < len(starts)
            start = starts[round_index] if counted else 0
            examples = [
                pair_at(self.eval_data, i)
                for i in range(start, min(start + size, len(self.eval_data)))
            ]
            with self._autocast():
                _, batch_sums = simpo_objective(policy(self._collate(examples)), self.simpo)
            if not counted:
                continue
            for name in PAIR_SUMS:
                sums[name] += batch_sums[name]
            num_pairs += len(examples)
        metrics, _ = self._reduce(sums, num_pairs, "eval")
        if not self.simpo.sft_weight:
            metrics.pop("eval/sft_loss")
        return metrics

    # ---- checkpoints -----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs besides the weights and the optimizer state (which
        engine.checkpoint writes with DCP, sharded as they are)."""
        return {
            "scheduler": self.scheduler.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "logps_start": dataclasses.asdict(self.logps_start) if self.logps_start else None,
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "python": random.getstate(),
            },
        }

    def save_checkpoint(self, directory: Path) -> Path:
        """Every rank calls it (a collective); each writes its part into `directory`."""
        return checkpoints.save_checkpoint(
            directory, self.model, self.optimizer, self.state_dict(), self.checkpoint_info
        )

    def load_checkpoint(self, directory: Path) -> None:
        """Every rank calls it, with the whole checkpoint (all ranks' parts) in `directory`."""
        state = checkpoints.load_checkpoint(directory, self.model, self.optimizer)
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.epoch = state["step"], state["epoch"]
        self.batch_in_epoch = state["batch_in_epoch"]
        start = state.get("logps_start")
        self.logps_start = LogpsStart(**start) if start is not None else None
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
        # What the verdicts on the trial's level read: recent evaluations, else recent steps.
        # A resumed trial's starts empty (until it refills, only evaluations are judged).
        window = MetricWindow(self.diagnostics.window_steps)
        while self.step < training.max_steps:
            train_metrics = self.train_step(micro_batches)
            if self.logps_start is None:
                self.logps_start = LogpsStart.read(train_metrics)
            done = self.step >= training.max_steps
            event = StepEvent(self.step, training.max_steps, train_metrics)
            window.add_train(self.step, train_metrics)
            if self.step % training.eval_every == 0 or done:
                event.eval_metrics = self.evaluate()
                window.add_eval(self.step, event.eval_metrics, pairs=len(self.eval_data))
            diagnosis = diagnose(
                event.metrics,
                step=self.step,
                max_steps=training.max_steps,
                rules=self.diagnostics,
                length_averaged=self.simpo.average_log_prob,
                start=self.logps_start,
                window=window,
            )
            event.diagnosis = diagnosis
            degenerate = bool(diagnosis.degenerate) and self.diagnostics.stop_degenerate
            checkpoint_due = self.step % training.checkpoint_every == 0 or done
            if checkpoint_due and not degenerate and self.checkpoint_root:
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


def _padded_pair_lengths(data: PairDataset) -> list[int]:
    """Each pair's longer sequence (prompt + longer response): arrow-backed columns count from
    their offsets without building any pair's lists."""
    longer_response = np.maximum(column_lengths(data.chosen_ids), column_lengths(data.rejected_ids))
    lengths: list[int] = (column_lengths(data.prompt_ids) + longer_response).tolist()
    return lengths


def _hold_weights(model: nn.Module, precision: Precision) -> nn.Module:
    """Trainable weights in the dtype the optimizer updates them in.

    bf16-mixed and fp32: float32 (master weights), whatever model.dtype loaded them as.
    Frozen weights (the base model under LoRA) keep their dtype under bf16-mixed: they are
    never updated, so bf16 loses nothing there and halves their memory; fp32 computes in
    float32 throughout, so they are cast too. bf16-true: everything in bfloat16.
    """
    if precision == "bf16-true":
        return model.to(torch.bfloat16)
    for parameter in model.parameters():
        if parameter.dtype != torch.float32 and (parameter.requires_grad or precision == "fp32"):
            # In place on the Parameter object: tied weights stay one tensor.
            parameter.data = parameter.data.float()
    return model


def decoder_layers(model: nn.Module) -> nn.ModuleList | None:
    """The decoder layers of a transformers causal LM (peft-wrapped or not), if it has them."""
    get_decoder = getattr(model, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else getattr(model, "model", None)
    layers = getattr(decoder, "layers", None)
    return layers if isinstance(layers, nn.ModuleList) else None


def _fully_shard(
    policy: nn.Module, model: nn.Module, device: torch.device, precision: Precision
) -> None:
    """FSDP2 as torchtitan applies it: one group per decoder layer (gathered just for its own
    forward and backward), then the root, which holds the rest (embeddings, final norm, LM
    head) in one group, so tied input and output embeddings stay one parameter. The root is
    PolicyLogps, whose forward is the one called: its pre-forward hook gathers the root's
    weights before the LM head's weight is read directly by the chunked log-probs."""
    from torch.distributed.device_mesh import init_device_mesh

    layers = decoder_layers(model)
    if layers is None:
        raise ValueError(f"strategy fsdp: {type(model).__name__} has no decoder layers to shard")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    policy_kwargs: dict[str, Any] = {}
    if precision == "bf16-mixed":
        # bf16 gathers and compute, float32 gradient reduction into float32 master shards.
        policy_kwargs["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32
        )
    for layer in layers:
        fully_shard(layer, mesh=mesh, **policy_kwargs)
    fully_shard(policy, mesh=mesh, **policy_kwargs)


def _compile_decoder_layers(model: nn.Module) -> None:
    """Compile layer by layer: one graph per layer compiles fast and is reused by all of them."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(
            f"training.compile_layers: {type(model).__name__} has no model.layers to compile"
        )
    for layer in layers:
        layer.compile(dynamic=True)
