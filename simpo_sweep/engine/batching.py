"""Chosen and rejected responses of a micro-batch laid out for ONE forward pass.

Two layouts, same sequence order (chosen of every pair, then rejected of every pair):
- padded: one row per sequence, right-padded to the longest;
- packed: sequences concatenated into rows with position ids restarting at each sequence and no
  attention mask, so that transformers derives the sequence boundaries from the position ids
  (block-diagonal causal attention). Which attention implementations honour that, and whether
  one long row or several bounded rows is cheaper, is `packing_layout`'s business:
  * varlen kernels (flash_attention_2/3) and flex_attention cost sum(len_i^2): one row;
  * sdpa and eager build a dense [rows, L, L] mask and cost rows * L^2 whatever the mask says,
    so one row of all tokens would cost far more than padding: sequences are binned into rows
    no longer than the longest sequence (first-fit decreasing), which is never more attention
    than the padded layout and drops most of the padding tokens from every other layer.
A third, `shared_prefix` (TrainingSpec.prefix_sharing), runs each pair's prompt once: prompt +
chosen + rejected as one sequence under a custom 4D mask (`collate_shared_prefix`).

`token_budget_micro_batches` and `pair_weighted_loss` fill micro-batches up to a token budget
(TrainingSpec.max_tokens_per_batch) instead of a fixed pair count, the loss still the mean over
a step's pairs.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

IGNORE_INDEX = -100
logger = logging.getLogger(__name__)

# Attention implementations whose packed cost is per sequence: pack everything into one row.
# "torch_varlen" is this project's (engine.logps.register_torch_varlen_attention): torch's own
# flash kernel for variable-length batches, no flash-attn package needed.
VARLEN_ATTENTION = frozenset(
    {"flash_attention_2", "flash_attention_3", "flex_attention", "torch_varlen"}
)
# Implementations that honour packed position ids through a dense block-diagonal mask
# (checked in tests/test_logps_paths.py): pack into rows bounded by the longest sequence.
DENSE_MASK_ATTENTION = frozenset({"sdpa", "eager"})

Layout = Literal["packed_one_row", "packed_rows", "padded", "shared_prefix"]
PaddingFree = Literal["auto", "on", "off"]
PrefixSharing = Literal["auto", "on", "off"]
# Attention implementations that take a custom 4D mask as given (transformers' masking_utils
# returns a 4D attention_mask unchanged): sdpa reads a boolean one, eager an additive float one
# (PolicyLogps converts). Varlen kernels take no mask, so they cannot express shared prefixes.
SHARED_PREFIX_ATTENTION = DENSE_MASK_ATTENTION


def packing_layout(attn_implementation: str | None) -> Layout:
    """The cheapest correct layout for a model's attention implementation (unknown: padded)."""
    if attn_implementation in VARLEN_ATTENTION:
        return "packed_one_row"
    if attn_implementation in DENSE_MASK_ATTENTION:
        return "packed_rows"
    return "padded"


def choose_layout(
    padding_free: PaddingFree,
    attn_implementation: str | None,
    prefix_sharing: PrefixSharing = "off",
) -> Layout:
    """The layout a trainer collates in (TrainingSpec.padding_free), logged with the reason.

    `prefix_sharing` (TrainingSpec.prefix_sharing) `on` collates "shared_prefix" (the prompt
    once per pair, see `collate_shared_prefix`) and refuses an attention that takes no custom
    4D mask; `auto` is off for now: on CPU it is 1.14-1.33x packed rows' speed (bench/README.md,
    "Prefix sharing"), but on a GPU its dense mask competes with varlen flash kernels, which
    bench/gpu_round2.sh has yet to measure.

    `auto` packs exactly where `packing_layout` knows the attention honours packed position
    ids and pads otherwise; `on` insists on packing and refuses an attention implementation
    that might silently attend across sequence boundaries; `off` always pads.
    """
    if prefix_sharing == "on":
        if attn_implementation not in SHARED_PREFIX_ATTENTION:
            raise ValueError(
                f"prefix_sharing=on needs an attention implementation that takes a custom 4D "
                f"mask ({sorted(SHARED_PREFIX_ATTENTION)}), not {attn_implementation!r}"
            )
        logger.info(
            "batch layout shared_prefix (prefix_sharing=on): prompt + chosen + rejected in one "
            "sequence per pair, the prompt computed once"
        )
        return "shared_prefix"
    if padding_free == "off":
        layout: Layout = "padded"
        reason = "padding_free=off"
    else:
        layout = packing_layout(attn_implementation)
        if layout == "padded":
            if padding_free == "on":
                raise ValueError(
                    f"padding_free=on, but attention implementation {attn_implementation!r} is "
                    "not known to keep packed sequences apart; use padding_free=auto or off, or "
                    f"one of {sorted(VARLEN_ATTENTION | DENSE_MASK_ATTENTION)}"
                )
            reason = f"attention {attn_implementation!r} is not known to honour packed position ids"
        elif layout == "packed_one_row":
            reason = (
                f"attention {attn_implementation!r} is varlen (cost per sequence): "
                "every sequence of a micro-batch in one row"
            )
        else:
            reason = (
                f"attention {attn_implementation!r} builds a dense block-diagonal mask: "
                "sequences binned into rows no longer than the longest one"
            )
    logger.info("batch layout %s (padding_free=%s): %s", layout, padding_free, reason)
    return layout


@dataclass(frozen=True)
class PairExample:
    prompt_ids: Sequence[int]
    chosen_ids: Sequence[int]
    rejected_ids: Sequence[int]


@dataclass
class PairBatch:
    input_ids: torch.Tensor  # [rows, length]
    labels: torch.Tensor  # [rows, length], IGNORE_INDEX outside responses
    sequence_ids: torch.Tensor  # [rows, length], which sequence each position belongs to (-1: pad)
    # padded layout: [rows, length] 0/1; shared_prefix layout: [rows, 1, length, length] bool
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor | None  # packed and shared_prefix layouts
    num_pairs: int
    # real (non-padding) tokens, counted on the CPU at collate time: reading it never waits for
    # the device
    num_tokens: int
    # one-row packed layout: sequence boundaries [0, len_0, len_0 + len_1, ...] (int32) and the
    # longest sequence, handed to varlen kernels so that they need no device-to-host sync
    cu_seq_lens: torch.Tensor | None = None
    max_length: int | None = None
    # shared_prefix layout: [rows, length], the position whose hidden state predicts the token
    # at each position (t - 1 everywhere else; the first rejected token is predicted from the
    # prompt's last token, not from the chosen response's last one). None: t - 1.
    predicted_from: torch.Tensor | None = None

    def model_inputs(self) -> dict[str, torch.Tensor | int]:
        inputs: dict[str, torch.Tensor | int] = {"input_ids": self.input_ids}
        if self.attention_mask is not None:
            inputs["attention_mask"] = self.attention_mask
        if self.position_ids is not None:
            inputs["position_ids"] = self.position_ids
        if self.cu_seq_lens is not None and self.max_length is not None:
            # transformers' FlashAttentionKwargs: reach the attention function through **kwargs
            inputs["cu_seq_lens_q"] = inputs["cu_seq_lens_k"] = self.cu_seq_lens
            inputs["max_length_q"] = inputs["max_length_k"] = self.max_length
        return inputs

    def to(self, device: torch.device | str) -> PairBatch:
        def move(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor.to(device, non_blocking=True)

        return PairBatch(
            input_ids=self.input_ids.to(device, non_blocking=True),
            labels=self.labels.to(device, non_blocking=True),
            sequence_ids=self.sequence_ids.to(device, non_blocking=True),
            attention_mask=move(self.attention_mask),
            position_ids=move(self.position_ids),
            num_pairs=self.num_pairs,
            num_tokens=self.num_tokens,
            cu_seq_lens=move(self.cu_seq_lens),
            max_length=self.max_length,
            predicted_from=move(self.predicted_from),
        )


def _sequences(examples: Sequence[PairExample]) -> list[tuple[list[int], int]]:
    """(tokens, prompt length) for every chosen, then every rejected sequence."""
    sequences = []
    for response_field in ("chosen_ids", "rejected_ids"):
        for index, example in enumerate(examples):
            response = list(getattr(example, response_field))
            if not example.prompt_ids or not response:
                raise ValueError(
                    f"pair {index} has an empty prompt or response; the data layer drops those"
                )
            sequences.append((list(example.prompt_ids) + response, len(example.prompt_ids)))
    return sequences


def collate_padded(examples: Sequence[PairExample], pad_token_id: int) -> PairBatch:
    sequences = _sequences(examples)
    length = max(len(tokens) for tokens, _ in sequences)
    rows = len(sequences)
    input_ids = torch.full((rows, length), pad_token_id, dtype=torch.long)
    labels = torch.full((rows, length), IGNORE_INDEX, dtype=torch.long)
    sequence_ids = torch.full((rows, length), -1, dtype=torch.long)
    attention_mask = torch.zeros((rows, length), dtype=torch.long)
    for row, (tokens, prompt_length) in enumerate(sequences):
        token_tensor = torch.tensor(tokens, dtype=torch.long)
        input_ids[row, : len(tokens)] = token_tensor
        labels[row, prompt_length : len(tokens)] = token_tensor[prompt_length:]
        sequence_ids[row, : len(tokens)] = row
        attention_mask[row, : len(tokens)] = 1
    return PairBatch(
        input_ids,
        labels,
        sequence_ids,
        attention_mask,
        None,
        len(examples),
        sum(len(tokens) for tokens, _ in sequences),
    )


def collate_packed(
    examples: Sequence[PairExample],
    *,
    max_row_tokens: int | None = None,
    pad_token_id: int = 0,
) -> PairBatch:
    """Pack the sequences without per-sequence padding.

    `max_row_tokens=None`: every sequence in one row (for varlen attention). Otherwise rows hold
    at most max(max_row_tokens, longest sequence) tokens, filled first-fit decreasing; rows
    shorter than the longest row get a tail of `pad_token_id` (label ignored, sequence id -1,
    position ids restarting at 0 so that the tail is a separate "sequence" nobody attends to).
    """
    sequences = _sequences(examples)
    bins: list[list[int]] = []
    if max_row_tokens is None:
        bins.append(list(range(len(sequences))))
    else:
        capacity = max(max_row_tokens, *(len(tokens) for tokens, _ in sequences))
        room: list[int] = []
        for index in sorted(range(len(sequences)), key=lambda i: -len(sequences[i][0])):
            size = len(sequences[index][0])
            target = next((b for b, free in enumerate(room) if free >= size), None)
            if target is None:
                bins.append([index])
                room.append(capacity - size)
            else:
                bins[target].append(index)
                room[target] -= size
        # keep sequence order inside a row stable (chosen before rejected, pair order)
        bins = [sorted(b) for b in bins]

    rows: list[tuple[list[int], list[int], list[int], list[int]]] = []
    for members in bins:
        input_ids: list[int] = []
        labels: list[int] = []
        sequence_ids: list[int] = []
        position_ids: list[int] = []
        for index in members:
            tokens, prompt_length = sequences[index]
            input_ids += tokens
            labels += [IGNORE_INDEX] * prompt_length + tokens[prompt_length:]
            sequence_ids += [index] * len(tokens)
            position_ids += list(range(len(tokens)))
        rows.append((input_ids, labels, sequence_ids, position_ids))

    width = max(len(row[0]) for row in rows)
    shape = (len(rows), width)
    input_tensor = torch.full(shape, pad_token_id, dtype=torch.long)
    label_tensor = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    sequence_tensor = torch.full(shape, -1, dtype=torch.long)
    position_tensor = torch.arange(width, dtype=torch.long).repeat(len(rows), 1)
    for row, (input_ids, labels, sequence_ids, position_ids) in enumerate(rows):
        used = len(input_ids)
        input_tensor[row, :used] = torch.tensor(input_ids, dtype=torch.long)
        label_tensor[row, :used] = torch.tensor(labels, dtype=torch.long)
        sequence_tensor[row, :used] = torch.tensor(sequence_ids, dtype=torch.long)
        position_tensor[row, :used] = torch.tensor(position_ids, dtype=torch.long)
        position_tensor[row, used:] = torch.arange(width - used, dtype=torch.long)
    cu_seq_lens = max_length = None
    if max_row_tokens is None:
        lengths = [len(sequences[index][0]) for index in bins[0]]
        cu_seq_lens = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)
        max_length = max(lengths)
    return PairBatch(
        input_tensor,
        label_tensor,
        sequence_tensor,
        None,
        position_tensor,
        len(examples),
        sum(len(tokens) for tokens, _ in sequences),
        cu_seq_lens,
        max_length,
    )


def collate_shared_prefix(examples: Sequence[PairExample], pad_token_id: int = 0) -> PairBatch:
    """prompt + chosen + rejected as one sequence per pair, the prompt computed once.

    The 4D boolean mask (True: may attend) is causal over prompt + chosen; rejected tokens
    attend the prompt and, causally, each other, never a chosen token nor another pair. Position
    ids restart at len(prompt) for the rejected branch, so its rotary positions, and with the
    mask its whole computation, equal the unshared path's. Pairs are binned into rows no longer
    than the longest pair (first-fit decreasing, as `collate_packed` bins sequences for sdpa:
    its mask costs rows x L^2, so never longer rows); the rows' tails are padding that attends
    only itself (a fully masked sdpa row would be NaN). Sequence ids and the order of
    ResponseLogps are the other layouts': chosen of pair i is i, its rejected num_pairs + i.
    `num_tokens` counts the prompt twice, as the other layouts do, so that tokens/s stays
    comparable across layouts (the model runs over the prompt once).
    """
    num_pairs = len(examples)
    _sequences(examples)  # the same empty prompt/response check as the other layouts
    lengths = [len(e.prompt_ids) + len(e.chosen_ids) + len(e.rejected_ids) for e in examples]
    width = max(lengths)
    bins: list[list[int]] = []
    room: list[int] = []
    for pair in sorted(range(num_pairs), key=lambda i: -lengths[i]):
        target = next((b for b, free in enumerate(room) if free >= lengths[pair]), None)
        if target is None:
            bins.append([pair])
            room.append(width - lengths[pair])
        else:
            bins[target].append(pair)
            room[target] -= lengths[pair]
    bins = [sorted(b) for b in bins]
    shape = (len(bins), width)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    sequence_ids = torch.full(shape, -1, dtype=torch.long)
    position_ids = torch.arange(width, dtype=torch.long).repeat(len(bins), 1)
    predicted_from = (torch.arange(width, dtype=torch.long) - 1).clamp_min(0).repeat(len(bins), 1)
    # part of each position: 0 prompt, 1 chosen, 2 rejected, -1 padding; and its pair
    part = torch.full(shape, -1, dtype=torch.long)
    pair_of = torch.full(shape, -1, dtype=torch.long)
    for row, members in enumerate(bins):
        at = 0
        for pair in members:
            example = examples[pair]
            prompt, chosen = list(example.prompt_ids), list(example.chosen_ids)
            rejected = list(example.rejected_ids)
            p, c, r = len(prompt), len(chosen), len(rejected)
            span = slice(at, at + p + c + r)
            input_ids[row, span] = torch.tensor(prompt + chosen + rejected, dtype=torch.long)
            labels[row, at + p : at + p + c] = torch.tensor(chosen, dtype=torch.long)
            labels[row, at + p + c : span.stop] = torch.tensor(rejected, dtype=torch.long)
            sequence_ids[row, at : at + p + c] = pair
            sequence_ids[row, at + p + c : span.stop] = num_pairs + pair
            position_ids[row, span] = torch.cat([torch.arange(p + c), torch.arange(p, p + r)])
            predicted_from[row, at + p + c] = at + p - 1
            part[row, at : at + p] = 0
            part[row, at + p : at + p + c] = 1
            part[row, at + p + c : span.stop] = 2
            pair_of[row, span] = pair
            at = span.stop
        position_ids[row, at:] = torch.arange(width - at)
    index = torch.arange(width)
    causal = index[None, :, None] >= index[None, None, :]  # [1, q, k]
    same_pair = (pair_of[:, :, None] == pair_of[:, None, :]) & (pair_of >= 0)[:, :, None]
    rejected_to_chosen = (part[:, :, None] == 2) & (part[:, None, :] == 1)
    mask = causal & same_pair & ~rejected_to_chosen
    mask |= torch.eye(width, dtype=torch.bool)[None]
    return PairBatch(
        input_ids,
        labels,
        sequence_ids,
        mask[:, None],
        position_ids,
        num_pairs,
        sum(lengths) + sum(len(e.prompt_ids) for e in examples),
        predicted_from=predicted_from,
    )


def pair_token_costs(
    prompt_lengths: np.ndarray,
    chosen_lengths: np.ndarray,
    rejected_lengths: np.ndarray,
    layout: Layout,
) -> np.ndarray:
    """Each pair's cost against a token budget: the positions it occupies in `layout`.

    Packed layouts: its real tokens (the prompt twice, once under `shared_prefix`). Padded:
    both sequences at the pair's padded width, 2 x (prompt + longer response); a padded
    micro-batch then costs its pair count x its largest pair cost (`token_budget_micro_batches`
    with `padded=True`), the positions the model really runs.
    """
    if layout == "shared_prefix":
        return prompt_lengths + chosen_lengths + rejected_lengths
    if layout == "padded":
        return 2 * (prompt_lengths + np.maximum(chosen_lengths, rejected_lengths))
    return 2 * prompt_lengths + chosen_lengths + rejected_lengths


def pair_tokens(example: PairExample, layout: Layout) -> int:
    """`pair_token_costs` of one pair."""
    lengths = (
        np.array([len(example.prompt_ids)]),
        np.array([len(example.chosen_ids)]),
        np.array([len(example.rejected_ids)]),
    )
    return int(pair_token_costs(*lengths, layout)[0])


def token_budget_micro_batches(
    order: Sequence[int],
    tokens: Sequence[int] | np.ndarray,
    max_tokens: int,
    *,
    padded: bool = False,
) -> list[list[int]]:
    """Consecutive runs of `order` whose pairs hold at most `max_tokens` tokens together.

    `tokens[i]` is pair i's cost (`pair_token_costs`); a run costs the sum of its pairs' costs,
    or with `padded` its pair count x its largest cost (every row padded to the longest).
    Order is kept (the epoch's shuffle, or its length grouping, stays the caller's); a pair
    over the budget on its own gets a micro-batch to itself rather than being dropped.
    Micro-batches then hold different pair counts: a step must weight each one's per-pair
    mean loss by its share of the step's pairs (`pair_weighted_loss`), not divide by the
    number of micro-batches.
    """
    if max_tokens <= 0:
        raise ValueError(f"max_tokens must be > 0, got {max_tokens}")
    batches: list[list[int]] = []
    current: list[int] = []
    used = largest = 0
    for index in order:
        cost = int(tokens[index])
        would_use = (len(current) + 1) * max(largest, cost) if padded else used + cost
        if current and would_use > max_tokens:
            batches.append(current)
            current, used, largest = [], 0, 0
            would_use = cost
        current.append(index)
        used, largest = would_use, max(largest, cost)
    if current:
        batches.append(current)
    return batches


def pair_weighted_loss(
    micro_batch_loss: torch.Tensor, micro_batch_pairs: int, step_pairs: int, world_size: int = 1
) -> torch.Tensor:
    """What to backpropagate for one micro-batch so that a step's gradient is the pair mean.

    `micro_batch_loss` is a mean over the micro-batch's pairs (simpo_objective's); the step
    mean over all its pairs is sum_i loss_i * pairs_i / step_pairs. `step_pairs` counts every
    rank's pairs, and the result is multiplied by `world_size` because DDP's all-reduce and
    FSDP's reduce-scatter average gradients over ranks. With equal pair counts this is the
    usual loss / accumulation steps.
    """
    if step_pairs <= 0:
        raise ValueError(f"step_pairs must be > 0, got {step_pairs}")
    return micro_batch_loss * (micro_batch_pairs * world_size / step_pairs)


def collate_layout(examples: Sequence[PairExample], layout: Layout, pad_token_id: int) -> PairBatch:
    """Collate in a layout from `choose_layout` / `packing_layout`."""
    if layout == "shared_prefix":
        return collate_shared_prefix(examples, pad_token_id)
    if layout == "packed_one_row":
        return collate_packed(examples, pad_token_id=pad_token_id)
    if layout == "packed_rows":
        return collate_packed(examples, max_row_tokens=0, pad_token_id=pad_token_id)
    return collate_padded(examples, pad_token_id)


def collate_for_attention(
    examples: Sequence[PairExample], attn_implementation: str | None, pad_token_id: int
) -> PairBatch:
    """Collate in `packing_layout(attn_implementation)`'s layout."""
    return collate_layout(examples, packing_layout(attn_implementation), pad_token_id)
