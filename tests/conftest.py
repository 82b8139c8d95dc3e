"""Shared fixtures: real local Ray, a real `mlflow server` on loopback, the demo's prepared data."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from simpo_sweep.engine.data import TokenizedSplit
    from simpo_sweep.engine.train import PairDataset

# Nothing in the tests may reach a hub: the demo is built locally. Set before anything imports
# huggingface_hub, which reads these once (so conftest imports no project module at its top).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
# Ray's own usage-stats prompt and its dashboard are not needed in tests.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

# Property-based tests count the examples they try here; the run's summary prints them.
FUZZ_COUNTS: dict[str, dict[str, int]] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """A failure's traceback printed when it happens, not only in the summary at the end: a
    CI run cut off at its time limit still shows why the tests before the cut failed."""
    if report.failed:
        traceback = report.longreprtext[-4000:]
        sys.stderr.write(
            f"\nFAILED {report.nodeid} ({report.when}, {report.duration:.0f} s; "
            f"{_machine_load()}):\n{traceback}\n"
        )


def _machine_load() -> str:
    """Load average and free memory: whether a failure came with a starved machine."""
    import psutil

    memory = psutil.virtual_memory()
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    return f"load {load}, {memory.available / 2**30:.1f} GiB of {memory.total / 2**30:.0f} free"


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for label, counts in FUZZ_COUNTS.items():
        if counts:
            terminalreporter.write_line(f"{label}: {counts} examples tried (seed fixed)")


MLFLOW_SERVER_SCRIPT = Path(__file__).resolve().parents[1] / "cluster" / "mlflow" / "server.sh"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_http(
    url: str, timeout_s: float, process: subprocess.Popen[bytes], log: Path | None = None
) -> None:
    """Until `url` answers 200; fails early, with the end of its log, if `process` exits."""
    tail = (lambda: ": " + log.read_text(errors="replace")[-2000:]) if log else (lambda: "")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"process serving {url} exited with {process.returncode}{tail()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout_s} s{tail()}")


def stop_process_group(process: subprocess.Popen[bytes]) -> None:
    """End a process started with start_new_session=True and everything it started."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=20)


@dataclass
class MlflowServer:
    """cluster/mlflow/server.sh on loopback (SQLite + artifact folder under `root`, one worker),
    in a process group of its own so that stopping it ends the server's workers too."""

    process: subprocess.Popen[bytes]
    uri: str
    log: Path

    @classmethod
    def start(cls, root: Path, env: Mapping[str, str] | None = None) -> MlflowServer:
        """`env`: extra environment, e.g. MLFLOW_ARTIFACTS_DESTINATION and bucket settings."""
        port = free_port()
        log = root / "mlflow-server.log"
        with log.open("wb") as handle:
            process = subprocess.Popen(
                [
                    "bash",
                    str(MLFLOW_SERVER_SCRIPT),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--workers",
                    "1",
                ],
                env={
                    **os.environ,
                    "MLFLOW_SERVER_ROOT": str(root / "mlflow"),
                    "MLFLOW_EXECUTABLE": str(Path(sys.executable).with_name("mlflow")),
                    **(env or {}),
                },
                stdout=handle,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return cls(process, f"http://127.0.0.1:{port}", log)

    def wait_ready(self, timeout_s: float) -> None:
        wait_http(f"{self.uri}/health", timeout_s, self.process, self.log)

    def stop(self) -> None:
        stop_process_group(self.process)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `mlflow server` process on loopback with a SQLite store; yields its URI."""
    server = MlflowServer.start(tmp_path_factory.mktemp("mlflow-server"))
    try:
        server.wait_ready(90)
        yield server.uri
    finally:
        server.stop()


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op thread, as a sweep trial on one CPU has: two threads on a busy 2-core
    machine spin against each other and run many times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    """One real local Ray instance shared by the tests that need it."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=True)
    yield
    ray.shutdown()


@dataclass
class S3Server:
    """A real S3-protocol server (moto_server) on loopback, with one bucket. `env` is what a
    client needs to reach it: pyarrow, boto3 and MLflow's S3 client read these variables."""

    process: subprocess.Popen[bytes]
    endpoint: str
    bucket: str

    @property
    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "MLFLOW_S3_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def object_keys(self, prefix: str = "") -> list[str]:
        import boto3

        client = boto3.client("s3", endpoint_url=self.endpoint, **_boto_credentials(self.env))
        keys: list[str] = []
        for page in client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=prefix
        ):
            keys += [item["Key"] for item in page.get("Contents", [])]
        return keys


def _boto_credentials(env: Mapping[str, str]) -> dict[str, str]:
    return {
        "aws_access_key_id": env["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": env["AWS_SECRET_ACCESS_KEY"],
        "region_name": env["AWS_DEFAULT_REGION"],
    }


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """moto_server on a free loopback port, a bucket created in it."""
    import boto3

    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with log.open("wb") as handle:
        process = subprocess.Popen(
            [
                str(Path(sys.executable).with_name("moto_server")),
                "-H",
                "127.0.0.1",
                "-p",
                str(port),
            ],
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = S3Server(process, f"http://127.0.0.1:{port}", "simpo-bucket")
    try:
        wait_http(f"{server.endpoint}/moto-api/", 60, process, log)
        boto3.client(
            "s3", endpoint_url=server.endpoint, **_boto_credentials(server.env)
        ).create_bucket(Bucket=server.bucket)
        yield server
    finally:
        stop_process_group(process)


def ragged_pairs(split: PairDataset) -> TokenizedSplit:
    """`split`'s pairs at 1-3x their prompt and with shortened responses: the demo's pair costs
    (all 32-38 tokens) spread to ~20-110, so that a token budget holds different pair counts."""
    from simpo_sweep.engine.data import TokenizedSplit
    from simpo_sweep.engine.train import pair_at

    prompts, chosen, rejected = [], [], []
    for index in range(len(split)):
        pair = pair_at(split, index)
        cut = (index % 4) * 3
        prompts.append(list(pair.prompt_ids) * (1 + index % 3))
        chosen.append(list(pair.chosen_ids)[: max(1, len(pair.chosen_ids) - cut)])
        rejected.append(list(pair.rejected_ids)[: max(1, len(pair.rejected_ids) - cut)])
    return TokenizedSplit(prompts, chosen, rejected)
