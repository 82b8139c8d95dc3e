"""What a sweep leaves in MLflow, read back through MLflow's client from a real `mlflow server`
on loopback: nesting, params, metric histories, states and statuses, artifacts, the report,
and no secret anywhere. (The embedded default store is read back in test_sweep.py.)"""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from simpo_sweep.service.results import STATE_COMPLETED, STATE_DEGENERATE, STATE_STOPPED_EARLY
from simpo_sweep.service.sweep import SweepOutcome, run_sweep
from simpo_sweep.spec.loading import parse_spec
from simpo_sweep.tracking.mlflow_runs import (
    TAG_BEST_TRIAL_ID,
    TAG_DIAGNOSIS,
    TAG_PARENT,
    TAG_STATE,
    TAG_TRIAL_ID,
    TRIAL_STATES,
    MetricLogger,
    SweepTracking,
    artifact_root,
    default_tracking_uri,
    trial_index,
    trial_run_name,
)
from simpo_sweep.tracking.redact import redact

pytestmark = pytest.mark.usefixtures("ray_local")

URI_PASSWORD = "uri-pw-8d1f2a"
ENV_TOKEN = "hf_envtoken_5be7c9d1"
SPEC_TOKEN = "sig-4c2e9a77"
MAX_STEPS = 20


@dataclass
class RecordedSweep:
    outcome: SweepOutcome
    client: MlflowClient
    parent: Run
    children: dict[str, Run]  # by trial state
    stdout: str


SPEC = """
name: tracked
model: {{name: "builtin:tiny-llama"}}
data:
  source: "builtin:rule-following"
  max_length: 64
  max_prompt_length: 24
  # where the real data lives: https://data.example/prefs.jsonl?token={spec_token}
training: {{max_steps: {max_steps}, batch_size: 8, eval_every: 10, checkpoint_every: 10}}
simpo: {{beta: 2.5, gamma_beta_ratio: 0.5, sft_weight: 0.1}}
search:
  algorithm: grid
  num_samples: 1
  max_concurrent_trials: 1
  scheduler: {{type: asha, grace_period: 10, reduction_factor: 2}}
  space:
    learning_rate: {{type: grid, values: [3.0e-3, 1.0e-6, 1.0e+6]}}
resources: {{num_workers: 1, cpus_per_worker: 1}}
tracking:
  tracking_uri: "{uri}"
  experiment: tracked-sweeps
storage: {{path: "{storage}"}}
"""


@pytest.fixture(scope="module")
def recorded(
    mlflow_server: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RecordedSweep]:
    """One sweep, three trials in a fixed order: a good learning rate (completes), one 1e6x
    too low (ASHA stops it at step 10 under the bar the first set), one that diverges."""
    storage = tmp_path_factory.mktemp("tracked")
    host = mlflow_server.removeprefix("http://")
    text = SPEC.format(
        spec_token=SPEC_TOKEN,
        max_steps=MAX_STEPS,
        uri=f"http://simpo:{URI_PASSWORD}@{host}",
        storage=storage,
    )
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setenv("HF_TOKEN", ENV_TOKEN)
    printed: list[str] = []
    try:
        outcome = run_sweep(parse_spec(text), spec_text=text, printer=printed.append)
    finally:
        monkeypatch.undo()
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("tracked-sweeps")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [run for run in runs if run.data.tags[TAG_TRIAL_ID] == "sweep"]
    children = {
        run.data.tags[TAG_STATE]: run for run in runs if run.data.tags[TAG_TRIAL_ID] != "sweep"
    }
    yield RecordedSweep(outcome, client, parent, children, "\n".join(printed))


def test_one_child_run_per_trial_nested_under_the_sweep(recorded: RecordedSweep) -> None:
    assert len(recorded.children) == 3
    assert sorted(run.data.tags[TAG_TRIAL_ID] for run in recorded.children.values()) == sorted(
        row.trial_id for row in recorded.outcome.rows
    )
    for run in recorded.children.values():
        # mlflow.parentRunId is what the UI nests by.
        assert run.data.tags[TAG_PARENT] == recorded.parent.info.run_id
        assert run.data.tags["simpo_sweep.sweep_id"] == recorded.outcome.sweep_id


def test_child_params_are_the_full_resolved_config_with_flat_names(
    recorded: RecordedSweep,
) -> None:
    params = recorded.children[STATE_COMPLETED].data.params
    assert float(params["learning_rate"]) == 3e-3
    assert float(params["beta"]) == 2.5
    assert float(params["gamma_beta_ratio"]) == 0.5
    assert params["loss_type"] == "sigmoid"
    assert float(params["label_smoothing"]) == 0.0
    assert float(params["sft_weight"]) == 0.1
    assert int(params["max_steps"]) == MAX_STEPS
    assert params["model.name"] == "builtin:tiny-llama"
    assert int(params["data.max_length"]) == 64


def test_trial_states_diagnoses_and_mlflow_statuses(recorded: RecordedSweep) -> None:
    # Stopped early by ASHA is a normal end (its state tag says so); a degenerate trial was cut
    # short by its own diagnosis.
    expected = {
        STATE_COMPLETED: "FINISHED",
        STATE_STOPPED_EARLY: "FINISHED",
        STATE_DEGENERATE: "KILLED",
    }
    assert {state: run.info.status for state, run in recorded.children.items()} == expected
    diverged = recorded.children[STATE_DEGENERATE]
    assert float(diverged.data.params["learning_rate"]) == 1e6
    assert "diverged" in diverged.data.tags[TAG_DIAGNOSIS]
    assert float(recorded.children[STATE_STOPPED_EARLY].data.params["learning_rate"]) == 1e-6
    assert recorded.parent.info.status == "FINISHED"
    assert recorded.parent.data.tags["simpo_sweep.status"] == "completed"


def test_metric_histories_per_step_under_simpo_names(recorded: RecordedSweep) -> None:
    run_id = recorded.children[STATE_COMPLETED].info.run_id

    def steps(key: str) -> list[int]:
        return [metric.step for metric in recorded.client.get_metric_history(run_id, key)]

    for key in (
        "train/loss",
        "train/rewards/chosen",
        "train/rewards/rejected",
        "train/rewards/margins",
        "train/rewards/accuracies",
        "train/logps/chosen",
        "train/logps/rejected",
        "train/logits/chosen",
        "train/logits/rejected",
        "perf/tokens_per_s",
        "perf/step_time_s",
    ):
        assert steps(key) == list(range(1, MAX_STEPS + 1)), key
    for key in (
        "eval/loss",
        "eval/rewards/margins",
        "eval/rewards/accuracies",
        "eval/logps/chosen",
    ):
        assert steps(key) == [10, 20], key
    stopped = recorded.children[STATE_STOPPED_EARLY].info.run_id
    stopped_steps = [m.step for m in recorded.client.get_metric_history(stopped, "train/loss")]
    assert stopped_steps == list(range(1, 11))


def test_parent_run_holds_spec_space_results_and_plots(recorded: RecordedSweep) -> None:
    parent = recorded.parent
    assert parent.data.params["sweep.algorithm"] == "grid"
    assert parent.data.params["sweep.scheduler"] == "asha"
    assert int(parent.data.params["sweep.trials"]) == 3
    names = {
        item.path
        for folder in ("", "plots")
        for item in recorded.client.list_artifacts(parent.info.run_id, folder or None)
    }
    for expected in (
        "spec.yaml",
        "search_space.txt",
        "results.md",
        "results.csv",
        "best_config.yaml",
        "plots/reward_margins.png",
        "plots/reward_accuracies.png",
        "plots/metric_vs_learning_rate.png",
    ):
        assert expected in names, f"{expected} not in {sorted(names)}"
    best = yaml.safe_load(
        Path(recorded.client.download_artifacts(parent.info.run_id, "best_config.yaml")).read_text()
    )
    assert best["training"]["learning_rate"] == 3e-3


def _all_recorded_text(recorded: RecordedSweep, tmp_path: Path) -> str:
    parts = [recorded.stdout]
    for run in [recorded.parent, *recorded.children.values()]:
        parts += [f"{k}={v}" for k, v in {**run.data.params, **run.data.tags}.items()]
        local = Path(recorded.client.download_artifacts(run.info.run_id, "", str(tmp_path)))
        parts += [path.read_text(errors="replace") for path in local.rglob("*") if path.is_file()]
    sweep_dir = recorded.outcome.sweep_dir
    parts += [(sweep_dir / name).read_text() for name in ("results.md", "results.csv")]
    return "\n".join(parts)


def test_no_secret_reaches_params_tags_artifacts_or_output(
    recorded: RecordedSweep, tmp_path: Path
) -> None:
    text = _all_recorded_text(recorded, tmp_path)
    # The scan read the artifacts (the spec's own text), not only params and tags.
    assert "name: tracked" in text and "experiment: tracked-sweeps" in text
    for secret in (URI_PASSWORD, ENV_TOKEN, SPEC_TOKEN):
        assert secret not in text
    # The spec artifact is still the spec, with the secrets masked in place.
    spec_artifact = Path(
        recorded.client.download_artifacts(recorded.parent.info.run_id, "spec.yaml", str(tmp_path))
    ).read_text()
    assert "simpo:***@" in spec_artifact and "?token=***" in spec_artifact


def test_redact_masks_secret_keys_env_values_and_uri_passwords(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("WANDB_API_KEY", "k-0123456789")
    document: dict[str, Any] = {
        "hub_token": "hf_abcdefgh",
        "tokenizer": "meta-llama/Llama-3-8B",  # a key that merely contains 'token'
        "max_tokens": 512,
        "note": "uses k-0123456789 for logging",
        "db": "postgresql://mlflow:hunter2pw@db:5432/mlflow",
    }
    assert redact(document) == {
        "hub_token": "***",
        "tokenizer": "meta-llama/Llama-3-8B",
        "max_tokens": 512,
        "note": "uses *** for logging",
        "db": "postgresql://mlflow:***@db:5432/mlflow",
    }


def test_report_command_ranks_trials_and_writes_plots(recorded: RecordedSweep) -> None:
    sweep_dir = recorded.outcome.sweep_dir
    result = subprocess.run(
        [sys.executable, "-m", "simpo_sweep.cli", "report", str(sweep_dir), "--no-mlflow"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd="/",  # the sweep is found by its folder, whatever the current one
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert lines[1].split("|")[3].strip() == STATE_COMPLETED  # rank 1, under the header
    assert "diverged" in result.stdout
    for name in ("reward_margins.png", "reward_accuracies.png"):
        plot = sweep_dir / "report" / name
        assert plot.stat().st_size > 10_000 and plot.read_bytes()[:4] == b"\x89PNG"


def test_metric_logger_skips_steps_the_run_already_holds(mlflow_server: str) -> None:
    """A retried attempt replays steps after its checkpoint; the run keeps one point each."""
    client = MlflowClient(mlflow_server)
    experiment = client.create_experiment("logger-replay")
    run_id = client.create_run(experiment).info.run_id
    first = MetricLogger(mlflow_server, run_id)
    for step in range(1, 8):
        first.log(step, {"train/loss": 1.0 / step})
    first.close()
    retry = MetricLogger(mlflow_server, run_id)
    for step in range(5, 11):  # resumed from a checkpoint at step 4
        retry.log(step, {"train/loss": 1.0 / step})
    retry.close("completed", "healthy")
    history = client.get_metric_history(run_id, "train/loss")
    assert sorted(metric.step for metric in history) == list(range(1, 11))
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags[TAG_STATE] == "completed"


def test_ui_serves_the_embedded_store_of_a_sweep(tmp_path: Path) -> None:
    from conftest import free_port, stop_process_group, wait_http

    sweep_dir = tmp_path / "runs" / "demo-1"
    sweep_dir.mkdir(parents=True)
    (sweep_dir / "spec.yaml").write_text("name: demo\n")
    uri = f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    tracking = SweepTracking(uri, "demo", "demo", "demo-1")
    port = free_port()
    ui = subprocess.Popen(
        [sys.executable, "-m", "simpo_sweep.cli", "ui", str(sweep_dir), "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # mlflow's web workers go down with it
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/health", 180, ui)
        served = MlflowClient(f"http://127.0.0.1:{port}")
        assert served.get_run(tracking.parent_run_id).data.tags[TAG_TRIAL_ID] == "sweep"
    finally:
        stop_process_group(ui)


def test_ui_points_at_the_server_of_a_server_tracked_sweep(recorded: RecordedSweep) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "simpo_sweep.cli", "ui", str(recorded.outcome.sweep_dir)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "open that server's UI" in result.stderr and URI_PASSWORD not in result.stderr


def _new_sweep_tracking(uri: str) -> SweepTracking:
    sweep_id = f"summary-{uuid.uuid4().hex[:8]}"
    return SweepTracking(uri, f"experiment-{sweep_id}", "summary", sweep_id)


def test_parent_run_carries_the_sweep_outcome_and_a_resume_updates_it(mlflow_server: str) -> None:
    metric = "eval/rewards/accuracies"
    tracking = _new_sweep_tracking(mlflow_server)
    parent = tracking.parent_run_id
    best_params = {"learning_rate": 0.0012, "loss_type": "sigmoid", "label_smoothing": 0.1}
    counts = {"completed": 3, "stopped_early": 5, "degenerate": 1}
    for _ in range(2):  # the second time (a driver that reports twice) adds nothing
        tracking.log_sweep_summary(metric, 0.875, "a8692_00003", best_params, counts)
    run = tracking.client.get_run(parent)
    assert run.data.metrics[metric] == run.data.metrics[f"best/{metric}"] == 0.875
    assert {key: value for key, value in run.data.metrics.items() if key.startswith("trials/")} == {
        "trials/completed": 3.0,
        "trials/stopped_early": 5.0,
        "trials/degenerate": 1.0,
        "trials/failed": 0.0,
        "trials/unfinished": 0.0,
    }
    assert run.data.tags[TAG_BEST_TRIAL_ID] == "a8692_00003"
    assert run.data.tags["best.learning_rate"] == "0.0012"
    assert run.data.tags["best.loss_type"] == "sigmoid"
    assert run.data.tags["best.label_smoothing"] == "0.1"
    assert not run.data.params, "params could not change when a resume finds another best"
    assert len(tracking.client.get_metric_history(parent, metric)) == 1
    assert len(tracking.client.get_metric_history(parent, "trials/completed")) == 1

    # A resumed sweep finishes its trials and finds another best, under hinge.
    resumed_best = {"learning_rate": 0.0021, "loss_type": "hinge", "label_smoothing": None}
    resumed_counts = {"completed": 5, "stopped_early": 5, "degenerate": 1}
    tracking.log_sweep_summary(metric, 0.9375, "a8692_00009", resumed_best, resumed_counts)
    run = tracking.client.get_run(parent)
    assert run.data.metrics[metric] == run.data.metrics[f"best/{metric}"] == 0.9375
    assert run.data.metrics["trials/completed"] == 5.0
    assert run.data.metrics["trials/stopped_early"] == 5.0
    assert run.data.tags[TAG_BEST_TRIAL_ID] == "a8692_00009"
    assert run.data.tags["best.loss_type"] == "hinge"
    assert run.data.tags["best.label_smoothing"] == "n/a"
    assert len(tracking.client.get_metric_history(parent, "trials/stopped_early")) == 1


def test_a_sweep_without_a_usable_trial_still_counts_its_trials(mlflow_server: str) -> None:
    tracking = _new_sweep_tracking(mlflow_server)
    tracking.log_sweep_summary("eval/loss", None, None, {}, {"failed": 2})
    run = tracking.client.get_run(tracking.parent_run_id)
    assert run.data.metrics["trials/failed"] == 2.0
    assert "eval/loss" not in run.data.metrics and TAG_BEST_TRIAL_ID not in run.data.tags


def test_child_run_is_named_after_its_trial_and_reopened_not_duplicated(
    mlflow_server: str,
) -> None:
    tracking = _new_sweep_tracking(mlflow_server)
    name = trial_run_name(trial_index("a8692_00002"), {"simpo.beta": 2.5})
    assert name == "03 beta=2.5"
    run_id = tracking.child_run("a8692_00002", {"beta": 2.5}, run_name=name)
    tracking.finish_trial(run_id, "stopped_early", "stopped at step 10")
    assert tracking.client.get_run(run_id).info.status == "FINISHED"
    assert tracking.child_run("a8692_00002", {"beta": 2.5}, run_name=name) == run_id  # a retry
    (run,) = tracking.child_runs().values()
    assert (run.info.run_name, run.data.tags[TAG_TRIAL_ID]) == (name, "a8692_00002")
    assert (run.info.status, run.data.tags[TAG_STATE]) == ("RUNNING", "running")
    # Without a name, the trial id names it, as before.
    unnamed = tracking.child_run("a8692_00003", {"beta": 4.0})
    assert tracking.client.get_run(unnamed).info.run_name == "a8692_00003"


@pytest.mark.parametrize(
    ("state", "status"),
    [
        ("completed", "FINISHED"),
        ("stopped_early", "FINISHED"),
        ("degenerate", "KILLED"),
        ("unfinished", "KILLED"),
        ("failed", "FAILED"),
    ],
)
def test_final_state_to_mlflow_status(state: str, status: str) -> None:
    assert TRIAL_STATES[state] == status


@pytest.mark.parametrize(
    ("index", "sampled", "expected"),
    [
        (
            3,
            {
                "simpo.loss_type": "sigmoid",
                "simpo.gamma_beta_ratio": 0.05,
                "training.learning_rate": 0.0012,
                "simpo.beta": 1.8612,
            },
            "03 lr=1.2e-3 beta=1.86 gbr=0.05 sigmoid",
        ),
        (
            12,
            {
                "simpo.loss_type": "hinge",
                "simpo.label_smoothing": None,  # not sampled under hinge
                "simpo.sft_weight": 0.1,
                "training.learning_rate": 3.0e-7,
            },
            "12 lr=3e-7 sft=0.1 hinge",
        ),
        (
            None,
            {"data.max_length": 512, "simpo.label_smoothing": 0.125, "warmup_ratio": 25000.0},
            "ls=0.125 max_length=512 warmup_ratio=2.5e4",
        ),
        (105, {}, "105"),
    ],
)
def test_run_name_says_what_the_trial_tried(
    index: int | None, sampled: dict[str, Any], expected: str
) -> None:
    assert trial_run_name(index, sampled) == expected


@pytest.mark.parametrize(
    ("trial_id", "index"),
    [("a8692_00011", 12), ("a8692_00000", 1), ("2f0c1_10000", 10001), ("sweep", None)],
)
def test_trial_index_from_the_tune_trial_id(trial_id: str, index: int | None) -> None:
    assert trial_index(trial_id) == index


def _files_under(folder: Path) -> set[Path]:
    return {path for path in folder.rglob("*") if path.is_file()}


@pytest.mark.parametrize("form", ["absolute", "relative"])
def test_embedded_store_keeps_artifacts_beside_its_database(
    form: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """sqlite:////abs/x/mlflow.db and sqlite:///rel/x/mlflow.db (from the current folder): the
    artifacts land in x/mlartifacts, nothing in the current folder or outside tmp_path (the
    old root, file:////abs/..., wrote to /<abs without its first part>/mlartifacts)."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    store = work / "runs" / "x"
    uri = f"sqlite:///{store / 'mlflow.db'}" if form == "absolute" else "sqlite:///runs/x/mlflow.db"
    assert artifact_root(uri) == (store / "mlartifacts").as_uri()
    tracking = SweepTracking(uri, "artifacts", "artifacts", "artifacts-1")
    tracking.client.log_text(tracking.parent_run_id, "what the sweep found", "results.md")

    run = tracking.client.get_run(tracking.parent_run_id)
    assert run.info.artifact_uri.startswith((store / "mlartifacts").as_uri() + "/")
    (artifact,) = (store / "mlartifacts").rglob("results.md")
    assert artifact.read_text() == "what the sweep found"
    assert _files_under(tmp_path) == {store / "mlflow.db", artifact}
    assert not Path("/", *tmp_path.parts[2:]).exists()  # where the old root put them
    downloaded = tracking.client.download_artifacts(
        tracking.parent_run_id, "results.md", str(tmp_path / "download")
    )
    assert Path(downloaded).read_text() == "what the sweep found"


def test_default_tracking_uri_is_an_absolute_sqlite_uri_in_the_storage_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    uri = default_tracking_uri("simpo_runs")
    assert uri == f"sqlite:///{tmp_path.resolve()}/simpo_runs/mlflow.db"
    assert uri.startswith("sqlite:////")  # SQLAlchemy's absolute form: four slashes
    assert artifact_root(uri) == (tmp_path.resolve() / "simpo_runs" / "mlartifacts").as_uri()
    SweepTracking(uri, "default", "default", "default-1")
    assert (tmp_path / "simpo_runs" / "mlflow.db").is_file()
