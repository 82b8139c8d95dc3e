"""Chaos soak: a sweep on a loopback Ray cluster while worker nodes die and the MLflow server
restarts, measured against the same sweep without faults.

    python scripts/chaos_soak.py            # long form: 24 trials, a node SIGKILLed and re-added
                                            # every 30-60 s, the MLflow server restarted once
    python scripts/chaos_soak.py --short    # what CI runs (tests/test_chaos.py): 8 trials,
                                            # faults every 12-20 s, no fault-free run

Everything runs on this machine: cluster/local_cluster.sh (head + worker nodes on loopback,
token auth), cluster/mlflow/server.sh, and the sweep submitted with `simpo-sweep submit` as a
user would. At the end it prints, for the faulty run: trials completed, retries, steps lost,
steps logged twice, duplicate and orphan MLflow runs, unreadable checkpoints, and the wall time
against the run without faults; it exits 1 if any of the must-be-zero figures is not zero.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
LOCAL_CLUSTER = ROOT / "cluster" / "local_cluster.sh"
MLFLOW_SERVER = ROOT / "cluster" / "mlflow" / "server.sh"
SIMPO_SWEEP = str(Path(sys.executable).with_name("simpo-sweep"))
TRIAL_ACTOR = "ImplicitFunc"  # the actor class of a Tune function trial


@dataclass(frozen=True)
class Form:
    trials: int
    workers: int
    max_steps: int
    fault_every_s: tuple[float, float]


LONG = Form(trials=24, workers=3, max_steps=120, fault_every_s=(30.0, 60.0))
SHORT = Form(trials=8, workers=2, max_steps=80, fault_every_s=(12.0, 20.0))
SHORT_RESTART_AFTER_S = 30.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def say(text: str) -> None:
    print(f"[chaos {time.strftime('%H:%M:%S')}] {text}", flush=True)


class MlflowServer:
    """cluster/mlflow/server.sh on a fixed port; restartable on the same store."""

    def __init__(self, root: Path):
        self.root = root
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = (self.root / "mlflow-server.log").open("ab")
        self.process = subprocess.Popen(
            [
                "bash",
                str(MLFLOW_SERVER),
                *("--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"),
            ],
            env={
                **os.environ,
                "MLFLOW_SERVER_ROOT": str(self.root / "mlflow"),
                "MLFLOW_EXECUTABLE": str(Path(sys.executable).with_name("mlflow")),
            },
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2):
                    return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"the MLflow server did not answer on {self.uri}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=20)


class Cluster:
    def __init__(self, state_dir: Path, workers: int):
        self.state_dir = state_dir

    def script(self, *args: str) -> str:
        env = {
            **os.environ,
            "RAY_health_check_period_ms": "1000",
            "RAY_health_check_failure_threshold": "3",
        }
        done = subprocess.run(
            ["bash", str(LOCAL_CLUSTER), *args, "--state-dir", str(self.state_dir)],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if done.returncode != 0:
            raise RuntimeError(f"local_cluster.sh {' '.join(args)}: {done.stderr[-2000:]}")
        return done.stdout

    def env(self) -> dict[str, str]:
        text = (self.state_dir / "cluster.env").read_text()
        return dict(re.findall(r"^export (\w+)=(.*)$", text, re.M))

    def _state(self) -> Any:
        from ray.util.state.api import StateApiClient

        exported = self.env()
        token = Path(exported["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
        return StateApiClient(
            address=exported["LOCAL_RAY_DASHBOARD_URL"],
            headers={"Authorization": f"Bearer {token}"},
        )

    def victims(self) -> tuple[list[str], list[str]]:
        """(worker nodes running a trial, every live worker node), by Ray node id."""
        from ray.util.state.common import ListApiOptions, StateResource

        state = self._state()
        nodes = state.list(
            StateResource.NODES, ListApiOptions(detail=True), raise_on_missing_output=False
        )
        workers = [
            node.node_id for node in nodes if node.state == "ALIVE" and not node.is_head_node
        ]
        actors = state.list(
            StateResource.ACTORS,
            ListApiOptions(filters=[("class_name", "=", TRIAL_ACTOR), ("state", "=", "ALIVE")]),
            raise_on_missing_output=False,
        )
        busy = sorted({actor.node_id for actor in actors} & set(workers))
        return busy, workers

    def kill_and_replace(self, rng: random.Random) -> str:
        """SIGKILL a worker node, one that runs a trial when there is one (the point of the
        soak is to lose work), then add a fresh node."""
        busy, workers = self.victims()
        if not workers:
            return "no worker node alive"
        victim = rng.choice(busy or workers)
        self.script("kill-node", victim)
        time.sleep(5)  # the GCS marks the node dead first (health checks: 1 s x 3)
        for attempt in range(3):
            try:
                self.script("add-node", "--cpus-per-node", "1")
                break
            except RuntimeError as error:
                say(f"adding a node failed (attempt {attempt + 1}): {str(error)[-200:]}")
                time.sleep(10)
        running = "running a trial" if victim in busy else "idle"
        return f"{victim[:8]} ({running})"


def write_spec(root: Path, name: str, form: Form, mlflow_uri: str) -> Path:
    spec = {
        "name": name,
        "model": {"name": "builtin:tiny-llama"},
        "data": {
            "source": "builtin:rule-following",
            "max_length": 48,
            "max_prompt_length": 16,
            "max_train_pairs": 256,
            "max_eval_pairs": 32,
        },
        "training": {
            "max_steps": form.max_steps,
            "batch_size": 8,
            "eval_every": form.max_steps // 2,
            "checkpoint_every": 10,
        },
        "search": {
            "algorithm": "random",
            "num_samples": form.trials,
            "max_concurrent_trials": form.workers,
            "space": {"learning_rate": {"type": "loguniform", "low": 5.0e-4, "high": 2.0e-3}},
        },
        "resources": {"num_workers": 1, "cpus_per_worker": 1, "max_failures": 20},
        "tracking": {"tracking_uri": mlflow_uri, "experiment": name},
        "storage": {"path": str(root / name / "runs"), "shared_filesystem": True},
    }
    path = root / name / "spec.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def simpo(env: dict[str, str], *args: str, timeout: float = 300) -> str:
    done = subprocess.run(
        [SIMPO_SWEEP, *args], env=env, capture_output=True, text=True, timeout=timeout
    )
    if done.returncode != 0:
        raise RuntimeError(
            f"simpo-sweep {args[0]} failed: {done.stdout[-2000:]}{done.stderr[-2000:]}"
        )
    return done.stdout


def job_status(env: dict[str, str], dashboard: str, job_id: str) -> str:
    out = subprocess.run(
        [SIMPO_SWEEP, "status", job_id, "--address", dashboard],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    found = re.search(r"\b(PENDING|RUNNING|SUCCEEDED|FAILED|STOPPED)\b", out)
    return found.group(1) if found else "UNKNOWN"


def run_sweep(
    cluster: Cluster,
    mlflow: MlflowServer,
    spec: Path,
    faults: Form | None,
    rng: random.Random,
    restart_after_s: float | None,
) -> tuple[float, list[str]]:
    """Submit, inject faults while it runs (when `faults`), wait for the end: (wall s, events)."""
    exported = cluster.env()
    dashboard = exported["LOCAL_RAY_DASHBOARD_URL"]
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))},
        "RAY_AUTH_TOKEN": Path(exported["RAY_AUTH_TOKEN_PATH"]).read_text().strip(),
    }
    started = time.monotonic()
    submitted = simpo(env, "submit", str(spec), "--address", dashboard)
    job_id = re.search(r"as job (\S+) to ", submitted)
    if job_id is None:
        raise RuntimeError(f"no job id in: {submitted}")
    events: list[str] = []
    next_fault = started + rng.uniform(*faults.fault_every_s) if faults else float("inf")
    restarted = restart_after_s is None
    while True:
        status = job_status(env, dashboard, job_id.group(1))
        if status in {"SUCCEEDED", "FAILED", "STOPPED"}:
            break
        now = time.monotonic()
        if not restarted and restart_after_s is not None and now - started >= restart_after_s:
            mlflow.stop()
            time.sleep(3)
            mlflow.start()
            restarted = True
            events.append(f"{now - started:.0f}s MLflow server restarted")
            say(events[-1])
        if faults is not None and now >= next_fault:
            victim = cluster.kill_and_replace(rng)
            events.append(f"{now - started:.0f}s worker node {victim} SIGKILLed, one added")
            say(events[-1])
            next_fault = time.monotonic() + rng.uniform(*faults.fault_every_s)
        time.sleep(2)
    wall = time.monotonic() - started
    if status != "SUCCEEDED":
        logs = subprocess.run(
            [SIMPO_SWEEP, "logs", job_id.group(1), "--address", dashboard],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        ).stdout
        raise RuntimeError(f"the sweep ended {status}:\n{logs[-4000:]}")
    return wall, events


def figures(spec_path: Path, mlflow_uri: str) -> dict[str, Any]:
    """What the faults cost, read back from storage and MLflow."""
    from mlflow.tracking import MlflowClient

    from simpo_sweep.engine.checkpoint import load_full_model_state

    spec = yaml.safe_load(spec_path.read_text())
    storage = Path(spec["storage"]["path"])
    (sweep_dir,) = [path.parent for path in storage.glob("*/spec.yaml")]
    with (sweep_dir / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    client = MlflowClient(mlflow_uri)
    experiment = client.get_experiment_by_name(spec["name"])
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id], max_results=5000)
    parents = [run for run in runs if run.data.tags.get("simpo_sweep.trial_id") == "sweep"]
    children = [run for run in runs if run.data.tags.get("simpo_sweep.trial_id") != "sweep"]
    per_trial = Counter(run.data.tags.get("simpo_sweep.trial_id") for run in children)
    known = {row["trial_id"] for row in rows}
    parent_ids = {run.info.run_id for run in parents}
    steps_lost = steps_twice = 0
    for run in children:
        reached = int(
            next(
                (
                    row["step"]
                    for row in rows
                    if row["trial_id"] == run.data.tags.get("simpo_sweep.trial_id")
                ),
                0,
            )
            or 0
        )
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
        steps_twice += len(steps) - len(set(steps))
        steps_lost += len(set(range(1, reached + 1)) - set(steps))
    unreadable = 0
    checkpoints = [path for path in sweep_dir.rglob("checkpoint_*") if path.is_dir()]
    for checkpoint in checkpoints:
        try:
            load_full_model_state(checkpoint)
        except Exception:
            unreadable += 1
    states = Counter(row["state"] for row in rows)
    return {
        "trials": len(rows),
        "trials completed": states.get("completed", 0) + states.get("stopped_early", 0),
        "states": dict(states),
        "retries (runs resumed from a checkpoint)": sum(
            1 for run in children if "simpo_sweep.resumed_from_step" in run.data.tags
        ),
        "steps lost": steps_lost,
        "steps logged twice": steps_twice,
        "duplicate MLflow runs": sum(count - 1 for count in per_trial.values() if count > 1)
        + max(len(parents) - 1, 0),
        "orphan MLflow runs": sum(
            1
            for run in children
            if run.data.tags.get("simpo_sweep.trial_id") not in known
            or run.data.tags.get("mlflow.parentRunId") not in parent_ids
        ),
        "checkpoints kept": len(checkpoints),
        "checkpoints unreadable": unreadable,
    }


MUST_BE_ZERO = (
    "steps lost",
    "steps logged twice",
    "duplicate MLflow runs",
    "orphan MLflow runs",
    "checkpoints unreadable",
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--short", action="store_true", help="the CI form")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    form = SHORT if args.short else LONG
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="chaos-"))
    mlflow = MlflowServer(root)
    cluster = Cluster(root / "ray", form.workers)
    say(f"{'short' if args.short else 'long'} form: {form}; work folder {root}")
    try:
        mlflow.start()
        cluster.script("start", "--workers", str(form.workers), "--cpus-per-node", "1")
        # The short form (CI) skips the fault-free run: its figures are the must-be-zero ones.
        baseline_wall = None
        if not args.short:
            baseline_spec = write_spec(root, "soak-baseline", form, mlflow.uri)
            baseline_wall, _ = run_sweep(cluster, mlflow, baseline_spec, None, rng, None)
            say(f"without faults: {baseline_wall:.0f} s")
        chaos_spec = write_spec(root, "soak-chaos", form, mlflow.uri)
        chaos_wall, events = run_sweep(
            cluster,
            mlflow,
            chaos_spec,
            form,
            rng,
            restart_after_s=baseline_wall / 3 if baseline_wall else SHORT_RESTART_AFTER_S,
        )
        result = figures(chaos_spec, mlflow.uri)
        result.update(
            {
                "faults": events,
                "wall time with faults (s)": round(chaos_wall, 1),
                "wall time without faults (s)": round(baseline_wall, 1) if baseline_wall else None,
                "wall time ratio": round(chaos_wall / baseline_wall, 2) if baseline_wall else None,
            }
        )
    finally:
        try:
            cluster.script("stop")
        finally:
            mlflow.stop()
            if not args.keep:
                shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    bad = [name for name in MUST_BE_ZERO if result[name] != 0]
    if result["trials completed"] != result["trials"] or result["trials"] != form.trials:
        bad.append("trials completed")
    if bad:
        say(f"FAILED: {', '.join(bad)}")
        return 1
    say("every must-be-zero figure is zero")
    return 0


if __name__ == "__main__":
    sys.exit(main())
