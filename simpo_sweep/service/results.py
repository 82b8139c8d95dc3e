"""A sweep's results: one row per trial, ranked; the table files and the best configuration."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import yaml

from simpo_sweep.service.storage import StorageLocation
from simpo_sweep.spec.models import GENERATION_METRIC_PREFIX, GENERATION_METRICS, SweepSpec
from simpo_sweep.spec.space import param_name, searched_keys, spec_with_trial
from simpo_sweep.trial.outcome import DIAGNOSIS, STEP, TrialOutcome, TrialState
from simpo_sweep.trial.trainable import sampled_values

# The states by their names, as tests and the MLflow tag spell them.
STATE_COMPLETED = TrialState.COMPLETED
STATE_STOPPED_EARLY = TrialState.STOPPED_EARLY
STATE_DEGENERATE = TrialState.DEGENERATE
STATE_FAILED = TrialState.FAILED
STATE_UNFINISHED = TrialState.UNFINISHED

SUMMARY_METRICS = (
    "eval/rewards/accuracies",
    "eval/rewards/margins",
    "eval/loss",
    "eval/logps/chosen",
    "eval/logps/rejected",
    "train/loss",
    "perf/trial_start_to_first_step_s",
    "perf/fit_time_s",
    # Generation evaluation (engine/generation.py), when the spec turns it on.
    *(GENERATION_METRIC_PREFIX + name for name in GENERATION_METRICS),
    "perf/generation_total_s",
)


@dataclass
class TrialRow:
    trial_id: str
    state: TrialState
    step: int
    metric: float | None
    diagnosis: str
    params: dict[str, Any]  # the searched knobs, flat names
    sampled: dict[str, Any]  # full config paths -> values, as Tune sampled them
    metrics: dict[str, float] = field(default_factory=dict)
    wall_s: float | None = None  # the trial's running time, as Tune measured it


@dataclass(frozen=True)
class Cost:
    """What a sweep's trials held, in the resource users pay for: GPU-hours (CPU-hours on
    CPU) = workers x resources per worker x wall time; and what ASHA's early stops saved
    against running every stopped trial to max_steps at its own pace."""

    unit: str  # "GPU" or "CPU"
    per_trial: dict[str, float]
    total: float
    saved_by_early_stops: float

    @property
    def name(self) -> str:
        return f"{self.unit.lower()}_hours"


def resources_held(spec: SweepSpec) -> tuple[str, float]:
    resources = spec.resources
    if resources.gpus_per_worker > 0:
        return "GPU", resources.num_workers * resources.gpus_per_worker
    return "CPU", resources.num_workers * resources.cpus_per_worker + resources.driver_cpus


def sweep_cost(spec: SweepSpec, rows: Iterable[TrialRow]) -> Cost:
    unit, held = resources_held(spec)
    per_trial: dict[str, float] = {}
    saved = 0.0
    for row in rows:
        if row.wall_s is None:
            continue
        hours = held * row.wall_s / 3600
        per_trial[row.trial_id] = hours
        if row.state == TrialState.STOPPED_EARLY and row.step > 0:
            saved += hours * (spec.training.max_steps - row.step) / row.step
    return Cost(unit, per_trial, sum(per_trial.values()), saved)


def trial_rows(spec: SweepSpec, results: Any, outcomes: dict[str, TrialOutcome]) -> list[TrialRow]:
    """Rows ranked best first (by the sweep's metric; failed and metric-less trials last).
    A trial with no recorded outcome was cut off: unfinished, or failed if Tune says so."""
    rows = []
    searched = searched_keys(spec)
    for result in results:
        metrics = dict(result.metrics or {})
        trial_id = str(metrics.get("trial_id") or str(result.path).rstrip("/").rsplit("/", 1)[-1])
        sampled = sampled_values(dict(result.config or {}))
        outcome = outcomes.get(trial_id) or TrialOutcome.decide(
            metrics,
            max_steps=spec.training.max_steps,
            error=str(result.error).splitlines()[0][:300] if result.error is not None else None,
            ended=False,
        )
        value = metrics.get(spec.search.metric)
        metric = float(value) if isinstance(value, int | float) and math.isfinite(value) else None
        rows.append(
            TrialRow(
                trial_id=trial_id,
                state=outcome.state,
                step=int(metrics.get(STEP, 0)),
                metric=metric,
                diagnosis=outcome.diagnosis or str(metrics.get(DIAGNOSIS, "")),
                params={param_name(path): sampled.get(path) for path in searched},
                sampled=sampled,
                metrics={
                    key: float(metrics[key])
                    for key in SUMMARY_METRICS
                    if isinstance(metrics.get(key), int | float)
                },
                wall_s=(
                    float(metrics["time_total_s"])
                    if isinstance(metrics.get("time_total_s"), int | float)
                    else None
                ),
            )
        )
    return rank_rows(spec, rows)


def rank_rows(spec: SweepSpec, rows: Iterable[TrialRow]) -> list[TrialRow]:
    """Best first by the sweep's metric; failed, degenerate and metric-less trials last."""
    sign = -1.0 if spec.search.mode == "max" else 1.0

    def rank_key(row: TrialRow) -> tuple[int, float]:
        return (0 if _usable(row) else 1, sign * row.metric if row.metric is not None else 0.0)

    return sorted(rows, key=rank_key)


def best_config_yaml(spec: SweepSpec, best: TrialRow) -> str:
    """A ready-to-train spec: the best trial's configuration fixed, nothing left to search."""
    document = spec_with_trial(spec, best.sampled).model_dump(mode="json")
    document["name"] = f"{spec.name}-best"
    document["search"] = {**document["search"], "space": {}, "stages": [], "num_samples": 1}
    header = (
        f"# Best trial {best.trial_id} of sweep {spec.name}: {spec.search.metric} = {best.metric}\n"
    )
    return header + yaml.safe_dump(document, sort_keys=False)


def format_table(spec: SweepSpec, rows: list[TrialRow]) -> str:
    """A Markdown table, best first: what `run` prints at the end and `report` shows."""
    knobs = list(rows[0].params) if rows else []
    header = ["rank", "trial", "state", "step", spec.search.metric, *knobs, "diagnosis"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for rank, row in enumerate(rows, start=1):
        metric = f"{row.metric:.4f}" if row.metric is not None else "-"
        values = [_short(row.params.get(knob)) for knob in knobs]
        lines.append(
            "| "
            + " | ".join(
                [
                    str(rank),
                    row.trial_id,
                    str(row.state),
                    str(row.step),
                    metric,
                    *values,
                    row.diagnosis,
                ]
            )
            + " |"
        )
    return "\n".join(lines) + "\n"


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def write_results(
    spec: SweepSpec, rows: list[TrialRow], sweep: StorageLocation
) -> dict[str, StorageLocation]:
    """results.md, results.csv and (when a trial is usable) best_config.yaml in the sweep's
    folder; returns name -> location."""
    files = {"results.md": sweep / "results.md", "results.csv": sweep / "results.csv"}
    files["results.md"].write_text(format_table(spec, rows))
    files["results.csv"].write_text(results_csv(spec, rows))
    best = best_row(rows)
    if best is not None:
        files["best_config.yaml"] = sweep / "best_config.yaml"
        files["best_config.yaml"].write_text(best_config_yaml(spec, best))
    return files


def results_csv(spec: SweepSpec, rows: list[TrialRow]) -> str:
    # The ranking metric has its own column, after the state.
    metric_names = sorted({key for row in rows for key in row.metrics} - {spec.search.metric})
    knobs = list(rows[0].params) if rows else []
    cost = sweep_cost(spec, rows)
    with io.StringIO(newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            [
                "trial_id",
                "state",
                "step",
                spec.search.metric,
                *knobs,
                *metric_names,
                cost.name,
                "diagnosis",
            ]
        )
        for row in rows:
            writer.writerow(
                [
                    row.trial_id,
                    str(row.state),
                    row.step,
                    row.metric,
                    *(row.params.get(k) for k in knobs),
                    *(row.metrics.get(m) for m in metric_names),
                    _hours(cost.per_trial.get(row.trial_id)),
                    row.diagnosis,
                ]
            )
        return handle.getvalue()


def _hours(hours: float | None) -> str:
    return "" if hours is None else f"{hours:.4g}"


def _usable(row: TrialRow) -> bool:
    # An unfinished (interrupted) trial's metric is a real evaluation of the steps it ran, as
    # is that of a trial ASHA stopped early: it ranks by it, and `report` on an interrupted
    # sweep shows where each trial stands. A failed or degenerate trial's metric says nothing
    # of its configuration.
    return row.metric is not None and row.state.usable


def best_row(rows: list[TrialRow]) -> TrialRow | None:
    """The best usable trial of ranked rows (degenerate and failed trials never win)."""
    return next((row for row in rows if _usable(row)), None)
