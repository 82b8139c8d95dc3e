"""Read a spec file, apply command-line overrides, and report every mistake at once.

Each problem names its key path and the line in the file, and for an unknown key the nearest
valid name: the user fixes the whole file in one pass instead of one error per run.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, TypeAdapter, ValidationError

from simpo_sweep.spec.models import Domain, SweepSpec, domain_values_to_check
from simpo_sweep.spec.space import (
    SEARCHABLE_SECTIONS,
    resolve_key,
    searchable_paths,
    set_path,
    why_not_searchable,
)

_DOMAIN: TypeAdapter[Any] = TypeAdapter(Domain)
_DOMAIN_TAGS = {"uniform", "loguniform", "choice", "grid", "int", "asha", "none"}


@dataclass(frozen=True)
class Problem:
    path: str  # dotted key path, e.g. "search.space.beta.low"
    message: str
    line: int | None = None

    def __str__(self) -> str:
        where = f"line {self.line}: " if self.line is not None else ""
        return f"{where}{self.path or '<spec>'}: {self.message}"


class SpecError(ValueError):
    def __init__(self, source: str, problems: Sequence[Problem]):
        self.source = source
        self.problems = list(problems)
        listing = "\n".join(f"  - {problem}" for problem in self.problems)
        count = len(self.problems)
        super().__init__(f"{source}: {count} problem{'s' * (count != 1)}\n{listing}")


def _line_index(node: yaml.Node | None, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], int]:
    """Key path -> 1-based line of that key, for every key in a composed YAML document."""
    lines: dict[tuple[str, ...], int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            path = (*prefix, str(key_node.value))
            lines[path] = key_node.start_mark.line + 1
            lines.update(_line_index(value_node, path))
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            path = (*prefix, str(index))
            lines[path] = item.start_mark.line + 1
            lines.update(_line_index(item, path))
    return lines


def _line_for(lines: Mapping[tuple[str, ...], int], path: Sequence[str]) -> int | None:
    for end in range(len(path), 0, -1):
        if tuple(path[:end]) in lines:
            return lines[tuple(path[:end])]
    return None


def parse_override(text: str) -> tuple[list[str], Any]:
    """`search.num_samples=4` -> (["search", "num_samples"], 4); the value is read as YAML."""
    key, separator, raw = text.partition("=")
    if not separator or not key.strip():
        raise SpecError("--set", [Problem(text, "expected KEY=VALUE, e.g. search.num_samples=4")])
    return key.strip().split("."), yaml.safe_load(raw)


def apply_overrides(raw: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    for override in overrides:
        keys, value = parse_override(override)
        target = raw
        for key in keys[:-1]:
            target = target.setdefault(key, {})
            if not isinstance(target, dict):
                raise SpecError("--set", [Problem(".".join(keys), f"{key} is not a section")])
        target[keys[-1]] = value
    return raw


def _model_at(path: Sequence[str | int]) -> type[BaseModel] | None:
    """The pydantic model that holds the key at `path` (for nearest-name suggestions)."""
    model: type[BaseModel] = SweepSpec
    for part in path[:-1]:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        else:
            return None
    return model


def _without_union_tags(location: list[str]) -> list[str]:
    """Drop the discriminator pydantic puts in a tagged union's location (`search.space.beta.
    uniform.low` -> `search.space.beta.low`), and only there: a user's key may be `int`."""
    kept = []
    for index, part in enumerate(location):
        after_union = index >= 1 and (
            location[index - 1] == "scheduler" or (index >= 2 and location[index - 2] == "space")
        )
        if not (part in _DOMAIN_TAGS and after_union):
            kept.append(part)
    return kept


def _problems_from_validation(
    error: ValidationError, lines: Mapping[tuple[str, ...], int], prefix: Sequence[str] = ()
) -> list[Problem]:
    problems = []
    for item in error.errors():
        location = _without_union_tags([*prefix, *(str(part) for part in item["loc"])])
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            model = _model_at(location[len(prefix) :])
            valid = list(model.model_fields) if model is not None else []
            close = difflib.get_close_matches(location[-1], valid, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            message = (
                f"unknown key{hint}"
                if close or not valid
                else f"unknown key (valid: {', '.join(valid)})"
            )
        elif (
            "input" in item
            and not isinstance(item["input"], dict | list)
            and item["type"] != "missing"
        ):
            message = f"{message} (got {item['input']!r})"
        problems.append(Problem(".".join(location), message, _line_for(lines, location)))
    return problems


def _space_problems(
    raw_space: Any, spec_base: dict[str, Any], lines: Mapping[tuple[str, ...], int]
) -> list[Problem]:
    """Space keys must name a config field; every domain value must be valid for that field."""
    problems: list[Problem] = []
    if not isinstance(raw_space, dict):
        return problems
    valid_paths = searchable_paths()
    for key, raw_domain in raw_space.items():
        location = ("search", "space", key)
        try:
            domain = _DOMAIN.validate_python(raw_domain)
        except ValidationError:
            domain = None  # its shape is reported by the whole-spec validation
        try:
            path = resolve_key(key)
        except KeyError:
            reason = why_not_searchable(key)
            if reason is not None:
                problems.append(
                    Problem(
                        ".".join(location),
                        f"cannot be searched: {reason}",
                        _line_for(lines, location),
                    )
                )
                continue
            close = difflib.get_close_matches(
                key, valid_paths + [p.split(".", 1)[1] for p in valid_paths], n=1
            )
            hint = f"; did you mean '{close[0]}'?" if close else ""
            problems.append(
                Problem(
                    ".".join(location),
                    f"not a searchable config field{hint}",
                    _line_for(lines, location),
                )
            )
            continue
        if domain is None:
            continue
        section, _, field_path = path.partition(".")
        name = field_path.split(".")[0]
        section_model = SweepSpec.model_fields[section].annotation
        assert isinstance(section_model, type) and issubclass(section_model, BaseModel)
        for value in domain_values_to_check(domain):
            sections = {section: dict(spec_base.get(section, {}))}
            set_path(sections, path, value)
            candidate = sections[section]
            if section == "simpo":
                # Judge the field alone: cross-field rules depend on the other sampled values.
                candidate = {name: value}
            try:
                section_model.model_validate(candidate)
            except ValidationError as error:
                for item in error.errors():
                    if item["loc"] and item["loc"][0] != name:
                        continue
                    if not item["loc"] and _base_fails(section_model, spec_base.get(section, {})):
                        continue  # the section's own problem, reported once where it is
                    message = item["msg"].removeprefix("Value error, ")
                    problems.append(
                        Problem(
                            ".".join(location),
                            f"value {value!r} is impossible for {path}: {message}",
                            _line_for(lines, location),
                        )
                    )
    return problems


def _base_fails(section_model: type[BaseModel], base: Any) -> bool:
    try:
        section_model.model_validate(base)
    except ValidationError:
        return True
    return False


def load_spec(path: str | Path, overrides: Iterable[str] = ()) -> SweepSpec:
    """Read, override and validate a spec; SpecError lists every problem with key and line."""
    source = str(path)
    try:
        text = Path(path).read_text()
    except OSError as error:
        raise SpecError(
            source, [Problem("", f"cannot read the spec file: {error.strerror}")]
        ) from error
    return parse_spec(text, source, overrides)


def parse_spec(text: str, source: str = "<spec>", overrides: Iterable[str] = ()) -> SweepSpec:
    try:
        lines = _line_index(yaml.compose(text))
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        raise SpecError(source, [Problem("", f"not valid YAML: {error}", line)]) from error
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise SpecError(source, [Problem("", "the spec must be a mapping of sections")])
    raw = apply_overrides(raw, overrides)
    problems: list[Problem] = []
    space = raw.get("search", {}).get("space") if isinstance(raw.get("search"), dict) else None
    # A section that is not a mapping (`training: 3.5`) is the model validation's problem to
    # report; the space checks then see it as empty.
    base = {
        section: raw[section] if isinstance(raw.get(section), dict) else {}
        for section in SEARCHABLE_SECTIONS
    }
    problems += _space_problems(space, base, lines)
    for stage_index, stage in enumerate(
        raw.get("search", {}).get("stages", []) or [] if isinstance(raw.get("search"), dict) else []
    ):
        if isinstance(stage, dict):
            stage_lines = {
                ("search", "space", *key[4:]): line
                for key, line in lines.items()
                if key[:4] == ("search", "stages", str(stage_index), "space")
            }
            for problem in _space_problems(stage.get("space"), base, stage_lines):
                problems.append(
                    Problem(
                        problem.path.replace(
                            "search.space", f"search.stages.{stage_index}.space", 1
                        ),
                        problem.message,
                        problem.line,
                    )
                )
    try:
        spec = SweepSpec.model_validate(raw)
    except ValidationError as error:
        problems = _problems_from_validation(error, lines) + problems
        raise SpecError(source, problems) from None
    if problems:
        raise SpecError(source, problems)
    return spec


def check_resources(spec: SweepSpec, available: Mapping[str, float], where: str) -> list[Problem]:
    """Problems with a trial's resource request that `available` (CPU, GPU totals) can never meet.

    `available` is the largest single node's resources: one Train worker must fit on one node.
    """
    resources = spec.resources
    problems = []
    node_cpus = available.get("CPU", 0.0)
    node_gpus = available.get("GPU", 0.0)
    if resources.cpus_per_worker > node_cpus:
        problems.append(
            Problem(
                "resources.cpus_per_worker",
                f"{resources.cpus_per_worker:g} CPUs per worker, but the largest node of {where} "
                f"has {node_cpus:g}",
            )
        )
    if resources.gpus_per_worker > node_gpus:
        problems.append(
            Problem(
                "resources.gpus_per_worker",
                f"{resources.gpus_per_worker:g} GPUs per worker, "
                f"but the largest node of {where} has "
                f"{node_gpus:g}; set gpus_per_worker: 0 to train on CPU",
            )
        )
    total_cpus = available.get("total_CPU", node_cpus)
    needed = resources.num_workers * resources.cpus_per_worker + resources.driver_cpus
    if needed > total_cpus:
        driver = f" + driver {resources.driver_cpus:g}" if resources.driver_cpus else ""
        problems.append(
            Problem(
                "resources.num_workers",
                f"one trial needs {needed:g} CPUs ({resources.num_workers} workers x "
                f"{resources.cpus_per_worker:g}{driver}) but {where} has {total_cpus:g} in all",
            )
        )
    total_gpus = available.get("total_GPU", node_gpus)
    if (
        resources.num_workers * resources.gpus_per_worker > total_gpus
        and resources.gpus_per_worker > 0
    ):
        problems.append(
            Problem(
                "resources.num_workers",
                f"one trial needs {resources.num_workers * resources.gpus_per_worker:g} GPUs but "
                f"{where} has {total_gpus:g}",
            )
        )
    return problems
