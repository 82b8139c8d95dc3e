"""A sweep's results: one row per trial, ranked; the table files and the best configuration."""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from simpo_sweep.spec.models import SweepSpec
from simpo_sweep.spec.space import param_name, searched_keys, spec_with_trial
from simpo_sweep.trial.trainable import sampled_values
from simpo_sweep.trial.worker import DIAGNOSIS, STEP, VERDICT

STATE_COMPLETED = "completed"
STATE_STOPPED_EARLY = "stopped_early"
STATE_DEGENERATE = "degenerate"
STATE_FAILED = "failed"
STATE_UNFINISHED = "unfinished"  # interrupted; `resume` continues it

SUMMARY_METRICS = (
    "eval/rewards/accuracies",
    "eval/rewards/margins",
    "eval/loss",
    "eval/logps/chosen",
    "eval/logps/rejected",
    "train/loss",
    "perf/trial_start_to_first_step_s",
    "perf/fit_time_s",
)


def final_state(result: dict[str, Any], max_steps: int) -> str:
    if result.get(VERDICT) == "degenerate":
        return STATE_DEGENERATE
    if int(result.get(STEP, 0)) >= max_steps:
        return STATE_COMPLETED
    return STATE_STOPPED_EARLY


@dataclass
class TrialRow:
    trial_id: str
    state: str
    step: int
    metric: float | None
    diagnosis: str
    params: dict[str, Any]  # the searched knobs, flat names
    sampled: dict[str, Any]  # full config paths -> values, as Tune sampled them
    metrics: dict[str, float] = field(default_factory=dict)


def trial_rows(spec: SweepSpec, results: Any, states: dict[str, tuple[str, str]]) -> list[TrialRow]:
    """Rows ranked best first (by the sweep's metric; failed and metric-less trials last)."""
    rows = []
    searched = searched_keys(spec)
    for result in results:
        metrics = dict(result.metrics or {})
        trial_id = str(metrics.get("trial_id") or Path(result.path).name)
        sampled = sampled_values(dict(result.config or {}))
        if trial_id in states:
            state, diagnosis = states[trial_id]
        elif result.error is not None:
            state, diagnosis = STATE_FAILED, str(result.error).splitlines()[0][:300]
        else:
            state, diagnosis = STATE_UNFINISHED, "interrupted; `simpo-sweep resume` continues it"
        value = metrics.get(spec.search.metric)
        metric = float(value) if isinstance(value, int | float) and math.isfinite(value) else None
        rows.append(
            TrialRow(
                trial_id=trial_id,
                state=state,
                step=int(metrics.get(STEP, 0)),
                metric=metric,
                diagnosis=diagnosis or str(metrics.get(DIAGNOSIS, "")),
                params={param_name(path): sampled.get(path) for path in searched},
                sampled=sampled,
                metrics={
                    key: float(metrics[key])
                    for key in SUMMARY_METRICS
                    if isinstance(metrics.get(key), int | float)
                },
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
                [str(rank), row.trial_id, row.state, str(row.step), metric, *values, row.diagnosis]
            )
            + " |"
        )
    return "\n".join(lines) + "\n"


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "-" if value is None else str(value)


def write_results(spec: SweepSpec, rows: list[TrialRow], sweep_dir: Path) -> dict[str, Path]:
    files = {"results.md": sweep_dir / "results.md", "results.csv": sweep_dir / "results.csv"}
    files["results.md"].write_text(format_table(spec, rows))
    # The ranking metric has its own column, after the state.
    metric_names = sorted({key for row in rows for key in row.metrics} - {spec.search.metric})
    knobs = list(rows[0].params) if rows else []
    with files["results.csv"].open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["trial_id", "state", "step", spec.search.metric, *knobs, *metric_names, "diagnosis"]
        )
        for row in rows:
            writer.writerow(
                [
                    row.trial_id,
                    row.state,
                    row.step,
                    row.metric,
                    *(row.params.get(k) for k in knobs),
                    *(row.metrics.get(m) for m in metric_names),
                    row.diagnosis,
                ]
            )
    best = best_row(rows)
    if best is not None:
        files["best_config.yaml"] = sweep_dir / "best_config.yaml"
        files["best_config.yaml"].write_text(best_config_yaml(spec, best))
    return files


def _usable(row: TrialRow) -> bool:
    # An unfinished (interrupted) trial's metric is a real evaluation of the steps it ran, as
    # is that of a trial ASHA stopped early: it ranks by it, and `report` on an interrupted
    # sweep shows where each trial stands. A failed or degenerate trial's metric says nothing
    # of its configuration.
    return row.metric is not None and row.state not in {STATE_FAILED, STATE_DEGENERATE}


def best_row(rows: list[TrialRow]) -> TrialRow | None:
    """The best usable trial of ranked rows (degenerate and failed trials never win)."""
    return next((row for row in rows if _usable(row)), None)
