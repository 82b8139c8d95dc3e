"""Preference data: load, normalise, apply the chat template, tokenise, truncate, cache.

    source (hub id | jsonl/json/parquet/csv file | save_to_disk folder | builtin:<name>)
      -> rows -> PreferenceExample (prompt, chosen, rejected as message lists)
      -> token ids (prompt ids; chosen/rejected = response ids only, ending with EOS)
      -> truncation (prompt from the left, then responses to fit max_length)
      -> arrow files in <cache_dir>/<fingerprint>/, built once and memory-mapped by every trial

Row shapes recognised per row (column names from `DataSpec.columns`):
  (a) prompt, chosen, rejected as strings;
  (b) chosen and rejected as message lists [{"role", "content"}, ...] with a prompt column
      (string or message list); response lists that repeat the prompt messages have them removed;
  (c) chosen and rejected as full dialogues (no prompt column needed): their common leading
      messages up to an assistant turn are the prompt, the rest of each is its response.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import json
import os
import random
import shutil
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NoReturn, overload

import datasets
import numpy as np
import pyarrow as pa
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from simpo_sweep.engine import demo
from simpo_sweep.engine.models import load_tokenizer
from simpo_sweep.spec.models import DataColumns, DataSpec, ModelSpec

# Bump when the tokenised output of the same inputs changes, so old caches are not reused.
DATA_FORMAT_VERSION = 2
ID_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")
MANIFEST_NAME = "manifest.json"
LOCAL_FILE_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
# Texts encoded per tokenizer call: large enough for the fast tokenizer's batching to pay off.
ENCODE_BATCH_TEXTS = 1024
# Separator between messages when there is no chat template to lay them out.
PLAIN_MESSAGE_SEPARATOR = "\n\n"

Message = dict[str, str]


class DataError(ValueError):
    """A data source, row or field that cannot be used; the message says which and why."""


# ---- normalisation -----------------------------------------------------------------------------


@dataclass(frozen=True)
class PreferenceExample:
    """One preference pair as chat messages: a shared prompt and two alternative responses."""

    prompt: list[Message]
    chosen: list[Message]
    rejected: list[Message]


class _RowContext:
    """Builds the errors of one row: `row 17: field 'chosen' is missing (in data.jsonl)`."""

    def __init__(self, index: int, location: str) -> None:
        self.index = index
        self.location = location

    def fail(self, problem: str) -> NoReturn:
        suffix = f" (in {self.location})" if self.location else ""
        raise DataError(f"row {self.index}: {problem}{suffix}")


def _parse_field(value: Any, name: str, row: _RowContext) -> str | list[Message]:
    if isinstance(value, str):
        return value
    if not isinstance(value, (list, tuple)):
        row.fail(
            f"field '{name}' is not a string or a list of messages (got {type(value).__name__})"
        )
    if not value:
        row.fail(f"field '{name}' is an empty list of messages")
    messages: list[Message] = []
    for position, item in enumerate(value):
        if not isinstance(item, Mapping):
            row.fail(
                f"field '{name}' message {position} is not a mapping with 'role' and 'content'"
            )
        for key in ("role", "content"):
            if item.get(key) is None:
                row.fail(f"field '{name}' message {position} has no '{key}'")
            if not isinstance(item[key], str):
                row.fail(
                    f"field '{name}' message {position} '{key}' is not a string "
                    f"(got {type(item[key]).__name__})"
                )
        # Only role and content reach the template: extra keys (ids, scores) are row metadata.
        messages.append({"role": item["role"], "content": item["content"]})
    return messages


def _response_after_prompt(
    value: str | list[Message], prompt: list[Message]
) -> list[Message] | None:
    """The response part of `value` given the prompt, or None when `value` is not one."""
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    if len(value) > len(prompt) and value[: len(prompt)] == prompt:
        value = value[len(prompt) :]
    return value if value[0]["role"] == "assistant" else None


def _split_dialogues(chosen: list[Message], rejected: list[Message]) -> PreferenceExample | None:
    """Shared leading messages are the prompt; the split falls just before an assistant turn.
    None when the dialogues share no such prefix."""
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    # Latest boundary that leaves each side a response starting with an assistant turn.
    for boundary in range(min(shared, len(chosen) - 1, len(rejected) - 1), 0, -1):
        if chosen[boundary]["role"] == "assistant" and rejected[boundary]["role"] == "assistant":
            return PreferenceExample(
                prompt=chosen[:boundary], chosen=chosen[boundary:], rejected=rejected[boundary:]
            )
    return None


def normalize_row(
    row: Mapping[str, Any], columns: DataColumns, *, index: int, location: str = ""
) -> PreferenceExample:
    """One source row in any supported shape -> PreferenceExample; a DataError names the field."""
    context = _RowContext(index, location)
    values: dict[str, str | list[Message]] = {}
    for name in (columns.chosen, columns.rejected):
        if row.get(name) is None:
            context.fail(f"field '{name}' is missing")
        values[name] = _parse_field(row[name], name, context)
    chosen, rejected = values[columns.chosen], values[columns.rejected]

    raw_prompt = row.get(columns.prompt)
    responses: dict[str, list[Message] | None] = {}
    if raw_prompt is not None:
        parsed_prompt = _parse_field(raw_prompt, columns.prompt, context)
        prompt = (
            [{"role": "user", "content": parsed_prompt}]
            if isinstance(parsed_prompt, str)
            else parsed_prompt
        )
        responses = {name: _response_after_prompt(values[name], prompt) for name in values}
        chosen_response, rejected_response = responses[columns.chosen], responses[columns.rejected]
        if chosen_response is not None and rejected_response is not None:
            return PreferenceExample(
                prompt=prompt, chosen=chosen_response, rejected=rejected_response
            )

    # Full dialogues: also when a prompt column is there but is not their exact prefix
    # (a system message in the dialogues and not in the prompt column, say).
    if isinstance(chosen, list) and isinstance(rejected, list):
        dialogues = _split_dialogues(chosen, rejected)
        if dialogues is not None:
            return dialogues
        if raw_prompt is None:
            context.fail(
                f"fields '{columns.chosen}' and '{columns.rejected}' are dialogues without a "
                "shared prompt (common leading messages followed by an assistant turn in each)"
            )
    if raw_prompt is None:
        context.fail(
            f"field '{columns.prompt}' is missing (needed unless '{columns.chosen}' and "
            f"'{columns.rejected}' are full dialogues)"
        )
    offending = next(name for name, response in responses.items() if response is None)
    context.fail(
        f"field '{offending}' does not continue the prompt with an assistant message "
        "(its messages after the prompt must start with role 'assistant')"
    )


# ---- tokenisation ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TruncatedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    prompt_truncated: bool
    response_truncated: bool

    @property
    def is_empty(self) -> bool:
        """Nothing to train on: no prompt token to predict from, or a response without tokens."""
        return not self.prompt_ids or not self.chosen_ids or not self.rejected_ids


def truncate_pair(
    prompt_ids: Sequence[int],
    chosen_ids: Sequence[int],
    rejected_ids: Sequence[int],
    *,
    max_length: int,
    max_prompt_length: int,
) -> TruncatedPair:
    """Prompt keeps its last `max_prompt_length` tokens; responses keep their first tokens
    so that prompt + response <= `max_length`. A response may end up empty: the caller drops it.
    """
    prompt = list(prompt_ids[-max_prompt_length:]) if max_prompt_length > 0 else []
    budget = max(0, max_length - len(prompt))
    chosen, rejected = list(chosen_ids[:budget]), list(rejected_ids[:budget])
    return TruncatedPair(
        prompt_ids=prompt,
        chosen_ids=chosen,
        rejected_ids=rejected,
        prompt_truncated=len(prompt) < len(prompt_ids),
        response_truncated=len(chosen) < len(chosen_ids) or len(rejected) < len(rejected_ids),
    )


def effective_chat_template(tokenizer: PreTrainedTokenizerBase, data: DataSpec) -> str | None:
    """The spec's override, else the tokenizer's own template, else None (plain concatenation)."""
    if data.chat_template is not None:
        return data.chat_template
    if not tokenizer.chat_template:
        return None
    template: str = tokenizer.get_chat_template()
    return template


def _end_with_eos(response_ids: list[int], eos_token_id: int | None) -> list[int]:
    """Responses end with EOS: what the template writes after its last EOS (a newline before
    the next turn, say) is not part of the answer; a template that writes no EOS gets one."""
    if eos_token_id is None:
        return response_ids
    if eos_token_id in response_ids:
        last = len(response_ids) - 1 - response_ids[::-1].index(eos_token_id)
        return response_ids[: last + 1]
    return [*response_ids, eos_token_id]


def _encode_texts(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    """Token ids of each text exactly as written: templates put BOS and turn markers themselves."""
    encoded: list[list[int]] = []
    for start in range(0, len(texts), ENCODE_BATCH_TEXTS):
        batch = tokenizer(texts[start : start + ENCODE_BATCH_TEXTS], add_special_tokens=False)
        encoded.extend(list(ids) for ids in batch["input_ids"])
    return encoded


def _render_templated(
    tokenizer: PreTrainedTokenizerBase,
    template: str,
    messages: list[Message],
    *,
    add_generation_prompt: bool,
    row: _RowContext,
) -> str:
    try:
        rendered = tokenizer.apply_chat_template(
            messages,
            chat_template=template,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )
    except Exception as error:  # templates raise anything (jinja errors, raise_exception)
        row.fail(f"the chat template failed on this row: {error}")
    if not isinstance(rendered, str):
        raise TypeError(f"apply_chat_template(tokenize=False) returned {type(rendered).__name__}")
    return rendered


def _has_content(messages: list[Message]) -> bool:
    return any(message["content"].strip() for message in messages)


@dataclass
class TokenizeCounts:
    dropped_empty: int = 0
    truncated: int = 0
    truncated_prompt: int = 0
    truncated_response: int = 0


def tokenize_examples(
    examples: Sequence[PreferenceExample],
    tokenizer: PreTrainedTokenizerBase,
    *,
    chat_template: str | None,
    max_length: int,
    max_prompt_length: int,
    row_indices: Sequence[int] | None = None,
    location: str = "",
) -> tuple[TokenizedSplit, TokenizeCounts]:
    """Token ids of each pair, truncated; pairs with nothing to train on are dropped and counted.

    With a chat template, a response's ids are those of the templated conversation (prompt +
    response) after the ids of the templated prompt with the generation prompt, so the model
    sees exactly what the template writes. `chat_template` None = plain concatenation: message
    contents joined, the tokenizer's own special tokens (BOS) on the prompt, EOS after responses.
    `row_indices` are the source rows of `examples`, for error messages.

    Dropped (`dropped_empty`): a pair whose chosen or rejected response has no content (only
    whitespace: what the template wraps around it, an end-of-turn token, is not an answer to
    prefer or reject), and a pair left with no prompt or response tokens after truncation
    (the first response token needs a prompt token to be predicted from).
    """
    all_indices = list(row_indices) if row_indices is not None else list(range(len(examples)))
    if len(all_indices) != len(examples):
        raise ValueError(f"{len(all_indices)} row indices for {len(examples)} examples")
    counts = TokenizeCounts()
    kept = [
        position
        for position, example in enumerate(examples)
        if _has_content(example.chosen) and _has_content(example.rejected)
    ]
    counts.dropped_empty = len(examples) - len(kept)
    examples = [examples[position] for position in kept]
    indices = [all_indices[position] for position in kept]
    prompt_texts: list[str] = []
    response_texts: list[str] = []  # chosen, rejected interleaved
    for example, index in zip(examples, indices, strict=True):
        row = _RowContext(index, location)
        if chat_template is None:
            prompt_texts.append(PLAIN_MESSAGE_SEPARATOR.join(m["content"] for m in example.prompt))
            for response in (example.chosen, example.rejected):
                response_texts.append(PLAIN_MESSAGE_SEPARATOR.join(m["content"] for m in response))
        else:
            prompt_texts.append(
                _render_templated(
                    tokenizer, chat_template, example.prompt, add_generation_prompt=True, row=row
                )
            )
            for response in (example.chosen, example.rejected):
                response_texts.append(
                    _render_templated(
                        tokenizer,
                        chat_template,
                        example.prompt + response,
                        add_generation_prompt=False,
                        row=row,
                    )
                )

    if chat_template is None:
        prompt_ids_list = (
            [list(ids) for ids in tokenizer(prompt_texts, add_special_tokens=True)["input_ids"]]
            if prompt_texts
            else []
        )
    else:
        prompt_ids_list = _encode_texts(tokenizer, prompt_texts)
    response_ids_list = _encode_texts(tokenizer, response_texts)

    split = _SplitBuilder()
    eos_token_id = tokenizer.eos_token_id
    for position, index in enumerate(indices):
        prompt_ids = prompt_ids_list[position]
        responses: list[list[int]] = []
        for side in (0, 1):
            encoded = response_ids_list[2 * position + side]
            if chat_template is not None:
                encoded = _response_after_prefix(
                    tokenizer,
                    conversation_text=response_texts[2 * position + side],
                    conversation_ids=encoded,
                    prompt_text=prompt_texts[position],
                    prompt_ids=prompt_ids,
                    row=_RowContext(index, location),
                )
            responses.append(_end_with_eos(encoded, eos_token_id))
        pair = truncate_pair(
            prompt_ids,
            responses[0],
            responses[1],
            max_length=max_length,
            max_prompt_length=max_prompt_length,
        )
        if pair.is_empty:
            counts.dropped_empty += 1
            continue
        counts.truncated_prompt += pair.prompt_truncated
        counts.truncated_response += pair.response_truncated
        counts.truncated += pair.prompt_truncated or pair.response_truncated
        split.append(pair)
    return split.build(), counts


def _response_after_prefix(
    tokenizer: PreTrainedTokenizerBase,
    *,
    conversation_text: str,
    conversation_ids: list[int],
    prompt_text: str,
    prompt_ids: list[int],
    row: _RowContext,
) -> list[int]:
    if conversation_ids[: len(prompt_ids)] == prompt_ids:
        return conversation_ids[len(prompt_ids) :]
    if not conversation_text.startswith(prompt_text):
        row.fail(
            "the chat template does not render the prompt with its generation prompt as the "
            "beginning of the conversation, so the response tokens cannot be told apart"
        )
    # The tokenizer merged tokens across the boundary (e.g. a space that ends the generation
    # prompt and starts the response): encode the response text on its own, so that prompt ids
    # stay identical to the generation prompt the model is conditioned on.
    return _encode_texts(tokenizer, [conversation_text[len(prompt_text) :]])[0]


# ---- tokenised splits --------------------------------------------------------------------------


class TokenIdColumn(Sequence[list[int]]):
    """Per-pair token id lists read from (memory-mapped) arrow data, one list on demand.

    Holding python lists of every pair would cost ~36 bytes per token in every worker; this
    keeps the int32 arrow buffers and converts only the pairs a batch asks for.
    """

    def __init__(self, column: pa.ChunkedArray | pa.Array) -> None:
        chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
        self._offsets: list[np.ndarray] = []
        self._values: list[np.ndarray] = []
        self._chunk_starts: list[int] = []
        total = 0
        for chunk in chunks:
            if len(chunk) == 0:
                continue
            if chunk.null_count:
                raise DataError("a token id column holds nulls; the cache is corrupt")
            self._chunk_starts.append(total)
            self._offsets.append(chunk.offsets.to_numpy())
            self._values.append(chunk.values.to_numpy(zero_copy_only=False))
            total += len(chunk)
        self._length = total

    def __len__(self) -> int:
        return self._length

    def _item(self, index: int) -> list[int]:
        if index < 0:
            index += self._length
        if not 0 <= index < self._length:
            raise IndexError(f"pair {index} out of range for {self._length} pairs")
        chunk = bisect.bisect_right(self._chunk_starts, index) - 1
        local = index - self._chunk_starts[chunk]
        offsets = self._offsets[chunk]
        ids: list[int] = self._values[chunk][offsets[local] : offsets[local + 1]].tolist()
        return ids

    @overload
    def __getitem__(self, index: int) -> list[int]: ...

    @overload
    def __getitem__(self, index: slice) -> list[list[int]]: ...

    def __getitem__(self, index: int | slice) -> list[int] | list[list[int]]:
        if isinstance(index, slice):
            return [self._item(position) for position in range(*index.indices(self._length))]
        return self._item(index)

    def __iter__(self) -> Iterator[list[int]]:
        return (self._item(position) for position in range(self._length))

    def lengths(self) -> np.ndarray:
        """Token count of every pair, without converting any of them to lists."""
        if not self._offsets:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([np.diff(offsets) for offsets in self._offsets]).astype(np.int64)


@dataclass(frozen=True)
class TokenizedSplit:
    """Token ids per pair: the prompt, and the chosen and rejected RESPONSES (not prompt+response).

    The columns are python lists when built in memory and arrow-backed `TokenIdColumn`s when
    loaded from a prepared folder; both index to `list[int]`. A split is the trainer's
    `PairDataset` (engine.train), which reads pairs column by column.
    """

    prompt_ids: Sequence[list[int]]
    chosen_ids: Sequence[list[int]]
    rejected_ids: Sequence[list[int]]

    def __post_init__(self) -> None:
        sizes = {len(self.prompt_ids), len(self.chosen_ids), len(self.rejected_ids)}
        if len(sizes) != 1:
            raise ValueError(
                f"prompt/chosen/rejected columns differ in length: {len(self.prompt_ids)}, "
                f"{len(self.chosen_ids)}, {len(self.rejected_ids)}"
            )

    def __len__(self) -> int:
        return len(self.prompt_ids)


@dataclass
class _SplitBuilder:
    prompt_ids: list[list[int]] = field(default_factory=list)
    chosen_ids: list[list[int]] = field(default_factory=list)
    rejected_ids: list[list[int]] = field(default_factory=list)

    def append(self, pair: TruncatedPair) -> None:
        self.prompt_ids.append(pair.prompt_ids)
        self.chosen_ids.append(pair.chosen_ids)
        self.rejected_ids.append(pair.rejected_ids)

    def build(self) -> TokenizedSplit:
        return TokenizedSplit(self.prompt_ids, self.chosen_ids, self.rejected_ids)


@dataclass(frozen=True)
class PreparedData:
    train: TokenizedSplit
    eval: TokenizedSplit
    stats: dict[str, int]
    fingerprint: str = ""
    path: Path | None = None
    from_cache: bool = False  # True when prepare_data reused an existing build


# ---- sources -----------------------------------------------------------------------------------


RawRows = Sequence[Mapping[str, Any]]


@dataclass
class _ResolvedSource:
    """Where rows come from, what identifies their content, and how to read them."""

    description: str
    identity: dict[str, Any]
    train_rows: RawRows | None = None
    eval_rows: RawRows | None = None
    eval_description: str = ""
    loader: Any = None  # () -> (train rows, eval rows or None); set when loading is deferred

    def load(self) -> tuple[RawRows, RawRows | None]:
        if self.train_rows is None:
            self.train_rows, self.eval_rows = self.loader()
        assert self.train_rows is not None
        return self.train_rows, self.eval_rows


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _sha256_folder(path: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(file.relative_to(path).as_posix().encode())
        digest.update(_sha256_file(file).encode())
    return digest.hexdigest()


def _is_save_to_disk_folder(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _load_local_file(path: Path, hf_cache: Path) -> datasets.Dataset:
    builder = LOCAL_FILE_FORMATS.get(path.suffix.lower())
    if builder is None:
        raise DataError(
            f"{path}: unsupported file type {path.suffix!r}; "
            f"use one of {', '.join(sorted(LOCAL_FILE_FORMATS))}"
        )
    try:
        loaded = datasets.load_dataset(
            builder, data_files=str(path), split="train", cache_dir=str(hf_cache)
        )
    except Exception as error:  # parser errors of json/csv/parquet readers vary by format
        raise DataError(f"{path}: cannot be read as {builder}: {error}") from error
    assert isinstance(loaded, datasets.Dataset)
    return loaded


def _load_saved_folder(
    path: Path, split: str, eval_split: str | None
) -> tuple[RawRows, RawRows | None]:
    """(train, eval) of a save_to_disk folder: splits of a DatasetDict, or a single Dataset."""
    loaded = datasets.load_from_disk(str(path))
    if not isinstance(loaded, datasets.DatasetDict):
        if eval_split is not None:
            raise DataError(
                f"{path}: a single saved Dataset has no splits, so eval_split {eval_split!r} "
                "cannot be found; save a DatasetDict or use eval_fraction"
            )
        return loaded, None

    def pick(name: str) -> datasets.Dataset:
        if name not in loaded:
            raise DataError(f"{path}: no split {name!r}; it has {', '.join(sorted(loaded))}")
        return loaded[name]

    return pick(split), pick(eval_split) if eval_split is not None else None


def _resolve_source(data: DataSpec, hf_cache: Path) -> _ResolvedSource:
    source = data.source
    if demo.is_builtin(source):
        return _resolve_builtin(data)
    path = Path(source).expanduser()
    if path.exists():
        return _resolve_local(data, path, hf_cache)
    if source.startswith((".", "/", "~")) or path.suffix.lower() in LOCAL_FILE_FORMATS:
        raise DataError(f"data source {source!r}: no such file or folder")
    return _resolve_hub(data, hf_cache)


def _resolve_builtin(data: DataSpec) -> _ResolvedSource:
    if data.eval_split is not None:
        raise DataError(
            f"built-in data set {data.source!r} has a single split; hold out an eval set "
            "with eval_fraction instead of eval_split"
        )
    num_pairs = demo.DEFAULT_DEMO_PAIRS
    try:
        rows = demo.demo_preference_rows(data.source, num_pairs, data.seed)
    except ValueError as error:
        raise DataError(str(error)) from error
    return _ResolvedSource(
        description=data.source,
        identity={
            "kind": "builtin",
            "name": data.source,
            "version": demo.BUILTIN_DATASETS_VERSION,
            "num_pairs": num_pairs,
        },
        train_rows=rows,
    )


def _resolve_local(data: DataSpec, path: Path, hf_cache: Path) -> _ResolvedSource:
    eval_path: Path | None = None
    if path.is_dir() and _is_save_to_disk_folder(path):
        identity: dict[str, Any] = {"kind": "saved", "sha256": _sha256_folder(path)}

        def load() -> tuple[RawRows, RawRows | None]:
            return _load_saved_folder(path, data.split, data.eval_split)

        return _ResolvedSource(
            description=str(path),
            identity=identity,
            loader=load,
            eval_description=f"{path} split {data.eval_split!r}" if data.eval_split else "",
        )

    if path.is_dir():
        raise DataError(
            f"{path}: a folder must be a datasets save_to_disk folder (state.json or "
            "dataset_dict.json); point at a data file instead"
        )
    identity = {"kind": "file", "suffix": path.suffix.lower(), "sha256": _sha256_file(path)}
    if data.eval_split is not None:
        # A single file has no named splits: eval_split names a second file.
        eval_path = Path(data.eval_split).expanduser()
        if not eval_path.is_file():
            raise DataError(
                f"eval_split {data.eval_split!r}: with a data file as source, eval_split must be "
                "the path of a second data file"
            )
        identity["eval_sha256"] = _sha256_file(eval_path)
        identity["eval_suffix"] = eval_path.suffix.lower()

    def load_files() -> tuple[RawRows, RawRows | None]:
        train = _load_local_file(path, hf_cache)
        evaluation = _load_local_file(eval_path, hf_cache) if eval_path is not None else None
        return train, evaluation

    return _ResolvedSource(
        description=str(path),
        identity=identity,
        loader=load_files,
        eval_description=str(eval_path) if eval_path is not None else "",
    )


def _resolve_hub(data: DataSpec, hf_cache: Path) -> _ResolvedSource:
    def load_split(split: str) -> datasets.Dataset:
        try:
            loaded = datasets.load_dataset(data.source, split=split, cache_dir=str(hf_cache))
        except Exception as error:  # hub, network and builder errors alike
            raise DataError(
                f"data source {data.source!r} split {split!r} cannot be loaded: {error}"
            ) from error
        assert isinstance(loaded, datasets.Dataset)
        return loaded

    train = load_split(data.split)
    evaluation = load_split(data.eval_split) if data.eval_split is not None else None
    # datasets fingerprints a loaded split from its builder config and data files (the hub
    # revision included), so it changes exactly when the content may have.
    identity = {
        "kind": "hub",
        "id": data.source,
        "train_fingerprint": train._fingerprint,
        "eval_fingerprint": evaluation._fingerprint if evaluation is not None else None,
    }
    return _ResolvedSource(
        description=f"{data.source} split {data.split!r}",
        identity=identity,
        train_rows=train,
        eval_rows=evaluation,
        eval_description=f"{data.source} split {data.eval_split!r}",
    )


# ---- selection ---------------------------------------------------------------------------------


def _normalize_rows(
    rows: Iterable[Mapping[str, Any]], columns: DataColumns, location: str
) -> list[PreferenceExample]:
    return [
        normalize_row(row, columns, index=index, location=location)
        for index, row in enumerate(rows)
    ]


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
    with _quiet_datasets():
        train = _load_split(folder / "train")
        evaluation = _load_split(folder / "eval")
    return PreparedData(
        train=train,
        eval=evaluation,
        stats={key: int(value) for key, value in manifest["stats"].items()},
        fingerprint=str(manifest["fingerprint"]),
        path=folder,
    )


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
        source = _resolve_source(data, hf_cache=cache_root / "hf_datasets")
    fingerprint, inputs = data_fingerprint(model, data, tokenizer, source.identity)
    final = cache_root / fingerprint
    if (final / MANIFEST_NAME).is_file():
        return replace(load_prepared(final), from_cache=True)

    with _quiet_datasets():
        train_rows, eval_rows = source.load()
    train_examples = _normalize_rows(train_rows, data.columns, source.description)
    if eval_rows is None:
        train_indices, eval_indices = hold_out_by_prompt(
            train_examples, data.eval_fraction, data.seed
        )
        eval_examples, eval_location = train_examples, source.description
    else:
        eval_location = source.eval_description or source.description
        eval_examples = _normalize_rows(eval_rows, data.columns, eval_location)
        train_indices, eval_indices = (
            list(range(len(train_examples))),
            list(range(len(eval_examples))),
        )
    train_indices = _limit(train_indices, data.max_train_pairs, data.seed)
    eval_indices = _limit(eval_indices, data.max_eval_pairs, data.seed)

    chat_template = effective_chat_template(tokenizer, data)
    stats: dict[str, int] = {}
    splits: dict[str, TokenizedSplit] = {}
    totals = TokenizeCounts()
    for name, examples, indices, location in (
        ("train", train_examples, train_indices, source.description),
        ("eval", eval_examples, eval_indices, eval_location),
    ):
        split, counts = tokenize_examples(
            [examples[index] for index in indices],
            tokenizer,
            chat_template=chat_template,
            max_length=data.max_length,
            max_prompt_length=data.max_prompt_length,
            row_indices=indices,
            location=location,
        )
        splits[name] = split
        stats[f"{name}_rows"] = len(indices)
        stats[f"{name}_pairs"] = len(split)
        stats[f"{name}_dropped_empty"] = counts.dropped_empty
        for key in ("dropped_empty", "truncated", "truncated_prompt", "truncated_response"):
            setattr(totals, key, getattr(totals, key) + getattr(counts, key))
    stats.update(
        dropped_empty=totals.dropped_empty,
        truncated=totals.truncated,
        truncated_prompt=totals.truncated_prompt,
        truncated_response=totals.truncated_response,
    )
    if stats["train_pairs"] == 0:
        raise DataError(f"no training pairs left from {source.description} (stats: {stats})")
    if stats["eval_pairs"] == 0:
        # Evaluation metrics are means over the eval pairs: with none there is nothing to
        # average, and no trial could be compared with another.
        raise DataError(
            f"no eval pairs left from {eval_location}: {stats['eval_dropped_empty']} of its "
            f"{stats['eval_rows']} held-out rows were dropped (a chosen or rejected response "
            "with no content, or no response tokens left after truncation to "
            f"max_length={data.max_length} with max_prompt_length={data.max_prompt_length}) "
            f"(stats: {stats})"
        )

    temporary = cache_root / f".tmp-{fingerprint[:16]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with _quiet_datasets():
            _save_split(splits["train"], temporary / "train")
            _save_split(splits["eval"], temporary / "eval")
        manifest = {"fingerprint": fingerprint, "stats": stats, "inputs": inputs}
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
