"""The search space in spec terms: which config field a key names, and a trial's resolved config.

Space keys are `section.field` paths (`simpo.beta`, `training.learning_rate`) or, for the
training and simpo sections whose field names are unique, the bare field name (`beta`).
Translation into Ray Tune domains lives in the service layer: the spec stays free of Ray.
"""

from __future__ import annotations

import decimal
import itertools
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel

from simpo_sweep.spec.models import (
    ChoiceDomain,
    GridDomain,
    IntDomain,
    LogUniformDomain,
    SweepSpec,
    TrialConfig,
    UniformDomain,
    domain_values_to_check,
)

# Sections a trial may vary. Resources and storage are sweep-wide.
SEARCHABLE_SECTIONS = ("training", "simpo", "data", "model")
BARE_NAME_SECTIONS = ("training", "simpo")

# Knobs that only mean something for some loss types: not searched where they have no effect.
ONLY_FOR_LOSS_TYPE = {"simpo.label_smoothing": "sigmoid"}
# What the flat params show for such a knob where it has no effect: a number there (the 0.0 the
# trial trains with) would read as a setting and plot as one in parallel coordinates.
NOT_APPLICABLE = "n/a"

# Sampled floats are rounded to this many significant digits when they are drawn, so that the
# value a trial trains with is the one MLflow, the tables and best_config.yaml show.
SIGNIFICANT_DIGITS = 4

# Fields that are input conveniences, not knobs: validation turns them into another field, so a
# value sampled for them would reach no trial. Each says what to search instead.
NOT_SEARCHABLE = {
    "simpo.gamma": (
        "the absolute margin is converted to gamma_beta_ratio when the spec is read; "
        "search gamma_beta_ratio instead (gamma = gamma_beta_ratio * beta)"
    ),
}


def _section_fields(section: str) -> dict[str, Any]:
    model: type[BaseModel] = SweepSpec.model_fields[section].annotation  # type: ignore[assignment]
    return dict(model.model_fields)


def _sub_model(section: str, name: str) -> type[BaseModel] | None:
    """The pydantic model of a field that is a sub-section (`model.lora`: LoraSpec | None)."""
    field = _section_fields(section).get(name)
    annotation = getattr(field, "annotation", None)
    for candidate in (annotation, *getattr(annotation, "__args__", ())):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def searchable_paths() -> list[str]:
    paths = []
    for section in SEARCHABLE_SECTIONS:
        for name in _section_fields(section):
            sub_model = _sub_model(section, name)
            if sub_model is not None:  # model.lora.r, model.lora.alpha, ...
                paths += [f"{section}.{name}.{sub}" for sub in sub_model.model_fields]
            elif f"{section}.{name}" not in NOT_SEARCHABLE:
                paths.append(f"{section}.{name}")
    return paths


def set_path(sections: dict[str, Any], path: str, value: Any) -> None:
    """Set `section.field` or `section.field.sub` in dumped sections; a sub-section that is
    off (None: `model.lora`) is switched on with its defaults for the value given."""
    section, _, rest = path.partition(".")
    name, _, sub = rest.partition(".")
    if not sub:
        sections[section][name] = value
        return
    sections[section][name] = {**(sections[section].get(name) or {}), sub: value}


def _field_path(key: str) -> str | None:
    """The config field a space key names, searchable or not; None when it names none."""
    if key.count(".") == 2:
        section, name, sub = key.split(".")
        sub_model = _sub_model(section, name) if section in SEARCHABLE_SECTIONS else None
        if sub_model is not None and sub in sub_model.model_fields:
            return key
    elif "." in key:
        section, _, name = key.partition(".")
        if section in SEARCHABLE_SECTIONS and name in _section_fields(section):
            return key
    else:
        for section in BARE_NAME_SECTIONS:
            if key in _section_fields(section):
                return f"{section}.{key}"
    return None


def resolve_key(key: str) -> str:
    """`beta` -> `simpo.beta`; `training.learning_rate` stays. KeyError with a hint otherwise."""
    path = _field_path(key)
    if path is None or path in NOT_SEARCHABLE:
        raise KeyError(key)
    return path


def why_not_searchable(key: str) -> str | None:
    """Why a space key that names a config field cannot be searched; None if it can be."""
    path = _field_path(key)
    return NOT_SEARCHABLE.get(path) if path is not None else None


def param_name(path: str) -> str:
    """The flat, readable name a trial's value is shown under (MLflow params, tables)."""
    section, _, name = path.partition(".")
    return name if section in BARE_NAME_SECTIONS else path


def stage_specs(spec: SweepSpec) -> list[SweepSpec]:
    """A staged search as one plain spec per stage (fixed values not yet updated); else [spec]."""
    if not spec.search.stages:
        return [spec]
    stages = []
    for stage in spec.search.stages:
        search = spec.search.model_copy(
            update={
                "space": stage.space,
                "stages": [],
                "num_samples": stage.num_samples or spec.search.num_samples,
            }
        )
        stages.append(spec.model_copy(update={"search": search}))
    return stages


def searched_keys(spec: SweepSpec) -> list[str]:
    """Config paths of the knobs the sweep searches, each once: its space's, or in a staged
    search every stage's (the spec's own space is empty then)."""
    return list(dict.fromkeys(resolve_key(key) for space in spec.search.spaces for key in space))


def describe_space(spec: SweepSpec) -> list[str]:
    """One line per searched knob and its domain, under its stage in a staged search."""
    if not spec.search.stages:
        return [
            f"{resolve_key(key)}: {describe_domain(domain)}"
            for key, domain in spec.search.space.items()
        ]
    lines = []
    for index, stage in enumerate(spec.search.stages, start=1):
        lines.append(f"stage {index} '{stage.name}':")
        lines += [
            f"  {resolve_key(key)}: {describe_domain(domain)}"
            for key, domain in stage.space.items()
        ]
    return lines


def count_trials(spec: SweepSpec) -> int:
    """Trials the search means: the (deduplicated) grid size times num_samples, over stages."""
    return sum(len(grid_points(stage)) * stage.search.num_samples for stage in stage_specs(spec))


def grid_points(spec: SweepSpec) -> list[dict[str, Any]]:
    """Every combination of the grid domains, with knobs that have no effect collapsed."""
    grid = {
        resolve_key(key): domain.values
        for key, domain in spec.search.space.items()
        if isinstance(domain, GridDomain)
    }
    points: list[dict[str, Any]] = []
    for values in itertools.product(*grid.values()):
        point = drop_ineffective(dict(zip(grid, values, strict=True)), spec)
        if point not in points:
            points.append(point)
    return points or [{}]


def drop_ineffective(sampled: Mapping[str, Any], spec: SweepSpec) -> dict[str, Any]:
    """Remove knobs that have no effect under this point's loss_type."""
    loss_type = sampled.get("simpo.loss_type", spec.simpo.loss_type)
    return {
        path: value
        for path, value in sampled.items()
        if ONLY_FOR_LOSS_TYPE.get(path, loss_type) == loss_type
    }


def trial_config(spec: SweepSpec, sampled: Mapping[str, Any]) -> TrialConfig:
    """The spec's fixed sections with a trial's sampled values (keyed by full path) applied."""
    sections = {
        name: getattr(spec, name).model_dump()
        for name in (*SEARCHABLE_SECTIONS, "diagnostics", "evaluation")
    }
    for path, value in drop_ineffective(sampled, spec).items():
        set_path(sections, path, value)
    if sections["simpo"]["loss_type"] == "hinge":
        sections["simpo"]["label_smoothing"] = 0.0
    return TrialConfig.model_validate(sections)


def spec_with_trial(spec: SweepSpec, sampled: Mapping[str, Any]) -> SweepSpec:
    """The spec with a trial's sampled values fixed in its sections (its search unchanged)."""
    resolved = trial_config(spec, sampled)
    return spec.model_copy(
        update={section: getattr(resolved, section) for section in SEARCHABLE_SECTIONS}
    )


# Searched fields that a trial's peak memory grows with: the memory plan of a sweep is made for
# the trial that has all of them at their largest, so that no sampled trial runs out of memory.
MEMORY_KNOBS = (
    "training.batch_size",
    "training.max_tokens_per_batch",
    "training.logprob_chunk_tokens",
    "data.max_length",
    "model.lora.r",
)


def largest_memory_trial(spec: SweepSpec) -> tuple[SweepSpec, dict[str, Any]]:
    """The spec with every searched memory knob at the largest value its domains allow (over
    every stage of a staged search), and those values by path; the spec itself when none of
    them is searched."""
    largest: dict[str, Any] = {}
    for space in spec.search.spaces:
        for key, domain in space.items():
            path = resolve_key(key)
            values = [
                value
                for value in domain_values_to_check(domain)
                if isinstance(value, int | float) and not isinstance(value, bool)
            ]
            if path in MEMORY_KNOBS and values:
                largest[path] = max([*values, *([largest[path]] if path in largest else [])])
    if not largest:
        return spec, {}
    return spec_with_trial(spec, largest), largest


def flat_params(config: TrialConfig) -> dict[str, Any]:
    """A trial's full resolved configuration under flat readable names; a knob that has no
    effect under the trial's loss_type shows as `n/a` (the config itself keeps its 0.0)."""
    params: dict[str, Any] = {}
    for section in SEARCHABLE_SECTIONS:
        for name, value in getattr(config, section).model_dump().items():
            if isinstance(value, dict):
                for sub, sub_value in value.items():
                    params[f"{section}.{name}.{sub}"] = sub_value
            elif value is not None or section in BARE_NAME_SECTIONS:
                params[param_name(f"{section}.{name}")] = value
    for path, loss_type in ONLY_FOR_LOSS_TYPE.items():
        if config.simpo.loss_type != loss_type:
            params[param_name(path)] = NOT_APPLICABLE
    return params


def rounded_sample(value: float, domain: UniformDomain | LogUniformDomain) -> float:
    """A float drawn from a domain as the trial gets it: 4 significant digits, or for a
    quantised domain the digits its grid is written with (which keeps it on the grid), and
    never outside the domain's bounds."""
    if domain.q:
        # The grid is low + k*q (Optuna) or k*q (Tune, whose bounds are multiples of q):
        # the decimals of q and low are those of every point on it.
        rounded = round(value, max(_decimal_places(domain.q), _decimal_places(domain.low)))
    else:
        rounded = _to_significant(value, decimal.ROUND_HALF_EVEN)
        # A bound with more digits (high: 0.123456) can be stepped over: round inwards then.
        if rounded > domain.high:
            rounded = _to_significant(value, decimal.ROUND_FLOOR)
        elif rounded < domain.low:
            rounded = _to_significant(value, decimal.ROUND_CEILING)
    return min(max(rounded, domain.low), domain.high)


def _to_significant(value: float, rounding: str) -> float:
    context = decimal.Context(prec=SIGNIFICANT_DIGITS, rounding=rounding)
    return float(context.plus(decimal.Decimal(value)))


def _decimal_places(number: float) -> int:
    """Digits after the point of a number as written: 0.05 -> 2, 5.0 -> 0, 2.5e-07 -> 8."""
    exponent = decimal.Decimal(repr(number)).normalize().as_tuple().exponent
    return max(0, -exponent) if isinstance(exponent, int) else 0


def describe_domain(domain: Any) -> str:
    if isinstance(domain, ChoiceDomain):
        return f"choice {domain.values}"
    if isinstance(domain, GridDomain):
        return f"grid {domain.values}"
    step = f" step {domain.q}" if domain.q else ""
    if isinstance(domain, IntDomain):
        return f"int [{domain.low}, {domain.high}]{step}"
    kind = "log-uniform" if isinstance(domain, LogUniformDomain) else "uniform"
    return f"{kind} [{domain.low:g}, {domain.high:g}]{step}"
