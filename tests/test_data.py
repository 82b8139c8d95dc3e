"""Preference data (issue 2): every source format and row shape, chat templates, truncation,
malformed rows, empty responses, held-out splits and the tokenised-data cache.

Sources are written to tmp_path in each format and prepared with the demo tokenizer, so token
ids decode back to readable text and the expected tokens can be written down.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import datasets
import pandas as pd
import pytest

from simpo_sweep.engine import demo
from simpo_sweep.engine.data import (
    DataError,
    PreparedData,
    TokenizedSplit,
    load_prepared,
    normalize_row,
    prepare_data,
    truncate_pair,
)
from simpo_sweep.engine.models import load_tokenizer
from simpo_sweep.spec.models import DataColumns, DataSpec, ModelSpec

Row = dict[str, Any]
MODEL = ModelSpec()
TOKENIZER = load_tokenizer(MODEL)
LENGTHS: dict[str, Any] = {"max_length": 64, "max_prompt_length": 24}


def _rows(count: int = 30) -> list[Row]:
    return demo.demo_preference_rows("builtin:rule-following", count, seed=0)


def _write(rows: Sequence[Row], path: Path) -> Path:
    """`rows` in the format `path`'s suffix names; a suffix-less path is a save_to_disk folder."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(list(rows)))
    elif path.suffix == ".parquet":
        pd.DataFrame(list(rows)).to_parquet(path)
    elif path.suffix == ".csv":
        pd.DataFrame(list(rows)).to_csv(path, index=False)
    else:
        datasets.Dataset.from_list(list(rows)).save_to_disk(str(path))
    return path


def _prepare(tmp_path: Path, source: Path | str, **data: Any) -> PreparedData:
    spec = DataSpec(source=str(source), **{**LENGTHS, **data})
    return prepare_data(MODEL, spec, tmp_path / "cache")


def _decoded(split: TokenizedSplit) -> list[tuple[str, str, str]]:
    return [
        (
            TOKENIZER.decode(split.prompt_ids[i]),
            TOKENIZER.decode(split.chosen_ids[i]),
            TOKENIZER.decode(split.rejected_ids[i]),
        )
        for i in range(len(split))
    ]


def _token_ids(prepared: PreparedData) -> list[list[list[int]]]:
    return [
        [list(ids) for ids in column]
        for split in (prepared.train, prepared.eval)
        for column in (split.prompt_ids, split.chosen_ids, split.rejected_ids)
    ]


def _expected_text(row: Row) -> tuple[str, str, str]:
    """What the demo chat template makes of a prompt/chosen/rejected string row."""
    return (
        f"<s> <|user|> {row['prompt']} <|assistant|>",
        f"{row['chosen']} </s>",
        f"{row['rejected']} </s>",
    )


# ---- formats and shapes ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["data.jsonl", "data.json", "data.parquet", "data.csv", "saved"])
def test_every_local_format_gives_the_templated_pairs(tmp_path: Path, name: str) -> None:
    rows = _rows()
    prepared = _prepare(tmp_path, _write(rows, tmp_path / name), eval_fraction=0.2)

    train, evaluation = _decoded(prepared.train), _decoded(prepared.eval)
    assert sorted(train + evaluation) == sorted(_expected_text(row) for row in rows)
    assert len(evaluation) == 6
    assert not {prompt for prompt, _, _ in train} & {prompt for prompt, _, _ in evaluation}
    assert prepared.stats["train_pairs"] == 24 and prepared.stats["dropped_empty"] == 0


def _assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def _user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


SHAPES: dict[str, Callable[[Row], Row]] = {
    "responses as message lists, prompt string": lambda row: {
        "prompt": row["prompt"],
        "chosen": _assistant(row["chosen"]),
        "rejected": _assistant(row["rejected"]),
    },
    "prompt as messages, responses repeating it": lambda row: {
        "prompt": _user(row["prompt"]),
        "chosen": _user(row["prompt"]) + _assistant(row["chosen"]),
        "rejected": _user(row["prompt"]) + _assistant(row["rejected"]),
    },
    "full dialogues, no prompt column": lambda row: {
        "chosen": _user(row["prompt"]) + _assistant(row["chosen"]),
        "rejected": _user(row["prompt"]) + _assistant(row["rejected"]),
    },
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_message_list_shapes_give_the_same_tokens_as_strings(tmp_path: Path, shape: str) -> None:
    rows = _rows()
    as_strings = _prepare(tmp_path / "strings", _write(rows, tmp_path / "strings.jsonl"))
    reshaped = [SHAPES[shape](row) for row in rows]
    as_messages = _prepare(tmp_path / "messages", _write(reshaped, tmp_path / "messages.jsonl"))

    assert _token_ids(as_messages) == _token_ids(as_strings)


def test_multi_turn_dialogues_split_at_the_last_shared_turn() -> None:
    history = [*_user("count up by 1 from 1 to 4"), *_assistant("1 2 3 4"), *_user("count down")]
    row = {
        "chosen": [*history, *_assistant("4 3 2 1")],
        "rejected": [*history, *_assistant("4 2 3 1")],
    }

    example = normalize_row(row, DataColumns(), index=0)

    assert example.prompt == history
    assert example.chosen == _assistant("4 3 2 1")
    assert example.rejected == _assistant("4 2 3 1")


def test_dialogues_may_diverge_over_several_turns() -> None:
    prompt = _user("count up by 1 from 1 to 4")
    row = {
        "chosen": [*prompt, *_assistant("1 2"), *_user("to"), *_assistant("3 4")],
        "rejected": [*prompt, *_assistant("1 3"), *_user("to"), *_assistant("2 4")],
    }

    example = normalize_row(row, DataColumns(), index=0)

    assert example.prompt == prompt
    assert example.chosen == row["chosen"][1:]


def test_a_prompt_column_holding_the_first_turn_takes_in_the_shared_turns() -> None:
    """UltraFeedback-style multi-turn rows: the prompt column has the first user turn only;
    the turns both dialogues share after it are prompt too, not part of both responses."""
    history = [*_user("count up by 1 from 1 to 4"), *_assistant("1 2 3 4"), *_user("count down")]
    row = {
        "prompt": "count up by 1 from 1 to 4",
        "chosen": [*history, *_assistant("4 3 2 1")],
        "rejected": [*history, *_assistant("4 2 3 1")],
    }

    example = normalize_row(row, DataColumns(), index=0)

    assert example.prompt == history
    assert (example.chosen, example.rejected) == (_assistant("4 3 2 1"), _assistant("4 2 3 1"))


def test_a_prompt_column_may_leave_out_the_dialogues_system_message() -> None:
    system = [{"role": "system", "content": "count carefully"}]
    row = {
        "prompt": "count up by 1 from 1 to 4 ",  # whitespace around a turn is layout
        "chosen": [*system, *_user("count up by 1 from 1 to 4"), *_assistant("1 2 3 4")],
        "rejected": [*system, *_user("count up by 1 from 1 to 4"), *_assistant("1 3 2 4")],
    }

    example = normalize_row(row, DataColumns(), index=0)

    assert example.prompt == [*system, *_user("count up by 1 from 1 to 4")]
    assert example.chosen == _assistant("1 2 3 4")


def test_identical_responses_are_dropped_and_counted(tmp_path: Path) -> None:
    rows = _rows(20)
    rows[4]["rejected"] = rows[4]["chosen"]
    rows[9]["chosen"] = _assistant(rows[9]["rejected"])  # same text, as a message list
    rows[13] = SHAPES["full dialogues, no prompt column"](
        {**rows[13], "rejected": rows[13]["chosen"]}
    )

    prepared = _prepare(tmp_path, _write(rows, tmp_path / "data.jsonl"), eval_fraction=0.25)

    assert prepared.stats["dropped_identical"] == 3 and prepared.stats["dropped_empty"] == 0
    assert prepared.stats["train_pairs"] + prepared.stats["eval_pairs"] == 17
    kept = _decoded(prepared.train) + _decoded(prepared.eval)
    assert all(chosen != rejected for _, chosen, rejected in kept)


def test_column_names_are_configurable(tmp_path: Path) -> None:
    rows = _rows()
    renamed = [
        {"question": row["prompt"], "good": row["chosen"], "bad": row["rejected"]} for row in rows
    ]
    columns = {"prompt": "question", "chosen": "good", "rejected": "bad"}

    default = _prepare(tmp_path / "a", _write(rows, tmp_path / "a.jsonl"))
    custom = _prepare(tmp_path / "b", _write(renamed, tmp_path / "b.jsonl"), columns=columns)

    assert _token_ids(custom) == _token_ids(default)


def test_spec_chat_template_overrides_the_tokenizers(tmp_path: Path) -> None:
    source = _write(_rows(), tmp_path / "data.jsonl")
    template = (
        "{% for message in messages %}{{ message['content'] }}"
        "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %} {% endfor %}"
    )

    own = _prepare(tmp_path, source)
    overridden = _prepare(tmp_path, source, chat_template=template)

    prompt, chosen, _ = _decoded(overridden.train)[0]
    assert "<|user|>" not in prompt and prompt.startswith("count ")
    assert chosen.endswith("</s>")
    assert overridden.fingerprint != own.fingerprint


def test_tokenizer_without_chat_template_concatenates_messages(tmp_path: Path) -> None:
    """A base-model tokenizer: prompt text as is, responses end with EOS."""
    plain = demo.build_demo_tokenizer()
    plain.chat_template = None
    plain.save_pretrained(tmp_path / "tokenizer")
    model = ModelSpec(tokenizer=str(tmp_path / "tokenizer"))
    rows = _rows()

    prepared = prepare_data(
        model,
        DataSpec(source=str(_write(rows, tmp_path / "data.jsonl")), **LENGTHS),
        tmp_path / "cache",
    )

    by_prompt = {row["prompt"]: row for row in rows}
    for prompt, chosen, rejected in _decoded(prepared.train):
        assert chosen == f"{by_prompt[prompt]['chosen']} </s>"
        assert rejected == f"{by_prompt[prompt]['rejected']} </s>"


# ---- truncation --------------------------------------------------------------------------------


def test_prompt_is_cut_from_the_left_then_responses_from_the_right() -> None:
    pair = truncate_pair(
        [1, 2, 3, 4, 5], [10, 11, 12, 13], [20, 21], max_length=6, max_prompt_length=3
    )

    assert pair.prompt_ids == [3, 4, 5]
    assert pair.chosen_ids == [10, 11, 12]
    assert pair.rejected_ids == [20, 21]
    assert pair.prompt_truncated and pair.response_truncated and not pair.is_empty


def test_a_pair_that_fits_exactly_is_untouched() -> None:
    pair = truncate_pair([1, 2, 3], [10, 11, 12], [20], max_length=6, max_prompt_length=3)

    assert (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids) == ([1, 2, 3], [10, 11, 12], [20])
    assert not pair.prompt_truncated and not pair.response_truncated


def test_a_short_prompt_leaves_its_room_to_the_responses() -> None:
    pair = truncate_pair([1], [10, 11, 12, 13, 14, 15], [20], max_length=6, max_prompt_length=3)

    assert pair.chosen_ids == [10, 11, 12, 13, 14]


def test_no_room_left_for_responses_makes_the_pair_empty() -> None:
    pair = truncate_pair([1, 2, 3, 4], [10], [20], max_length=4, max_prompt_length=4)

    assert pair.chosen_ids == [] and pair.is_empty


def test_prepare_truncates_to_the_limits_and_counts_it(tmp_path: Path) -> None:
    # Demo prompts template to 11 tokens and answers to 5-8: both limits bite.
    full = _prepare(tmp_path, "builtin:rule-following", max_train_pairs=200)
    cut = _prepare(
        tmp_path, "builtin:rule-following", max_train_pairs=200, max_length=14, max_prompt_length=8
    )

    assert cut.stats["truncated_prompt"] == cut.stats["train_pairs"] + cut.stats["eval_pairs"]
    assert cut.stats["truncated_response"] > 0
    assert cut.stats["dropped_empty"] == 0
    for short, whole in ((cut.train, full.train), (cut.eval, full.eval)):
        for i in range(len(short)):
            prompt = short.prompt_ids[i]
            assert prompt == whole.prompt_ids[i][-8:]
            for response, untruncated in (
                (short.chosen_ids[i], whole.chosen_ids[i]),
                (short.rejected_ids[i], whole.rejected_ids[i]),
            ):
                assert len(response) >= 1 and len(prompt) + len(response) <= 14
                assert response == untruncated[: len(response)]


# ---- malformed rows and empty responses --------------------------------------------------------


def _replace(row: Row, new: Row) -> None:
    row.clear()
    row.update(new)


MALFORMED: dict[str, tuple[Callable[[Row], None], str]] = {
    "missing field": (lambda row: row.pop("chosen"), "field 'chosen' is missing"),
    "number instead of text": (
        lambda row: row.update(rejected=7),
        "field 'rejected' is not a string or a list of messages",
    ),
    "message without role": (
        lambda row: row.update(chosen=[{"content": "1 2 3"}]),
        "field 'chosen' message 0 has no 'role'",
    ),
    "list of plain strings": (
        lambda row: row.update(chosen=["1 2 3"]),
        "field 'chosen' message 0 is not a mapping",
    ),
    "no prompt and no dialogue": (
        lambda row: row.pop("prompt"),
        "field 'prompt' is missing",
    ),
    "response that is not the assistant's": (
        lambda row: row.update(chosen=_user("1 2")),
        "field 'chosen' does not continue the prompt with an assistant message",
    ),
    "dialogues sharing no prompt": (
        lambda row: _replace(row, {"chosen": _user("1"), "rejected": _user("2")}),
        "fields 'chosen' and 'rejected' are dialogues without a shared prompt",
    ),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_row_is_reported_with_its_index_and_field(tmp_path: Path, case: str) -> None:
    mutate, problem = MALFORMED[case]
    rows = _rows(8)
    mutate(rows[5])
    source = _write(rows, tmp_path / "data.jsonl")

    with pytest.raises(DataError) as raised:
        _prepare(tmp_path, source)

    assert f"row 5: {problem}" in str(raised.value)
    assert str(source) in str(raised.value)


def test_empty_responses_are_dropped_and_counted(tmp_path: Path) -> None:
    rows = _rows(20)
    rows[2]["chosen"] = ""
    rows[7]["rejected"] = "   "
    rows[11]["chosen"] = _assistant("")
    dropped_prompts = {rows[i]["prompt"] for i in (2, 7, 11)}

    prepared = _prepare(tmp_path, _write(rows, tmp_path / "data.jsonl"), eval_fraction=0.25)

    assert prepared.stats["dropped_empty"] == 3
    assert prepared.stats["train_pairs"] + prepared.stats["eval_pairs"] == 17
    kept = _decoded(prepared.train) + _decoded(prepared.eval)
    assert not {prompt for prompt, _, _ in kept} & {
        _expected_text({"prompt": p, "chosen": "", "rejected": ""})[0] for p in dropped_prompts
    }
    assert all(len(chosen) and len(rejected) for _, chosen, rejected in kept)
    # decoded responses always end in EOS: what must be non-empty is the text before it
    assert all(
        chosen.removesuffix("</s>").strip() and rejected.removesuffix("</s>").strip()
        for _, chosen, rejected in kept
    )


def test_data_with_only_empty_responses_is_an_error(tmp_path: Path) -> None:
    rows = [{**row, "chosen": ""} for row in _rows(6)]

    with pytest.raises(DataError, match="no training pairs left"):
        _prepare(tmp_path, _write(rows, tmp_path / "data.jsonl"))


def test_an_eval_split_left_with_no_pairs_is_an_error(tmp_path: Path) -> None:
    """Eval metrics are means over the eval pairs: an eval split that loses every pair is
    refused when the data is prepared, not met as a division by zero at the first evaluation."""
    rows = _rows(24)
    train = _write(rows[:20], tmp_path / "train.jsonl")
    held_out = _write([{**row, "rejected": " "} for row in rows[20:]], tmp_path / "eval.jsonl")

    with pytest.raises(DataError) as raised:
        _prepare(tmp_path, train, eval_split=str(held_out))

    message = str(raised.value)
    assert message.startswith(f"no eval pairs left from {held_out}: 4 of its 4 held-out rows")
    assert "max_length=64 with max_prompt_length=24" in message
    assert not (tmp_path / "cache").exists() or not [
        path for path in (tmp_path / "cache").iterdir() if path.name != "hf_datasets"
    ]  # nothing cached


# ---- sources and splits ------------------------------------------------------------------------


def test_eval_split_of_a_saved_dataset_dict(tmp_path: Path) -> None:
    rows = _rows(30)
    folder = tmp_path / "saved"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(rows[:24]),
            "test": datasets.Dataset.from_list(rows[24:]),
        }
    ).save_to_disk(str(folder))

    prepared = _prepare(tmp_path, folder, eval_split="test")

    assert sorted(_decoded(prepared.eval)) == sorted(_expected_text(row) for row in rows[24:])
    assert prepared.stats["train_pairs"] == 24


def test_eval_split_of_a_data_file_is_a_second_file(tmp_path: Path) -> None:
    rows = _rows(30)
    train = _write(rows[:20], tmp_path / "train.jsonl")
    held_out = _write(rows[20:], tmp_path / "eval.parquet")

    prepared = _prepare(tmp_path, train, eval_split=str(held_out))

    assert sorted(_decoded(prepared.eval)) == sorted(_expected_text(row) for row in rows[20:])
    assert prepared.stats["train_pairs"] == 20


def test_a_single_saved_dataset_has_no_named_eval_split(tmp_path: Path) -> None:
    folder = _write(_rows(), tmp_path / "saved")

    with pytest.raises(DataError, match="single saved Dataset has no splits"):
        _prepare(tmp_path, folder, eval_split="test")


def test_a_missing_split_names_the_ones_there(tmp_path: Path) -> None:
    folder = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(_rows())}).save_to_disk(str(folder))

    with pytest.raises(DataError, match="no split 'validation'; it has train"):
        _prepare(tmp_path, folder, eval_split="validation")


def test_unreadable_sources_are_reported(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file"):
        _prepare(tmp_path, tmp_path / "absent.jsonl")
    (tmp_path / "data.txt").write_text("count 1 2")
    with pytest.raises(DataError, match=r"unsupported file type '\.txt'"):
        _prepare(tmp_path, tmp_path / "data.txt")
    (tmp_path / "plain_folder").mkdir()
    with pytest.raises(DataError, match="save_to_disk folder"):
        _prepare(tmp_path, tmp_path / "plain_folder")


def test_an_unreachable_hub_id_is_reported_with_the_reason(tmp_path: Path) -> None:
    """conftest keeps the hub offline, as a cluster without egress would be."""
    with pytest.raises(DataError, match="data source 'someone/preferences' split 'train'"):
        _prepare(tmp_path, "someone/preferences")


def test_builtin_hold_out_never_trains_on_an_eval_prompt(tmp_path: Path) -> None:
    prepared = _prepare(tmp_path, "builtin:rule-following", max_eval_pairs=100)

    train_prompts = {tuple(ids) for ids in prepared.train.prompt_ids}
    eval_prompts = {tuple(ids) for ids in prepared.eval.prompt_ids}
    assert len(prepared.eval) == 100
    assert prepared.stats["train_pairs"] > 1500
    assert not train_prompts & eval_prompts


def test_pair_limits_take_a_seeded_sample(tmp_path: Path) -> None:
    source = _write(_rows(40), tmp_path / "data.jsonl")

    first = _prepare(tmp_path / "a", source, max_train_pairs=10, max_eval_pairs=3)
    again = _prepare(tmp_path / "b", source, max_train_pairs=10, max_eval_pairs=3)
    other_seed = _prepare(tmp_path / "c", source, max_train_pairs=10, max_eval_pairs=3, seed=1)

    assert (len(first.train), len(first.eval)) == (10, 3)
    assert _token_ids(first) == _token_ids(again)
    assert _token_ids(first) != _token_ids(other_seed)


# ---- cache -------------------------------------------------------------------------------------


def test_second_prepare_reuses_the_cached_build(tmp_path: Path) -> None:
    source = _write(_rows(), tmp_path / "data.jsonl")

    first = _prepare(tmp_path, source)
    second = _prepare(tmp_path, source)

    assert not first.from_cache and second.from_cache
    assert second.path == first.path and second.fingerprint == first.fingerprint
    assert _token_ids(second) == _token_ids(first)
    builds = [path.name for path in (tmp_path / "cache").iterdir() if path.name != "hf_datasets"]
    assert builds == [first.fingerprint]


@pytest.mark.parametrize(
    "change",
    [{"max_length": 48}, {"max_prompt_length": 16}, {"eval_fraction": 0.3}, {"seed": 3}],
    ids=lambda change: next(iter(change)),
)
def test_changing_what_shapes_the_tokens_changes_the_fingerprint(
    tmp_path: Path, change: dict[str, Any]
) -> None:
    source = _write(_rows(), tmp_path / "data.jsonl")

    before = _prepare(tmp_path, source)
    after = _prepare(tmp_path, source, **change)

    assert after.fingerprint != before.fingerprint and not after.from_cache


def test_editing_the_data_file_invalidates_the_cache(tmp_path: Path) -> None:
    rows = _rows()
    source = _write(rows, tmp_path / "data.jsonl")
    before = _prepare(tmp_path, source)

    rows[0]["chosen"] = rows[0]["rejected"]
    _write(rows, source)
    after = _prepare(tmp_path, source)

    assert after.fingerprint != before.fingerprint and not after.from_cache


def test_a_prepared_folder_loads_without_the_source(tmp_path: Path) -> None:
    source = _write(_rows(), tmp_path / "data.jsonl")
    prepared = _prepare(tmp_path, source)
    source.unlink()
    assert prepared.path is not None

    loaded = load_prepared(prepared.path)

    assert _token_ids(loaded) == _token_ids(prepared)
    assert loaded.stats == prepared.stats
    assert loaded.train.chosen_ids[-1] == loaded.train.chosen_ids[len(loaded.train) - 1]
    assert loaded.train.prompt_ids[1:3] == [loaded.train.prompt_ids[1], loaded.train.prompt_ids[2]]
    # negative indices and slices against the prepared ids as plain lists (read by iteration)
    prepared_prompts, prepared_chosen = _token_ids(prepared)[:2]
    assert loaded.train.chosen_ids[-1] == prepared_chosen[-1]
    assert loaded.train.prompt_ids[1:3] == prepared_prompts[1:3]
    assert loaded.train.prompt_ids[-3:] == prepared_prompts[-3:]
