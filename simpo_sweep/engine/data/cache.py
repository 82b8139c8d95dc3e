"""Prepared data: fingerprint, hold-out, and the tokenised splits saved once and memory-mapped.

prepare_data: source -> rows -> examples -> (hold-out) -> token ids
  -> arrow files in <cache_dir>/<fingerprint>/, built once and memory-mapped by every trial
load_prepared: such a folder, read back without the source
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import datasets
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from simpo_sweep.engine.data.normalize import (
    DataError,
    DataProblems,
    PreferenceExample,
    check_columns,
    count_shapes,
    normalize_rows,
)
from simpo_sweep.engine.data.sources import RawRows, column_names, resolve_source
from simpo_sweep.engine.data.summary import DataSummary, SplitCounts, TokenLengths
from simpo_sweep.engine.data.tokenize import (
    ID_COLUMNS,
    TokenIdColumn,
    TokenizedSplit,
    chat_template_source,
    effective_chat_template,
    tokenize_examples,
)
from simpo_sweep.engine.models import load_tokenizer
from simpo_sweep.spec.models import DataColumns, DataSpec, ModelSpec

# Bump when the tokenised output of the same inputs changes, so old caches are not reused.
DATA_FORMAT_VERSION = 3
MANIFEST_NAME = "manifest.json"


@dataclass(frozen=True)
class PreparedData:
    """The tokenised splits a sweep trains and evaluates on, and what preparing them found."""

    train: TokenizedSplit
    eval: TokenizedSplit
    summary: DataSummary
    fingerprint: str = ""
    path: Path | None = None
    from_cache: bool = False  # True when prepare_data reused an existing build

    @property
    def stats(self) -> dict[str, int]:
        """Flat counts (train_pairs, dropped_empty, truncated, ...), from the summary."""
        return self.summary.stats()


# ---- selection ---------------------------------------------------------------------------------


def _prompt_key(example: PreferenceExample) -> str:
    return json.dumps(example.prompt, sort_keys=True, ensure_ascii=False)


def hold_out_by_prompt(
    examples: Sequence[PreferenceExample], fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """Row indices of (train, eval): whole prompts go to eval, so no eval prompt is trained on."""
    keys = [_prompt_key(example) for example in examples]
    distinct = sorted(set(keys))
    if len(distinct) < 2:
        raise DataError(
            f"cannot hold out an eval split: the data has {len(distinct)} distinct prompt(s); "
            "give eval_split or more data"
        )
    random.Random(seed).shuffle(distinct)
    eval_count = min(len(distinct) - 1, max(1, round(fraction * len(distinct))))
    eval_prompts = set(distinct[:eval_count])
    train_rows = [index for index, key in enumerate(keys) if key not in eval_prompts]
    eval_rows = [index for index, key in enumerate(keys) if key in eval_prompts]
    return train_rows, eval_rows


def _limit(indices: list[int], maximum: int | None, seed: int) -> list[int]:
    if maximum is None or len(indices) <= maximum:
        return indices
    return sorted(random.Random(seed).sample(indices, maximum))


# ---- fingerprint and cache ---------------------------------------------------------------------


def _tokenizer_identity(model: ModelSpec, tokenizer: PreTrainedTokenizerBase) -> dict[str, Any]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    serialised = (
        backend.to_str()
        if backend is not None
        else json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    )
    return {
        "name": model.tokenizer or model.name,
        "revision": model.revision,
        "class": type(tokenizer).__name__,
        "vocab_sha256": hashlib.sha256(serialised.encode()).hexdigest(),
        "special_tokens": {
            "bos": tokenizer.bos_token_id,
            "eos": tokenizer.eos_token_id,
            "pad": tokenizer.pad_token_id,
        },
    }


def data_fingerprint(
    model: ModelSpec,
    data: DataSpec,
    tokenizer: PreTrainedTokenizerBase,
    source_identity: Mapping[str, Any],
) -> tuple[str, dict[str, Any]]:
    """sha256 over everything that changes the tokenised output, and the inputs it hashed."""
    inputs = {
        "format_version": DATA_FORMAT_VERSION,
        "source": dict(source_identity),
        "data": data.model_dump(
            include={
                "split",
                "eval_split",
                "eval_fraction",
                "max_train_pairs",
                "max_eval_pairs",
                "columns",
                "max_length",
                "max_prompt_length",
                "seed",
            }
        ),
        "tokenizer": _tokenizer_identity(model, tokenizer),
        "chat_template": effective_chat_template(tokenizer, data),
    }
    canonical = json.dumps(inputs, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest(), inputs


_ID_FEATURES = datasets.Features(
    {name: datasets.List(datasets.Value("int32")) for name in ID_COLUMNS}
)


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """No progress bars from datasets while caching: trial logs are for training metrics."""
    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def _save_split(split: TokenizedSplit, folder: Path) -> None:
    table = {name: list(getattr(split, name)) for name in ID_COLUMNS}
    datasets.Dataset.from_dict(table, features=_ID_FEATURES).save_to_disk(str(folder))


def _load_split(folder: Path) -> TokenizedSplit:
    dataset = datasets.Dataset.load_from_disk(str(folder))
    table = dataset.data.table
    columns = [TokenIdColumn(table.column(name)) for name in ID_COLUMNS]
    return TokenizedSplit(*columns)


def load_prepared(path: str | Path) -> PreparedData:
    """A folder written by prepare_data, memory-mapped (cheap: call it in every trial)."""
    folder = Path(path)
    manifest_path = folder / MANIFEST_NAME
    if not manifest_path.is_file():
        raise DataError(f"{folder} is not a prepared data folder (no {MANIFEST_NAME})")
    manifest = json.loads(manifest_path.read_text())
    if "summary" not in manifest:
        raise DataError(
            f"{folder} was prepared by an older simpo-sweep (no data summary in its "
            f"{MANIFEST_NAME}); prepare the data again"
        )
    with _quiet_datasets():
        train = _load_split(folder / "train")
        evaluation = _load_split(folder / "eval")
    return PreparedData(
        train=train,
        eval=evaluation,
        summary=DataSummary.from_dict(manifest["summary"]),
        fingerprint=str(manifest["fingerprint"]),
        path=folder,
    )


@dataclass(frozen=True)
class BuiltSplits:
    train: TokenizedSplit
    eval: TokenizedSplit
    summary: DataSummary


def _check_columns(rows: RawRows, columns: DataColumns, location: str, container: str) -> None:
    problems = check_columns(column_names(rows), columns, where=container)
    if problems:
        raise DataProblems([f"{location}: {problem}" for problem in problems])


def build_splits(
    train_rows: RawRows,
    eval_rows: RawRows | None,
    *,
    data: DataSpec,
    tokenizer: PreTrainedTokenizerBase,
    location: str,
    eval_location: str = "",
    train_lines: Sequence[int | None] | None = None,
    eval_lines: Sequence[int | None] | None = None,
    container: str = "the data set",
    eval_container: str = "the data set",
    sample_rows: int | None = None,
) -> BuiltSplits:
    """Source rows -> tokenised train and eval splits and their summary, nothing written.

    The one path from rows to pairs, shared by prepare_data (all rows) and inspect_data (the
    first rows of each source). `eval_rows` None: the eval split is held out of the train rows
    by prompt. Every bad row is reported at once (DataProblems).
    """
    _check_columns(train_rows, data.columns, location, container)
    eval_location = eval_location or location
    if eval_rows is not None:
        _check_columns(eval_rows, data.columns, eval_location, eval_container)
    train_examples = normalize_rows(train_rows, data.columns, location, lines=train_lines)
    if eval_rows is None:
        train_indices, eval_indices = hold_out_by_prompt(
            train_examples, data.eval_fraction, data.seed
        )
        eval_examples, eval_location = train_examples, location
    else:
        eval_examples = normalize_rows(eval_rows, data.columns, eval_location, lines=eval_lines)
        train_indices = list(range(len(train_examples)))
        eval_indices = list(range(len(eval_examples)))
    train_indices = _limit(train_indices, data.max_train_pairs, data.seed)
    eval_indices = _limit(eval_indices, data.max_eval_pairs, data.seed)

    chat_template = effective_chat_template(tokenizer, data)
    splits: dict[str, TokenizedSplit] = {}
    counts: dict[str, SplitCounts] = {}
    prompt_lengths: list[int] = []
    response_lengths: list[int] = []
    for name, examples, indices, split_location in (
        ("train", train_examples, train_indices, location),
        ("eval", eval_examples, eval_indices, eval_location),
    ):
        split, tokenized = tokenize_examples(
            [examples[index] for index in indices],
            tokenizer,
            chat_template=chat_template,
            max_length=data.max_length,
            max_prompt_length=data.max_prompt_length,
            row_indices=indices,
            location=split_location,
        )
        splits[name] = split
        counts[name] = SplitCounts.of(len(indices), len(split), tokenized)
        prompt_lengths += tokenized.prompt_lengths
        response_lengths += tokenized.response_lengths
    read = train_examples if eval_rows is None else [*train_examples, *eval_examples]
    summary = DataSummary(
        source=location if eval_rows is None else f"{location}; eval: {eval_location}",
        shapes=count_shapes(read),
        chat_template=chat_template_source(tokenizer, data),
        rows_read=len(train_rows) + (len(eval_rows) if eval_rows is not None else 0),
        train=counts["train"],
        eval=counts["eval"],
        prompt_tokens=TokenLengths.of(prompt_lengths),
        response_tokens=TokenLengths.of(response_lengths),
        max_length=data.max_length,
        max_prompt_length=data.max_prompt_length,
        sample_rows=sample_rows,
    )
    limits = f"max_length={data.max_length} with max_prompt_length={data.max_prompt_length}"
    train_counts, eval_counts = summary.train, summary.eval
    if train_counts.pairs == 0:
        raise DataError(
            f"no training pairs left from {location}: all {train_counts.rows} rows were "
            f"dropped ({train_counts.dropped_reasons() or 'no rows'}; {limits}) "
            f"(stats: {summary.stats()})"
        )
    if eval_counts.pairs == 0:
        # Evaluation metrics are means over the eval pairs: with none there is nothing to
        # average, and no trial could be compared with another.
        raise DataError(
            f"no eval pairs left from {eval_location}: {eval_counts.dropped_total} of its "
            f"{eval_counts.rows} held-out rows were dropped "
            f"({eval_counts.dropped_reasons() or 'no rows'}: a chosen or rejected "
            "response with no content, identical chosen and rejected, or no response tokens "
            f"left after truncation to {limits}) (stats: {summary.stats()})"
        )
    return BuiltSplits(splits["train"], splits["eval"], summary)


def prepare_data(model: ModelSpec, data: DataSpec, cache_dir: str | Path) -> PreparedData:
    """Tokenised train and eval splits, built once per distinct input and reused after that.

    The build lands in `<cache_dir>/<fingerprint>/` via a temporary folder and a rename, so
    trials preparing the same data at once never read a half-written cache: the first rename
    wins and the others use its result.
    """
    cache_root = Path(cache_dir)
    cache_root.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(model)
    with _quiet_datasets():
        source = resolve_source(data, hf_cache=cache_root / "hf_datasets")
    fingerprint, inputs = data_fingerprint(model, data, tokenizer, source.identity)
    final = cache_root / fingerprint
    if (final / MANIFEST_NAME).is_file():
        return replace(load_prepared(final), from_cache=True)

    with _quiet_datasets():
        train_rows, eval_rows = source.load()
    built = build_splits(
        train_rows,
        eval_rows,
        data=data,
        tokenizer=tokenizer,
        location=source.description,
        eval_location=source.eval_description,
        container=source.container,
        eval_container=source.container,
    )

    temporary = cache_root / f".tmp-{fingerprint[:16]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with _quiet_datasets():
            _save_split(built.train, temporary / "train")
            _save_split(built.eval, temporary / "eval")
        manifest = {
            "fingerprint": fingerprint,
            "summary": built.summary.to_dict(),
            "inputs": inputs,
        }
        (temporary / MANIFEST_NAME).write_text(
            json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False, default=str)
        )
        try:
            temporary.rename(final)
        except OSError:
            # Another process renamed its identical build into place first: use that one.
            if not (final / MANIFEST_NAME).is_file():
                raise
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return load_prepared(final)
