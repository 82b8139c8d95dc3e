"""Sweep storage: one location type for local folders and buckets, and a sweep that keeps its
Tune state, checkpoints, spec, results and report in a bucket (a real S3-protocol server,
moto_server, on loopback), is interrupted there and resumed from it."""

from __future__ import annotations

import csv
import io
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import MlflowServer, S3Server
from mlflow.tracking import MlflowClient

from simpo_sweep.service.errors import SweepError
from simpo_sweep.service.storage import StorageLocation
from simpo_sweep.trial.outcome import TrialState

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "search_spaces" / "quickstart.yaml"


def test_a_relative_path_becomes_absolute_and_a_bucket_uri_stays_a_uri(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert StorageLocation.parse("simpo_runs").uri == str(tmp_path.resolve() / "simpo_runs")
    assert StorageLocation.parse(f"file://{tmp_path}/x").uri == str(tmp_path.resolve() / "x")
    bucket = StorageLocation.parse("s3://bucket/simpo_runs/")
    assert bucket.uri == "s3://bucket/simpo_runs"
    assert bucket.is_remote and bucket.local_path is None
    assert (bucket / "sweep-1" / "spec.yaml").uri == "s3://bucket/simpo_runs/sweep-1/spec.yaml"
    assert (bucket / "sweep-1").parent == bucket
    assert (bucket / "sweep-1").name == "sweep-1"
    assert bucket.fs_path == "bucket/simpo_runs"
    with pytest.raises(SweepError, match="unsupported scheme 'ftp'"):
        StorageLocation.parse("ftp://host/x")


def test_a_local_write_is_whole_or_absent(tmp_path: Path) -> None:
    target = StorageLocation.parse(str(tmp_path / "deep" / "results.md"))
    target.write_text("first")
    target.write_text("second")
    assert target.read_text() == "second"
    # Written beside the target and moved over it: no temporary file is left behind.
    assert [path.name for path in (tmp_path / "deep").iterdir()] == ["results.md"]


def test_bucket_reads_writes_and_lists_through_pyarrow(
    s3_server: S3Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    folder = StorageLocation.parse(f"s3://{s3_server.bucket}/unit")
    (folder / "a.txt").write_text("hello")
    assert (folder / "a.txt").is_file() and (folder / "a.txt").read_text() == "hello"
    assert not (folder / "missing.txt").exists()
    assert [child.name for child in folder.children()] == ["a.txt"]
    local = tmp_path / "prepared"
    local.mkdir()
    (local / "manifest.json").write_text("{}")
    (folder / "copy").upload_folder(local)
    assert "unit/copy/manifest.json" in s3_server.object_keys("unit/")
    # A plan holding a location crosses to Ray workers pickled; the filesystem is reopened.
    restored = pickle.loads(pickle.dumps(folder))
    assert restored == folder and (restored / "a.txt").read_text() == "hello"
    assert not list(tmp_path.rglob("s3:*"))


@pytest.mark.slow
def test_quickstart_on_a_bucket_keeps_everything_there_and_resumes(
    s3_server: S3Server, tmp_path: Path
) -> None:
    mlflow = MlflowServer.start(
        tmp_path,
        env={
            **s3_server.env,
            "MLFLOW_ARTIFACTS_DESTINATION": f"s3://{s3_server.bucket}/mlflow-artifacts",
        },
    )
    env = {
        **{key: value for key, value in os.environ.items() if not key.startswith("RAY_ADDRESS")},
        **s3_server.env,
        "PYTHONUNBUFFERED": "1",
    }
    storage = f"s3://{s3_server.bucket}/simpo_runs"
    cli = [sys.executable, "-m", "simpo_sweep.cli"]
    try:
        mlflow.wait_ready(90)
        overrides = [
            f"storage.path={storage}",
            f"tracking.tracking_uri={mlflow.uri}",
            "search.num_samples=4",
            "search.max_concurrent_trials=1",
        ]
        log = tmp_path / "run.log"
        with log.open("w") as handle:
            process = subprocess.Popen(
                [*cli, "run", str(QUICKSTART), *(f"--set={o}" for o in overrides)],
                stdout=handle,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=tmp_path,
            )
        # Interrupt once the first trial's outcome is recorded in the bucket.
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and process.poll() is None:
            if any(
                key.endswith("trial_states.json") for key in s3_server.object_keys("simpo_runs/")
            ):
                break
            time.sleep(0.5)
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=120) == 130, log.read_text()[-3000:]
        (spec_key,) = [
            key for key in s3_server.object_keys("simpo_runs/") if key.endswith("/spec.yaml")
        ]
        sweep_uri = f"s3://{s3_server.bucket}/{spec_key.rsplit('/', 1)[0]}"
        assert f"simpo-sweep resume {sweep_uri}" in log.read_text()

        resumed = subprocess.run(
            [*cli, "resume", sweep_uri],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            timeout=450,
        )
        assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
        sweep_prefix = spec_key.rsplit("/", 1)[0] + "/"
        keys = s3_server.object_keys(sweep_prefix)
        names = {key.removeprefix(sweep_prefix) for key in keys}
        for expected in ("spec.yaml", "results.csv", "results.md", "trial_states.json"):
            assert expected in names, sorted(names)
        assert any(name.startswith("report/") and name.endswith(".png") for name in names)
        assert any(name.startswith("experiment_state") for name in names), "no Tune state"
        assert any("/checkpoint_" in name for name in names), "no checkpoint in the bucket"
        assert any(key.startswith("simpo_runs/data_cache/") for key in s3_server.object_keys())

        with io.StringIO(_read_object(s3_server, sweep_prefix + "results.csv")) as handle:
            rows = list(csv.DictReader(handle))
        assert len(rows) == 4
        assert all(row["state"] != TrialState.UNFINISHED for row in rows)

        # MLflow's artifacts went to the bucket through the server (--artifacts-destination).
        artifact_keys = s3_server.object_keys("mlflow-artifacts/")
        assert any(key.endswith("results.md") for key in artifact_keys), artifact_keys
        assert any("/plots/" in key for key in artifact_keys)
        client = MlflowClient(mlflow.uri)
        experiment = client.get_experiment_by_name("quickstart")
        assert experiment is not None
        runs = client.search_runs([experiment.experiment_id])
        assert len(runs) == 5  # the sweep's parent run and one per trial, none duplicated

        # Nothing was written to a local folder named after the scheme.
        assert not list(tmp_path.rglob("s3:*"))
        assert not Path("s3:").exists()
    finally:
        mlflow.stop()


def _read_object(s3_server: S3Server, key: str) -> str:
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=s3_server.endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    return str(client.get_object(Bucket=s3_server.bucket, Key=key)["Body"].read().decode())
