"""Prefix sharing (prompt + chosen + rejected in one sequence) and token-budget micro-batches.

The shared-prefix layout must give the unshared (padded) path's log-probs, SimPO loss and the
gradient of every parameter, for the Llama, Qwen2, Mistral, Phi-3 and Gemma2 families, sdpa
and eager attention (Gemma2: eager, its only path), and refuse a sliding window it cannot express.
Tolerances, float32: log-prob sums rtol 1e-5 / atol 1e-5 and gradients rtol 1e-4 / atol 1e-6,
as in tests/test_logps_paths.py (only summation order differs: the prompt's keys are the same
numbers, the attention runs over a longer, masked key axis).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from typing import Any

import pytest
import torch
from torch import nn
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from simpo_sweep.engine.batching import (
    PairExample,
    choose_layout,
    collate_layout,
    collate_padded,
    collate_shared_prefix,
    pair_tokens,
    pair_weighted_loss,
    token_budget_micro_batches,
)
from simpo_sweep.engine.data import TokenizedSplit
from simpo_sweep.engine.logps import PolicyLogps
from simpo_sweep.engine.loss import simpo_objective
from simpo_sweep.engine.train import SimPOTrainer
from simpo_sweep.spec.models import SimPOSpec, TrainingSpec

VOCAB = 97
LOGP_RTOL = LOGP_ATOL = 1e-5
GRAD_RTOL, GRAD_ATOL = 1e-4, 1e-6
SIMPO = SimPOSpec(beta=2.0, gamma_beta_ratio=0.5, sft_weight=0.3)


def tiny_model(family: str, attn: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    common: dict[str, Any] = {
        "vocab_size": VOCAB,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 64,
        "max_position_embeddings": 256,
        "attn_implementation": attn,
    }
    if family == "llama":
        return LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=False)).eval()
    if family == "mistral":
        return MistralForCausalLM(MistralConfig(**common, sliding_window=None)).eval()
    if family == "phi3":
        return Phi3ForCausalLM(Phi3Config(**common, pad_token_id=0)).eval()
    if family == "gemma2":
        return Gemma2ForCausalLM(Gemma2Config(**common, head_dim=8)).eval()
    return Qwen2ForCausalLM(Qwen2Config(**common, tie_word_embeddings=True)).eval()


def ragged_pairs(count: int, seed: int = 1) -> list[PairExample]:
    rng = random.Random(seed)

    def words(n: int) -> list[int]:
        return [rng.randrange(3, VOCAB) for _ in range(n)]

    # ragged prompts and responses, the first pair's rejected longer than its chosen and the
    # second's shorter, so that padding and the rejected position restart both vary
    return [
        PairExample(words(rng.randint(2, 11)), words(rng.randint(1, 9)), words(rng.randint(1, 9)))
        for _ in range(count)
    ]


def logps_and_grads(
    model: nn.Module, batch_of: str, examples: Sequence[PairExample]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    batch = collate_shared_prefix(examples) if batch_of == "shared" else collate_padded(examples, 0)
    result = PolicyLogps(model, chunk_tokens=7)(batch)
    loss, _ = simpo_objective(result, SIMPO)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return result.summed.detach(), result.token_counts, loss.detach(), grads


# Gemma2 (logit soft-capping) has no sdpa path in transformers: eager only.
FAMILY_ATTENTION = [
    *itertools.product(["llama", "qwen2", "mistral", "phi3"], ["sdpa", "eager"]),
    ("gemma2", "eager"),
]


@pytest.mark.parametrize(("family", "attn"), FAMILY_ATTENTION)
def test_shared_prefix_matches_unshared(family: str, attn: str) -> None:
    model = tiny_model(family, attn)
    examples = ragged_pairs(5)
    shared = logps_and_grads(model, "shared", examples)
    unshared = logps_and_grads(model, "padded", examples)
    torch.testing.assert_close(shared[0], unshared[0], rtol=LOGP_RTOL, atol=LOGP_ATOL)
    assert torch.equal(shared[1], unshared[1])
    torch.testing.assert_close(shared[2], unshared[2], rtol=LOGP_RTOL, atol=LOGP_ATOL)
    assert shared[3].keys() == unshared[3].keys() and len(shared[3]) > 0
    for name, grad in shared[3].items():
        torch.testing.assert_close(
            grad, unshared[3][name], rtol=GRAD_RTOL, atol=GRAD_ATOL, msg=name
        )


def test_layout_positions_mask_and_predictors() -> None:
    example = PairExample([5, 6, 7], [10, 11], [20, 21, 22, 23])
    short = PairExample([5, 6], [12], [24])
    batch = collate_shared_prefix([example, short], pad_token_id=0)
    assert batch.input_ids[0].tolist() == [5, 6, 7, 10, 11, 20, 21, 22, 23]
    # the rejected branch restarts at len(prompt): its rotary positions are the unshared path's
    assert batch.position_ids is not None and batch.predicted_from is not None
    assert batch.position_ids[0].tolist() == [0, 1, 2, 3, 4, 3, 4, 5, 6]
    # first rejected token predicted from the prompt's last token, not the chosen's last
    assert batch.predicted_from[0, 5].item() == 2 and batch.predicted_from[0, 3].item() == 2
    assert batch.predicted_from[0, 6].item() == 5
    assert batch.sequence_ids[0].tolist() == [0, 0, 0, 0, 0, 2, 2, 2, 2]
    assert batch.sequence_ids[1, 4:].tolist() == [-1] * 5  # padding
    assert batch.attention_mask is not None and batch.attention_mask.shape == (2, 1, 9, 9)
    mask = batch.attention_mask[0, 0]
    assert not mask[5:, 3:5].any()  # rejected never sees chosen
    assert mask[5:, :3].all()  # but sees the whole prompt
    assert torch.equal(mask[5:, 5:], torch.ones(4, 4, dtype=torch.bool).tril())
    assert torch.equal(mask[:5, :5], torch.ones(5, 5, dtype=torch.bool).tril())
    pad_mask = batch.attention_mask[1, 0]
    assert torch.equal(pad_mask[4:, :], torch.eye(9, dtype=torch.bool)[4:])  # pads: only self
    assert batch.num_tokens == collate_padded([example, short], 0).num_tokens


def test_pairs_binned_into_rows_stay_apart() -> None:
    """Two short pairs share a row: each attends only itself, positions restart per pair."""
    long = PairExample([5, 6, 7, 8], [10, 11], [20, 21, 22])  # 9 tokens: the row width
    first, second = PairExample([5], [12], [24, 25]), PairExample([6, 7], [13], [26])
    batch = collate_shared_prefix([long, first, second], pad_token_id=0)
    assert batch.input_ids.shape == (2, 9)  # first (4) and second (4) share the second row
    assert batch.input_ids[1].tolist() == [5, 12, 24, 25, 6, 7, 13, 26, 0]
    assert batch.position_ids is not None and batch.predicted_from is not None
    assert batch.position_ids[1].tolist() == [0, 1, 1, 2, 0, 1, 2, 2, 0]
    assert batch.predicted_from[1, 2].item() == 0 and batch.predicted_from[1, 7].item() == 5
    assert batch.sequence_ids[1].tolist() == [1, 1, 4, 4, 2, 2, 2, 5, -1]
    assert batch.attention_mask is not None
    mask = batch.attention_mask[1, 0]
    assert not mask[4:8, :4].any() and not mask[:4, 4:].any()  # pairs never see each other
    assert mask[2, 0] and not mask[2, 1]  # the rejected sees its prompt, not its chosen


def test_binned_rows_match_unshared() -> None:
    model = tiny_model("llama", "sdpa")
    # many short pairs next to one long one, so that several pairs share rows
    examples = [*ragged_pairs(6, seed=7), PairExample(list(range(3, 30)), [40, 41], [50, 51])]
    batch = collate_shared_prefix(examples)
    assert batch.input_ids.shape[0] < len(examples)
    policy = PolicyLogps(model)
    shared = policy(batch).summed.detach()
    unshared = policy(collate_padded(examples, 0)).summed.detach()
    torch.testing.assert_close(shared, unshared, rtol=LOGP_RTOL, atol=LOGP_ATOL)


def test_wrong_rejected_positions_are_detected() -> None:
    """The equality test above can fail: continuing positions past chosen changes the logps."""
    model = tiny_model("llama", "sdpa")
    examples = ragged_pairs(3)
    batch = collate_shared_prefix(examples)
    policy = PolicyLogps(model)
    right = policy(batch).summed.detach()
    assert batch.position_ids is not None
    batch.position_ids = torch.arange(batch.input_ids.shape[1]).repeat(len(examples), 1)
    wrong = policy(batch).summed.detach()
    assert not torch.allclose(right, wrong, rtol=LOGP_RTOL, atol=LOGP_ATOL)


def test_choose_layout_prefix_sharing(caplog: pytest.LogCaptureFixture) -> None:
    assert choose_layout("auto", "sdpa", "on") == "shared_prefix"
    assert choose_layout("off", "eager", "on") == "shared_prefix"
    assert choose_layout("auto", "sdpa", "auto") == "packed_rows"
    assert choose_layout("auto", "sdpa", "off") == "packed_rows"
    with pytest.raises(ValueError, match="4D"):
        choose_layout("auto", "flash_attention_2", "on")
    assert collate_layout(ragged_pairs(2), "shared_prefix", 0).predicted_from is not None


def columns(examples: Sequence[PairExample]) -> TokenizedSplit:
    return TokenizedSplit(
        [list(e.prompt_ids) for e in examples],
        [list(e.chosen_ids) for e in examples],
        [list(e.rejected_ids) for e in examples],
    )


def test_a_sliding_window_shorter_than_the_data_refuses_prefix_sharing() -> None:
    """The shared mask is plain causal; a window that bites in the unshared path (sequences
    longer than it) would give other log-probs, so the trainer refuses instead."""
    examples = ragged_pairs(4, seed=3)
    windowed = tiny_model("mistral", "sdpa")
    windowed.config.sliding_window = 4
    policy = PolicyLogps(windowed)
    shared = policy(collate_shared_prefix(examples)).summed.detach()
    unshared = policy(collate_padded(examples, 0)).summed.detach()
    assert not torch.allclose(shared, unshared, rtol=LOGP_RTOL, atol=LOGP_ATOL)

    def trainer(model: nn.Module) -> SimPOTrainer:
        training = TrainingSpec(max_steps=1, batch_size=4, precision="fp32", prefix_sharing="on")
        data = columns(examples)
        return SimPOTrainer(
            model, data, data, training=training, simpo=SIMPO, pad_token_id=0, device="cpu"
        )

    with pytest.raises(ValueError, match=r"sliding attention window \(4 tokens\)"):
        trainer(windowed)
    wide = tiny_model("mistral", "sdpa")
    wide.config.sliding_window = 64  # longer than any sequence here: the window never bites
    assert trainer(wide).layout == "shared_prefix"


def test_trainer_step_same_with_prefix_sharing() -> None:
    examples = ragged_pairs(4, seed=3)

    first_steps = {}
    for sharing in ("on", "off"):
        training = TrainingSpec(max_steps=1, batch_size=4, precision="fp32", prefix_sharing=sharing)
        trainer = SimPOTrainer(
            tiny_model("qwen2", "sdpa"),
            columns(examples),
            columns(examples),
            training=training,
            simpo=SIMPO,
            pad_token_id=0,
            device="cpu",
        )
        assert (trainer.layout == "shared_prefix") == (sharing == "on")
        batch = trainer._collate(examples)
        first_steps[sharing] = trainer.train_step(iter([batch]))
    for name in ("train/loss", "train/logps/chosen", "train/logps/rejected"):
        assert first_steps["on"][name] == pytest.approx(first_steps["off"][name], abs=1e-5)


def test_token_budget_micro_batches() -> None:
    examples = ragged_pairs(12, seed=4)
    costs = [pair_tokens(e, "packed_rows") for e in examples]
    order = list(range(11, -1, -1))
    budget = 60
    batches = token_budget_micro_batches(order, costs, budget)
    assert [i for b in batches for i in b] == order  # every pair once, order kept
    for members in batches:
        assert len(members) == 1 or sum(costs[i] for i in members) <= budget
    # greedy: the next pair would not have fitted
    for members, following in itertools.pairwise(batches):
        assert sum(costs[i] for i in members) + costs[following[0]] > budget
    assert token_budget_micro_batches([0, 1], [100, 5], 10) == [[0], [1]]  # oversize alone
    shared = pair_tokens(examples[0], "shared_prefix")
    assert shared == pair_tokens(examples[0], "packed_rows") - len(examples[0].prompt_ids)
    with pytest.raises(ValueError):
        token_budget_micro_batches(order, costs, 0)


def test_pair_weighted_accumulation_equals_fixed_batch_mean() -> None:
    model = tiny_model("llama", "sdpa")
    examples = ragged_pairs(9, seed=5)
    costs = [pair_tokens(e, "packed_rows") for e in examples]
    batches = token_budget_micro_batches(range(9), costs, 70)
    sizes = [len(b) for b in batches]
    assert len(set(sizes)) > 1, sizes  # unequal pair counts, or the test proves nothing

    def grads_after(backward_losses: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        for loss in backward_losses:
            loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return grads

    policy = PolicyLogps(model)

    def loss_of(members: Sequence[int]) -> torch.Tensor:
        batch = collate_layout([examples[i] for i in members], "packed_rows", 0)
        return simpo_objective(policy(batch), SIMPO)[0]

    full_loss = loss_of(range(9))
    fixed = grads_after([full_loss])
    losses = [loss_of(b) for b in batches]
    weighted = [
        pair_weighted_loss(loss, len(b), 9) for loss, b in zip(losses, batches, strict=True)
    ]
    torch.testing.assert_close(
        sum(w.detach() for w in weighted), full_loss.detach(), rtol=LOGP_RTOL, atol=LOGP_ATOL
    )
    budgeted = grads_after(weighted)
    for name, grad in fixed.items():
        torch.testing.assert_close(budgeted[name], grad, rtol=GRAD_RTOL, atol=GRAD_ATOL, msg=name)
    # dividing by the number of micro-batches (the fixed-batch rule) would be a different mean
    naive = grads_after([loss_of(b) / len(batches) for b in batches])
    assert not all(
        torch.allclose(naive[n], g, rtol=GRAD_RTOL, atol=GRAD_ATOL) for n, g in fixed.items()
    )
