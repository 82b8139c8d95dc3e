"""Property-based: any JSON row (wrong types, missing and extra fields, nested lists, huge and
empty strings, unicode, null) ends as a preference pair or as a DataError that names the row;
never an uncaught exception. Whole files go through `inspect_data` the way `validate` reads
them, tokenizer and chat template included.

CI runs a fixed number of examples with a fixed seed; a longer run:
    SIMPO_FUZZ_EXAMPLES=20000 python -m pytest tests/test_fuzz_data.py -q -s
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from conftest import FUZZ_COUNTS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from simpo_sweep.engine.data import DataError, inspect_data, normalize_row
from simpo_sweep.spec.models import DataColumns, DataSpec, ModelSpec

EXAMPLES = int(os.environ.get("SIMPO_FUZZ_EXAMPLES", "500"))
FUZZ = settings(
    max_examples=EXAMPLES,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
TRIED = FUZZ_COUNTS.setdefault("data fuzzing", {})  # printed at the end of the run

texts = st.one_of(
    st.text(max_size=30),
    st.sampled_from(["", " ", "\n\nHuman: hi\n\nAssistant: yo", "\n\nHuman:", "Assistant:"]),
    st.text(alphabet="ab ", min_size=5000, max_size=6000),  # huge strings
)
roles = st.sampled_from(["user", "assistant", "system", "human", "gpt", "tool", "", "USER"])
messages = st.fixed_dictionaries(
    {},
    optional={
        "role": st.one_of(roles, st.integers(), st.none()),
        "content": st.one_of(texts, st.integers(), st.none(), st.lists(texts, max_size=2)),
        "from": roles,
        "value": st.one_of(texts, st.none()),
    },
)
values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), texts, messages),
    lambda children: st.lists(children, max_size=4),
    max_leaves=8,
)
field_names = st.sampled_from(["prompt", "chosen", "rejected", "conversations", "extra", "score"])
rows = st.dictionaries(field_names, values, max_size=6)

ROW_NAMED = re.compile(r"row \d+")


def _check_row(row: dict[str, Any]) -> None:
    TRIED["rows"] = TRIED.get("rows", 0) + 1
    try:
        normalize_row(row, DataColumns(), index=7, location="fuzz.jsonl")
    except DataError as error:
        assert ROW_NAMED.search(str(error)), str(error)


@FUZZ
@given(rows)
def test_any_json_row_is_a_pair_or_an_error_naming_the_row(row: dict[str, Any]) -> None:
    _check_row(row)


@settings(
    max_examples=max(EXAMPLES // 10, 20),
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(st.lists(rows, min_size=1, max_size=5))
def test_any_jsonl_file_is_summarised_or_its_problems_named(file_rows: list[Any]) -> None:
    TRIED["files"] = TRIED.get("files", 0) + 1
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "pairs.jsonl"
        path.write_text("\n".join(json.dumps(row) for row in file_rows) + "\n")
        data = DataSpec(source=str(path), max_length=64, max_prompt_length=24)
        try:
            inspection = inspect_data(ModelSpec(), data)
        except DataError as error:
            assert "row" in str(error) or "line" in str(error) or str(path) in str(error), error
            return
        assert inspection.lines()
