"""Orchestration overhead of a sweep: what a trial costs before and around its training.

Runs the same sweep twice in one Ray instance:
  in-trial      single-worker trials run their loop inside the Tune trial (Ray Train local
                mode; the default, `resources.single_worker_in_trial: true`);
  worker-group  the naive pattern: every trial starts a TorchTrainer worker group.
For each it prints the time from a trial's start to its first optimizer step (median and
max over trials) and the share of the sweep's slot time (wall time x concurrent trials) that
is not spent inside the training loop, then the ratios worker-group / in-trial.

    python bench/orchestration.py                       # the quickstart, 4 trials
    python bench/orchestration.py --spec SPEC --trials 8
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from simpo_sweep.service.results import TrialRow
from simpo_sweep.service.sweep import connect, run_sweep
from simpo_sweep.spec.loading import load_spec
from simpo_sweep.spec.models import NoScheduler
from simpo_sweep.trial.worker import FIT_TIME, STARTUP

ROOT = Path(__file__).resolve().parent.parent
MODES = {"in-trial": True, "worker-group": False}


def measure(spec_path: Path, trials: int, in_trial: bool, storage: Path) -> dict[str, float]:
    spec = load_spec(
        spec_path,
        [
            f"search.num_samples={trials}",
            f"resources.single_worker_in_trial={str(in_trial).lower()}",
            f"storage.path={storage}",
        ],
    )
    # Every trial runs to the end: the comparison is of overhead, not of early stopping.
    spec = spec.model_copy(
        update={"search": spec.search.model_copy(update={"scheduler": NoScheduler(type="none")})}
    )
    started = time.perf_counter()
    outcome = run_sweep(spec, printer=lambda _line: None)
    wall = time.perf_counter() - started
    rows: list[TrialRow] = outcome.rows
    startups = [row.metrics[STARTUP] for row in rows if STARTUP in row.metrics]
    fit_time = sum(row.metrics.get(FIT_TIME, 0.0) for row in rows)
    slots = min(spec.search.max_concurrent_trials, len(rows))
    return {
        "trials": len(rows),
        "wall_s": wall,
        "startup_median_s": statistics.median(startups),
        "startup_max_s": max(startups),
        "not_training_share": 1.0 - fit_time / (wall * slots),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", type=Path, default=ROOT / "search_spaces" / "quickstart.yaml")
    parser.add_argument("--trials", type=int, default=4)
    args = parser.parse_args()
    connect(None)
    results = {}
    with tempfile.TemporaryDirectory(prefix="simpo-bench-") as storage:
        for mode, in_trial in MODES.items():
            results[mode] = measure(args.spec, args.trials, in_trial, Path(storage) / mode)
    print(f"\n{args.spec.name}, {args.trials} trials, same Ray instance\n")
    print(f"{'':14}{'wall s':>8}{'start->1st step s (median/max)':>32}{'not training':>14}")
    for mode, row in results.items():
        print(
            f"{mode:14}{row['wall_s']:8.1f}"
            f"{row['startup_median_s']:>24.1f} / {row['startup_max_s']:<5.1f}"
            f"{row['not_training_share']:>14.0%}"
        )
    ours, naive = results["in-trial"], results["worker-group"]
    print(
        f"\nworker-group / in-trial: start->first step x"
        f"{naive['startup_median_s'] / ours['startup_median_s']:.1f}, "
        f"wall x{naive['wall_s'] / ours['wall_s']:.2f}"
    )


if __name__ == "__main__":
    main()
