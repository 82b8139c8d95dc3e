"""Spec search settings -> Ray Tune: param space, search algorithm, scheduler.

Tune's config keys are the full config paths (`simpo.beta`); grid points (deduplicated, with
knobs that have no effect collapsed) arrive as one dict under `grid`. A knob that only matters
for one loss_type is left unsampled (None) when the trial's loss_type is another. Sampled floats
are rounded as they are drawn (spec.space.rounded_sample), by every algorithm, so what a trial
trains with is what MLflow and best_config.yaml show; grid and choice values stay as written.
"""

from __future__ import annotations

from copy import copy
from typing import Any

import numpy as np
import optuna
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search import BasicVariantGenerator, Searcher
from ray.tune.search.optuna import OptunaSearch
from ray.tune.search.sample import Domain, Sampler

from simpo_sweep.spec.models import (
    ChoiceDomain,
    GridDomain,
    IntDomain,
    LogUniformDomain,
    SearchSpec,
    SweepSpec,
    UniformDomain,
)
from simpo_sweep.spec.space import ONLY_FOR_LOSS_TYPE, grid_points, resolve_key, rounded_sample

LOSS_TYPE = "simpo.loss_type"


class RoundedFloats(Sampler):
    """Wraps a Tune float sampler: every draw rounded as `rounded_sample` rounds it.

    The wrapped sampler draws from the same random state as it would alone, so a seeded search
    still draws the same trials, only rounded.
    """

    def __init__(self, sampler: Sampler, domain: UniformDomain | LogUniformDomain):
        self.sampler = sampler
        self.domain = domain

    def get_sampler(self) -> Sampler:
        return self.sampler

    def sample(
        self,
        domain: Domain,
        config: Any = None,
        size: int = 1,
        random_state: Any = None,
    ) -> float | list[float]:
        drawn = self.sampler.sample(domain, config, size, random_state=random_state)
        if isinstance(drawn, list | np.ndarray):
            return [rounded_sample(float(value), self.domain) for value in drawn]
        return rounded_sample(float(drawn), self.domain)

    def __str__(self) -> str:
        return f"{self.sampler} rounded"


def _float_domain(domain: UniformDomain | LogUniformDomain) -> Domain:
    if isinstance(domain, LogUniformDomain):
        drawn = (
            tune.qloguniform(domain.low, domain.high, domain.q)
            if domain.q
            else tune.loguniform(domain.low, domain.high)
        )
    else:
        drawn = (
            tune.quniform(domain.low, domain.high, domain.q)
            if domain.q
            else tune.uniform(domain.low, domain.high)
        )
    rounded = copy(drawn)
    rounded.set_sampler(RoundedFloats(drawn.get_sampler(), domain), allow_override=True)
    return rounded


def _tune_domain(domain: Any) -> Any:
    if isinstance(domain, ChoiceDomain):
        return tune.choice(domain.values)
    if isinstance(domain, UniformDomain | LogUniformDomain):
        return _float_domain(domain)
    if isinstance(domain, IntDomain):
        if domain.q:
            return tune.qrandint(domain.low, domain.high, domain.q)
        return tune.randint(domain.low, domain.high + 1)  # randint's upper bound is exclusive
    raise TypeError(f"no Tune domain for {domain!r}")


def _loss_type_of(config: dict[str, Any], fixed: str) -> str:
    return str(config.get("grid", {}).get(LOSS_TYPE, config.get(LOSS_TYPE, fixed)))


def param_space(spec: SweepSpec, search: SearchSpec) -> dict[str, Any]:
    """Tune param_space for the random/grid algorithms (BasicVariantGenerator)."""
    space: dict[str, Any] = {}
    points = grid_points(spec.model_copy(update={"search": search}))
    if points != [{}]:
        space["grid"] = tune.grid_search(points)
    # Tune hands a sample_from function only the config, not the generator's seeded random
    # state, so conditional knobs draw from their own generator seeded like the search.
    conditional_rng = np.random.default_rng(search.seed)
    for key, domain in search.space.items():
        if isinstance(domain, GridDomain):
            continue
        path = resolve_key(key)
        tune_domain = _tune_domain(domain)
        only_for = ONLY_FOR_LOSS_TYPE.get(path)
        if only_for is None:
            space[path] = tune_domain
        else:
            fixed = spec.simpo.loss_type

            def conditional(
                config: dict[str, Any],
                domain: Any = tune_domain,
                only_for: str = only_for,
                fixed: str = fixed,
            ) -> Any:
                if _loss_type_of(config, fixed) != only_for:
                    return None
                return domain.sample(random_state=conditional_rng)

            space[path] = tune.sample_from(conditional)
    return space


class OptunaSpace:
    """A define-by-run Optuna space, so a knob is suggested only where it has an effect.

    A class rather than a closure: Tune pickles the searcher into its experiment state.
    """

    def __init__(self, spec: SweepSpec, search: SearchSpec):
        entries = [(resolve_key(key), domain) for key, domain in search.space.items()]
        # loss_type first: what is suggested after it depends on it.
        entries.sort(key=lambda entry: entry[0] != LOSS_TYPE)
        self.entries = entries
        self.default_loss_type = spec.simpo.loss_type

    def __call__(self, trial: optuna.Trial) -> dict[str, Any]:
        """Suggests the trial's values; returns the trial's config, floats rounded.

        OptunaSearch lays the returned dict over what was suggested: the trial trains with the
        rounded values while the study keeps the exact ones it drew (TPE's model is unchanged).
        """
        config: dict[str, Any] = {}
        loss_type: str = self.default_loss_type
        for path, domain in self.entries:
            only_for = ONLY_FOR_LOSS_TYPE.get(path)
            if only_for is not None and loss_type != only_for:
                continue
            value: Any
            if isinstance(domain, ChoiceDomain):
                value = trial.suggest_categorical(path, domain.values)
            elif isinstance(domain, UniformDomain | LogUniformDomain):
                value = rounded_sample(_suggest_float(trial, path, domain), domain)
            elif isinstance(domain, IntDomain):
                value = trial.suggest_int(path, domain.low, domain.high, step=domain.q or 1)
            else:
                raise TypeError(f"{path}: Optuna takes no {type(domain).__name__}")
            config[path] = value
            if path == LOSS_TYPE:
                loss_type = str(value)
        return config


def _suggest_float(
    trial: optuna.Trial, path: str, domain: UniformDomain | LogUniformDomain
) -> float:
    if isinstance(domain, LogUniformDomain) and domain.q:
        # Optuna takes no step on a log scale: draw log-uniform, then take the nearest point of
        # the grid, as Tune's qloguniform does (multiples of q).
        drawn = trial.suggest_float(path, domain.low, domain.high, log=True)
        return round(drawn / domain.q) * domain.q
    log = isinstance(domain, LogUniformDomain)
    return trial.suggest_float(path, domain.low, domain.high, log=log, step=domain.q)


def search_algorithm(spec: SweepSpec, search: SearchSpec) -> Searcher | BasicVariantGenerator:
    if search.algorithm == "optuna":
        return OptunaSearch(
            space=OptunaSpace(spec, search),
            metric=search.metric,
            mode=search.mode,
            sampler=optuna.samplers.TPESampler(seed=search.seed),
        )
    # The generator limits concurrency itself; Tune's max_concurrent_trials only wraps Searchers.
    return BasicVariantGenerator(
        random_state=search.seed, max_concurrent=search.max_concurrent_trials
    )


def scheduler(spec: SweepSpec, search: SearchSpec) -> TrialScheduler:
    if search.scheduler.type == "asha":
        return ASHAScheduler(
            time_attr="step",
            max_t=spec.training.max_steps,
            grace_period=search.scheduler.grace_period,
            reduction_factor=search.scheduler.reduction_factor,
        )
    return FIFOScheduler()
