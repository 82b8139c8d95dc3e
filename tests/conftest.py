"""Shared fixtures: real local Ray, a real `mlflow server` on loopback, the demo's prepared data."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

# Nothing in the tests may reach a hub: the demo is built locally.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
# Ray's own usage-stats prompt and its dashboard are not needed in tests.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

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
    def start(cls, root: Path) -> MlflowServer:
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


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    """One real local Ray instance shared by the tests that need it."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=True)
    yield
    ray.shutdown()
