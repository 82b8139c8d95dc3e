"""PreferenceExample -> token ids: chat template, tokenising, truncation, and the id columns.

Prompt ids are the templated prompt with its generation prompt; chosen/rejected ids are the
RESPONSE ids only (the templated conversation after the prompt), ending with EOS. Truncation
cuts the prompt from the left, then the responses to fit max_length.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import overload

import numpy as np
import pyarrow as pa
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from simpo_sweep.engine.data.normalize import (
    HH_LABELS,
    SHAPE_HH,
    DataError,
    Message,
    PreferenceExample,
    RowContext,
)
from simpo_sweep.spec.models import DataSpec

ID_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")
# Texts encoded per tokenizer call: large enough for the fast tokenizer's batching to pay off.
ENCODE_BATCH_TEXTS = 1024
# Separator between messages when there is no chat template to lay them out.
PLAIN_MESSAGE_SEPARATOR = "\n\n"


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


TEMPLATE_OF_SPEC = "spec's"
TEMPLATE_OF_TOKENIZER = "tokenizer's own"
TEMPLATE_PLAIN = "plain"


def effective_chat_template(tokenizer: PreTrainedTokenizerBase, data: DataSpec) -> str | None:
    """The spec's override, else the tokenizer's own template, else None (plain concatenation)."""
    if data.chat_template is not None:
        return data.chat_template
    if not tokenizer.chat_template:
        return None
    template: str = tokenizer.get_chat_template()
    return template


def chat_template_source(tokenizer: PreTrainedTokenizerBase, data: DataSpec) -> str:
    """Which template effective_chat_template uses: the spec's, the tokenizer's own, or plain."""
    if data.chat_template is not None:
        return TEMPLATE_OF_SPEC
    return TEMPLATE_OF_TOKENIZER if tokenizer.chat_template else TEMPLATE_PLAIN


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
    row: RowContext,
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


def _plain_texts(example: PreferenceExample) -> tuple[str, str, str]:
    """Prompt, chosen and rejected text when there is no chat template to lay the turns out.

    Message contents are joined as they are, except for hh-rlhf rows, which are written back
    in their own Human/Assistant layout: a base model trained on that data expects its labels.
    """
    if example.shape != SHAPE_HH:
        return (
            PLAIN_MESSAGE_SEPARATOR.join(message["content"] for message in example.prompt),
            PLAIN_MESSAGE_SEPARATOR.join(message["content"] for message in example.chosen),
            PLAIN_MESSAGE_SEPARATOR.join(message["content"] for message in example.rejected),
        )

    def turns(messages: list[Message]) -> str:
        return "".join(
            f"\n\n{HH_LABELS.get(m['role'], m['role'])}: {m['content'].strip()}" for m in messages
        )

    def response(messages: list[Message]) -> str:
        # The prompt ends with the generation prompt "\n\nAssistant:"; the answer follows it.
        return " " + messages[0]["content"].strip() + turns(messages[1:])

    return (
        turns(example.prompt) + "\n\nAssistant:",
        response(example.chosen),
        response(example.rejected),
    )


# Why a pair was dropped, in the order the checks run.
DROP_EMPTY_RESPONSE = "empty_response"
DROP_IDENTICAL = "identical_responses"
DROP_EMPTY_AFTER_TRUNCATION = "empty_after_truncation"
DROP_IDENTICAL_AFTER_TRUNCATION = "identical_after_truncation"
DROP_REASONS = (
    DROP_EMPTY_RESPONSE,
    DROP_IDENTICAL,
    DROP_EMPTY_AFTER_TRUNCATION,
    DROP_IDENTICAL_AFTER_TRUNCATION,
)


@dataclass
class TokenizeCounts:
    """What tokenising a split did: pairs dropped by reason, truncations, token lengths."""

    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))
    truncated: int = 0
    truncated_prompt: int = 0
    truncated_response: int = 0
    # Before truncation, for every pair that was tokenised (all but empty-response ones):
    # one prompt length per pair, and the chosen and the rejected response's lengths.
    prompt_lengths: list[int] = field(default_factory=list)
    response_lengths: list[int] = field(default_factory=list)

    @property
    def dropped_empty(self) -> int:
        return self.dropped[DROP_EMPTY_RESPONSE] + self.dropped[DROP_EMPTY_AFTER_TRUNCATION]

    @property
    def dropped_identical(self) -> int:
        return self.dropped[DROP_IDENTICAL] + self.dropped[DROP_IDENTICAL_AFTER_TRUNCATION]


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
    """Token ids of each pair, truncated; pairs with nothing to learn from are dropped and counted.

    With a chat template, a response's ids are those of the templated conversation (prompt +
    response) after the ids of the templated prompt with the generation prompt, so the model
    sees exactly what the template writes. `chat_template` None = plain concatenation: message
    contents joined, the tokenizer's own special tokens (BOS) on the prompt, EOS after responses.
    `row_indices` are the source rows of `examples`, for error messages.

    Dropped (`TokenizeCounts.dropped`, by reason):
    - empty_response: the chosen or rejected response has no content (only whitespace: what
      the template wraps around it, an end-of-turn token, is not an answer to prefer or reject);
    - identical_responses: chosen and rejected have the same token ids (a pair with nothing
      to prefer: its loss is a constant and its reward margin 0 by construction);
    - empty_after_truncation: no prompt or response token left after truncation (the first
      response token needs a prompt token to be predicted from);
    - identical_after_truncation: the responses differ only in tokens truncation cut off.
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
    counts.dropped[DROP_EMPTY_RESPONSE] = len(examples) - len(kept)
    examples = [examples[position] for position in kept]
    indices = [all_indices[position] for position in kept]
    prompt_texts: list[str] = []
    response_texts: list[str] = []  # chosen, rejected interleaved
    for example, index in zip(examples, indices, strict=True):
        row = RowContext(index, location)
        if chat_template is None:
            prompt_text, chosen_text, rejected_text = _plain_texts(example)
            prompt_texts.append(prompt_text)
            response_texts += [chosen_text, rejected_text]
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
                    row=RowContext(index, location),
                )
            responses.append(_end_with_eos(encoded, eos_token_id))
        counts.prompt_lengths.append(len(prompt_ids))
        counts.response_lengths += [len(responses[0]), len(responses[1])]
        if responses[0] == responses[1]:
            counts.dropped[DROP_IDENTICAL] += 1
            continue
        pair = truncate_pair(
            prompt_ids,
            responses[0],
            responses[1],
            max_length=max_length,
            max_prompt_length=max_prompt_length,
        )
        if pair.is_empty:
            counts.dropped[DROP_EMPTY_AFTER_TRUNCATION] += 1
            continue
        if pair.chosen_ids == pair.rejected_ids:
            counts.dropped[DROP_IDENTICAL_AFTER_TRUNCATION] += 1
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
    row: RowContext,
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
