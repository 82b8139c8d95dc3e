"""inspect_data (what `validate` runs): the data checked on a sample, nothing written; and the
same clear errors from prepare_data for broken files and wrong column names.

Sources are written to tmp_path; the tokenizer is the demo's (conftest keeps the hub offline).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import datasets
import pandas as pd
import pytest

from simpo_sweep.engine import demo
from simpo_sweep.engine.data import (
    SHAPE_STRINGS,
    DataError,
    DataProblems,
    inspect_data,
    prepare_data,
)
from simpo_sweep.spec.models import DataSpec, ModelSpec

Row = dict[str, Any]
MODEL = ModelSpec()
LENGTHS: dict[str, Any] = {"max_length": 64, "max_prompt_length": 24}


def _rows(count: int) -> list[Row]:
    return demo.demo_preference_rows("builtin:rule-following", count, seed=0)


def _jsonl(rows: list[Row], path: Path) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _spec(source: Path | str, **data: Any) -> DataSpec:
    return DataSpec(source=str(source), **{**LENGTHS, **data})


def _tree(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))


def _datasets_cache() -> list[str]:
    cache = Path(datasets.config.HF_DATASETS_CACHE)
    return _tree(cache) if cache.exists() else []


# ---- a good sample -----------------------------------------------------------------------------


def test_inspect_summarises_the_first_rows_and_writes_nothing(tmp_path: Path) -> None:
    source = _jsonl(_rows(300), tmp_path / "data.jsonl")
    before, cache_before = _tree(tmp_path), _datasets_cache()

    inspection = inspect_data(MODEL, _spec(source), sample_rows=50)

    summary = inspection.summary
    assert summary is not None
    assert (summary.rows_read, summary.sample_rows) == (50, 50)
    assert summary.pairs == 50 and summary.eval.pairs == 5
    assert summary.shape == SHAPE_STRINGS and summary.chat_template == "tokenizer's own"
    assert (
        summary.prompt_tokens.max == 11
    )  # "<s> <|user|> count up by 3 from 7 to 19 <|assistant|>"
    assert inspection.notes == (f"{source}: checked the first 50 of its 300 rows",)
    text = inspection.format()
    assert f"data: {source} (first 50 rows)" in text and "note: " in text
    assert _tree(tmp_path) == before and _datasets_cache() == cache_before


def test_inspect_reads_a_second_file_as_the_eval_split(tmp_path: Path) -> None:
    rows = _rows(40)
    train = _jsonl(rows[:30], tmp_path / "train.jsonl")
    held_out = tmp_path / "eval.parquet"
    pd.DataFrame(rows[30:]).to_parquet(held_out)

    inspection = inspect_data(MODEL, _spec(train, eval_split=str(held_out)))

    assert inspection.summary is not None
    assert (inspection.summary.train.rows, inspection.summary.eval.rows) == (30, 10)
    assert inspection.summary.rows_read == 40 and inspection.notes == ()


def test_inspect_reads_a_saved_dataset_dict(tmp_path: Path) -> None:
    rows = _rows(30)
    folder = tmp_path / "saved"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(rows[:24]),
            "test": datasets.Dataset.from_list(rows[24:]),
        }
    ).save_to_disk(str(folder))
    before = _tree(tmp_path)

    inspection = inspect_data(MODEL, _spec(folder, eval_split="test"), sample_rows=10)

    assert inspection.summary is not None
    assert (inspection.summary.train.rows, inspection.summary.eval.rows) == (10, 6)
    assert _tree(tmp_path) == before


def test_inspect_of_the_builtin_set() -> None:
    inspection = inspect_data(MODEL, DataSpec(), sample_rows=100)

    assert inspection.summary is not None and inspection.summary.rows_read == 100
    assert inspection.notes == ("builtin:rule-following: checked the first 100 of its 2000 rows",)


# ---- what cannot be read here ------------------------------------------------------------------


def test_a_hub_source_is_skipped_with_a_note_when_the_hub_is_off(tmp_path: Path) -> None:
    """conftest sets HF_HUB_OFFLINE, as on a machine without egress: no call is made."""
    inspection = inspect_data(MODEL, DataSpec(source="someone/preferences"))

    assert inspection.summary is None
    assert inspection.notes == (
        "hub data set someone/preferences split 'train' not checked: the hub is switched off "
        "here (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE)",
    )
    assert "not checked" in inspection.format()


def test_rows_are_still_checked_when_the_tokenizer_is_out_of_reach(tmp_path: Path) -> None:
    source = _jsonl(_rows(20), tmp_path / "data.jsonl")

    inspection = inspect_data(ModelSpec(name="someone/model"), _spec(source))

    assert inspection.summary is None
    assert inspection.rows_checked == 20 and inspection.shapes == {SHAPE_STRINGS: 20}
    assert "tokenizer 'someone/model' cannot be loaded here" in inspection.notes[0]


# ---- broken files ------------------------------------------------------------------------------


def test_a_broken_json_lines_file_names_every_broken_line(tmp_path: Path) -> None:
    lines = [json.dumps(row) for row in _rows(12)]
    lines[3] = lines[3][:-1]  # closing brace lost
    lines[8] = '["a", "list"]'
    source = tmp_path / "data.jsonl"
    source.write_text("\n".join(lines) + "\n")

    with pytest.raises(DataProblems) as raised:
        inspect_data(MODEL, _spec(source))

    assert raised.value.problems == [
        f"{source} line 4: Expecting ',' delimiter (column {len(lines[3]) + 1})",
        f"{source} line 9: a JSON Lines row must be an object, got list",
    ]


def test_prepare_names_the_broken_line_too(tmp_path: Path) -> None:
    lines = [json.dumps(row) for row in _rows(12)]
    lines[6] = lines[6].replace('"chosen":', '"chosen"')
    source = tmp_path / "data.jsonl"
    source.write_text("\n".join(lines) + "\n")

    with pytest.raises(DataError) as raised:
        prepare_data(MODEL, _spec(source), tmp_path / "cache")

    message = str(raised.value)
    assert message.startswith(f"{source} line 7: Expecting ':' delimiter")
    assert "cannot be read as json" not in message


def test_a_broken_json_document_names_its_line(tmp_path: Path) -> None:
    source = tmp_path / "data.json"
    text = json.dumps(_rows(3), indent=2)
    source.write_text(text.replace('"rejected"', "rejected", 1))
    broken_line = text.splitlines().index(
        next(line for line in text.splitlines() if '"rejected"' in line)
    )

    with pytest.raises(DataError, match=rf"data\.json line {broken_line + 1}: Expecting"):
        inspect_data(MODEL, _spec(source))


def test_a_json_file_of_json_lines_is_read_as_such(tmp_path: Path) -> None:
    source = _jsonl(_rows(20), tmp_path / "data.json")

    inspection = inspect_data(MODEL, _spec(source))

    assert inspection.summary is not None and inspection.summary.rows_read == 20


# ---- columns -----------------------------------------------------------------------------------


def _write(rows: list[Row], path: Path) -> Path:
    if path.suffix == ".jsonl":
        return _jsonl(rows, path)
    if path.suffix == ".csv":
        pd.DataFrame(rows).to_csv(path, index=False)
    elif path.suffix == ".parquet":
        pd.DataFrame(rows).to_parquet(path)
    else:
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("name", ["data.jsonl", "data.csv", "data.parquet", "saved"])
def test_a_wrong_column_name_lists_the_columns_and_the_nearest(tmp_path: Path, name: str) -> None:
    source = _write(_rows(12), tmp_path / name)
    spec = _spec(source, columns={"chosen": "chosen_response"})
    where = "the data set" if name == "saved" else "the file"
    expected = (
        f"{source}: column 'chosen_response' not in {where}; its columns are: prompt, chosen, "
        "rejected; nearest: chosen (data.columns.chosen)"
    )

    with pytest.raises(DataError) as inspected:
        inspect_data(MODEL, spec)
    with pytest.raises(DataError) as prepared:
        prepare_data(MODEL, spec, tmp_path / "cache")

    assert str(inspected.value) == str(prepared.value) == expected


def test_every_wrong_column_is_reported_at_once(tmp_path: Path) -> None:
    source = _jsonl(_rows(12), tmp_path / "data.jsonl")
    spec = _spec(source, columns={"prompt": "question", "rejected": "rejected_response"})

    with pytest.raises(DataProblems) as raised:
        inspect_data(MODEL, spec)

    problems = raised.value.problems
    assert len(problems) == 2
    assert "column 'rejected_response' not in the file" in problems[0]
    assert "nearest: rejected (data.columns.rejected)" in problems[0]
    assert "column 'question' not in the file" in problems[1]
    assert problems[1].endswith("(data.columns.prompt)")


# ---- rows --------------------------------------------------------------------------------------


def test_every_bad_row_of_the_sample_is_listed_with_its_line(tmp_path: Path) -> None:
    rows = _rows(20)
    rows[3].pop("chosen")
    rows[7]["rejected"] = 7
    rows[12]["chosen"] = [{"content": "1 2 3"}]
    lines = [json.dumps(row) for row in rows]
    lines.insert(5, "")  # a blank line: rows after it sit one line further down
    source = tmp_path / "data.jsonl"
    source.write_text("\n".join(lines) + "\n")

    with pytest.raises(DataProblems) as raised:
        inspect_data(MODEL, _spec(source))

    assert raised.value.problems == [
        f"row 3 (line 4): field 'chosen' is missing (in {source})",
        f"row 7 (line 9): field 'rejected' is not a string or a list of messages (got int) "
        f"(in {source})",
        f"row 12 (line 14): field 'chosen' message 0 has no 'role' (in {source})",
    ]
    assert str(raised.value).startswith("3 problems in the data:\n  row 3 (line 4)")


def test_csv_rows_name_their_lines_and_empty_cells_are_missing(tmp_path: Path) -> None:
    rows = _rows(10)
    rows[4]["chosen"] = ""
    source = _write(rows, tmp_path / "data.csv")

    with pytest.raises(DataError) as raised:
        inspect_data(MODEL, _spec(source))

    assert str(raised.value) == f"row 4 (line 6): field 'chosen' is missing (in {source})"


def test_many_bad_rows_are_listed_up_to_a_limit(tmp_path: Path) -> None:
    rows = [{**row, "chosen": None} for row in _rows(30)]
    source = _jsonl(rows, tmp_path / "data.jsonl")

    with pytest.raises(DataProblems) as raised:
        inspect_data(MODEL, _spec(source))

    assert len(raised.value.problems) == 30
    message = str(raised.value)
    assert message.startswith("30 problems in the data:")
    assert message.endswith("... and 10 more")
