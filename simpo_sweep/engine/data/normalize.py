"""Source rows -> PreferenceExample: a shared prompt and two responses, as chat messages.

Row shapes recognised per row (column names from `DataSpec.columns`):
  - "prompt/chosen/rejected strings": three strings;
  - "message lists": chosen and rejected as message lists [{"role", "content"}, ...], each
    either the response only (with a prompt column, string or message list) or the whole
    dialogue (the prompt column optional);
  - "hh-rlhf dialogue strings": chosen and rejected as "\\n\\nHuman: ...\\n\\nAssistant: ..."
    dialogues (Anthropic/hh-rlhf), no prompt column needed;
  - "sharegpt": ShareGPT / LLaMA-Factory rows, a `conversations` list of {"from", "value"}
    turns and chosen/rejected each ONE {"from", "value"} turn (roles human/gpt/system, or
    user/assistant).

Whatever the shape, the prompt is the longest message prefix that the chosen and rejected
dialogues share, cut just before an assistant turn; each response is the rest of its
dialogue. A prompt column only has to agree with that (its messages start the shared prefix),
which is what keeps shared later turns of a multi-turn row out of both responses.
"""

from __future__ import annotations

import difflib
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

from simpo_sweep.spec.models import DataColumns

Message = dict[str, str]

SHAPE_STRINGS = "prompt/chosen/rejected strings"
SHAPE_MESSAGES = "message lists"
SHAPE_HH = "hh-rlhf dialogue strings"
SHAPE_SHAREGPT = "sharegpt"

# ShareGPT speaker names -> chat roles. Messages keyed role/content keep their role as given.
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}
HH_ROLES = {"Human": "user", "Assistant": "assistant"}
HH_LABELS = {role: label for label, role in HH_ROLES.items()}
# A turn marker of an hh-rlhf dialogue: "\n\nHuman:" or "\n\nAssistant:" (the first may lack
# the blank lines).
_HH_MARKER = re.compile(r"(?:^|\n\n)(Human|Assistant):")
# Row problems listed in one error: enough to see a pattern, short enough to read.
MAX_LISTED_PROBLEMS = 20


class DataError(ValueError):
    """A data source, row or field that cannot be used; the message says which and why."""


class DataProblems(DataError):
    """Several problems found at once (every bad row of a sample, every missing column).

    With one problem the message is that problem, so it reads like any other DataError.
    """

    def __init__(self, problems: Sequence[str]) -> None:
        if not problems:
            raise ValueError("DataProblems needs at least one problem")
        self.problems = list(problems)
        if len(self.problems) == 1:
            message = self.problems[0]
        else:
            listed = self.problems[:MAX_LISTED_PROBLEMS]
            more = len(self.problems) - len(listed)
            message = f"{len(self.problems)} problems in the data:\n" + "\n".join(
                f"  {problem}" for problem in listed
            )
            if more:
                message += f"\n  ... and {more} more"
        super().__init__(message)


@dataclass(frozen=True)
class PreferenceExample:
    """One preference pair as chat messages: a shared prompt and two alternative responses.

    `shape` is the row shape it was read from (one of the SHAPE_* names); hh-rlhf rows keep
    their Human/Assistant labels when there is no chat template to lay the turns out.
    """

    prompt: list[Message]
    chosen: list[Message]
    rejected: list[Message]
    shape: str = field(default=SHAPE_MESSAGES, compare=False)


class RowContext:
    """Builds the errors of one row: `row 17 (line 18): field 'chosen' is missing (in x.jsonl)`."""

    def __init__(self, index: int, location: str, line: int | None = None) -> None:
        self.index = index
        self.location = location
        self.line = line

    def describe(self, problem: str) -> str:
        where = f"row {self.index}" + (f" (line {self.line})" if self.line is not None else "")
        suffix = f" (in {self.location})" if self.location else ""
        return f"{where}: {problem}{suffix}"

    def fail(self, problem: str) -> NoReturn:
        raise DataError(self.describe(problem))


# ---- fields ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Field:
    """A parsed field: text, or messages (`sharegpt` when they were {from, value} turns)."""

    text: str | None = None
    messages: list[Message] | None = None
    sharegpt: bool = False


def is_hh_dialogue(text: str) -> bool:
    """An hh-rlhf dialogue string: starts with a Human turn and has an Assistant turn."""
    return text.lstrip().startswith("Human:") and "\n\nAssistant:" in text


def parse_hh_dialogue(text: str) -> list[Message]:
    """ "\\n\\nHuman: a\\n\\nAssistant: b" -> [user a, assistant b] (contents stripped)."""
    parts = _HH_MARKER.split(text.lstrip())
    # parts = ["", "Human", " a", "Assistant", " b", ...]: nothing may come before the first turn
    return [
        {"role": HH_ROLES[label], "content": content.strip()}
        for label, content in zip(parts[1::2], parts[2::2], strict=True)
    ]


def _parse_message(item: Any, name: str, position: int, row: RowContext) -> tuple[Message, bool]:
    if not isinstance(item, Mapping):
        row.fail(f"field '{name}' message {position} is not a mapping with 'role' and 'content'")
    # Arrow fills keys a message lacks with None (a column mixing both key styles), so a key
    # holding None counts as absent.
    sharegpt = item.get("role") is None and item.get("from") is not None
    role_key, content_key = ("from", "value") if sharegpt else ("role", "content")
    for key in (role_key, content_key):
        if item.get(key) is None:
            row.fail(f"field '{name}' message {position} has no '{key}'")
        if not isinstance(item[key], str):
            row.fail(
                f"field '{name}' message {position} '{key}' is not a string "
                f"(got {type(item[key]).__name__})"
            )
    role = item[role_key]
    if sharegpt:
        if role not in SHAREGPT_ROLES:
            row.fail(
                f"field '{name}' message {position} is from {role!r}; ShareGPT turns must be "
                f"from one of {', '.join(SHAREGPT_ROLES)}"
            )
        role = SHAREGPT_ROLES[role]
    # Only role and content reach the template: extra keys (ids, scores) are row metadata.
    return {"role": role, "content": item[content_key]}, sharegpt


def _parse_field(value: Any, name: str, row: RowContext) -> _Field:
    if isinstance(value, str):
        return _Field(text=value)
    if isinstance(value, Mapping):  # one turn on its own (ShareGPT's chosen/rejected)
        value = [value]
    if not isinstance(value, (list, tuple)):
        row.fail(
            f"field '{name}' is not a string or a list of messages (got {type(value).__name__})"
        )
    if not value:
        row.fail(f"field '{name}' is an empty list of messages")
    parsed = [_parse_message(item, name, position, row) for position, item in enumerate(value)]
    return _Field(
        messages=[message for message, _ in parsed],
        sharegpt=any(sharegpt for _, sharegpt in parsed),
    )


def _prompt_messages(prompt: _Field) -> list[Message]:
    if prompt.messages is not None:
        return prompt.messages
    assert prompt.text is not None
    if is_hh_dialogue(prompt.text):
        messages = parse_hh_dialogue(prompt.text)
        # "...\n\nAssistant:" at the end is the generation prompt, not a turn of the prompt.
        if messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
            messages = messages[:-1]
        return messages
    return [{"role": "user", "content": prompt.text}]


# ---- the shared prompt -------------------------------------------------------------------------


def _same(first: Message, second: Message) -> bool:
    # Whitespace around a turn is layout (a prompt column often drops a trailing newline).
    return first["role"] == second["role"] and first["content"].strip() == second["content"].strip()


def _prompt_end(dialogue: list[Message], prompt: list[Message]) -> int | None:
    """Where `prompt` ends in `dialogue` when the dialogue starts with it, else None.

    A prompt column without the dialogue's leading system messages still starts it: datasets
    often keep the user's question apart from the system prompt the dialogues carry.
    """
    skips = [0]
    if not any(message["role"] == "system" for message in prompt):
        leading_system = 0
        while leading_system < len(dialogue) and dialogue[leading_system]["role"] == "system":
            leading_system += 1
        if leading_system:
            skips.append(leading_system)
    for skip in skips:
        candidate = dialogue[skip : skip + len(prompt)]
        if len(candidate) == len(prompt) and all(map(_same, candidate, prompt)):
            return skip + len(prompt)
    return None


def split_shared_prompt(
    chosen: list[Message], rejected: list[Message]
) -> tuple[int, list[Message], list[Message], list[Message]] | None:
    """(prompt length, prompt, chosen response, rejected response) of two dialogues.

    The prompt is their longest shared message prefix that is followed by an assistant turn in
    both (each response must be the assistant's). None when there is no such prefix.
    """
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    # Identical dialogues still split before their last assistant turn: the pair is then
    # dropped as identical responses (and counted), not refused as malformed.
    for boundary in range(min(shared, len(chosen) - 1, len(rejected) - 1), 0, -1):
        if chosen[boundary]["role"] == "assistant" and rejected[boundary]["role"] == "assistant":
            return boundary, chosen[:boundary], chosen[boundary:], rejected[boundary:]
    return None


def _detect_shape(chosen: _Field, rejected: _Field, prompt: _Field | None) -> str:
    fields = [chosen, rejected, *([prompt] if prompt is not None else [])]
    if any(item.sharegpt for item in fields):
        return SHAPE_SHAREGPT
    texts = [item.text for item in (chosen, rejected) if item.text is not None]
    if any(is_hh_dialogue(text) for text in texts) or (
        prompt is not None and prompt.text is not None and is_hh_dialogue(prompt.text)
    ):
        return SHAPE_HH
    if all(item.text is not None for item in fields) and prompt is not None:
        return SHAPE_STRINGS
    return SHAPE_MESSAGES


def normalize_row(
    row: Mapping[str, Any],
    columns: DataColumns,
    *,
    index: int,
    location: str = "",
    line: int | None = None,
) -> PreferenceExample:
    """One source row in any supported shape -> PreferenceExample; a DataError names the field."""
    context = RowContext(index, location, line)
    parsed: dict[str, _Field] = {}
    for name in (columns.chosen, columns.rejected):
        if row.get(name) is None:
            context.fail(f"field '{name}' is missing")
        parsed[name] = _parse_field(row[name], name, context)
    chosen_field, rejected_field = parsed[columns.chosen], parsed[columns.rejected]

    prompt_name = columns.prompt
    if row.get(prompt_name) is None and row.get(columns.conversations) is not None:
        prompt_name = columns.conversations
    prompt_field = (
        _parse_field(row[prompt_name], prompt_name, context)
        if row.get(prompt_name) is not None
        else None
    )
    shape = _detect_shape(chosen_field, rejected_field, prompt_field)
    prompt = _prompt_messages(prompt_field) if prompt_field is not None else None

    dialogues: dict[str, list[Message]] = {}
    for name, value in parsed.items():
        dialogues[name] = _dialogue(value, name, prompt, shape, columns, context)
    split = split_shared_prompt(dialogues[columns.chosen], dialogues[columns.rejected])
    if split is None:
        context.fail(
            f"fields '{columns.chosen}' and '{columns.rejected}' are dialogues without a "
            "shared prompt (common leading messages followed by an assistant turn in each)"
        )
    prompt_length, shared_prompt, chosen, rejected = split
    if prompt is not None:
        end = _prompt_end(shared_prompt, prompt)
        if end is None:
            context.fail(
                f"field '{prompt_name}' is not the start of the conversation that "
                f"'{columns.chosen}' and '{columns.rejected}' share (their shared prompt "
                f"has {prompt_length} message(s), starting with role "
                f"'{shared_prompt[0]['role']}')"
            )
    return PreferenceExample(prompt=shared_prompt, chosen=chosen, rejected=rejected, shape=shape)


def _dialogue(
    value: _Field,
    name: str,
    prompt: list[Message] | None,
    shape: str,
    columns: DataColumns,
    context: RowContext,
) -> list[Message]:
    """The whole conversation one response belongs to: prompt + response, or as given."""
    if value.text is not None:
        if is_hh_dialogue(value.text):
            return parse_hh_dialogue(value.text)
        if shape == SHAPE_HH and prompt is None:
            context.fail(
                f"field '{name}' is not an hh-rlhf dialogue ('\\n\\nHuman: ...\\n\\n"
                "Assistant: ...' turns) like the other response of the row"
            )
        messages = [{"role": "assistant", "content": value.text}]
    else:
        assert value.messages is not None
        messages = value.messages
    if prompt is None:
        if messages[0]["role"] == "assistant":
            context.fail(
                f"field '{columns.prompt}' is missing (needed unless '{columns.chosen}' and "
                f"'{columns.rejected}' are full dialogues)"
            )
        return messages
    if _prompt_end(messages, prompt) is not None:
        return messages  # the response repeats the prompt: it is the whole dialogue
    if messages[0]["role"] == "assistant":
        return prompt + messages
    context.fail(
        f"field '{name}' does not continue the prompt with an assistant message (it neither "
        "starts with the prompt's messages nor with an assistant turn)"
    )


# ---- many rows ---------------------------------------------------------------------------------


def normalize_rows(
    rows: Iterable[Mapping[str, Any]],
    columns: DataColumns,
    location: str,
    *,
    lines: Sequence[int | None] | None = None,
) -> list[PreferenceExample]:
    """Every row normalised; every bad row reported at once (DataProblems) when there are any.

    `lines`: the source line of each row, where the format has lines (JSON Lines, CSV).
    """
    examples: list[PreferenceExample] = []
    problems: list[str] = []
    for index, row in enumerate(rows):
        line = lines[index] if lines is not None else None
        try:
            examples.append(normalize_row(row, columns, index=index, location=location, line=line))
        except DataError as error:
            problems.append(str(error))
    if problems:
        raise DataProblems(problems)
    return examples


def count_shapes(examples: Iterable[PreferenceExample]) -> dict[str, int]:
    """Rows per shape, most common first."""
    return dict(Counter(example.shape for example in examples).most_common())


def check_columns(
    available: Sequence[str], columns: DataColumns, *, where: str = "the file"
) -> list[str]:
    """Problems of the spec's column names against the columns a source has.

    chosen and rejected are always needed; prompt and conversations only when the spec renames
    them (under their default names they may be absent: dialogue shapes need no prompt column).
    Renamed, not "set": a spec dumped and read back has every field set.
    """
    needed = ["chosen", "rejected"]
    needed += [
        key
        for key in ("prompt", "conversations")
        if getattr(columns, key) != DataColumns.model_fields[key].default
    ]
    problems = []
    for key in needed:
        name = getattr(columns, key)
        if name in available:
            continue
        nearest = difflib.get_close_matches(name, list(available), n=1, cutoff=0.3)
        problems.append(
            f"column '{name}' not in {where}; its columns are: {', '.join(available)}"
            + (f"; nearest: {nearest[0]}" if nearest else "")
            + f" (data.columns.{key})"
        )
    return problems
