"""SimPO step metrics (docs/simpo.md names) and the verdict on a trial's health."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from simpo_sweep.spec.models import DiagnosticsSpec

# The metrics engine.loss.simpo_objective sums over pairs inside a step; turned into means once
# all micro-batches and workers are in.
PAIR_SUMS = (
    "loss",
    "sft_loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
    "logits/chosen",
    "logits/rejected",
)


def sums_to_means(sums: Mapping[str, float], num_pairs: float, prefix: str) -> dict[str, float]:
    return {f"{prefix}/{name}": value / num_pairs for name, value in sums.items()}


@dataclass
class Diagnosis:
    """`degenerate` reasons stop a trial; `warnings` only label it."""

    degenerate: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        if self.degenerate:
            return "degenerate"
        return "warning" if self.warnings else "healthy"

    def summary(self) -> str:
        return "; ".join(self.degenerate + self.warnings) or "healthy"


@dataclass(frozen=True)
class LogpsStart:
    """Mean log-probs where a trial started: its first step's, computed before any update.

    Collapse is a fall from here. The trainer keeps it (and its checkpoints do), because a
    resumed trial's first step is not where the trial started.
    """

    chosen: float
    rejected: float

    @classmethod
    def read(cls, metrics: Mapping[str, float], prefix: str = "train") -> LogpsStart | None:
        """From one step's metrics; None when they lack the log-probs or these are not finite."""
        chosen = metrics.get(f"{prefix}/logps/chosen")
        rejected = metrics.get(f"{prefix}/logps/rejected")
        if chosen is None or rejected is None:
            return None
        if not (math.isfinite(chosen) and math.isfinite(rejected)):
            return None
        return cls(chosen=float(chosen), rejected=float(rejected))


def diagnose(
    metrics: Mapping[str, float],
    *,
    step: int,
    max_steps: int,
    rules: DiagnosticsSpec,
    length_averaged: bool,
    prefix: str = "train",
    start: LogpsStart | None = None,
) -> Diagnosis:
    """Read one set of metrics the way docs/simpo.md's diagnostics table does.

    `length_averaged`: whether the log-probs are averaged over response tokens
    (SimPOSpec.average_log_prob). The collapse and reward-margin thresholds are defined on
    averaged log-probs; summed ones scale with response length (a healthy -2 per token reads
    -200 over 100 tokens), so without averaging only the scale-free rules apply: NaN/inf loss
    and positive log-probs.

    `start`: the log-probs the trial started from (LogpsStart.read of its first step). Collapse
    is both log-probs falling more than `rules.collapse_drop` below them; without `start` it is
    not judged. An absolute floor cannot work: an untrained model starts near -log(vocabulary
    size), already below any floor a trained model's collapse would be read against.
    """
    diagnosis = Diagnosis()
    loss = metrics.get(f"{prefix}/loss")
    chosen = metrics.get(f"{prefix}/logps/chosen")
    rejected = metrics.get(f"{prefix}/logps/rejected")
    margin = metrics.get(f"{prefix}/rewards/margins")
    if loss is not None and not math.isfinite(loss):
        diagnosis.degenerate.append(
            f"diverged: loss is {loss} at step {step}; lower the learning rate, and keep "
            "gradient clipping on (training.max_grad_norm)"
        )
    if chosen is not None and rejected is not None:
        if chosen > 0 or rejected > 0:
            diagnosis.degenerate.append(
                f"numerical instability: positive log-prob (chosen {chosen:.3g}, "
                f"rejected {rejected:.3g}) at step {step}; a log-probability cannot exceed 0, "
                "so the computation is broken, not the hyperparameters: try model.dtype "
                "float32, training.precision fp32 or training.padding_free off"
            )
        elif length_averaged and start is not None:
            chosen_drop, rejected_drop = start.chosen - chosen, start.rejected - rejected
            if chosen_drop > rules.collapse_drop and rejected_drop > rules.collapse_drop:
                diagnosis.degenerate.append(
                    f"collapse: logps/chosen fell from {start.chosen:.3g} to {chosen:.3g} and "
                    f"logps/rejected from {start.rejected:.3g} to {rejected:.3g} by step "
                    f"{step} (more than {rules.collapse_drop} nats per token each): the model "
                    "is losing the language it started with; lower the learning rate, or add "
                    "an SFT term (simpo.sft_weight) to hold the chosen responses' likelihood"
                )
    if length_averaged and margin is not None and math.isfinite(margin):
        late = step >= rules.late_fraction * max_steps
        if late and margin < rules.low_margin:
            diagnosis.warnings.append(
                f"not learning preferences: reward margin {margin:.3g} < {rules.low_margin} "
                f"at step {step} of {max_steps}; raise the learning rate first, then "
                "gamma_beta_ratio or beta"
            )
        if margin > rules.high_margin:
            diagnosis.warnings.append(
                f"probably over-fitting: reward margin {margin:.3g} > {rules.high_margin}; "
                "if eval/rewards/accuracies lags train's, lower the learning rate or beta"
            )
    return diagnosis
