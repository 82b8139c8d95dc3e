"""What MLflow logging costs a training step.

Trains the quickstart's demo model for the same steps three ways, in one process, interleaved
and in a rotated order each repeat so that drift on the machine hits all alike:
  none        no tracking;
  sqlite      the embedded default store (sqlite:///.../mlflow.db);
  server      `mlflow server` on loopback from cluster/mlflow/server.sh (what a cluster uses);
every metric of every step logged through MetricLogger (buffered, written by a background
thread). Prints each way's median step time in its fastest run, the overhead against `none`,
and the share of training time logging takes on the step path; the goal is under 2%.

    python bench/logging_overhead.py [--steps 200] [--repeats 3]
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import torch
from mlflow.tracking import MlflowClient

from simpo_sweep.engine.data import prepare_data
from simpo_sweep.engine.models import load_model, load_tokenizer
from simpo_sweep.engine.train import SimPOTrainer, StepEvent
from simpo_sweep.spec.loading import load_spec
from simpo_sweep.tracking.mlflow_runs import MetricLogger

ROOT = Path(__file__).resolve().parent.parent


def start_server(root: Path) -> tuple[subprocess.Popen[bytes], str]:
    """The project's server recipe (cluster/mlflow/server.sh), on loopback with one worker."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    recipe = ROOT / "cluster" / "mlflow" / "server.sh"
    process = subprocess.Popen(
        ["bash", str(recipe), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        env={
            **os.environ,
            "MLFLOW_SERVER_ROOT": str(root / "server"),
            "MLFLOW_EXECUTABLE": str(Path(sys.executable).with_name("mlflow")),
        },
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # the server and its workers end together
    )
    uri = f"http://127.0.0.1:{port}"
    for _ in range(180):
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=1)
            return process, uri
        except OSError:
            time.sleep(0.5)
    os.killpg(process.pid, signal.SIGKILL)
    raise RuntimeError("mlflow server did not start")


def timed_run(
    spec_path: Path, steps: int, data_cache: Path, uri: str | None
) -> tuple[float, float, float]:
    """Median step time (s) of a run, the logger's writes included where there is one, and
    the seconds its writer thread spent writing."""
    spec = load_spec(spec_path)
    training = spec.training.model_copy(update={"max_steps": steps, "eval_every": steps})
    prepared = prepare_data(spec.model, spec.data, data_cache)
    tokenizer = load_tokenizer(spec.model)
    torch.manual_seed(0)
    device = torch.device("cpu")
    model = load_model(spec.model, tokenizer, device)
    trainer = SimPOTrainer(
        model,
        prepared.train,
        prepared.eval,
        training=training,
        simpo=spec.simpo,
        diagnostics=spec.diagnostics,
        pad_token_id=int(tokenizer.pad_token_id),
        device=device,
    )
    logger = None
    if uri is not None:
        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name("bench") or client.get_experiment(
            client.create_experiment("bench")
        )
        logger = MetricLogger(uri, client.create_run(experiment.experiment_id).info.run_id)
    log: Callable[[StepEvent], None] = (
        (lambda event: logger.log(event.step, event.metrics)) if logger else (lambda event: None)
    )
    stamps: list[float] = []
    in_log = 0.0

    def on_step(event: StepEvent) -> None:
        nonlocal in_log
        started = time.perf_counter()
        log(event)
        in_log += time.perf_counter() - started
        stamps.append(time.perf_counter())

    trainer.fit(callback=on_step)
    writing = 0.0
    if logger is not None:
        logger.close("completed", "bench")
        writing = logger.seconds_writing
    # Wall time between steps: whatever logging steals from training shows here.
    gaps = [later - earlier for earlier, later in itertools.pairwise(stamps[10:])]
    training_time = stamps[-1] - stamps[0]
    return statistics.median(gaps), writing / training_time, in_log / training_time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", type=Path, default=ROOT / "search_spaces" / "quickstart.yaml")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)  # as a trial with one CPU runs
    root = Path(tempfile.mkdtemp(prefix="simpo-logbench-"))
    server, server_uri = start_server(root)
    try:
        uris = {"none": None, "sqlite": f"sqlite:///{root / 'local.db'}", "server": server_uri}
        times: dict[str, list[float]] = {name: [] for name in uris}
        writer_share: dict[str, list[float]] = {name: [] for name in uris}
        hot_path_share: dict[str, list[float]] = {name: [] for name in uris}
        timed_run(args.spec, 20, root / "data", None)  # warm-up: data cache, imports
        names = list(uris)
        for repeat in range(args.repeats):
            for name in names[repeat % 3 :] + names[: repeat % 3]:
                step, share, hot = timed_run(args.spec, args.steps, root / "data", uris[name])
                times[name].append(step)
                writer_share[name].append(share)
                hot_path_share[name].append(hot)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        shutil.rmtree(root, ignore_errors=True)
    # The fastest of the repeats: the machine's other load only ever adds time.
    base = min(times["none"])
    print(f"\n{args.steps} steps x {args.repeats} runs each, demo model, 1 thread\n")
    print(f"{'tracking':10}{'step ms':>10}{'overhead':>10}{'on step path':>14}{'writer busy':>13}")
    for name, samples in times.items():
        step = min(samples)
        busy = statistics.median(writer_share[name])
        hot = statistics.median(hot_path_share[name])
        print(
            f"{name:10}{step * 1000:10.2f}{(step - base) / base:>+10.1%}{hot:>14.2%}{busy:>13.1%}"
        )
    print(
        "\noverhead: fastest step time against no tracking (noisy on a shared machine);"
        "\non step path: share of the training time spent in MetricLogger.log (the only"
        " logging work the training thread does);"
        "\nwriter busy: share of it the background writer spent in MLflow calls (mostly"
        " waiting on the store, concurrent with training)"
    )


if __name__ == "__main__":
    main()
