"""Sweeps as Ray Jobs: submit to a cluster's dashboard address, then status, logs, stop, list.

What travels with a job (its runtime environment):
- working_dir: a staging folder holding `spec.yaml` (the spec as submitted, overrides applied)
  and, when the spec names a small local data file or folder by a relative path, a copy of it;
- py_modules: this `simpo_sweep` package (without __pycache__), so the job runs the client's
  code. The cluster needs the dependencies (torch, transformers, ray, mlflow, ...): install
  simpo-sweep on its nodes (cluster/ recipes) and the uploaded copy takes precedence.
The entrypoint is `python -m simpo_sweep.cli run spec.yaml --address auto` on the head node.

Authentication: with RAY_AUTH_MODE=token Ray's own client sends the token (RAY_AUTH_TOKEN,
RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token). A token given in RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH
without RAY_AUTH_MODE is sent as well. The token never appears in the job's metadata, its
runtime environment or anything printed.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

import requests
import yaml
from ray.exceptions import AuthenticationError
from ray.job_submission import JobDetails, JobStatus, JobSubmissionClient

from simpo_sweep.service.errors import JobError
from simpo_sweep.service.storage import StorageLocation
from simpo_sweep.spec.loading import load_spec
from simpo_sweep.spec.models import SweepSpec

JOB_METADATA_KEY = "simpo_sweep"
SPEC_NAME = "spec.yaml"
ENTRYPOINT = f"python -m simpo_sweep.cli run {SPEC_NAME} --address auto"
# Uploaded with the package: nothing that is rebuilt or machine-specific.
PACKAGE_EXCLUDES = ["__pycache__", "*.pyc", "*.pyo", ".mypy_cache", ".ruff_cache"]
# A relative local data source up to this size travels with the job; a larger one must already
# be on the cluster (shared storage) under an absolute path.
MAX_DATA_UPLOAD_BYTES = 100 * 1024 * 1024
# After submission: how long a job may stay PENDING (runtime environment set-up, waiting for
# the head's resources) before `submit` returns anyway, and how long a RUNNING job is watched
# for an early failure (a spec the cluster refuses, a missing dependency) before returning.
START_TIMEOUT_S = 180.0
SETTLE_TIMEOUT_S = 45.0
POLL_S = 1.0
# The sweep prints this once the cluster accepted it (after its resource and storage checks).
SWEEP_STARTED = re.compile(r"^sweep \S+: \d+ trials, storage ", re.MULTILINE)
LOG_TAIL_LINES = 25
_CHATTY_LOGGERS = (
    "ray.dashboard.modules.dashboard_sdk",
    "ray.dashboard.modules.job.sdk",
    "ray._private.runtime_env.packaging",
)

T = TypeVar("T")


# ---- connection and errors ------------------------------------------------------------------


def dashboard_url(address: str) -> str:
    """The dashboard URL for `address`; refuses what is not a dashboard address."""
    address = address.strip().rstrip("/")
    if address in {"", "auto", "local"}:
        raise JobError(
            f"--address {address!r}: give the cluster's dashboard URL, e.g. http://HEAD:8265"
        )
    if address.startswith("ray://"):
        raise JobError(
            f"{address} is a Ray Client address; the job commands talk to the dashboard's "
            "Jobs API: give http://HEAD:8265"
        )
    if "://" not in address:
        address = f"http://{address}"
    parsed = urlparse(address)
    if parsed.scheme not in {"http", "https"} or not parsed.hostname:
        raise JobError(f"{address} is not a dashboard URL; expected http://HEAD:8265")
    return address


def _token_from_env() -> str | None:
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if token:
        return token
    path = os.environ.get("RAY_AUTH_TOKEN_PATH", "").strip()
    if path:
        try:
            return Path(path).expanduser().read_text().strip() or None
        except OSError as error:
            raise JobError(
                f"RAY_AUTH_TOKEN_PATH={path} cannot be read ({error.strerror})"
            ) from error
    return None


def auth_headers() -> dict[str, str]:
    """Headers Ray's client would not add itself: a token given without RAY_AUTH_MODE=token."""
    if os.environ.get("RAY_AUTH_MODE", "").strip():
        return {}  # "token": Ray sends it; "disabled": the user asked for none
    token = _token_from_env()
    return {"Authorization": f"Bearer {token}"} if token else {}


def _explain(address: str, error: Exception) -> str:
    """One line (or a few) saying what went wrong and what to do; never a token."""
    if isinstance(error, AuthenticationError):
        text = error.message
        if "Missing authentication token" in text or "couldn't find" in text:
            return (
                f"the Ray cluster at {address} requires token authentication and no token was "
                "found: set RAY_AUTH_TOKEN=<token> or RAY_AUTH_TOKEN_PATH=<file> "
                "(with RAY_AUTH_MODE=token, ~/.ray/auth_token is also read)"
            )
        if "Invalid authentication token" in text or "invalid or incorrect" in text:
            return (
                f"the Ray cluster at {address} refused the authentication token: use this "
                "cluster's token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)"
            )
        return f"authentication with the Ray cluster at {address} failed: {text.splitlines()[0]}"
    if isinstance(error, ConnectionError | requests.exceptions.RequestException):
        return (
            f"cannot reach the Ray dashboard at {address}: is the cluster up, and is this the "
            "dashboard's address (http://HEAD:8265, not the GCS port 6379)?"
        )
    text = str(error)
    if "Version check returned 404" in text or "Jobs API is not supported" in text:
        return f"{address} answers HTTP but is not a Ray dashboard with the Jobs API"
    if "status code 404" in text and "does not exist" in text:
        found = re.search(r"Job (\S+) does not exist", text)
        job = found.group(1) if found else "the job"
        return (
            f"no job {job} on the Ray cluster at {address} "
            "(`simpo-sweep list` shows the submitted sweeps)"
        )
    return f"Ray dashboard at {address}: {text}"


def _call(address: str, action: str, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    try:
        return function(*args, **kwargs)
    except JobError:
        raise
    except (
        AuthenticationError,
        ConnectionError,
        requests.exceptions.RequestException,
        RuntimeError,
    ) as error:
        raise JobError(f"{action}: {_explain(address, error)}") from error


def client(address: str) -> JobSubmissionClient:
    """A client for the dashboard at `address` (checks that it answers and accepts us)."""
    url = dashboard_url(address)
    for name in _CHATTY_LOGGERS:  # "Uploading package ...", "WebSocket closed": not news
        logging.getLogger(name).setLevel(logging.WARNING)
    return _call(url, "connect", JobSubmissionClient, url, headers=auth_headers() or None)


# ---- submit ---------------------------------------------------------------------------------


def _local_path(path: str) -> Path | None:
    """`path` as a local file or folder that exists, or None (hub ids, builtins, URIs)."""
    if "://" in path or path.startswith("builtin:"):  # a URI or a hub id is no local path
        return None
    candidate = Path(path).expanduser()
    return candidate if candidate.exists() else None


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(item.stat().st_size for item in path.rglob("*") if item.is_file())


def job_document(spec: SweepSpec, staging: Path, notes: list[str]) -> dict[str, Any] | None:
    """The spec as the job must see it, or None when the submitted file can go as it is.

    The job runs in a temporary working directory on the head, so relative paths are made
    absolute (storage, caches) or the file they name is copied along (a small data source).
    """
    document = spec.model_dump(mode="json", exclude_none=True)
    changed = False

    storage = StorageLocation.parse(spec.storage.path)
    if storage.uri != spec.storage.path:  # relative, ~ or file://: the job's folder differs
        document["storage"]["path"] = storage.uri
        if not storage.is_remote and not Path(spec.storage.path).is_absolute():
            notes.append(
                f"storage.path {spec.storage.path!r} is relative: the job writes to "
                f"{storage.uri}, which must exist on the cluster (on a multi-node cluster: "
                "shared storage)"
            )
        changed = True
    if spec.data.cache_dir:
        cache = StorageLocation.parse(spec.data.cache_dir)
        if cache.uri != spec.data.cache_dir:
            document["data"]["cache_dir"] = cache.uri
            changed = True

    source = spec.data.source
    local = _local_path(source)
    if local is not None and not Path(source).expanduser().is_absolute():
        size = _size(local)
        if size <= MAX_DATA_UPLOAD_BYTES and ".." not in Path(source).parts:
            target = staging / source
            target.parent.mkdir(parents=True, exist_ok=True)
            if local.is_dir():
                shutil.copytree(local, target)
            else:
                shutil.copy2(local, target)
            notes.append(f"data.source {source} ({size / 1e6:.1f} MB) travels with the job")
        else:
            absolute = str(local.resolve())
            document["data"]["source"] = absolute
            notes.append(
                f"data.source {source!r} is not uploaded ({size / 1e6:.0f} MB); the job reads "
                f"{absolute}, which must exist on the cluster's head node"
            )
            changed = True
    for key in ("name", "tokenizer"):
        value = getattr(spec.model, key)
        local = _local_path(value) if value else None
        if local is not None and value and not Path(value).expanduser().is_absolute():
            document["model"][key] = str(local.resolve())
            notes.append(f"model.{key} {value!r} is a local path: the job reads {local.resolve()}")
            changed = True
    return document if changed else None


def _package_dir() -> str:
    """The simpo_sweep package folder (this file's grandparent; robust to namespace imports)."""
    return str(Path(__file__).resolve().parents[1])


def submission_id(spec: SweepSpec) -> str:
    return f"simpo-{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def submit(
    spec_path: str,
    overrides: list[str],
    address: str,
    *,
    start_timeout_s: float = START_TIMEOUT_S,
    settle_timeout_s: float = SETTLE_TIMEOUT_S,
    verbose: bool = False,
) -> str:
    """Submit the sweep; returns once it is running (or raises when it failed to start).
    `verbose`: the job's log carries Ray's own output too (trial processes, checkpoints)."""
    spec = load_spec(spec_path, overrides)  # refuse a bad spec before anything reaches the cluster
    url = dashboard_url(address)
    jobs = client(url)
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="simpo-job-") as staging:
        document = job_document(spec, Path(staging), notes)
        if document is None and not overrides:
            text = Path(spec_path).read_text()  # the user's file, comments included
        else:
            text = yaml.safe_dump(document or spec.model_dump(mode="json", exclude_none=True))
        (Path(staging) / SPEC_NAME).write_text(text)
        for note in notes:
            print(f"note: {note}")
        job_id = _call(
            url,
            "submit",
            jobs.submit_job,
            entrypoint=ENTRYPOINT + (" --verbose" if verbose else ""),
            runtime_env={
                "working_dir": staging,
                "py_modules": [_package_dir()],
                "excludes": PACKAGE_EXCLUDES,
                "env_vars": {"PYTHONUNBUFFERED": "1"},
            },
            metadata={JOB_METADATA_KEY: "1", "sweep": spec.name},
            submission_id=submission_id(spec),
        )
    print(f"submitted sweep '{spec.name}' as job {job_id} to {url}")
    current = watch_start(jobs, job_id, url, start_timeout_s, settle_timeout_s)
    print(f"job {job_id}: {current}")
    print(f"  follow:    simpo-sweep logs {job_id} --address {url} --follow")
    print(f"  status:    simpo-sweep status {job_id} --address {url}")
    print(f"  stop:      simpo-sweep stop {job_id} --address {url}")
    print(f"  dashboard: {url}/#/jobs/{job_id}")
    if spec.tracking.enabled and spec.tracking.tracking_uri:
        print(f"  MLflow:    {spec.tracking.tracking_uri}")
    return str(job_id)


def _tail(text: str, lines: int = LOG_TAIL_LINES) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def watch_start(
    jobs: JobSubmissionClient,
    job_id: str,
    address: str,
    start_timeout_s: float = START_TIMEOUT_S,
    settle_timeout_s: float = SETTLE_TIMEOUT_S,
) -> str:
    """Follow a fresh job until its sweep started; raise JobError when it fails before that.

    Returns the job's status: RUNNING once the sweep printed its start (or after
    `settle_timeout_s` of running), PENDING after `start_timeout_s` without starting, or the
    terminal status of a job that ended well (or was stopped) within that time.
    """
    started = time.monotonic()
    running_since: float | None = None
    while True:
        info = _call(address, f"status of {job_id}", jobs.get_job_info, job_id)
        now = time.monotonic()
        if info.status == JobStatus.FAILED:
            logs = _call(address, f"logs of {job_id}", jobs.get_job_logs, job_id)
            reason = (info.message or "failed").splitlines()[0]
            reason = reason.split(", last available logs", 1)[0].rstrip(":")
            detail = _tail(logs) if logs.strip() else (info.message or "")
            raise JobError(
                f"job {job_id} failed to start: {reason}\n"
                f"--- last lines of its log ---\n{detail}\n---"
            )
        if info.status.is_terminal():
            return str(info.status)
        if info.status == JobStatus.RUNNING:
            running_since = running_since or now
            if now - running_since >= settle_timeout_s:
                return str(info.status)
            logs = _call(address, f"logs of {job_id}", jobs.get_job_logs, job_id)
            if SWEEP_STARTED.search(logs):
                return str(info.status)
        elif now - started >= start_timeout_s:
            print(f"note: job {job_id} is still {info.status}: {info.message}")
            return str(info.status)
        time.sleep(POLL_S)


# ---- follow ---------------------------------------------------------------------------------


def status(job_id: str, address: str) -> JobDetails:
    url = dashboard_url(address)
    return _call(url, f"status of {job_id}", client(url).get_job_info, job_id)


def logs(job_id: str, address: str, follow: bool) -> str:
    """Print the job's driver log (following it to the end); returns the final status."""
    url = dashboard_url(address)
    jobs = client(url)
    info = _call(url, f"logs of {job_id}", jobs.get_job_info, job_id)  # an unknown id fails here
    if not follow:
        print(_call(url, f"logs of {job_id}", jobs.get_job_logs, job_id), end="", flush=True)
        return str(info.status)

    async def tail() -> None:
        async for chunk in jobs.tail_job_logs(job_id):
            print(chunk, end="", flush=True)

    try:
        asyncio.run(tail())
    except Exception as error:  # aiohttp errors of a dropped connection
        raise JobError(f"following the logs of {job_id} at {url} failed: {error}") from error
    return str(_call(url, f"status of {job_id}", jobs.get_job_status, job_id))


def wait_for(job_id: str, address: str, timeout_s: float, poll_s: float = 2.0) -> str:
    """Block until the job ends; returns its terminal status."""
    url = dashboard_url(address)
    jobs = client(url)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        current = _call(url, f"status of {job_id}", jobs.get_job_status, job_id)
        if current.is_terminal():
            return str(current)
        time.sleep(poll_s)
    raise JobError(f"job {job_id} did not finish within {timeout_s:.0f} s")


def stop(job_id: str, address: str, timeout_s: float = 60.0) -> str:
    """Ask the job to stop and wait until it did; returns its final status."""
    url = dashboard_url(address)
    jobs = client(url)
    info = _call(url, f"stop {job_id}", jobs.get_job_info, job_id)
    if info.status.is_terminal():
        return str(info.status)
    _call(url, f"stop {job_id}", jobs.stop_job, job_id)
    return wait_for(job_id, url, timeout_s, poll_s=0.5)


def sweep_jobs(address: str) -> list[JobDetails]:
    """The jobs of the cluster that are simpo-sweep sweeps, oldest first."""
    url = dashboard_url(address)
    listed = _call(url, "list", client(url).list_jobs)
    sweeps = [job for job in listed if (job.metadata or {}).get(JOB_METADATA_KEY)]
    return sorted(sweeps, key=lambda job: job.start_time or 0)


def _clock(milliseconds: int | None) -> str:
    if not milliseconds:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(milliseconds / 1000))


# ---- command line ---------------------------------------------------------------------------


def cli(args: argparse.Namespace) -> int:
    """`submit`, `status`, `logs`, `stop`, `list`: 0 on success, 1 for a failed job."""
    if args.command == "submit":
        submit(args.spec, args.overrides, args.address, verbose=args.verbose)
        return 0
    if args.command == "status":
        info = status(args.job_id, args.address)
        sweep = (info.metadata or {}).get("sweep")
        print(
            f"{args.job_id}: {info.status}"
            + (f"  sweep={sweep}" if sweep else "")
            + f"  started {_clock(info.start_time)}"
            + (f"  ended {_clock(info.end_time)}" if info.end_time else "")
        )
        if info.message and info.status != JobStatus.RUNNING:
            print(_tail(info.message, 10))
        return 1 if info.status == JobStatus.FAILED else 0
    if args.command == "logs":
        final = logs(args.job_id, args.address, args.follow)
        if args.follow:
            print(f"\njob {args.job_id}: {final}")
        return 1 if final == str(JobStatus.FAILED) else 0
    if args.command == "stop":
        final = stop(args.job_id, args.address)
        print(f"{args.job_id}: {final}")
        return 0
    if args.command == "list":
        sweeps = sweep_jobs(args.address)
        if not sweeps:
            print("no sweeps submitted to this cluster")
        for job in sweeps:
            print(
                f"{job.submission_id}  {job.status!s:<9}  sweep={(job.metadata or {}).get('sweep')}"
                f"  started {_clock(job.start_time)}"
            )
        return 0
    raise AssertionError(args.command)
