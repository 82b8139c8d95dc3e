"""Spec search -> Ray Tune, without a Ray cluster: what the random/grid generator and Optuna
actually draw. Sampled floats reach the trial rounded to 4 significant digits (a quantised
domain: on its grid), inside their domain's bounds; ints and choices are drawn as they are."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import numpy as np
import pytest
from ray import tune
from ray.tune.search import Searcher
from ray.tune.search.variant_generator import generate_variants

from simpo_sweep.service.search import param_space, search_algorithm
from simpo_sweep.spec.models import (
    ChoiceDomain,
    IntDomain,
    LogUniformDomain,
    SweepSpec,
    UniformDomain,
)
from simpo_sweep.spec.space import SIGNIFICANT_DIGITS, resolve_key, rounded_sample

METRIC = "eval/rewards/accuracies"


def significant_digits(value: float) -> int:
    """Digits of the shortest decimal that reads back as `value` (what MLflow and YAML show)."""
    return len(Decimal(repr(value)).normalize().as_tuple().digits)


def spec_with_space(algorithm: str, space: dict[str, Any], seed: int = 3) -> SweepSpec:
    return SweepSpec.model_validate(
        {
            "name": "s",
            "search": {"algorithm": algorithm, "num_samples": 40, "seed": seed, "space": space},
        }
    )


# Bounds Tune accepts for its quantised domains (multiples of q).
TUNE_SPACE: dict[str, Any] = {
    "learning_rate": {"type": "loguniform", "low": 1.0e-4, "high": 3.0e-3},
    "beta": {"type": "uniform", "low": 1.0, "high": 10.0},
    "gamma_beta_ratio": {"type": "uniform", "low": 0.0, "high": 1.0, "q": 0.05},
    "warmup_ratio": {"type": "loguniform", "low": 0.01, "high": 0.3, "q": 0.01},
    "loss_type": {"type": "choice", "values": ["sigmoid", "hinge"]},
    "label_smoothing": {"type": "uniform", "low": 0.05, "high": 0.3},
    "batch_size": {"type": "int", "low": 2, "high": 16},
}


def assert_drawn_as_the_spec_says(spec: SweepSpec, config: dict[str, Any]) -> None:
    for key, domain in spec.search.space.items():
        value = config.get(resolve_key(key))
        if value is None:  # label_smoothing under hinge
            assert key == "label_smoothing" and config["simpo.loss_type"] == "hinge"
            continue
        if isinstance(domain, IntDomain):
            assert type(value) is int and domain.low <= value <= domain.high
        elif isinstance(domain, UniformDomain | LogUniformDomain):
            assert type(value) is float
            assert domain.low <= value <= domain.high, (key, value)
            # No float noise (0.6000000000000001) on a grid either: these grids need <= 4 digits.
            assert significant_digits(value) <= SIGNIFICANT_DIGITS, (key, value)
            if domain.q:
                grid_index = (value - domain.low) / domain.q
                assert abs(grid_index - round(grid_index)) < 1e-9, (key, value)
        elif isinstance(domain, ChoiceDomain):
            assert value in domain.values
        else:
            raise AssertionError(f"{key}: no such domain in these tests")


def random_search_draws(spec: SweepSpec) -> list[dict[str, Any]]:
    """As BasicVariantGenerator draws: a fresh space, one seeded generator across samples."""
    space = param_space(spec, spec.search)
    generator = np.random.default_rng(spec.search.seed)
    return [
        config
        for _ in range(spec.search.num_samples)
        for _, config in generate_variants(space, random_state=generator)
    ]


def test_random_search_draws_rounded_floats_inside_their_bounds() -> None:
    spec = spec_with_space("random", TUNE_SPACE)
    draws = random_search_draws(spec)
    for config in draws:
        assert_drawn_as_the_spec_says(spec, config)
    # Rounding did not collapse the draws: 40 distinct learning rates, both loss types.
    assert len({config["training.learning_rate"] for config in draws}) == len(draws)
    assert {config["simpo.loss_type"] for config in draws} == {"sigmoid", "hinge"}
    assert any(config["simpo.label_smoothing"] is not None for config in draws)
    assert random_search_draws(spec) == draws  # same seed, same trials


def test_rounding_draws_the_same_random_numbers_as_the_plain_tune_domain() -> None:
    """A seeded search draws the trials it drew before rounding existed, only rounded."""
    spec = spec_with_space("random", {"beta": TUNE_SPACE["beta"]})
    domain = UniformDomain(type="uniform", low=1.0, high=10.0)
    assert spec.search.space["beta"] == domain
    rounded = param_space(spec, spec.search)["simpo.beta"]
    plain = tune.uniform(1.0, 10.0)
    rounded_rng, plain_rng = np.random.default_rng(7), np.random.default_rng(7)
    for _ in range(50):
        exact = plain.sample(random_state=plain_rng)
        assert rounded.sample(random_state=rounded_rng) == rounded_sample(exact, domain)
        assert significant_digits(exact) > SIGNIFICANT_DIGITS  # there was something to round


def test_grid_search_rounds_its_sampled_domains_and_keeps_grid_values_as_written() -> None:
    spec = spec_with_space(
        "grid",
        {
            "learning_rate": {"type": "grid", "values": [1.0e-3, 3.0e-4]},
            "beta": TUNE_SPACE["beta"],
        },
    )
    draws = random_search_draws(spec)
    assert {config["grid"]["training.learning_rate"] for config in draws} == {1.0e-3, 3.0e-4}
    for config in draws:
        assert significant_digits(config["simpo.beta"]) <= SIGNIFICANT_DIGITS
        assert 1.0 <= config["simpo.beta"] <= 10.0


def test_optuna_trials_get_rounded_floats_and_the_study_goes_on() -> None:
    """Through Tune's OptunaSearch (the define-by-run space's returned config is what the trial
    gets), with a grid that starts off zero: Optuna's grid is low + k * q."""
    space = {
        **{key: domain for key, domain in TUNE_SPACE.items() if key != "gamma_beta_ratio"},
        "gamma_beta_ratio": {"type": "uniform", "low": 0.025, "high": 1.025, "q": 0.05},
    }
    spec = spec_with_space("optuna", space)
    searcher = search_algorithm(spec, spec.search)
    assert isinstance(searcher, Searcher)
    configs = []
    for index in range(12):
        trial_id = f"trial_{index}"
        config = searcher.suggest(trial_id)
        assert isinstance(config, dict)
        assert_drawn_as_the_spec_says(spec, config)
        if config["simpo.loss_type"] == "hinge":
            assert "simpo.label_smoothing" not in config
        searcher.on_trial_complete(trial_id, {METRIC: 0.5 + 0.01 * index})
        configs.append(config)
    assert {config["simpo.loss_type"] for config in configs} == {"sigmoid", "hinge"}


@pytest.mark.parametrize("seed", [0, 1])
def test_optuna_with_a_seed_suggests_the_same_trials(seed: int) -> None:
    spec = spec_with_space("optuna", TUNE_SPACE, seed=seed)

    def suggestions() -> list[Any]:
        searcher = search_algorithm(spec, spec.search)
        assert isinstance(searcher, Searcher)
        found = []
        for index in range(4):
            found.append(searcher.suggest(f"trial_{index}"))
            searcher.on_trial_complete(f"trial_{index}", {METRIC: 0.1 * index})
        return found

    assert suggestions() == suggestions()
