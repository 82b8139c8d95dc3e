"""What preparing (or inspecting) the preference data found: counts, drops, lengths, shape.

A `DataSummary` travels on `PreparedData.summary`, is stored in the prepared folder's
manifest, and gives the upper layers what they print (`lines()`) and log to MLflow
(`params()`, `metrics()`, flat names under `data.` that no spec field uses).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from simpo_sweep.engine.data.tokenize import (
    DROP_EMPTY_AFTER_TRUNCATION,
    DROP_EMPTY_RESPONSE,
    DROP_IDENTICAL,
    DROP_IDENTICAL_AFTER_TRUNCATION,
    DROP_REASONS,
    TokenizeCounts,
)

PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class TokenLengths:
    """Percentiles of token counts (nearest rank: a count that really occurs), 0 when empty."""

    p50: int = 0
    p90: int = 0
    p99: int = 0
    max: int = 0

    @classmethod
    def of(cls, lengths: Sequence[int]) -> TokenLengths:
        if not len(lengths):
            return cls()
        values = np.asarray(lengths, dtype=np.int64)
        p50, p90, p99 = (int(np.percentile(values, q, method="inverted_cdf")) for q in PERCENTILES)
        return cls(p50=p50, p90=p90, p99=p99, max=int(values.max()))

    def format(self) -> str:
        return f"p50 {self.p50}, p90 {self.p90}, p99 {self.p99}, max {self.max}"


@dataclass(frozen=True)
class SplitCounts:
    """One split: the source rows it was given, the pairs kept, and what happened to the rest."""

    rows: int
    pairs: int
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))
    truncated: int = 0  # kept pairs with the prompt or a response cut
    truncated_prompt: int = 0
    truncated_response: int = 0

    @classmethod
    def of(cls, rows: int, pairs: int, counts: TokenizeCounts) -> SplitCounts:
        return cls(
            rows=rows,
            pairs=pairs,
            dropped=dict(counts.dropped),
            truncated=counts.truncated,
            truncated_prompt=counts.truncated_prompt,
            truncated_response=counts.truncated_response,
        )

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())

    def dropped_reasons(self) -> str:
        """ "2 empty response, 1 identical responses": the reasons that dropped any pair."""
        return ", ".join(
            f"{count} {reason.replace('_', ' ')}" for reason, count in self.dropped.items() if count
        )


@dataclass(frozen=True)
class DataSummary:
    """The data a sweep trains on, in numbers.

    `rows_read`: rows read from the source (train and eval sources together); each split's
    `rows` are those it was given after the hold-out and the max_*_pairs limits, so
    rows_read - train.rows - eval.rows rows were left out by the limits. Token lengths are
    before truncation, over every pair that was tokenised (both splits; responses: chosen and
    rejected each), which is what max_length and max_prompt_length are chosen against.
    `sample_rows`: set when only the first rows of each source were read (inspect_data).
    """

    source: str
    shapes: dict[str, int]  # rows per row shape, most common first
    chat_template: str  # "spec's", "tokenizer's own" or "plain"
    rows_read: int
    train: SplitCounts
    eval: SplitCounts
    prompt_tokens: TokenLengths
    response_tokens: TokenLengths
    max_length: int
    max_prompt_length: int
    sample_rows: int | None = None

    @property
    def shape(self) -> str:
        """The row shape; a mix reads "message lists (90 rows) + sharegpt (10 rows)"."""
        if len(self.shapes) == 1:
            return next(iter(self.shapes))
        return " + ".join(f"{name} ({count} rows)" for name, count in self.shapes.items())

    @property
    def pairs(self) -> int:
        return self.train.pairs + self.eval.pairs

    @property
    def dropped(self) -> dict[str, int]:
        """Pairs dropped by reason, both splits."""
        return {
            reason: self.train.dropped.get(reason, 0) + self.eval.dropped.get(reason, 0)
            for reason in DROP_REASONS
        }

    @property
    def truncated(self) -> int:
        return self.train.truncated + self.eval.truncated

    # ---- for people ----------------------------------------------------------------------

    def lines(self) -> list[str]:
        scope = f" (first {self.sample_rows} rows)" if self.sample_rows is not None else ""
        lines = [
            f"data: {self.source}{scope}",
            f"  shape: {self.shape}; chat template: {self.chat_template}",
            f"  rows read: {self.rows_read}; pairs kept: {self.train.pairs} train, "
            f"{self.eval.pairs} eval",
        ]
        for name, split in (("train", self.train), ("eval", self.eval)):
            dropped = split.dropped_reasons()
            lines.append(
                f"  {name}: {split.rows} rows -> {split.pairs} pairs; "
                f"dropped {split.dropped_total}{f' ({dropped})' if dropped else ''}; "
                f"truncated {split.truncated} (prompt {split.truncated_prompt}, "
                f"response {split.truncated_response})"
            )
        lines += [
            f"  prompt tokens: {self.prompt_tokens.format()} "
            f"(max_prompt_length {self.max_prompt_length})",
            f"  response tokens: {self.response_tokens.format()} (max_length {self.max_length})",
        ]
        return lines

    def format(self) -> str:
        return "\n".join(self.lines())

    # ---- for MLflow ----------------------------------------------------------------------

    def params(self) -> dict[str, str]:
        """Text facts. The names avoid the spec's own `data.*` params (data.chat_template is
        the spec's template text; data.chat_template_used says which template ran)."""
        return {"data.shape": self.shape, "data.chat_template_used": self.chat_template}

    def metrics(self) -> dict[str, float]:
        metrics: dict[str, float] = {
            "data.rows_read": self.rows_read,
            "data.train_rows": self.train.rows,
            "data.train_pairs": self.train.pairs,
            "data.eval_rows": self.eval.rows,
            "data.eval_pairs": self.eval.pairs,
            "data.truncated_pairs": self.truncated,
            "data.truncated_prompts": self.train.truncated_prompt + self.eval.truncated_prompt,
            "data.truncated_responses": (
                self.train.truncated_response + self.eval.truncated_response
            ),
        }
        for reason, count in self.dropped.items():
            metrics[f"data.dropped_{reason}"] = count
        for name, lengths in (("prompt", self.prompt_tokens), ("response", self.response_tokens)):
            for statistic, value in asdict(lengths).items():
                metrics[f"data.{name}_tokens_{statistic}"] = value
        return {name: float(value) for name, value in metrics.items()}

    # ---- for the manifest ----------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> DataSummary:
        return cls(
            source=str(values["source"]),
            shapes={str(name): int(count) for name, count in values["shapes"].items()},
            chat_template=str(values["chat_template"]),
            rows_read=int(values["rows_read"]),
            train=SplitCounts(**values["train"]),
            eval=SplitCounts(**values["eval"]),
            prompt_tokens=TokenLengths(**values["prompt_tokens"]),
            response_tokens=TokenLengths(**values["response_tokens"]),
            max_length=int(values["max_length"]),
            max_prompt_length=int(values["max_prompt_length"]),
            sample_rows=values.get("sample_rows"),
        )

    def stats(self) -> dict[str, int]:
        """The flat counts PreparedData.stats has always had (and the identical drops)."""
        stats: dict[str, int] = {}
        for name, split in (("train", self.train), ("eval", self.eval)):
            stats[f"{name}_rows"] = split.rows
            stats[f"{name}_pairs"] = split.pairs
            stats[f"{name}_dropped_empty"] = _empty(split.dropped)
            stats[f"{name}_dropped_identical"] = _identical(split.dropped)
        stats.update(
            dropped_empty=_empty(self.dropped),
            dropped_identical=_identical(self.dropped),
            truncated=self.truncated,
            truncated_prompt=self.train.truncated_prompt + self.eval.truncated_prompt,
            truncated_response=self.train.truncated_response + self.eval.truncated_response,
        )
        return stats


def _empty(dropped: Mapping[str, int]) -> int:
    return dropped.get(DROP_EMPTY_RESPONSE, 0) + dropped.get(DROP_EMPTY_AFTER_TRUNCATION, 0)


def _identical(dropped: Mapping[str, int]) -> int:
    return dropped.get(DROP_IDENTICAL, 0) + dropped.get(DROP_IDENTICAL_AFTER_TRUNCATION, 0)
