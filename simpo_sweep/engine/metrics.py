"""SimPO step metrics (shared/SIMPO.md names) and the verdict on a trial's health."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from simpo_sweep.engine.logps import ResponseLogps
from simpo_sweep.engine.loss import reduce_token_logps, simpo_loss
from simpo_sweep.spec.models import DiagnosticsSpec, SimPOSpec

# Summed over pairs inside a step; turned into means once all micro-batches and workers are in.
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


def simpo_objective(
    response_logps: ResponseLogps, simpo: SimPOSpec
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Total loss (mean over the batch's pairs) and the per-pair sums of every metric."""
    num_pairs = response_logps.summed.shape[0] // 2
    # No empty-response check here: it would cost a host/device sync every micro-batch, and
    # batching refuses pairs with an empty response before they reach the model.
    logps = reduce_token_logps(
        response_logps.summed,
        response_logps.token_counts,
        average=simpo.average_log_prob,
        check_empty=False,
    )
    chosen_logps, rejected_logps = logps[:num_pairs], logps[num_pairs:]
    preference = simpo_loss(
        chosen_logps,
        rejected_logps,
        beta=simpo.beta,
        gamma_beta_ratio=simpo.gamma_beta_ratio,
        loss_type=simpo.loss_type,
        label_smoothing=simpo.label_smoothing,
    )
    sft_losses = -chosen_logps
    per_pair_total = preference.losses + simpo.sft_weight * sft_losses
    mean_logits = response_logps.logit_sums / response_logps.token_counts.clamp_min(1)
    margins = preference.chosen_rewards - preference.rejected_rewards
    sums = {
        "loss": per_pair_total.detach().sum(),
        "sft_loss": sft_losses.detach().sum(),
        "rewards/chosen": preference.chosen_rewards.sum(),
        "rewards/rejected": preference.rejected_rewards.sum(),
        "rewards/margins": margins.sum(),
        "rewards/accuracies": (margins > 0).float().sum(),
        "logps/chosen": chosen_logps.detach().sum(),
        "logps/rejected": rejected_logps.detach().sum(),
        "logits/chosen": mean_logits[:num_pairs].sum(),
        "logits/rejected": mean_logits[num_pairs:].sum(),
    }
    return per_pair_total.mean(), sums


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


def diagnose(
    metrics: Mapping[str, float],
    *,
    step: int,
    max_steps: int,
    rules: DiagnosticsSpec,
    length_averaged: bool,
    prefix: str = "train",
) -> Diagnosis:
    """Read one set of metrics the way shared/SIMPO.md's diagnostics table does.

    `length_averaged`: whether the log-probs are averaged over response tokens
    (SimPOSpec.average_log_prob). The collapse and reward-margin thresholds are defined on
    averaged log-probs; summed ones scale with response length (a healthy -2 per token reads
    -200 over 100 tokens), so without averaging only the scale-free rules apply: NaN/inf loss
    and positive log-probs.
    """
    diagnosis = Diagnosis()
    loss = metrics.get(f"{prefix}/loss")
    chosen = metrics.get(f"{prefix}/logps/chosen")
    rejected = metrics.get(f"{prefix}/logps/rejected")
    margin = metrics.get(f"{prefix}/rewards/margins")
    if loss is not None and not math.isfinite(loss):
        diagnosis.degenerate.append(f"diverged: loss is {loss} at step {step}")
    if chosen is not None and rejected is not None:
        if chosen > 0 or rejected > 0:
            diagnosis.degenerate.append(
                f"numerical instability: positive log-prob (chosen {chosen:.3g}, "
                f"rejected {rejected:.3g}) at step {step}"
            )
        elif (
            length_averaged
            and chosen < rules.collapse_logp
            and rejected < rules.collapse_logp
            and step >= rules.collapse_after_fraction * max_steps
        ):
            diagnosis.degenerate.append(
                f"collapse: logps/chosen {chosen:.3g} and logps/rejected {rejected:.3g} both "
                f"below {rules.collapse_logp} at step {step}; lower the learning rate"
            )
    if length_averaged and margin is not None and math.isfinite(margin):
        late = step >= rules.late_fraction * max_steps
        if late and margin < rules.low_margin:
            diagnosis.warnings.append(
                f"not learning preferences: reward margin {margin:.3g} < {rules.low_margin} "
                "late in training; raise beta, gamma_beta_ratio or the learning rate"
            )
        if margin > rules.high_margin:
            diagnosis.warnings.append(
                f"probably over-fitting: reward margin {margin:.3g} > {rules.high_margin}; "
                "lower beta or the learning rate"
            )
    return diagnosis
