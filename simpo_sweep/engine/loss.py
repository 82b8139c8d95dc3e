"""The SimPO objective (docs/simpo.md), readable in one screen.

pi_logratios = logp(chosen) - logp(rejected)
logits       = pi_logratios - gamma_beta_ratio
sigmoid:  L = -logsigmoid(beta*logits)*(1-eps) - logsigmoid(-beta*logits)*eps
hinge:    L = relu(1 - beta*logits)
total     = mean(L) + sft_weight * mean(-logp(chosen))

`simpo_loss` is the per-pair preference loss; `simpo_objective` is what the trainer minimises
(the total, with the SFT term) and the per-pair sums of every step metric.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F

from simpo_sweep.engine.batching import IGNORE_INDEX
from simpo_sweep.engine.logps import ResponseLogps
from simpo_sweep.spec.models import SimPOSpec

LossType = Literal["sigmoid", "hinge"]


class SimPOLoss(NamedTuple):
    losses: torch.Tensor  # per pair
    chosen_rewards: torch.Tensor  # beta * logp(chosen), detached
    rejected_rewards: torch.Tensor  # beta * logp(rejected), detached


def simpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    *,
    beta: float,
    gamma_beta_ratio: float,
    loss_type: LossType = "sigmoid",
    label_smoothing: float = 0.0,
) -> SimPOLoss:
    """Per-pair SimPO losses and the implicit rewards.

    `chosen_logps`/`rejected_logps` are sequence log-probs of each response (length-averaged
    for SimPO; see `sequence_logps`). The SFT term is added by the caller: it is a property
    of the batch, not of a pair's preference.
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5], got {label_smoothing}")
    logits = (chosen_logps - rejected_logps) - gamma_beta_ratio
    if loss_type == "sigmoid":
        losses = (
            -F.logsigmoid(beta * logits) * (1 - label_smoothing)
            - F.logsigmoid(-beta * logits) * label_smoothing
        )
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * logits)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected 'sigmoid' or 'hinge'")
    return SimPOLoss(
        losses=losses,
        chosen_rewards=beta * chosen_logps.detach(),
        rejected_rewards=beta * rejected_logps.detach(),
    )


def sequence_logps(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    average: bool = True,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Log-prob of each row's labelled tokens, summed or averaged over those tokens.

    `labels` is aligned with the input ids (labels[t] = input_ids[t] on response tokens,
    `ignore_index` on prompt and padding); the next-token shift happens here. The log-softmax
    runs in (at least) float32 whatever the logits' dtype, because bf16 log-probs of long responses
    lose the small differences the loss is made of.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} "
            "disagree on [batch, length]"
        )
    shifted_labels = labels[:, 1:]
    mask = shifted_labels != ignore_index
    token_ids = shifted_labels.masked_fill(~mask, 0)
    compute_dtype = torch.promote_types(logits.dtype, torch.float32)
    log_probs = torch.log_softmax(logits[:, :-1].to(compute_dtype), dim=-1)
    per_token = torch.gather(log_probs, -1, token_ids.unsqueeze(-1)).squeeze(-1) * mask
    return reduce_token_logps(per_token.sum(-1), mask.sum(-1), average=average)


def reduce_token_logps(
    summed_logps: torch.Tensor,
    token_counts: torch.Tensor,
    *,
    average: bool,
    check_empty: bool = True,
) -> torch.Tensor:
    """Sum -> average over response tokens; a response with no tokens is an input error.

    The check reads the counts on the host (a device sync): `check_empty=False` is for callers
    whose batches cannot hold an empty response (the trainer's: batching refuses them).
    """
    if not average:
        return summed_logps
    if check_empty and bool((token_counts == 0).any()):
        raise ValueError(
            "a response has no tokens left after truncation; drop such pairs before training"
        )
    return summed_logps / token_counts


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
