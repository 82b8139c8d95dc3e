"""`simpo-sweep report`: a sweep's trials ranked, with diagnosis, plus table and plot files.

The source is the sweep's MLflow runs (what the UI shows): child runs' params, tags
(state, diagnosis) and metric histories. Plots go to <sweep>/report/ and to the parent run.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers
import matplotlib.pyplot as plt

from simpo_sweep.service.errors import SweepError
from simpo_sweep.service.results import STATE_UNFINISHED, TrialRow, format_table, rank_rows
from simpo_sweep.service.storage import (
    StorageLocation,
    artifact_location,
    find_sweep_dir,
    load_sweep_spec,
    tracking_uri,
)
from simpo_sweep.spec.models import SweepSpec
from simpo_sweep.spec.space import param_name, searched_keys
from simpo_sweep.tracking.mlflow_runs import (
    TAG_DIAGNOSIS,
    TAG_STATE,
    SweepTracking,
    last_logged_step,
    latest_generations,
)
from simpo_sweep.trial.outcome import TrialState

CURVES = {
    "reward_margins.png": ("train/rewards/margins", "eval/rewards/margins"),
    "reward_accuracies.png": ("train/rewards/accuracies", "eval/rewards/accuracies"),
}


def _rows_from_mlflow(spec: SweepSpec, tracking: SweepTracking) -> list[TrialRow]:
    searched = [param_name(path) for path in searched_keys(spec)]
    rows = []
    for trial_id, run in tracking.child_runs().items():
        metrics = run.data.metrics
        value = metrics.get(spec.search.metric)
        rows.append(
            TrialRow(
                trial_id=trial_id,
                state=TrialState(run.data.tags.get(TAG_STATE, STATE_UNFINISHED)),
                step=last_logged_step(tracking.client, run.info.run_id),
                metric=float(value) if value is not None and math.isfinite(value) else None,
                diagnosis=run.data.tags.get(TAG_DIAGNOSIS, ""),
                params={name: run.data.params.get(name) for name in searched},
                sampled={},
                metrics=dict(metrics),
            )
        )
    return rank_rows(spec, rows)


def _history(tracking: SweepTracking, run_id: str, key: str) -> tuple[list[int], list[float]]:
    points = sorted(tracking.client.get_metric_history(run_id, key), key=lambda m: m.step)
    return [m.step for m in points], [m.value for m in points]


def plot_curves(
    spec: SweepSpec, tracking: SweepTracking, out_dir: StorageLocation
) -> list[StorageLocation]:
    runs = tracking.child_runs()
    paths = []
    for file_name, (train_key, eval_key) in CURVES.items():
        figure, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
        for trial_id, run in sorted(runs.items()):
            for axis, key in zip(axes, (train_key, eval_key), strict=True):
                steps, values = _history(tracking, run.info.run_id, key)
                if steps:
                    axis.plot(
                        steps, values, label=trial_id, marker="." if key == eval_key else None
                    )
        for axis, key in zip(axes, (train_key, eval_key), strict=True):
            axis.set_title(key)
            axis.set_xlabel("step")
            axis.grid(alpha=0.3)
        axes[1].legend(fontsize=7, loc="best")
        figure.suptitle(f"{spec.name}: {train_key.split('/', 1)[1]} per trial")
        figure.tight_layout()
        paths.append(out_dir.save_figure(figure, file_name))
        plt.close(figure)
    return paths


def plot_metric_vs_knobs(
    spec: SweepSpec, rows: list[TrialRow], out_dir: StorageLocation
) -> list[StorageLocation]:
    paths = []
    for knob in [param_name(searched) for searched in searched_keys(spec)]:
        points = [
            (row.params.get(knob), row.metric, row.state) for row in rows if row.metric is not None
        ]
        if not points:
            continue
        figure, axis = plt.subplots(figsize=(6, 4))
        numeric = all(_is_number(value) for value, _, _ in points)
        labels = sorted({str(value) for value, _, _ in points})
        for value, metric, state in points:
            x = float(str(value)) if numeric else labels.index(str(value))
            axis.scatter(x, metric, c="tab:red" if state == "degenerate" else "tab:blue")
        if not numeric:
            axis.set_xticks(range(len(labels)), labels)
        elif knob in {"learning_rate"} or _spans_decades(points):
            axis.set_xscale("log")
        axis.set_xlabel(knob)
        axis.set_ylabel(spec.search.metric)
        axis.grid(alpha=0.3)
        axis.set_title(f"{spec.search.metric} vs {knob}")
        figure.tight_layout()
        paths.append(out_dir.save_figure(figure, f"metric_vs_{knob.replace('.', '_')}.png"))
        plt.close(figure)
    return paths


def _is_number(value: Any) -> bool:
    try:
        float(str(value))
    except ValueError:
        return False
    return True


def _spans_decades(points: list[tuple[Any, Any, Any]]) -> bool:
    values = [float(str(value)) for value, _, _ in points]
    return min(values) > 0 and max(values) / min(values) >= 100


# Trials shown side by side in generations.md: the best usable ones.
SIDE_BY_SIDE_TRIALS = 3
GENERATIONS_FILE = "generations.md"


def _cell(value: Any) -> str:
    """A value as one Markdown table cell: pipes escaped, no line breaks."""
    if isinstance(value, float):
        value = f"{value:.3g}"
    text = "" if value is None else str(value)
    return text.replace("|", "\\|").replace("\n", " ")[:300] or " "


# A prompt cell keeps this many characters: the start (its first role, or the mark of a cut)
# and the end (the last turn, which the generations answer), with a mark between.
PROMPT_CELL_CHARS = 600
PROMPT_CELL_HEAD_CHARS = 150


def prompt_cell(prompt: Any) -> str:
    """A generations table's prompt (engine.generation.render_prompt: one "[role] text" line
    per turn, and a mark where it was cut) as one Markdown cell: turns run on in one line, their
    roles tell them apart; a long one loses its middle, and says how much."""
    text = "" if prompt is None else " ".join(str(prompt).split("\n"))
    if len(text) > PROMPT_CELL_CHARS:
        tail_chars = PROMPT_CELL_CHARS - PROMPT_CELL_HEAD_CHARS
        left_out = len(text) - PROMPT_CELL_CHARS
        text = (
            f"{text[:PROMPT_CELL_HEAD_CHARS]} [… {left_out} characters left out here …] "
            f"{text[-tail_chars:]}"
        )
    return text.replace("|", "\\|") or " "


def generations_side_by_side(
    spec: SweepSpec, rows: list[TrialRow], tracking: SweepTracking
) -> str | None:
    """The top trials' last generations for the same prompts, one column each (Markdown);
    None when no trial logged generations (evaluation off)."""
    runs = tracking.child_runs()
    shown: list[tuple[TrialRow, int, dict[int, dict[str, Any]]]] = []
    for row in rows:
        if len(shown) == SIDE_BY_SIDE_TRIALS or row.trial_id not in runs:
            continue
        if not row.state.usable and shown:
            continue  # a degenerate or failed trial only when there is nothing better
        latest = latest_generations(tracking.client, runs[row.trial_id].info.run_id)
        if latest is not None:
            step, records = latest
            shown.append((row, step, {int(record["row"]): record for record in records}))
    if not shown:
        return None
    prompt_rows = list(shown[0][2])
    header = ["prompt", "chosen"] + [
        f"#{rows.index(row) + 1} {row.trial_id} (step {step})" for row, step, _ in shown
    ]
    lines = [
        f"# {spec.name}: generations of the top trials",
        "",
        f"Ranked by {spec.search.metric}; each trial's last generation evaluation, for the same "
        "held-out prompts, as the model saw them: [role] before each turn, and a mark where a "
        "prompt was cut. In brackets: the generation's score (chosen: the chosen response's).",
        "",
        "| trial | " + " | ".join(_cell(name) for name in header[2:]) + " |",
        "|---|" + "---|" * len(shown),
    ]
    for metric in ("score", "win_rate", "lc_win_rate", "length_tokens", "repetition", "truncated"):
        values = [row.metrics.get(f"eval/generation/{metric}") for row, _, _ in shown]
        if any(value is not None for value in values):
            lines.append(f"| {metric} | " + " | ".join(_cell(value) for value in values) + " |")
    lines += ["", "| " + " | ".join(_cell(name) for name in header) + " |"]
    lines.append("|" + "---|" * len(header))
    for prompt_row in prompt_rows:
        first = shown[0][2][prompt_row]
        cells = [prompt_cell(first["prompt"]), _scored(first["chosen"], first.get("chosen_score"))]
        for _, _, by_row in shown:
            record = by_row.get(prompt_row)
            cells.append(_scored(record["generation"], record.get("score")) if record else " ")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _scored(text: Any, score: Any) -> str:
    return _cell(text) + (f" [{score:.3g}]" if isinstance(score, int | float) else "")


def write_report(
    spec: SweepSpec,
    sweep_dir: StorageLocation,
    tracking: SweepTracking,
    *,
    log_to_mlflow: bool = True,
) -> tuple[str, list[StorageLocation]]:
    """The ranking from MLflow, the table and plots under <sweep>/report/, the plots logged to
    the parent run. Returns the table and the files."""
    rows = _rows_from_mlflow(spec, tracking)
    if not rows:
        raise SweepError(f"sweep {sweep_dir.name} has no trials recorded in MLflow")
    out_dir = sweep_dir / "report"
    out_dir.mkdirs()
    table = format_table(spec, rows)
    (out_dir / "results.md").write_text(table)
    plots = plot_curves(spec, tracking, out_dir) + plot_metric_vs_knobs(spec, rows, out_dir)
    side_by_side = generations_side_by_side(spec, rows, tracking)
    extra_files = []
    if side_by_side is not None:
        (out_dir / GENERATIONS_FILE).write_text(side_by_side)
        extra_files.append(out_dir / GENERATIONS_FILE)
        if log_to_mlflow:
            tracking.client.log_text(tracking.parent_run_id, side_by_side, GENERATIONS_FILE)
    if log_to_mlflow:
        with tempfile.TemporaryDirectory() as staging:
            for plot in plots:
                # MLflow uploads from local files; the plots may live in a bucket.
                local = Path(staging) / plot.name
                local.write_bytes(plot.read_bytes())
                tracking.client.log_artifact(tracking.parent_run_id, str(local), "plots")
    return table, [out_dir / "results.md", *extra_files, *plots]


def report(sweep: str, *, log_to_mlflow: bool = True) -> str:
    sweep_dir = find_sweep_dir(sweep)
    spec = load_sweep_spec(sweep_dir)
    uri = tracking_uri(spec)
    if uri is None:
        table_file = sweep_dir / "results.md"
        if not table_file.is_file():
            raise SweepError(f"{sweep_dir} has no results yet and tracking is off")
        return table_file.read_text()
    tracking = SweepTracking(
        uri,
        spec.experiment_name,
        spec.name,
        sweep_dir.name,
        artifact_location=artifact_location(spec),
    )
    table, files = write_report(spec, sweep_dir, tracking, log_to_mlflow=log_to_mlflow)
    listing = "\n".join(f"  {path}" for path in files)
    return f"{table}\nfiles:\n{listing}"
