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
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

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

Layout = Literal["packed_one_row", "packed_rows", "padded"]
PaddingFree = Literal["auto", "on", "off"]


def packing_layout(attn_implementation: str | None) -> Layout:
    """The cheapest correct layout for a model's attention implementation (unknown: padded)."""
    if attn_implementation in VARLEN_ATTENTION:
        return "packed_one_row"
    if attn_implementation in DENSE_MASK_ATTENTION:
        return "packed_rows"
    return "padded"


def choose_layout(padding_free: PaddingFree, attn_implementation: str | None) -> Layout:
    """The layout a trainer collates in (TrainingSpec.padding_free), logged with the reason.

    `auto` packs exactly where `packing_layout` knows the attention honours packed position
    ids and pads otherwise; `on` insists on packing and refuses an attention implementation
    that might silently attend across sequence boundaries; `off` always pads.
    """
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
    attention_mask: torch.Tensor | None  # padded layout
    position_ids: torch.Tensor | None  # packed layout
    num_pairs: int
    # real (non-padding) tokens, counted on the CPU at collate time: reading it never waits for
    # the device
    num_tokens: int
    # one-row packed layout: sequence boundaries [0, len_0, len_0 + len_1, ...] (int32) and the
    # longest sequence, handed to varlen kernels so that they need no device-to-host sync
    cu_seq_lens: torch.Tensor | None = None
    max_length: int | None = None

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


def collate_layout(examples: Sequence[PairExample], layout: Layout, pad_token_id: int) -> PairBatch:
    """Collate in a layout from `choose_layout` / `packing_layout`."""
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
