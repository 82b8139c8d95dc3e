"""Sweeps on a real local Ray instance, on the built-in demo: search algorithms, ASHA, worker
failures, interruption and resume, degenerate trials (2-worker DDP and FSDP trials against one
worker: tests/test_fsdp.py). MLflow is the embedded
store unless a test says otherwise; test_tracking.py reads the runs back in detail."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient
from ray.tune.search.variant_generator import generate_variants

from simpo_sweep.service.results import (
    STATE_COMPLETED,
    STATE_DEGENERATE,
    STATE_STOPPED_EARLY,
)
from simpo_sweep.service.search import param_space
from simpo_sweep.service.sweep import SweepOutcome, run_sweep
from simpo_sweep.spec.models import SweepSpec
from simpo_sweep.tracking.mlflow_runs import TAG_TRIAL_ID, SweepTracking

pytestmark = pytest.mark.usefixtures("ray_local")


def demo_spec(tmp_path: Path, **sections: Any) -> dict[str, Any]:
    """A short demo sweep; sections given replace (or extend) the defaults."""
    spec: dict[str, Any] = {
        "name": "t",
        "model": {"name": "builtin:tiny-llama"},
        "data": {"source": "builtin:rule-following", "max_length": 64, "max_prompt_length": 24},
        "training": {
            "max_steps": 20,
            "batch_size": 8,
            "learning_rate": 3.0e-3,
            "eval_every": 10,
            "checkpoint_every": 10,
        },
        "search": {"algorithm": "random", "num_samples": 1, "max_concurrent_trials": 2},
        "resources": {"num_workers": 1, "cpus_per_worker": 1},
        "storage": {"path": str(tmp_path / "runs")},
    }
    for section, value in sections.items():
        if isinstance(value, dict) and isinstance(spec.get(section), dict):
            spec[section] = {**spec[section], **value}
        else:
            spec[section] = value
    return spec


def sweep(spec: dict[str, Any]) -> SweepOutcome:
    return run_sweep(SweepSpec.model_validate(spec), printer=lambda _line: None)


def child_runs(outcome: SweepOutcome, spec: dict[str, Any]) -> dict[str, Any]:
    validated = SweepSpec.model_validate(spec)
    uri = f"sqlite:///{Path(spec['storage']['path']).resolve() / 'mlflow.db'}"
    return SweepTracking(uri, validated.name, validated.name, outcome.sweep_id).child_runs()


def test_grid_search_with_asha_stops_the_bad_learning_rates(tmp_path: Path) -> None:
    spec = demo_spec(
        tmp_path,
        training={"max_steps": 60, "batch_size": 16, "eval_every": 30, "checkpoint_every": 60},
        search={
            "algorithm": "grid",
            "max_concurrent_trials": 2,
            "space": {"learning_rate": {"type": "grid", "values": [1e-3, 2e-3, 1e-6, 2e-6]}},
            "scheduler": {"type": "asha", "grace_period": 30, "reduction_factor": 4},
        },
    )
    outcome = sweep(spec)
    by_lr = {row.params["learning_rate"]: row for row in outcome.rows}
    assert sorted(by_lr) == [1e-6, 2e-6, 1e-3, 2e-3]
    # The good learning rates run first and set the bar at the rung (step 30, the top quarter
    # passes); the 1000x lower ones, still at chance there, fall under it and are stopped.
    for low in (1e-6, 2e-6):
        assert (by_lr[low].state, by_lr[low].step) == (STATE_STOPPED_EARLY, 30)
    assert STATE_COMPLETED in {by_lr[1e-3].state, by_lr[2e-3].state}
    assert outcome.best is not None and outcome.best.params["learning_rate"] > 1e-3
    # The best configuration is a spec that validates and searches nothing.
    best = SweepSpec.model_validate(
        yaml.safe_load((outcome.sweep_dir / "best_config.yaml").read_text())
    )
    assert (
        best.search.space == {}
        and best.training.learning_rate == outcome.best.params["learning_rate"]
    )
    with (outcome.sweep_dir / "results.csv").open() as handle:
        header, *trials = list(csv.reader(handle))
    assert len(trials) == 4
    assert len(header) == len(set(header)), f"a column twice: {header}"


def test_random_search_leaves_label_smoothing_unsampled_under_hinge(tmp_path: Path) -> None:
    spec = demo_spec(
        tmp_path,
        training={"max_steps": 10, "eval_every": 10, "checkpoint_every": 10},
        search={
            "algorithm": "random",
            "num_samples": 4,
            "seed": 3,
            "space": {
                "loss_type": {"type": "choice", "values": ["sigmoid", "hinge"]},
                "label_smoothing": {"type": "uniform", "low": 0.05, "high": 0.3},
                "beta": {"type": "loguniform", "low": 1.0, "high": 10.0},
            },
        },
    )
    outcome = sweep(spec)
    assert len(outcome.rows) == 4
    loss_types = {row.params["loss_type"] for row in outcome.rows}
    assert loss_types == {"sigmoid", "hinge"}, f"seed 3 no longer samples both: {loss_types}"
    for row in outcome.rows:
        smoothing = row.params["label_smoothing"]
        if row.params["loss_type"] == "hinge":
            assert smoothing is None
        else:
            assert 0.05 <= smoothing <= 0.3
        assert 1.0 <= row.params["beta"] <= 10.0
    assert len({row.params["beta"] for row in outcome.rows}) == 4


def test_random_search_with_a_seed_draws_the_same_trials_every_time(tmp_path: Path) -> None:
    """The conditional label_smoothing included: it is drawn outside Tune's seeded generator."""
    spec = SweepSpec.model_validate(
        demo_spec(
            tmp_path,
            search={
                "algorithm": "random",
                "num_samples": 8,
                "seed": 3,
                "space": {
                    "loss_type": {"type": "choice", "values": ["sigmoid", "hinge"]},
                    "label_smoothing": {"type": "uniform", "low": 0.05, "high": 0.3},
                    "beta": {"type": "loguniform", "low": 1.0, "high": 10.0},
                },
            },
        )
    )

    def draw() -> list[dict[str, Any]]:
        # As BasicVariantGenerator does: a fresh space, one seeded generator across samples.
        space = param_space(spec, spec.search)
        generator = np.random.default_rng(spec.search.seed)
        return [
            config
            for _ in range(spec.search.num_samples)
            for _, config in generate_variants(space, random_state=generator)
        ]

    first, second = draw(), draw()
    assert first == second
    assert any(config["simpo.label_smoothing"] is not None for config in first)


def test_optuna_tpe_search(tmp_path: Path) -> None:
    spec = demo_spec(
        tmp_path,
        training={"max_steps": 10, "eval_every": 10, "checkpoint_every": 10},
        search={
            "algorithm": "optuna",
            "num_samples": 3,
            "max_concurrent_trials": 1,
            "space": {
                "learning_rate": {"type": "loguniform", "low": 1e-4, "high": 3e-3},
                "gamma_beta_ratio": {"type": "uniform", "low": 0.0, "high": 1.0, "q": 0.1},
                "sft_weight": {"type": "choice", "values": [0.0, 0.5]},
            },
        },
    )
    outcome = sweep(spec)
    assert [row.state for row in outcome.rows] == [STATE_COMPLETED] * 3
    for row in outcome.rows:
        assert 1e-4 <= row.params["learning_rate"] <= 3e-3
        assert row.params["sft_weight"] in (0.0, 0.5)
        assert (
            abs(row.params["gamma_beta_ratio"] * 10 - round(row.params["gamma_beta_ratio"] * 10))
            < 1e-9
        )
        assert row.metric is not None
    runs = child_runs(outcome, spec)
    assert sorted(runs) == sorted(row.trial_id for row in outcome.rows)


def test_nan_configuration_is_stopped_and_labelled_while_the_rest_complete(tmp_path: Path) -> None:
    spec = demo_spec(
        tmp_path,
        training={"max_steps": 20, "eval_every": 10, "checkpoint_every": 20, "max_grad_norm": None},
        search={
            "algorithm": "grid",
            "space": {"learning_rate": {"type": "grid", "values": [3e-3, 1e6]}},
        },
    )
    outcome = sweep(spec)
    by_lr = {row.params["learning_rate"]: row for row in outcome.rows}
    healthy, diverged = by_lr[3e-3], by_lr[1e6]
    assert healthy.state == STATE_COMPLETED and healthy.step == 20
    assert diverged.state == STATE_DEGENERATE
    assert diverged.step < 20
    assert "nan" in diverged.diagnosis.lower() or "inf" in diverged.diagnosis.lower()
    runs = child_runs(outcome, spec)
    run = runs[diverged.trial_id]
    assert run.info.status == "KILLED"
    assert run.data.tags["simpo_sweep.state"] == STATE_DEGENERATE
    assert run.data.tags["simpo_sweep.diagnosis"] == diverged.diagnosis
    assert outcome.best is not None and outcome.best.trial_id == healthy.trial_id


def _first_results(storage: Path) -> list[str]:
    return [
        line
        for result_file in storage.rglob("result.json")
        for line in result_file.read_text().splitlines()
    ]


def test_killed_trial_process_is_retried_from_its_checkpoint(tmp_path: Path) -> None:
    spec = demo_spec(
        tmp_path,
        training={"max_steps": 600, "eval_every": 200, "checkpoint_every": 20, "batch_size": 4},
        resources={"num_workers": 1, "cpus_per_worker": 1, "max_failures": 2},
    )
    outcome: list[SweepOutcome] = []
    runner = threading.Thread(target=lambda: outcome.append(sweep(spec)))
    runner.start()
    storage = Path(spec["storage"]["path"])
    deadline = time.monotonic() + 240
    # Kill the trial's process (Tune records its pid with every result) once it has
    # reported a checkpoint.
    while not _first_results(storage) and time.monotonic() < deadline:
        time.sleep(0.2)
    results = _first_results(storage)
    assert results, "no result before the deadline"
    os.kill(int(json.loads(results[-1])["pid"]), signal.SIGKILL)
    runner.join(timeout=400)
    assert outcome, "the sweep did not finish"
    (row,) = outcome[0].rows
    assert row.state == STATE_COMPLETED and row.step == 600
    (run,) = child_runs(outcome[0], spec).values()
    resumed_from = int(run.data.tags["simpo_sweep.resumed_from_step"])
    assert 20 <= resumed_from < 600 and resumed_from % 20 == 0
    client = MlflowClient(f"sqlite:///{storage.resolve() / 'mlflow.db'}")
    steps = [metric.step for metric in client.get_metric_history(run.info.run_id, "train/loss")]
    assert steps == list(range(1, 601)), "steps lost or logged twice across the retry"


@pytest.fixture
def cli_env() -> Iterator[dict[str, str]]:
    yield {**os.environ, "PYTHONUNBUFFERED": "1"}


def _an_unfinished_trial_has_checkpointed(storage: Path) -> bool:
    try:
        (states,) = storage.glob("*/trial_states.json")
        finished = set(json.loads(states.read_text()))
    except ValueError:  # none yet, or caught half-written
        return False
    # Tune's trial folders are run_trial_<trial id>_<index>_..., holding checkpoint_NNNNNN
    checkpointed = {
        "_".join(folder.parent.name.split("_")[2:4])
        for folder in storage.glob("*/run_trial_*/checkpoint_[0-9]*")
    }
    return bool(finished) and bool(checkpointed - finished)


def test_interrupted_sweep_resumes_without_rerunning_finished_trials(
    tmp_path: Path, cli_env: dict[str, str]
) -> None:
    spec = demo_spec(
        tmp_path,
        training={"max_steps": 150, "eval_every": 50, "checkpoint_every": 25},
        search={
            "algorithm": "grid",
            "max_concurrent_trials": 1,
            "space": {"beta": {"type": "grid", "values": [2.0, 4.0, 8.0]}},
        },
    )
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec))
    cli = [sys.executable, "-m", "simpo_sweep.cli"]
    log = (tmp_path / "run.log").open("w")
    process = subprocess.Popen(
        [*cli, "run", str(spec_path)], stdout=log, stderr=subprocess.STDOUT, env=cli_env
    )
    storage = Path(spec["storage"]["path"])
    deadline = time.monotonic() + 300
    # Interrupt once the first trial has finished and the second has checkpointed (the
    # finished one keeps its checkpoints too: only those of an unfinished trial count).
    while time.monotonic() < deadline and process.poll() is None:
        if _an_unfinished_trial_has_checkpointed(storage):
            break
        time.sleep(0.5)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=120) == 130, (tmp_path / "run.log").read_text()[-3000:]
    (sweep_dir,) = [path.parent for path in storage.glob("*/spec.yaml")]
    finished_before = set(yaml.safe_load((sweep_dir / "trial_states.json").read_text()))
    assert 1 <= len(finished_before) < 3
    assert "simpo-sweep resume" in (tmp_path / "run.log").read_text()
    client = MlflowClient(f"sqlite:///{storage.resolve() / 'mlflow.db'}")
    experiment_id = client.get_experiment_by_name("t").experiment_id
    interrupted = {run.data.tags[TAG_TRIAL_ID]: run for run in client.search_runs([experiment_id])}
    assert interrupted["sweep"].info.status == "KILLED"
    assert interrupted["sweep"].data.tags["simpo_sweep.status"] == "interrupted"
    started_unfinished = [
        run
        for trial, run in interrupted.items()
        if trial != "sweep" and trial not in finished_before
    ]
    assert started_unfinished, "the interrupted trial has no run"
    for run in started_unfinished:
        assert (run.info.status, run.data.tags["simpo_sweep.state"]) == ("KILLED", "unfinished")

    resumed = subprocess.run(
        [*cli, "resume", str(sweep_dir)], capture_output=True, text=True, env=cli_env, timeout=400
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    for trial_id in finished_before:
        assert f"{trial_id} started" not in resumed.stdout, f"{trial_id} ran again"
    with (sweep_dir / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(row["state"] for row in rows) == [STATE_COMPLETED] * 3
    runs = client.search_runs(experiment_id)
    trial_ids = [run.data.tags[TAG_TRIAL_ID] for run in runs]
    assert sorted(trial_ids) == sorted([*(row["trial_id"] for row in rows), "sweep"])
    assert all(run.info.status == "FINISHED" for run in runs)
    for run in runs:
        if run.data.tags[TAG_TRIAL_ID] == "sweep":
            continue
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
        assert steps == list(range(1, 151)), run.data.tags[TAG_TRIAL_ID]
