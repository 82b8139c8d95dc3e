"""The README's main job: the quickstart sweep, run as a user runs it (not root: a user who
cannot write outside their own folders), finds a configuration that has learned the demo task
(held-out reward accuracy >= 0.9) and keeps everything it writes under its storage path."""

from __future__ import annotations

import contextlib
import csv
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from simpo_sweep.spec.models import SweepSpec

ROOT = Path(__file__).resolve().parent.parent
TEST_USER = "simpo-sweep-test"


def _unprivileged_user() -> pwd.struct_passwd:
    """This user when it is not root; as root, a system user made for the test."""
    if os.geteuid() != 0:
        return pwd.getpwuid(os.geteuid())
    try:
        return pwd.getpwnam(TEST_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/bin/sh", TEST_USER],
            check=True,
        )
        return pwd.getpwnam(TEST_USER)


@contextlib.contextmanager
def _interpreter_reachable_by_others() -> Iterator[None]:
    """As root, this venv's Python may live under /root (pyenv), which other users cannot
    enter: let them traverse (x, not read) the folders on its way for the test's duration."""
    opened = []
    real = Path(os.path.realpath(sys.executable))
    for folder in [*reversed(real.parents), *(Path(sys.prefix).resolve().parents)]:
        mode = folder.stat().st_mode
        if os.geteuid() == 0 and not mode & stat.S_IXOTH:
            folder.chmod(mode | stat.S_IXOTH)
            opened.append((folder, mode))
    try:
        yield
    finally:
        for folder, mode in opened:
            folder.chmod(mode)


@pytest.fixture
def user_home() -> Iterator[tuple[pwd.struct_passwd, Path]]:
    """The user, and a folder of theirs outside root's (pytest's tmp is root-only)."""
    user = _unprivileged_user()
    home = Path(tempfile.mkdtemp(prefix="simpo-user-"))
    os.chown(home, user.pw_uid, user.pw_gid)
    try:
        with _interpreter_reachable_by_others():
            yield user, home
    finally:
        shutil.rmtree(home, ignore_errors=True)


@pytest.mark.timeout(960)
def test_quickstart_sweep_finds_a_configuration_that_learns(
    user_home: tuple[pwd.struct_passwd, Path],
) -> None:
    user, tmp_path = user_home
    as_user = (
        ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups"]
        if os.geteuid() == 0
        else []
    )
    root_entries = set(os.listdir("/"))
    result = subprocess.run(
        [
            *as_user,
            sys.executable,
            "-m",
            "simpo_sweep.cli",
            "run",
            str(ROOT / "search_spaces" / "quickstart.yaml"),
            "--set",
            "storage.path=simpo_runs",  # relative, as a user writes it
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
        env={
            **{key: value for key, value in os.environ.items() if not key.startswith("RAY_")},
            "HOME": str(tmp_path),
            "RAY_TMPDIR": str(tmp_path / "ray"),
            "PYTHONUNBUFFERED": "1",
        },
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # Ray's own banners and per-checkpoint lines, and MLflow's download bars, stay out of the
    # sweep's output.
    noises = ("Checkpoint successfully created", "tensorboard", "Configuration for experiment")
    for noise in (*noises, "Downloading artifacts"):
        assert noise not in result.stdout + result.stderr
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

    # Every artifact of the embedded store is beside mlflow.db, none at the filesystem root.
    storage = tmp_path / "simpo_runs"
    assert set(os.listdir("/")) == root_entries
    client = MlflowClient(f"sqlite:///{storage / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("quickstart")
    assert experiment is not None
    (parent,) = client.search_runs(
        [experiment.experiment_id], filter_string="tags.`simpo_sweep.trial_id` = 'sweep'"
    )
    artifacts = storage / "mlartifacts"
    logged = {path.relative_to(artifacts).parts[-1] for path in artifacts.rglob("*.*")}
    assert {"results.md", "results.csv", "best_config.yaml", "spec.yaml"} <= logged
    assert any(name.endswith(".png") for name in logged)
    assert Path(parent.info.artifact_uri.removeprefix("file://")).is_relative_to(artifacts)
