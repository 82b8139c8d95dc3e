"""Spec search settings -> Ray Tune: param space, search algorithm, scheduler.

Tune's config keys are the full config paths (`simpo.beta`); grid points (deduplicated, with
knobs that have no effect collapsed) arrive as one dict under `grid`. A knob that only matters
for one loss_type is left unsampled (None) when the trial's loss_type is another.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import optuna
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search import BasicVariantGenerator, Searcher
from ray.tune.search.optuna import OptunaSearch

from simpo_sweep.spec.models import (
    ChoiceDomain,
    GridDomain,
    IntDomain,
    LogUniformDomain,
    SearchSpec,
    SweepSpec,
    UniformDomain,
)
from simpo_sweep.spec.space import ONLY_FOR_LOSS_TYPE, grid_points, resolve_key

LOSS_TYPE = "simpo.loss_type"


def _tune_domain(domain: Any) -> Any:
    if isinstance(domain, ChoiceDomain):
        return tune.choice(domain.values)
    if isinstance(domain, UniformDomain):
        return (
            tune.quniform(domain.low, domain.high, domain.q)
            if domain.q
            else tune.uniform(domain.low, domain.high)
        )
    if isinstance(domain, LogUniformDomain):
        if domain.q:
            return tune.qloguniform(domain.low, domain.high, domain.q)
        return tune.loguniform(domain.low, domain.high)
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

    def __call__(self, trial: optuna.Trial) -> None:
        loss_type: str = self.default_loss_type
        for path, domain in self.entries:
            only_for = ONLY_FOR_LOSS_TYPE.get(path)
            if only_for is not None and loss_type != only_for:
                continue
            if isinstance(domain, ChoiceDomain):
                value = trial.suggest_categorical(path, domain.values)
            elif isinstance(domain, UniformDomain | LogUniformDomain):
                value = trial.suggest_float(
                    path,
                    domain.low,
                    domain.high,
                    log=isinstance(domain, LogUniformDomain),
                    step=domain.q,
                )
            elif isinstance(domain, IntDomain):
                value = trial.suggest_int(path, domain.low, domain.high, step=domain.q or 1)
            else:
                raise TypeError(f"{path}: Optuna takes no {type(domain).__name__}")
            if path == LOSS_TYPE:
                loss_type = str(value)


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
