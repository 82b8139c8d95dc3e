"""Chosen and rejected responses of a micro-batch laid out for ONE forward pass.

Two layouts, same sequence order (chosen of every pair, then rejected of every pair):
- padded: one row per sequence, right-padded to the longest;
- packed: every sequence concatenated into one row, position ids restarting at each sequence,
  so no compute goes to padding (needs an attention implementation that honours packed
  position ids).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100


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

    @property
    def packed(self) -> bool:
        return self.position_ids is not None

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) tokens in the batch."""
        return int((self.sequence_ids >= 0).sum())

    def model_inputs(self) -> dict[str, torch.Tensor]:
        inputs = {"input_ids": self.input_ids}
        if self.attention_mask is not None:
            inputs["attention_mask"] = self.attention_mask
        if self.position_ids is not None:
            inputs["position_ids"] = self.position_ids
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
    return PairBatch(input_ids, labels, sequence_ids, attention_mask, None, len(examples))


def collate_packed(examples: Sequence[PairExample]) -> PairBatch:
    input_ids: list[int] = []
    labels: list[int] = []
    sequence_ids: list[int] = []
    position_ids: list[int] = []
    for index, (tokens, prompt_length) in enumerate(_sequences(examples)):
        input_ids += tokens
        labels += [IGNORE_INDEX] * prompt_length + tokens[prompt_length:]
        sequence_ids += [index] * len(tokens)
        position_ids += list(range(len(tokens)))

    def row(values: list[int]) -> torch.Tensor:
        return torch.tensor([values], dtype=torch.long)

    return PairBatch(
        row(input_ids), row(labels), row(sequence_ids), None, row(position_ids), len(examples)
    )
