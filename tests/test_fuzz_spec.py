"""Property-based: whatever document a user feeds the spec loader, it ends as a valid spec or as
a SpecError whose every problem names where it is; never as an uncaught exception.

CI runs a fixed number of examples with a fixed seed (derandomized); a longer run:
    SIMPO_FUZZ_EXAMPLES=20000 python -m pytest tests/test_fuzz_spec.py -q -s
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import FUZZ_COUNTS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from simpo_sweep.spec.loading import SpecError, parse_spec
from simpo_sweep.spec.models import SweepSpec

SHIPPED = sorted((Path(__file__).resolve().parent.parent / "search_spaces").glob("*.yaml"))
EXAMPLES = int(os.environ.get("SIMPO_FUZZ_EXAMPLES", "300"))
FUZZ = settings(
    max_examples=EXAMPLES,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)
TRIED = FUZZ_COUNTS.setdefault("spec fuzzing", {})  # printed at the end of the run

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**12), max_value=10**12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.sampled_from(["", "grid", "uniform", "loguniform", "choice", "int", "asha", "none"]),
)
documents = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.text(max_size=12), children, max_size=4),
    ),
    max_leaves=20,
)


def _check(text: str, kind: str) -> None:
    TRIED[kind] = TRIED.get(kind, 0) + 1
    try:
        spec = parse_spec(text, "fuzzed.yaml")
    except SpecError as error:
        assert error.problems, text
        for problem in error.problems:
            assert problem.message.strip(), (text, problem)
            # A problem names its key, or its line, or is about the whole document.
            assert problem.path or problem.line is not None or "spec" in str(problem), problem
        return
    assert isinstance(spec, SweepSpec)


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix] if prefix else []
    if isinstance(node, dict):
        for key, value in node.items():
            found += _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += _paths(value, (*prefix, index))
    return found


def _parent(document: Any, path: tuple[Any, ...]) -> Any:
    for part in path[:-1]:
        document = document[part]
    return document


@st.composite
def mutated_specs(draw: st.DrawFn) -> str:
    """A shipped spec with values replaced by other types, keys deleted or misspelt, or its
    text cut short."""
    source = draw(st.sampled_from(SHIPPED))
    text = source.read_text()
    if draw(st.integers(0, 9)) == 0:
        return text[: draw(st.integers(0, len(text)))]
    document = copy.deepcopy(yaml.safe_load(text))
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(document)
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = _parent(document, path)
        action = draw(st.sampled_from(["replace", "delete", "misspell"]))
        if action == "replace":
            parent[path[-1]] = draw(documents)
        elif action == "delete" and isinstance(parent, dict):
            del parent[path[-1]]
        elif action == "misspell" and isinstance(parent, dict):
            key = path[-1]
            parent[f"{key}{draw(st.sampled_from(['s', '_', 'x']))}"] = parent.pop(key)
    return yaml.safe_dump(document, sort_keys=False)


@FUZZ
@given(documents)
def test_any_yaml_document_is_a_spec_or_named_problems(document: Any) -> None:
    _check(yaml.safe_dump(document), "yaml documents")


@FUZZ
@given(st.text(max_size=200))
def test_any_text_is_a_spec_or_named_problems(text: str) -> None:
    _check(text, "raw texts")


@FUZZ
@given(mutated_specs())
def test_any_mutation_of_a_shipped_spec_is_a_spec_or_named_problems(text: str) -> None:
    _check(text, "mutated shipped specs")


def test_the_known_crash_a_number_for_a_section_with_a_searched_knob() -> None:
    text = (
        "name: t\ntraining: 3.5\nsearch:\n  space:\n"
        "    learning_rate: {type: loguniform, low: 1.0e-4, high: 1.0e-2}\n"
    )
    with pytest.raises(SpecError, match="training"):
        parse_spec(text)
