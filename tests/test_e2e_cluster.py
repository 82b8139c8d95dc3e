"""End to end on a real multi-node Ray cluster on loopback, through the command line.

The module starts, with the recipes of cluster/: a Ray cluster of a head and one worker node
(cluster/local_cluster.sh, token authentication on, free ports, its own temp dirs) and an MLflow
tracking server (cluster/mlflow/server.sh, SQLite + artifact folder). Then, as a user would:
`simpo-sweep submit` a demo sweep, follow it, and check that its trials ran on more than one node,
that the ranking and best configuration were written and that MLflow holds one parent run and one
child run per trial; stop a running sweep; get clear errors for a wrong address and a wrong or
missing token; add a node on a second loopback address (a second "host") and see a node-local
storage path refused; and kill that node in the middle of a sweep, which still completes, the
lost trial continuing from its checkpoint in its own MLflow run. These are marked slow (about
six minutes on two cores); a few fast tests at the end check what `submit` sends without a
cluster.
"""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import MlflowServer, free_port
from mlflow.tracking import MlflowClient
from ray.job_submission import JobSubmissionClient
from ray.util.state.api import StateApiClient
from ray.util.state.common import ActorState, ListApiOptions, NodeState, StateResource

from simpo_sweep.service import jobs
from simpo_sweep.service.errors import JobError
from simpo_sweep.spec.models import SweepSpec

ROOT = Path(__file__).resolve().parents[1]
LOCAL_CLUSTER = ROOT / "cluster" / "local_cluster.sh"
SIMPO_SWEEP = str(Path(sys.executable).with_name("simpo-sweep"))
SECOND_HOST = "127.0.0.3"  # another loopback address: Ray sees a second machine
TRIAL_ACTOR = "ImplicitFunc"  # the actor class of a Tune function trainable


@dataclass
class Stack:
    root: Path
    state_dir: Path
    dashboard: str
    token: str
    mlflow_uri: str

    def cli_env(self, **extra: str) -> dict[str, str]:
        """The environment of a user's shell: the token in RAY_AUTH_TOKEN, nothing else of Ray."""
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("RAY_AUTH", "RAY_ADDRESS"))
        }
        env["RAY_AUTH_TOKEN"] = self.token
        env["PYTHONPATH"] = str(ROOT)
        env.update(extra)
        return env

    def simpo(
        self, *args: str, timeout: float = 120, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [SIMPO_SWEEP, *args],
            cwd=self.root,
            env=env if env is not None else self.cli_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def simpo_together(
        self, *calls: tuple[list[str], dict[str, str] | None], timeout: float = 120
    ) -> list[subprocess.CompletedProcess[str]]:
        """Several CLI calls at once (each spends seconds importing; the cores are idle)."""
        started = [
            (
                args,
                subprocess.Popen(
                    [SIMPO_SWEEP, *args],
                    cwd=self.root,
                    env=env if env is not None else self.cli_env(),
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                ),
            )
            for args, env in calls
        ]
        done = []
        for args, process in started:
            stdout, stderr = process.communicate(timeout=timeout)
            done.append(subprocess.CompletedProcess(args, process.returncode, stdout, stderr))
        return done

    def script(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", str(LOCAL_CLUSTER), *args, "--state-dir", str(self.state_dir)],
            env=_cluster_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def jobs(self) -> JobSubmissionClient:
        return JobSubmissionClient(self.dashboard, headers=self._auth())

    def actors(self, ray_job_id: str) -> list[ActorState]:
        """Every trial actor of a Ray job (alive or dead), from Ray's state API."""
        state = StateApiClient(address=self.dashboard, headers=self._auth())
        options = ListApiOptions(
            filters=[("job_id", "=", ray_job_id), ("class_name", "=", TRIAL_ACTOR)],
            detail=True,
            limit=1000,
        )
        listed = state.list(StateResource.ACTORS, options, raise_on_missing_output=False)
        return [actor for actor in listed if isinstance(actor, ActorState)]

    def _nodes(self) -> list[NodeState]:
        state = StateApiClient(address=self.dashboard, headers=self._auth())
        listed = state.list(StateResource.NODES, ListApiOptions(detail=True), False)
        return [node for node in listed if isinstance(node, NodeState)]

    def nodes(self) -> dict[str, str]:
        """node id -> node IP, for every node the cluster ever had."""
        return {node.node_id: node.node_ip for node in self._nodes()}

    def node_states(self) -> dict[str, str]:
        """node id -> ALIVE or DEAD."""
        return {node.node_id: str(node.state) for node in self._nodes()}

    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


def _cluster_env() -> dict[str, str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("RAY_AUTH", "RAY_ADDRESS"))
    }
    # As on a real cluster (cluster/kuberay, cluster/launcher), the head runs the drivers and
    # no trial: every trial lands on a worker node.
    env["LOCAL_RAY_HEAD_CPUS"] = "0"
    # A lost node is noticed after 3 missed 1 s health checks instead of 5 missed 3 s ones.
    env["RAY_health_check_period_ms"] = "1000"
    env["RAY_health_check_failure_threshold"] = "3"
    return env


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("e2e-cluster")
    state_dir = root / "ray-state"
    # The MLflow server first: it comes up while the Ray nodes start.
    mlflow_server = MlflowServer.start(root)
    try:
        start = subprocess.run(
            [
                "bash",
                str(LOCAL_CLUSTER),
                "start",
                "--workers",
                "2",
                "--cpus-per-node",
                "1",
                "--state-dir",
                str(state_dir),
            ],
            env=_cluster_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert start.returncode == 0, f"local cluster did not start:\n{start.stderr}"
        exported = dict(
            re.findall(r"^export (\w+)=(.*)$", (state_dir / "cluster.env").read_text(), re.M)
        )
        assert exported["LOCAL_RAY_NUM_NODES"] == "3"
        mlflow_server.wait_ready(180)
        yield Stack(
            root=root,
            state_dir=state_dir,
            dashboard=exported["LOCAL_RAY_DASHBOARD_URL"],
            token=Path(exported["RAY_AUTH_TOKEN_PATH"]).read_text().strip(),
            mlflow_uri=mlflow_server.uri,
        )
    finally:
        subprocess.run(
            ["bash", str(LOCAL_CLUSTER), "stop", "--state-dir", str(state_dir)],
            env=_cluster_env(),
            capture_output=True,
            timeout=120,
        )
        mlflow_server.stop()


@pytest.fixture(scope="module")
def second_host(stack: Stack) -> str:
    """A worker node on another loopback address: the cluster now spans two hosts."""
    added = stack.script("add-node", "--ip", SECOND_HOST, "--cpus-per-node", "1")
    assert added.returncode == 0, added.stderr
    assert SECOND_HOST in stack.nodes().values()
    return SECOND_HOST


# ---- helpers --------------------------------------------------------------------------------


def _spec(stack: Stack, name: str, **sections: dict[str, Any]) -> Path:
    """A small demo sweep: builtin model and data, a few short trials, one CPU each."""
    document: dict[str, Any] = {
        "name": name,
        "model": {"name": "builtin:tiny-llama"},
        "data": {
            "source": "builtin:rule-following",
            "max_length": 48,
            "max_prompt_length": 16,
            "max_train_pairs": 256,
            "max_eval_pairs": 32,
        },
        "training": {"max_steps": 40, "batch_size": 8, "eval_every": 20, "checkpoint_every": 20},
        "search": {
            "algorithm": "random",
            "space": {
                "beta": {"type": "uniform", "low": 1.5, "high": 3.0},
                "learning_rate": {"type": "loguniform", "low": 5.0e-4, "high": 2.0e-3},
            },
            "num_samples": 3,
            "max_concurrent_trials": 3,
        },
        "resources": {"num_workers": 1, "cpus_per_worker": 1, "max_failures": 2},
        "tracking": {"tracking_uri": stack.mlflow_uri, "experiment": f"e2e-{name}"},
        "storage": {"path": str(stack.root / name / "runs")},
    }
    for section, values in sections.items():
        document[section] = {**document.get(section, {}), **values}
    path = stack.root / name / "sweep.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def _submit(stack: Stack, spec: Path, *extra: str) -> str:
    submitted = stack.simpo("submit", str(spec), "--address", stack.dashboard, *extra, timeout=240)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    found = re.search(r"as job (\S+) to ", submitted.stdout)
    assert found, submitted.stdout
    job_id = found.group(1)
    assert f"simpo-sweep logs {job_id} --address {stack.dashboard} --follow" in submitted.stdout
    return job_id


def _follow(stack: Stack, job_id: str, timeout: float = 420) -> subprocess.CompletedProcess[str]:
    """`simpo-sweep logs --follow` until the job ends (its exit code says how it ended)."""
    return stack.simpo("logs", job_id, "--address", stack.dashboard, "--follow", timeout=timeout)


def _sweep_dir(storage: Path, timeout_s: float = 120) -> Path:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = [path.parent for path in storage.glob("*/spec.yaml")]
        if found:
            assert len(found) == 1, found
            return found[0]
        time.sleep(0.5)
    raise TimeoutError(f"no sweep folder appeared under {storage}")


def _results(sweep_dir: Path) -> list[dict[str, str]]:
    with (sweep_dir / "results.csv").open() as handle:
        return list(csv.DictReader(handle))


def _mlflow_runs(stack: Stack, experiment: str, sweep_id: str) -> tuple[Any, list[Any]]:
    """The sweep's parent run and its child runs."""
    client = MlflowClient(stack.mlflow_uri)
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no MLflow experiment {experiment}"
    runs = client.search_runs(
        [found.experiment_id],
        filter_string=f"tags.`simpo_sweep.sweep_id` = '{sweep_id}'",
        max_results=1000,
    )
    parents = [run for run in runs if "mlflow.parentRunId" not in run.data.tags]
    assert len(parents) == 1, [run.info.run_name for run in parents]
    parent = parents[0]
    children = [
        run for run in runs if run.data.tags.get("mlflow.parentRunId") == parent.info.run_id
    ]
    assert len(children) + 1 == len(runs), "runs of the sweep outside parent and children"
    return parent, children


def _ray_job_id(stack: Stack, job_id: str) -> str:
    info = stack.jobs().get_job_info(job_id)
    assert info.job_id, f"{job_id} has no Ray job id"
    return str(info.job_id)


# ---- tests ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_submitted_sweep_runs_on_several_nodes_and_is_tracked(stack: Stack) -> None:
    # A node-local storage path is fine here: every node of this cluster is on one host.
    # Worker nodes have one CPU each and the 3 trials start at once, so no node can hold two.
    spec = _spec(
        stack, "main", training={"max_steps": 120, "eval_every": 40, "checkpoint_every": 40}
    )
    job_id = _submit(stack, spec)

    followed = _follow(stack, job_id)
    log = followed.stdout + followed.stderr
    assert followed.returncode == 0, log[-5000:]
    assert f"job {job_id}: SUCCEEDED" in followed.stdout
    assert "best trial" in followed.stdout

    status, listed = stack.simpo_together(
        (["status", job_id, "--address", stack.dashboard], None),
        (["list", "--address", stack.dashboard], None),
    )
    assert status.returncode == 0 and "SUCCEEDED" in status.stdout, status.stderr
    assert listed.returncode == 0 and job_id in listed.stdout and "sweep=main" in listed.stdout

    # Ranking and best configuration on storage.
    sweep_dir = _sweep_dir(stack.root / "main" / "runs", timeout_s=5)
    rows = _results(sweep_dir)
    assert len(rows) == 3
    assert {row["state"] for row in rows} <= {"completed", "degenerate", "stopped_early"}, rows
    assert (sweep_dir / "results.md").read_text().count("\n|") >= 4  # header rule + 3 trials
    # The best configuration: a spec that validates, searches nothing, and holds rank 1's values.
    best = SweepSpec.model_validate(yaml.safe_load((sweep_dir / "best_config.yaml").read_text()))
    assert best.search.space == {}
    assert best.training.learning_rate == float(rows[0]["learning_rate"])

    # MLflow: one parent run, one child run per trial, with their metrics.
    parent, children = _mlflow_runs(stack, "e2e-main", sweep_dir.name)
    assert parent.info.status == "FINISHED"
    trial_ids = sorted(child.data.tags["simpo_sweep.trial_id"] for child in children)
    assert trial_ids == sorted(row["trial_id"] for row in rows)
    for child in children:
        assert "train/loss" in child.data.metrics, child.info.run_name
        assert child.data.params, child.info.run_name
        assert child.data.tags["simpo_sweep.layout"] == "packed_rows"  # sdpa: packed, binned

    # The trials trained on more than one node, and each child run says which (one CPU per
    # worker node: two trials at once cannot share one).
    nodes = stack.nodes()
    used = {child.data.tags["simpo_sweep.ray_node_id"] for child in children}
    assert len(used) >= 2 and used <= set(nodes), (used, nodes)
    for child in children:
        assert (
            child.data.tags["simpo_sweep.node_ip"]
            == nodes[child.data.tags["simpo_sweep.ray_node_id"]]
        )


@pytest.mark.slow
def test_two_sweeps_submitted_at_once_to_one_cluster_storage_and_mlflow_both_complete(
    stack: Stack,
) -> None:
    """The same spec twice, at the same moment: same cluster, same storage folder, same MLflow
    experiment. Each sweep gets its own id, folder and runs; neither sees the other's."""
    spec = _spec(
        stack,
        "twin",
        search={"num_samples": 2, "max_concurrent_trials": 2},
        training={"max_steps": 20, "eval_every": 20, "checkpoint_every": 20},
    )
    submitted = stack.simpo_together(
        *[(["submit", str(spec), "--address", stack.dashboard], None)] * 2, timeout=240
    )
    job_ids = []
    for result in submitted:
        assert result.returncode == 0, result.stdout + result.stderr
        found = re.search(r"as job (\S+) to ", result.stdout)
        assert found, result.stdout
        job_ids.append(found.group(1))
    assert len(set(job_ids)) == 2
    for job_id in job_ids:
        followed = _follow(stack, job_id)
        assert followed.returncode == 0, (followed.stdout + followed.stderr)[-4000:]
    storage = stack.root / "twin" / "runs"
    sweep_dirs = sorted(path.parent for path in storage.glob("*/spec.yaml"))
    assert len(sweep_dirs) == 2, sweep_dirs
    trial_ids: list[str] = []
    for sweep_dir in sweep_dirs:
        rows = _results(sweep_dir)
        assert len(rows) == 2
        parent, children = _mlflow_runs(stack, "e2e-twin", sweep_dir.name)
        assert parent.info.status == "FINISHED"
        assert sorted(child.data.tags["simpo_sweep.trial_id"] for child in children) == sorted(
            row["trial_id"] for row in rows
        )
        trial_ids += [row["trial_id"] for row in rows]
    assert len(set(trial_ids)) == 4  # no trial shared between the sweeps


@pytest.mark.slow
def test_stop_ends_a_running_sweep(stack: Stack) -> None:
    spec = _spec(
        stack,
        "stopped",
        training={"max_steps": 5000, "eval_every": 50, "checkpoint_every": 50},
        search={"num_samples": 2},
    )
    job_id = _submit(stack, spec)
    sweep_dir = _sweep_dir(stack.root / "stopped" / "runs")
    deadline = time.monotonic() + 180
    while not list(sweep_dir.glob("*/checkpoint_*")):  # a trial is training
        assert time.monotonic() < deadline, "no trial checkpointed within 180 s"
        assert not stack.jobs().get_job_status(job_id).is_terminal()
        time.sleep(1)

    stopped = stack.simpo("stop", job_id, "--address", stack.dashboard)
    assert stopped.returncode == 0, stopped.stderr
    assert f"{job_id}: STOPPED" in stopped.stdout  # `stop` waits for the job to end
    assert stack.jobs().get_job_status(job_id) == "STOPPED"

    # Its trials are gone and their CPUs free again.
    ray_job = _ray_job_id(stack, job_id)
    deadline = time.monotonic() + 60
    while any(actor.state != "DEAD" for actor in stack.actors(ray_job)):
        assert time.monotonic() < deadline, "trial actors still alive 60 s after the stop"
        time.sleep(1)


@pytest.mark.slow
def test_clear_errors_for_wrong_address_and_token(stack: Stack, tmp_path: Path) -> None:
    spec = _spec(stack, "unreached")
    closed = f"http://127.0.0.1:{free_port()}"
    no_token = stack.cli_env(HOME=str(tmp_path))  # no ~/.ray/auth_token either
    del no_token["RAY_AUTH_TOKEN"]
    wrong_token = stack.cli_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="0" * 64)
    # The right token from a file, read by Ray's own loader (RAY_AUTH_MODE=token).
    token_file = tmp_path / "token"
    token_file.write_text(stack.token)
    from_file = stack.cli_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file))
    del from_file["RAY_AUTH_TOKEN"]

    unreachable, missing, wrong, unknown = stack.simpo_together(
        (["submit", str(spec), "--address", closed], None),
        (["list", "--address", stack.dashboard], no_token),
        (["status", "any-job", "--address", stack.dashboard], wrong_token),
        (["status", "no-such-job", "--address", stack.dashboard], from_file),
    )
    assert unreachable.returncode == 1
    assert f"cannot reach the Ray dashboard at {closed}" in unreachable.stderr
    assert "Traceback" not in unreachable.stderr

    assert missing.returncode == 1
    assert "requires token authentication" in missing.stderr, missing.stderr

    assert wrong.returncode == 1
    assert "refused the authentication token" in wrong.stderr, wrong.stderr
    assert "0" * 64 not in wrong.stderr + wrong.stdout  # a token is never printed

    assert unknown.returncode == 1
    assert "no job no-such-job" in unknown.stderr, unknown.stderr


@pytest.mark.slow
def test_node_local_storage_is_refused_across_hosts(stack: Stack, second_host: str) -> None:
    spec = _spec(stack, "local-storage")  # storage.path on this disk, shared_filesystem unset
    refused = stack.simpo("submit", str(spec), "--address", stack.dashboard, timeout=240)
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "failed to start" in refused.stderr
    assert "is a local path but the cluster spans 2 hosts" in refused.stderr
    assert "shared_filesystem" in refused.stderr


@pytest.mark.slow
def test_sweep_survives_the_loss_of_a_worker_node(stack: Stack, second_host: str) -> None:
    # Since `second_host` joined, the cluster spans two hosts that share this disk, as an NFS
    # mount would: the spec says so.
    spec = _spec(
        stack,
        "node-loss",
        training={"max_steps": 300, "eval_every": 50, "checkpoint_every": 20},
        storage={"shared_filesystem": True},
    )
    # --verbose: the job's log then has Ray's per-checkpoint lines this test reads.
    job_id = _submit(stack, spec, "--verbose")
    ray_job = _ray_job_id(stack, job_id)
    sweep_dir = _sweep_dir(stack.root / "node-loss" / "runs")

    # Ray prefixes what a trial prints with its process id: find a trial that has saved a
    # checkpoint and is still running, and the node its actor runs on; take that node down.
    checkpointed = re.compile(
        r"\(run_trial pid=(\d+)(?:, ip=[\d.]+)?\).*Checkpoint successfully created.*?"
        r"/run_trial_([0-9a-f]+_\d{5})_"
    )
    deadline = time.monotonic() + 240
    victim = lost_trial = ""
    while not victim:
        assert time.monotonic() < deadline, "no trial checkpointed in time"
        assert not stack.jobs().get_job_status(job_id).is_terminal(), "sweep ended first"
        log = stack.jobs().get_job_logs(job_id)
        found = checkpointed.findall(log)
        if found:
            pid, trial = found[-1]
            alive = {
                actor.pid: actor.node_id
                for actor in stack.actors(ray_job)
                if actor.state == "ALIVE" and actor.node_id
            }
            if int(pid) in alive and f"{trial} completed" not in log:
                victim, lost_trial = alive[int(pid)], trial
        time.sleep(0.5)
    killed = stack.script("kill-node", victim)
    assert killed.returncode == 0, killed.stderr

    followed = _follow(stack, job_id)
    assert followed.returncode == 0, (followed.stdout + followed.stderr)[-5000:]
    assert stack.node_states()[victim] == "DEAD"

    rows = _results(sweep_dir)
    assert len(rows) == 3
    assert {row["state"] for row in rows} <= {"completed", "degenerate", "stopped_early"}, rows
    lost_row = next(row for row in rows if row["trial_id"] == lost_trial)
    assert int(lost_row["step"]) > 20, lost_row

    # No duplicate MLflow runs: the retried trial continued its own child run, from its
    # checkpoint, and logged each step once.
    _, children = _mlflow_runs(stack, "e2e-node-loss", sweep_dir.name)
    by_trial = {child.data.tags["simpo_sweep.trial_id"]: child for child in children}
    assert len(by_trial) == len(children) == 3
    assert sorted(by_trial) == sorted(row["trial_id"] for row in rows)
    resumed = by_trial[lost_trial].data.tags.get("simpo_sweep.resumed_from_step")
    assert resumed is not None and int(resumed) >= 20, by_trial[lost_trial].data.tags
    history = MlflowClient(stack.mlflow_uri).get_metric_history(
        by_trial[lost_trial].info.run_id, "train/loss"
    )
    steps = [metric.step for metric in history]
    assert len(steps) == len(set(steps)), "a step was logged twice"
    assert max(steps) == int(lost_row["step"])


# ---- what `submit` sends, checked without a cluster -----------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("http://head:8265", "http://head:8265"),
        ("http://head:8265/", "http://head:8265"),
        ("127.0.0.1:8265", "http://127.0.0.1:8265"),
        ("https://ray.example.org", "https://ray.example.org"),
    ],
)
def test_dashboard_addresses(given: str, expected: str) -> None:
    assert jobs.dashboard_url(given) == expected


@pytest.mark.parametrize("given", ["ray://head:10001", "auto", "", "ftp://head:8265"])
def test_addresses_that_are_not_a_dashboard(given: str) -> None:
    with pytest.raises(JobError, match="8265"):
        jobs.dashboard_url(given)


def test_token_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    assert jobs.auth_headers() == {}
    monkeypatch.setenv("RAY_AUTH_TOKEN", "abc123")
    assert jobs.auth_headers() == {"Authorization": "Bearer abc123"}
    # With RAY_AUTH_MODE set, Ray's client sends the token itself (or none: "disabled").
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    assert jobs.auth_headers() == {}
    monkeypatch.delenv("RAY_AUTH_MODE")
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token_file))
    assert jobs.auth_headers() == {"Authorization": "Bearer from-file"}
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(JobError, match="RAY_AUTH_TOKEN_PATH"):
        jobs.auth_headers()


def test_relative_paths_travel_or_become_absolute(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    work, staging = tmp_path / "work", tmp_path / "staging"
    (work / "data").mkdir(parents=True)
    staging.mkdir()
    (work / "data" / "prefs.jsonl").write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    monkeypatch.chdir(work)
    spec = SweepSpec.model_validate(
        {"name": "rel", "data": {"source": "data/prefs.jsonl"}, "storage": {"path": "runs"}}
    )
    notes: list[str] = []
    document = jobs.job_document(spec, staging, notes)
    assert document is not None
    assert document["storage"]["path"] == str(work / "runs")
    assert document["data"]["source"] == "data/prefs.jsonl"  # copied next to spec.yaml
    assert (staging / "data" / "prefs.jsonl").read_text().startswith('{"prompt"')
    assert any("storage.path" in note for note in notes)
    SweepSpec.model_validate(document)  # still a valid spec

    absolute = SweepSpec.model_validate(
        {"name": "abs", "storage": {"path": str(tmp_path / "runs")}}
    )
    assert jobs.job_document(absolute, staging, []) is None  # the file goes as written
