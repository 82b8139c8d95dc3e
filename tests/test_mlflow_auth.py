"""A sweep against a real MLflow server with authentication (cluster/mlflow/server.sh with
MLFLOW_AUTH=basic, MLflow's basic-auth app) on loopback: the right credentials work, a wrong
password stops the sweep before any trial with one clear line, and the password appears in no
param, tag, artifact or printed output."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from conftest import MlflowServer
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow

ADMIN = "admin"


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """(URI, admin password) of an authenticating server; the password only in the env."""
    password = secrets.token_urlsafe(16)
    server = MlflowServer.start(
        tmp_path_factory.mktemp("mlflow-auth"),
        env={
            "MLFLOW_AUTH": "basic",
            "MLFLOW_AUTH_ADMIN_PASSWORD": password,
            "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
        },
    )
    try:
        server.wait_ready(90)
        yield server.uri, password
    finally:
        server.stop()
    assert password not in server.log.read_text()


def _spec(tmp_path: Path, uri: str) -> Path:
    spec = {
        "name": "auth",
        "data": {"source": "builtin:rule-following", "max_length": 64, "max_prompt_length": 24},
        "training": {"max_steps": 10, "batch_size": 8, "eval_every": 10, "checkpoint_every": 10},
        "search": {
            "algorithm": "grid",
            "space": {"learning_rate": {"type": "grid", "values": [1e-3]}},
        },
        "tracking": {"tracking_uri": uri},
        "storage": {"path": str(tmp_path / "runs")},
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _run(spec: Path, username: str, password: str) -> subprocess.CompletedProcess[str]:
    env = {
        **{key: value for key, value in os.environ.items() if not key.startswith("MLFLOW_")},
        "MLFLOW_TRACKING_USERNAME": username,
        "MLFLOW_TRACKING_PASSWORD": password,
        "PYTHONUNBUFFERED": "1",
    }
    return subprocess.run(
        [sys.executable, "-m", "simpo_sweep.cli", "run", str(spec)],
        capture_output=True,
        text=True,
        env=env,
        timeout=450,
    )


def test_a_wrong_password_stops_the_sweep_before_any_trial(
    auth_server: tuple[str, str], tmp_path: Path
) -> None:
    uri, _ = auth_server
    wrong = "not-the-password-" + secrets.token_hex(4)
    started = time.monotonic()
    result = _run(_spec(tmp_path, uri), ADMIN, wrong)
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "refused the credentials" in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    assert "started" not in result.stdout  # no trial ran
    assert not (tmp_path / "runs").exists()  # nothing recorded for a sweep that never began
    assert time.monotonic() - started < 60
    assert wrong not in result.stdout + result.stderr


def test_the_right_credentials_record_the_sweep_and_the_password_is_nowhere(
    auth_server: tuple[str, str], tmp_path: Path
) -> None:
    uri, password = auth_server
    result = _run(_spec(tmp_path, uri), ADMIN, password)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert password not in result.stdout + result.stderr

    os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = (
        ADMIN,
        password,
    )
    try:
        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name("auth")
        assert experiment is not None
        runs = client.search_runs([experiment.experiment_id])
        assert len(runs) == 2  # the sweep and its one trial
        downloaded = tmp_path / "artifacts"
        for run in runs:
            recorded = [*run.data.params.values(), *run.data.tags.values()]
            assert not any(password in value for value in recorded), run.info.run_id
            target = downloaded / run.info.run_id
            target.mkdir(parents=True)
            client.download_artifacts(run.info.run_id, "", str(target))
        files = [path for path in downloaded.rglob("*") if path.is_file()]
        assert any(path.name == "spec.yaml" for path in files)
        for path in files:
            assert password.encode() not in path.read_bytes(), path
    finally:
        del os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]
