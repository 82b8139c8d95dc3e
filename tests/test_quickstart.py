"""The README's main job: the quickstart sweep, run as a user runs it, finds a configuration
that has learned the demo task (held-out reward accuracy >= 0.9)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import yaml

from simpo_sweep.spec.models import SweepSpec

ROOT = Path(__file__).resolve().parent.parent


def test_quickstart_sweep_finds_a_configuration_that_learns(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "simpo_sweep.cli",
            "run",
            str(ROOT / "search_spaces" / "quickstart.yaml"),
            "--set",
            f"storage.path={tmp_path / 'simpo_runs'}",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (results,) = (tmp_path / "simpo_runs").glob("quickstart-*/results.csv")
    with results.open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 12
    accuracies = [float(row["eval/rewards/accuracies"] or -1) for row in rows]
    assert max(accuracies) >= 0.9
    # The sweep separates configurations: not every trial learns the task.
    assert min(accuracies) < 0.8
    best = SweepSpec.model_validate(
        yaml.safe_load((results.parent / "best_config.yaml").read_text())
    )
    best_row = max(rows, key=lambda row: float(row["eval/rewards/accuracies"] or -1))
    assert best.training.learning_rate == float(best_row["learning_rate"])
    assert f"best trial {best_row['trial_id']}" in result.stdout
