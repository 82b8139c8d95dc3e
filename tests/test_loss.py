"""The SimPO objective against docs/simpo.md: worked examples, gradients, options."""

from __future__ import annotations

import math

import pytest
import torch

from simpo_sweep import sequence_logps, simpo_loss
from simpo_sweep.engine.logps import ResponseLogps
from simpo_sweep.engine.loss import simpo_objective
from simpo_sweep.spec.models import SimPOSpec


def _pair(chosen: float, rejected: float) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor([chosen], dtype=torch.float64), torch.tensor(
        [rejected], dtype=torch.float64
    )


def _total(chosen: float, rejected: float, **simpo: float | str) -> float:
    """Total loss through the training objective for one pair of average log-probs."""
    response = ResponseLogps(
        summed=torch.tensor([chosen, rejected], dtype=torch.float64),
        token_counts=torch.tensor([1, 1]),
        logit_sums=torch.zeros(2, dtype=torch.float64),
    )
    loss, _ = simpo_objective(response, SimPOSpec.model_validate(simpo))
    return loss.item()


def test_worked_example_1_sigmoid() -> None:
    chosen, rejected = _pair(-1.2, -2.5)
    result = simpo_loss(chosen, rejected, beta=2.0, gamma_beta_ratio=0.5)
    # pi_logratios = 1.3, logits = 0.8, L = -log(sigmoid(1.6))
    assert result.losses.item() == pytest.approx(0.18389, abs=1e-4)
    assert result.losses.item() == pytest.approx(-math.log(1 / (1 + math.exp(-1.6))), abs=1e-12)
    assert result.chosen_rewards.item() == pytest.approx(-2.4)
    assert result.rejected_rewards.item() == pytest.approx(-5.0)


def test_worked_example_2_exact_value_with_sft_weight() -> None:
    # The source doc's 0.304 reuses example 1's loss; computed exactly with beta=2.5 it is 0.2469.
    total = _total(-1.2, -2.5, beta=2.5, gamma_beta_ratio=0.5, sft_weight=0.1)
    assert total == pytest.approx(0.2469, abs=1e-4)
    assert total == pytest.approx(-math.log(1 / (1 + math.exp(-2.0))) + 0.12, abs=1e-12)


def test_hinge_loss_values() -> None:
    chosen = torch.tensor([-1.2, -1.0, -3.0], dtype=torch.float64)
    rejected = torch.tensor([-2.5, -3.0, -1.0], dtype=torch.float64)
    losses = simpo_loss(chosen, rejected, beta=2.0, gamma_beta_ratio=0.5, loss_type="hinge").losses
    # logits = [0.8, 1.5, -2.5]; relu(1 - 2*logits)
    torch.testing.assert_close(losses, torch.tensor([0.0, 0.0, 6.0], dtype=torch.float64))


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 0.5])
@pytest.mark.parametrize("beta", [0.5, 2.0, 10.0])
def test_sigmoid_gradient_matches_formula(beta: float, label_smoothing: float) -> None:
    chosen = torch.tensor([-1.2, -2.0, -0.5, -4.0], dtype=torch.float64, requires_grad=True)
    rejected = torch.tensor([-2.5, -1.0, -0.6, -3.9], dtype=torch.float64)
    gamma_beta_ratio = 0.3
    losses = simpo_loss(
        chosen,
        rejected,
        beta=beta,
        gamma_beta_ratio=gamma_beta_ratio,
        label_smoothing=label_smoothing,
    ).losses
    losses.sum().backward()
    logits = (chosen - rejected - gamma_beta_ratio).detach()
    expected = (
        -beta * torch.sigmoid(-beta * logits) * (1 - label_smoothing)
        + beta * torch.sigmoid(beta * logits) * label_smoothing
    )
    # d logits / d chosen = 1
    torch.testing.assert_close(chosen.grad, expected)


def test_hinge_gradient_matches_formula() -> None:
    beta = 2.0
    chosen = torch.tensor([-1.2, -1.0, -3.0, -1.0], dtype=torch.float64, requires_grad=True)
    rejected = torch.tensor([-2.5, -3.0, -1.0, -1.6], dtype=torch.float64)
    losses = simpo_loss(chosen, rejected, beta=beta, gamma_beta_ratio=0.1, loss_type="hinge").losses
    losses.sum().backward()
    logits = (chosen - rejected - 0.1).detach()
    expected = torch.where(logits < 1 / beta, -beta, 0.0).to(torch.float64)
    torch.testing.assert_close(chosen.grad, expected)


def test_label_smoothing_half_is_symmetric() -> None:
    chosen, rejected = _pair(-1.0, -2.0)
    forward = simpo_loss(
        chosen, rejected, beta=2.0, gamma_beta_ratio=0.0, label_smoothing=0.5
    ).losses
    backward = simpo_loss(
        rejected, chosen, beta=2.0, gamma_beta_ratio=0.0, label_smoothing=0.5
    ).losses
    torch.testing.assert_close(forward, backward)
    smoothed = simpo_loss(
        chosen, rejected, beta=2.0, gamma_beta_ratio=0.0, label_smoothing=0.1
    ).losses
    expected = (
        -math.log(torch.sigmoid(torch.tensor(2.0)).item()) * 0.9
        - math.log(torch.sigmoid(torch.tensor(-2.0)).item()) * 0.1
    )
    assert smoothed.item() == pytest.approx(expected, abs=1e-6)


def test_gamma_beta_ratio_is_a_margin_divided_by_beta() -> None:
    # With gamma_beta_ratio = margin exactly, logits = 0 and L = log 2 for any beta.
    chosen, rejected = _pair(-1.0, -1.7)
    for beta in (1.0, 2.5, 10.0):
        losses = simpo_loss(chosen, rejected, beta=beta, gamma_beta_ratio=0.7).losses
        assert losses.item() == pytest.approx(math.log(2), abs=1e-9)


def test_absolute_gamma_converts_and_never_mixes() -> None:
    assert SimPOSpec(beta=2.5, gamma=1.25).gamma_beta_ratio == pytest.approx(0.5)
    with pytest.raises(ValueError, match="not both"):
        SimPOSpec(beta=2.5, gamma=1.25, gamma_beta_ratio=0.5)


def test_sum_versus_average_log_prob() -> None:
    response = ResponseLogps(
        summed=torch.tensor([-6.0, -9.0]),
        token_counts=torch.tensor([3, 2]),
        logit_sums=torch.zeros(2),
    )
    _, averaged = simpo_objective(response, SimPOSpec(average_log_prob=True))
    _, summed = simpo_objective(response, SimPOSpec(average_log_prob=False))
    assert averaged["logps/chosen"].item() == pytest.approx(-2.0)
    assert averaged["logps/rejected"].item() == pytest.approx(-4.5)
    assert summed["logps/chosen"].item() == pytest.approx(-6.0)
    assert summed["logps/rejected"].item() == pytest.approx(-9.0)


def test_sft_weight_adds_mean_negative_chosen_logp() -> None:
    base = _total(-1.2, -2.5, beta=2.0, gamma_beta_ratio=0.5)
    weighted = _total(-1.2, -2.5, beta=2.0, gamma_beta_ratio=0.5, sft_weight=0.3)
    assert weighted - base == pytest.approx(0.3 * 1.2, abs=1e-9)


def test_invalid_arguments_are_refused() -> None:
    chosen, rejected = _pair(-1.0, -2.0)
    with pytest.raises(ValueError, match="beta"):
        simpo_loss(chosen, rejected, beta=0.0, gamma_beta_ratio=0.5)
    with pytest.raises(ValueError, match="label_smoothing"):
        simpo_loss(chosen, rejected, beta=1.0, gamma_beta_ratio=0.5, label_smoothing=0.6)
    with pytest.raises(ValueError, match="loss_type"):
        simpo_loss(chosen, rejected, beta=1.0, gamma_beta_ratio=0.5, loss_type="ipo")  # type: ignore[arg-type]


def test_sequence_logps_matches_naive_loop() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 11, dtype=torch.float64)
    labels = torch.randint(0, 11, (3, 7))
    labels[0, :3] = -100  # prompt
    labels[1, :2] = -100
    labels[1, 5:] = -100  # padding
    labels[2, :6] = -100  # a single response token
    summed = sequence_logps(logits, labels, average=False)
    averaged = sequence_logps(logits, labels, average=True)
    for row in range(3):
        total, count = 0.0, 0
        for t in range(1, 7):
            if labels[row, t] != -100:
                row_logits = logits[row, t - 1]
                total += (row_logits[labels[row, t]] - torch.logsumexp(row_logits, 0)).item()
                count += 1
        assert summed[row].item() == pytest.approx(total, abs=1e-10)
        assert averaged[row].item() == pytest.approx(total / count, abs=1e-10)


def test_sequence_logps_is_float32_for_bf16_logits() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 13).to(torch.bfloat16)
    labels = torch.randint(0, 13, (2, 5))
    result = sequence_logps(logits, labels)
    assert result.dtype == torch.float32
    torch.testing.assert_close(result, sequence_logps(logits.float(), labels))


def test_empty_response_is_an_error_not_a_nan() -> None:
    logits = torch.randn(1, 4, 5)
    labels = torch.full((1, 4), -100)
    with pytest.raises(ValueError, match="no tokens"):
        sequence_logps(logits, labels)
