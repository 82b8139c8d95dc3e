"""What the CLI prints for validate, run and ui."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from simpo_sweep.service.errors import SweepError
from simpo_sweep.service.results import TrialRow, format_table
from simpo_sweep.service.storage import find_sweep_dir, load_sweep_spec, tracking_uri
from simpo_sweep.service.sweep import SweepOutcome, alive_nodes, cluster_resources, connect
from simpo_sweep.spec.loading import Problem, SpecError, check_resources, load_spec
from simpo_sweep.spec.models import GENERATION_METRIC_PREFIX, SweepSpec
from simpo_sweep.spec.space import (
    count_trials,
    describe_space,
    largest_memory_trial,
    param_name,
    searched_keys,
)
from simpo_sweep.tracking.mlflow_runs import is_local_store
from simpo_sweep.tracking.redact import redact_text


def _local_resources() -> dict[str, float]:
    cpus = float(os.cpu_count() or 1)
    gpus = 0.0
    try:
        import torch

        gpus = float(torch.cuda.device_count())
    except ImportError:
        pass
    return {"CPU": cpus, "GPU": gpus}


def _cluster_resources(address: str) -> dict[str, float]:
    connect(address)
    return cluster_resources(alive_nodes())


def validate(spec: SweepSpec, address: str | None = None) -> str:
    """The spec checked everywhere; its resources against the cluster at `address` (refused
    when it cannot run there), else against this machine as a note only: a spec written for
    a GPU cluster is checked on a laptop before it is submitted."""
    notes = []
    if address:
        problems = check_resources(
            spec, _cluster_resources(address), f"the Ray cluster at {address}"
        )
        if problems:
            raise SpecError("resources", problems)
    else:
        problems = check_resources(spec, _local_resources(), "this machine")
        if problems:
            reasons = "; ".join(f"{problem.path}: {problem.message}" for problem in problems)
            notes.append(
                f"note: this machine cannot run it: {reasons}; it is checked again by run "
                "and submit (against the cluster they use)"
            )
    memory = memory_lines(spec)
    lines = [f"spec OK: sweep '{spec.name}'", "search space:"]
    lines += [f"  {line}" for line in describe_space(spec)]
    if not searched_keys(spec):
        lines.append("  (nothing searched: one configuration)")
    scheduler = spec.search.scheduler
    lines += [
        f"algorithm: {spec.search.algorithm}; scheduler: {scheduler.type}"
        + (f" (grace period {scheduler.grace_period} steps)" if scheduler.type == "asha" else ""),
        f"trials: {count_trials(spec)} (grid size x num_samples {spec.search.num_samples}); "
        f"at most {spec.search.max_concurrent_trials} at once",
        f"per trial: {spec.resources.num_workers} worker(s) "
        f"x {spec.resources.cpus_per_worker:g} CPU"
        + (f", {spec.resources.gpus_per_worker:g} GPU" if spec.resources.gpus_per_worker else ""),
        *memory,
        *notes,
        *data_lines(spec),
    ]
    return "\n".join(lines)


def memory_lines(spec: SweepSpec) -> list[str]:
    """The memory plan of the sweep's largest trial (searched batch sizes, lengths, token
    budgets and LoRA ranks at their largest), refused when resources.gpu_memory_gb is given
    and the plan does not fit it."""
    from simpo_sweep.engine.memory import plan_trial
    from simpo_sweep.engine.models import lost_update_warning, resolve_precision

    largest, values = largest_memory_trial(spec)
    try:
        memory = plan_trial(largest.model, largest.data, largest.training, largest.resources)
    except (OSError, ValueError) as error:
        return [f"memory plan: unknown ({redact_text(str(error)).splitlines()[0]})"]
    refusal = memory.refusal()
    if refusal:
        raise SpecError("memory plan", [Problem("resources.gpu_memory_gb", refusal)])
    title = "memory plan" + (
        " (the largest trial: "
        + ", ".join(f"{param_name(path)}={value:g}" for path, value in values.items())
        + ")"
        if values
        else ""
    )
    lines = [f"{title}:", *(f"  {line}" for line in memory.lines())]
    if memory.memory_gb is None and spec.resources.gpus_per_worker > 0:
        lines.append("  (set resources.gpu_memory_gb to have it checked against the GPU)")
    device = "cuda" if spec.resources.gpus_per_worker > 0 else "cpu"
    if resolve_precision(spec.training.precision, device) == "bf16-true":
        lines.append(f"warning: {lost_update_warning(spec.training.learning_rate)}")
    return lines


def data_lines(spec: SweepSpec) -> list[str]:
    """The data checked as `run` would read it (a sample of local files; hub sources only
    when reachable), its summary printed; problems refused like the spec's, all at once."""
    from simpo_sweep.engine.data import DataError, DataProblems, inspect_data

    try:
        inspection = inspect_data(spec.model, spec.data)
    except DataProblems as error:
        raise SpecError("data", [Problem("data", problem) for problem in error.problems]) from None
    except DataError as error:
        raise SpecError("data", [Problem("data", str(error))]) from None
    return inspection.lines()


def print_outcome(spec: SweepSpec, outcome: SweepOutcome) -> None:
    print()
    print(format_table(spec, outcome.rows))
    if outcome.status != "completed":
        print(
            f"sweep {outcome.sweep_id} interrupted; continue it with: "
            f"simpo-sweep resume {outcome.location}"
        )
        return
    if outcome.best is None:
        print(
            f"sweep {outcome.sweep_id} found no usable trial: every trial failed or was "
            "degenerate (see the diagnosis column); exit code 1",
            file=sys.stderr,
        )
        return
    best = outcome.best
    knobs = ", ".join(
        f"{name}={'n/a' if value is None else value}" for name, value in best.params.items()
    )
    print(f"best trial {best.trial_id}: {spec.search.metric} = {best.metric:.4f} ({knobs})")
    cost = outcome.cost
    if cost is not None and cost.per_trial:
        share = cost.saved_by_early_stops / (cost.total + cost.saved_by_early_stops)
        print(
            f"cost: {cost.total:.3g} {cost.unit}-hours in all; early stops saved "
            f"{cost.saved_by_early_stops:.3g} ({share:.0%}) against every trial run to max_steps; "
            f"checkpoints hold {outcome.checkpoint_bytes / 1e6:.0f} MB"
        )
    for line in generation_score_lines(spec, outcome.rows, best):
        print(line)
    for name, path in outcome.files.items():
        print(f"  {name}: {path}")


def generation_score_lines(spec: SweepSpec, rows: list[TrialRow], best: TrialRow) -> list[str]:
    """The best trial's generation score and the poorest-ranked scored trial's, so a reward
    metric that rose while the generations did not is seen at the end of the run."""
    key = f"{GENERATION_METRIC_PREFIX}score"
    if not spec.evaluation.enabled or not spec.evaluation.scored:
        return []
    scored = [row for row in rows if key in row.metrics]
    if best not in scored:
        return [f"generation score ({spec.evaluation.scorer}): best trial has none recorded"]
    poor = next((row for row in reversed(scored) if row is not best), None)
    lines = [
        f"generation score ({spec.evaluation.scorer}, mean over "
        f"{spec.evaluation.num_prompts} held-out prompts):",
        f"  best trial {best.trial_id}: {best.metrics[key]:.3f}" + _length_note(best),
    ]
    if poor is not None:
        lines.append(
            f"  a poor trial {poor.trial_id} ({poor.state}, rank {rows.index(poor) + 1}): "
            f"{poor.metrics[key]:.3f}" + _length_note(poor)
        )
    return lines


def _length_note(row: TrialRow) -> str:
    length = row.metrics.get(f"{GENERATION_METRIC_PREFIX}length_tokens")
    repetition = row.metrics.get(f"{GENERATION_METRIC_PREFIX}repetition")
    if length is None or repetition is None:
        return ""
    return f" (length {length:.1f} tokens, repetition {repetition:.2f})"


def ui_command(sweep: str | None, host: str, port: int) -> list[str]:
    """`mlflow ui` on the tracking store of a sweep folder, a spec, or ./simpo_runs."""
    if sweep and Path(sweep).is_file():
        spec = load_spec(sweep)
    elif sweep:
        spec = load_sweep_spec(find_sweep_dir(sweep))
    else:
        spec = SweepSpec(name="default")
    uri = tracking_uri(spec)
    if uri is None:
        raise SweepError("tracking is off for this sweep (tracking.enabled: false)")
    if not is_local_store(uri):
        raise SweepError(f"this sweep tracks to {redact_text(uri)}: open that server's UI")
    mlflow = shutil.which("mlflow") or str(Path(sys.executable).with_name("mlflow"))
    # One worker: a UI for one person; the default spawns several processes.
    return [
        mlflow,
        "ui",
        "--backend-store-uri",
        uri,
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        "1",
    ]
