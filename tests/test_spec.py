"""Spec validation: every rule has its message, its key path and its line; overrides; space;
how a staged search carries each stage's best into the next, and how trials rank (no Ray)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from simpo_sweep.cli import main
from simpo_sweep.service.results import (
    STATE_COMPLETED,
    STATE_DEGENERATE,
    STATE_FAILED,
    STATE_STOPPED_EARLY,
    STATE_UNFINISHED,
    TrialRow,
    best_row,
    rank_rows,
    write_results,
)
from simpo_sweep.service.sweep import next_stage_spec
from simpo_sweep.spec.loading import Problem, SpecError, check_resources, parse_spec
from simpo_sweep.spec.models import LogUniformDomain, SweepSpec, UniformDomain
from simpo_sweep.spec.space import (
    NOT_APPLICABLE,
    count_trials,
    flat_params,
    grid_points,
    rounded_sample,
    searchable_paths,
    searched_keys,
    stage_specs,
    trial_config,
)

SEARCH_SPACES = Path(__file__).parent.parent / "search_spaces"


def problems_of(text: str, overrides: tuple[str, ...] = ()) -> list[Problem]:
    with pytest.raises(SpecError) as raised:
        parse_spec(text, "spec.yaml", overrides)
    return raised.value.problems


def only_problem(text: str) -> Problem:
    problems = problems_of(text)
    assert len(problems) == 1, problems
    return problems[0]


def test_unknown_key_names_the_nearest_valid_key_and_line() -> None:
    problem = only_problem("name: s\ntraining:\n  learning_rat: 0.1\n")
    assert problem.path == "training.learning_rat"
    assert problem.line == 3
    assert "did you mean 'learning_rate'" in problem.message


def test_unknown_section() -> None:
    problem = only_problem("name: s\nmodle:\n  name: x\n")
    assert (problem.path, problem.line) == ("modle", 2)
    assert "did you mean 'model'" in problem.message


def test_wrong_type() -> None:
    problem = only_problem("name: s\ntraining:\n  max_steps: lots\n")
    assert (problem.path, problem.line) == ("training.max_steps", 3)
    assert "integer" in problem.message and "'lots'" in problem.message


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("beta", 0, "greater than 0"),
        ("beta", -2, "greater than 0"),
        ("label_smoothing", 0.7, "less than or equal to 0.5"),
        ("label_smoothing", -0.1, "greater than or equal to 0"),
        ("sft_weight", -1, "greater than or equal to 0"),
        ("gamma_beta_ratio", -0.5, "greater than or equal to 0"),
        ("loss_type", "ipo", "'sigmoid' or 'hinge'"),
    ],
)
def test_impossible_simpo_values(field: str, value: object, expected: str) -> None:
    problem = only_problem(f"name: s\nsimpo:\n  {field}: {value}\n")
    assert (problem.path, problem.line) == (f"simpo.{field}", 3)
    assert expected in problem.message


@pytest.mark.parametrize(
    ("domain", "expected"),
    [
        ("{type: uniform, low: 0.5, high: 0.1}", "low (0.5) must be below high (0.1)"),
        ("{type: loguniform, low: 0, high: 1}", "log-uniform bounds must be > 0"),
        ("{type: loguniform, low: -1, high: 1}", "log-uniform bounds must be > 0"),
        ("{type: int, low: 3, high: 3}", "must be below high"),
        ("{type: choice, values: []}", "at least 1 item"),
    ],
)
def test_impossible_ranges(domain: str, expected: str) -> None:
    problem = only_problem(f"name: s\nsearch:\n  space:\n    sft_weight: {domain}\n")
    assert problem.path.startswith("search.space.sft_weight")
    assert problem.line == 4
    assert expected in problem.message


@pytest.mark.parametrize(
    ("key", "domain", "expected"),
    [
        ("beta", "{type: uniform, low: 0, high: 5}", "value 0.0 is impossible for simpo.beta"),
        ("label_smoothing", "{type: uniform, low: 0, high: 0.9}", "0.9 is impossible"),
        ("gamma_beta_ratio", "{type: grid, values: [-1, 0.5]}", "-1 is impossible"),
        ("loss_type", "{type: choice, values: [sigmoid, ipo]}", "'ipo' is impossible"),
        ("learning_rate", "{type: uniform, low: 0, high: 0.1}", "is impossible for training"),
    ],
)
def test_domain_values_must_be_valid_for_their_field(key: str, domain: str, expected: str) -> None:
    problem = only_problem(f"name: s\nsearch:\n  space:\n    {key}: {domain}\n")
    assert problem.path == f"search.space.{key}"
    assert expected in problem.message


def test_unknown_space_key() -> None:
    problem = only_problem("name: s\nsearch:\n  space:\n    betta: {type: choice, values: [1]}\n")
    assert problem.path == "search.space.betta"
    assert "not a searchable config field; did you mean 'beta'?" in problem.message


def test_every_problem_is_reported_at_once() -> None:
    text = """name: s
training:
  max_steps: -3
  learning_rat: 0.1
simpo:
  beta: 0
search:
  space:
    sft_weight: {type: uniform, low: 0.5, high: 0.1}
  scheduler: {type: asha, grace_period: 0}
"""
    paths = {problem.path for problem in problems_of(text)}
    assert paths == {
        "training.max_steps",
        "training.learning_rat",
        "simpo.beta",
        "search.space.sft_weight",
        "search.scheduler.grace_period",
    }


def test_gamma_and_gamma_beta_ratio_are_never_mixed() -> None:
    problem = only_problem("name: s\nsimpo:\n  gamma: 1.0\n  gamma_beta_ratio: 0.5\n")
    assert problem.path == "simpo"
    assert "not both" in problem.message


@pytest.mark.parametrize("key", ["gamma", "simpo.gamma"])
@pytest.mark.parametrize("where", ["space", "stage"])
def test_absolute_gamma_cannot_be_searched(key: str, where: str) -> None:
    """gamma is converted to gamma_beta_ratio when the spec is read: a sampled gamma would
    reach no trial, so searching it is refused, pointing at gamma_beta_ratio."""
    domain = "{type: uniform, low: 0.5, high: 2.0}"
    if where == "space":
        text = f"name: s\nsearch:\n  space:\n    {key}: {domain}\n"
        path, line = f"search.space.{key}", 4
    else:
        text = (
            f"name: s\nsearch:\n  stages:\n    - name: g\n      space:\n        {key}: {domain}\n"
        )
        path, line = f"search.stages.0.space.{key}", 6
    problem = only_problem(text)
    assert (problem.path, problem.line) == (path, line)
    assert "cannot be searched" in problem.message
    assert "search gamma_beta_ratio instead (gamma = gamma_beta_ratio * beta)" in problem.message
    assert "simpo.gamma" not in searchable_paths()
    assert "simpo.gamma_beta_ratio" in searchable_paths()


def test_absolute_gamma_is_converted_and_never_carried_further() -> None:
    spec = parse_spec("name: s\nsimpo:\n  beta: 2.5\n  gamma: 1.25\n")
    assert spec.simpo.gamma_beta_ratio == pytest.approx(0.5)
    assert spec.simpo.gamma is None
    assert "gamma" not in spec.model_dump()["simpo"]
    # A searched gamma_beta_ratio wins over the converted fixed value.
    config = trial_config(spec, {"simpo.gamma_beta_ratio": 0.8})
    assert config.simpo.gamma_beta_ratio == 0.8
    assert "gamma" not in flat_params(config) and flat_params(config)["gamma_beta_ratio"] == 0.8


def test_grace_period_longer_than_training() -> None:
    problem = only_problem(
        "name: s\ntraining: {max_steps: 50}\nsearch:\n  scheduler: {type: asha, grace_period: 80}\n"
    )
    assert "no trial could ever be stopped" in problem.message


def test_a_token_budget_below_the_longest_pair_is_refused() -> None:
    problem = only_problem(
        "name: s\ndata: {max_length: 512}\ntraining: {max_tokens_per_batch: 1000}\n"
    )
    assert "2 x data.max_length = 1024" in problem.message
    assert only_problem("name: s\ntraining: {max_tokens_per_batch: 0}\n").path == (
        "training.max_tokens_per_batch"
    )
    spec = parse_spec("name: s\ndata: {max_length: 512}\ntraining: {max_tokens_per_batch: 8192}\n")
    assert spec.training.max_tokens_per_batch == 8192


def test_searched_budgets_and_lengths_are_checked_at_their_hardest_pairing() -> None:
    """Each value is fine alone; the smallest budget with the longest length is not."""
    space = (
        "name: s\ndata: {max_prompt_length: 64}\nsearch:\n  space:\n"
        "    max_tokens_per_batch: {type: choice, values: [300, 4096]}\n"
        "    data.max_length: {type: choice, values: [128, 256]}\n"
    )
    problem = only_problem(space)
    assert "(300) is below the longest pair: 2 x data.max_length = 512" in problem.message
    assert "the smallest budget and longest length the search allows" in problem.message
    assert parse_spec(space.replace("[300, 4096]", "[512, 4096]")).search.space


def test_grid_domains_need_grid_or_random() -> None:
    problem = only_problem(
        "name: s\nsearch:\n  algorithm: optuna\n  space:\n    beta: {type: grid, values: [1, 2]}\n"
    )
    assert "grid domains need algorithm grid or random" in problem.message


def test_fractional_gpus_only_for_single_worker_trials() -> None:
    problem = only_problem("name: s\nresources: {num_workers: 2, gpus_per_worker: 0.5}\n")
    assert "fractional gpus_per_worker works for single-worker trials only" in problem.message


def test_not_yaml() -> None:
    problem = only_problem("name: s\ntraining: [unclosed\n")
    assert "not valid YAML" in problem.message


def test_overrides_apply_before_validation() -> None:
    spec = parse_spec("name: s\n", overrides=("search.num_samples=6", "simpo.beta=4.5"))
    assert spec.search.num_samples == 6
    assert spec.simpo.beta == 4.5
    assert problems_of("name: s\n", ("simpo.beta=-1",))[0].path == "simpo.beta"


def test_resources_the_cluster_can_never_satisfy() -> None:
    spec = SweepSpec(
        name="s", resources={"num_workers": 2, "cpus_per_worker": 4, "gpus_per_worker": 1}
    )
    problems = check_resources(spec, {"CPU": 2, "GPU": 0}, "this machine")
    messages = " | ".join(problem.message for problem in problems)
    assert "4 CPUs per worker, but the largest node of this machine has 2" in messages
    assert "1 GPUs per worker, but the largest node of this machine has 0" in messages
    assert check_resources(SweepSpec(name="s"), {"CPU": 2, "GPU": 0}, "here") == []


def test_grid_size_times_samples_with_ineffective_knobs_collapsed() -> None:
    spec = parse_spec(
        """name: s
search:
  algorithm: grid
  num_samples: 2
  space:
    loss_type: {type: grid, values: [sigmoid, hinge]}
    label_smoothing: {type: grid, values: [0.0, 0.1, 0.2]}
"""
    )
    # sigmoid x 3 smoothings + hinge once (label smoothing means nothing for hinge)
    assert len(grid_points(spec)) == 4
    assert count_trials(spec) == 8


def test_trial_config_applies_sampled_values_and_drops_ineffective_knobs() -> None:
    spec = SweepSpec(name="s")
    config = trial_config(
        spec,
        {"simpo.loss_type": "hinge", "simpo.label_smoothing": 0.2, "training.learning_rate": 3e-4},
    )
    assert config.simpo.loss_type == "hinge"
    assert config.simpo.label_smoothing == 0.0
    assert config.training.learning_rate == 3e-4
    params = flat_params(config)
    assert params["beta"] == 2.0 and params["learning_rate"] == 3e-4
    assert params["model.name"] == "builtin:tiny-llama"


def test_a_knob_without_effect_is_logged_as_not_applicable_but_trains_as_zero() -> None:
    """Under hinge, label_smoothing means nothing: the params say n/a (a 0.0 there would plot as
    a setting in parallel coordinates); the config the trial trains with keeps 0.0."""
    spec = SweepSpec(name="s", simpo={"label_smoothing": 0.1})
    hinge = trial_config(spec, {"simpo.loss_type": "hinge", "simpo.label_smoothing": 0.2})
    assert hinge.simpo.label_smoothing == 0.0
    assert flat_params(hinge)["label_smoothing"] == NOT_APPLICABLE == "n/a"
    sigmoid = trial_config(spec, {"simpo.loss_type": "sigmoid", "simpo.label_smoothing": 0.2})
    assert flat_params(sigmoid)["label_smoothing"] == 0.2
    assert flat_params(trial_config(spec, {}))["label_smoothing"] == 0.1  # sigmoid by default


def uniform(low: float, high: float, q: float | None = None) -> UniformDomain:
    return UniformDomain(type="uniform", low=low, high=high, q=q)


@pytest.mark.parametrize(
    ("value", "domain", "expected"),
    [
        (0.6000000000000001, uniform(0.0, 1.0), 0.6),
        (1.8612345, uniform(1.0, 10.0), 1.861),
        (0.0012345678901, LogUniformDomain(type="loguniform", low=1e-4, high=3e-3), 0.001235),
        (9.99991, uniform(1.0, 10.0), 10.0),
        # The nearest 4-digit value lies past a bound written with more digits: round inwards.
        (0.1234599, uniform(0.0, 0.123456), 0.1234),
        (0.12344, uniform(0.12343, 0.2), 0.1235),
        # No 4-digit value inside the bounds at all: the bound itself.
        (0.123433, uniform(0.123431, 0.123436), 0.123436),
        # Quantised: the grid's own digits, which keeps the value on its grid (Optuna's grid
        # is low + k*q; Tune's k*q), the float noise gone.
        (0.35000000000000003, uniform(0.0, 1.0, q=0.05), 0.35),
        (0.07500000000000001, uniform(0.025, 1.025, q=0.05), 0.075),
        (12.345000000000001, uniform(0.0, 100.0, q=0.001), 12.345),
        (
            3.4999999999999995e-06,
            LogUniformDomain(type="loguniform", low=1e-7, high=1e-5, q=1e-7),
            3.5e-06,
        ),
    ],
)
def test_sampled_floats_are_rounded_inside_their_bounds(
    value: float, domain: UniformDomain | LogUniformDomain, expected: float
) -> None:
    rounded = rounded_sample(value, domain)
    assert rounded == expected and repr(rounded) == repr(expected)
    assert domain.low <= rounded <= domain.high


@pytest.mark.parametrize("path", sorted(SEARCH_SPACES.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_specs_validate(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec_resources = parse_spec(path.read_text(), str(path)).resources
    if spec_resources.gpus_per_worker or spec_resources.cpus_per_worker > 2:
        parse_spec(path.read_text(), str(path))  # cluster specs: the file itself is valid
        return
    assert main(["validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert "spec OK" in out and "trials:" in out
    # Every shipped spec searches something, a staged one in its stages.
    assert "nothing searched" not in out
    for searched in searched_keys(parse_spec(path.read_text(), str(path))):
        assert searched in out


def test_validate_command_exit_code_and_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = tmp_path / "bad.yaml"
    spec.write_text("name: s\nsimpo:\n  beta: 0\n")
    assert main(["validate", str(spec)]) == 2
    assert "line 3: simpo.beta: Input should be greater than 0" in capsys.readouterr().err


def trial_row(trial_id: str, sampled: dict[str, Any], metric: float | None, state: str) -> TrialRow:
    """A row as trial_rows builds it: `sampled` holds the stage's searched knobs, by full path."""
    return TrialRow(
        trial_id=trial_id,
        state=state,
        step=20,
        metric=metric,
        diagnosis="",
        params={},
        sampled=sampled,
    )


def test_staged_search_carries_every_earlier_winner_into_the_last_stage_and_best_config(
    tmp_path: Path,
) -> None:
    """Each stage runs from the best of the one before, and that one's values already hold the
    winners before it: stage 1's learning rate reaches stage 3 and best_config.yaml."""
    spec = parse_spec((SEARCH_SPACES / "staged-lr-gamma-beta.yaml").read_text())
    assert searched_keys(spec) == [
        "training.learning_rate",
        "simpo.gamma_beta_ratio",
        "simpo.beta",
    ]
    default_learning_rate = spec.training.learning_rate
    finished_stages = [
        {"training.learning_rate": (3.0e-4, 3.0e-3)},
        {"simpo.gamma_beta_ratio": (1.0, 0.0)},
        {"simpo.beta": (5.0, 10.0)},
    ]
    stage_spec, rows = spec, []
    ran_with = []
    for index, (stage, knob) in enumerate(zip(stage_specs(spec), finished_stages, strict=True)):
        # As run_sweep does: the stage's spec from the one before and that one's trial rows.
        stage_spec = next_stage_spec(stage, stage_spec, rows)
        ran_with.append(stage_spec)
        ((path, (worse, better)),) = knob.items()
        rows = rank_rows(
            stage_spec,
            [
                trial_row(f"s{index}-worse", {path: worse}, 0.6, STATE_COMPLETED),
                trial_row(f"s{index}-better", {path: better}, 0.9, STATE_COMPLETED),
            ],
        )
    first, second, third = ran_with
    assert first.search.space == stage_specs(spec)[0].search.space
    assert first.training.learning_rate == default_learning_rate
    assert second.training.learning_rate == 3.0e-3
    assert (third.training.learning_rate, third.simpo.gamma_beta_ratio) == (3.0e-3, 0.0)
    assert third.simpo.beta == spec.simpo.beta  # stage 3 searches it; not yet decided
    assert third.search.space == stage_specs(spec)[2].search.space and third.search.stages == []

    files = write_results(stage_spec, rows, tmp_path)
    best = SweepSpec.model_validate(yaml.safe_load(files["best_config.yaml"].read_text()))
    assert (best.training.learning_rate, best.simpo.gamma_beta_ratio, best.simpo.beta) == (
        3.0e-3,
        0.0,
        10.0,
    )
    assert best.search.space == {} and best.search.stages == []


def test_a_stage_without_a_usable_trial_keeps_the_winners_before_it() -> None:
    spec = parse_spec((SEARCH_SPACES / "staged-lr-gamma-beta.yaml").read_text())
    first, second, third = stage_specs(spec)
    stage_one = next_stage_spec(first, spec, [])
    stage_two = next_stage_spec(
        second,
        stage_one,
        [trial_row("lr", {"training.learning_rate": 3.0e-3}, 0.9, STATE_COMPLETED)],
    )
    failed = [trial_row("g", {"simpo.gamma_beta_ratio": 1.0}, None, STATE_FAILED)]
    stage_three = next_stage_spec(third, stage_two, failed)
    assert stage_three.training.learning_rate == 3.0e-3
    assert stage_three.simpo.gamma_beta_ratio == spec.simpo.gamma_beta_ratio


@pytest.mark.parametrize("mode", ["max", "min"])
def test_ranking_puts_failed_degenerate_and_metricless_trials_last(mode: str) -> None:
    spec = SweepSpec(name="s", search={"mode": mode})
    rows = [
        trial_row("failed", {}, 0.99 if mode == "max" else 0.01, STATE_FAILED),
        trial_row("degenerate", {}, 0.98 if mode == "max" else 0.02, STATE_DEGENERATE),
        trial_row("no-metric", {}, None, STATE_COMPLETED),
        trial_row("good", {}, 0.7 if mode == "max" else 0.3, STATE_COMPLETED),
        trial_row("interrupted", {}, 0.8 if mode == "max" else 0.2, STATE_UNFINISHED),
        trial_row("stopped", {}, 0.5, STATE_STOPPED_EARLY),
    ]
    ranked = [row.trial_id for row in rank_rows(spec, rows)]
    # An interrupted trial's metric is a real evaluation of the steps it ran: it ranks by it.
    assert ranked[:3] == ["interrupted", "good", "stopped"]
    assert set(ranked[3:]) == {"failed", "degenerate", "no-metric"}
    best = best_row(rank_rows(spec, rows))
    assert best is not None and best.trial_id == "interrupted"


def test_lora_fields_are_searchable_like_any_other() -> None:
    text = (
        "name: lora\nmodel: {lora: {r: 8}}\nsearch:\n  space:\n"
        "    model.lora.r: {type: choice, values: [4, 16]}\n"
        "    model.lora.alpha: {type: choice, values: [8, 32]}\n"
    )
    spec = parse_spec(text)
    assert searched_keys(spec) == ["model.lora.r", "model.lora.alpha"]
    resolved = trial_config(spec, {"model.lora.r": 16, "model.lora.alpha": 8})
    assert resolved.model.lora is not None
    assert (resolved.model.lora.r, resolved.model.lora.alpha) == (16, 8)
    assert flat_params(resolved)["model.lora.r"] == 16
    # An impossible rank is refused where it is written, like any other knob.
    with pytest.raises(SpecError, match=r"model\.lora\.r: value 0 is impossible"):
        parse_spec(text.replace("values: [4, 16]", "values: [0, 16]"))
    with pytest.raises(SpecError, match="not a searchable config field"):
        parse_spec(text.replace("model.lora.r:", "model.lora.rank:"))
