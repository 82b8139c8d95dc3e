"""Sweeps as Ray Jobs: submit to a cluster's dashboard address, then status, logs, stop, list.

The job carries the spec (overrides applied) in its working directory and this package as a
py_module, so the cluster needs the dependencies (torch, transformers, ray, mlflow) but not a
copy of simpo-sweep. Ray's token authentication is used when RAY_AUTH_MODE=token is set (the
token comes from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or Ray's default token file).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import requests
import yaml
from ray.job_submission import JobStatus, JobSubmissionClient

import simpo_sweep
from simpo_sweep.service.errors import JobError
from simpo_sweep.spec.loading import load_spec

JOB_METADATA_KEY = "simpo_sweep"
TERMINAL = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}


def client(address: str) -> JobSubmissionClient:
    """A client for the dashboard at `address`, with errors that say what went wrong."""
    try:
        return JobSubmissionClient(address)
    except ConnectionError as error:
        raise JobError(
            f"cannot reach the Ray dashboard at {address}: is the cluster up and the address "
            f"the dashboard's (http://HEAD:8265)? ({error})"
        ) from error
    except RuntimeError as error:
        raise JobError(_auth_hint(address, str(error))) from error


def _auth_hint(address: str, message: str) -> str:
    if "401" in message or "Missing authentication" in message:
        return (
            f"the Ray cluster at {address} requires token authentication: set RAY_AUTH_MODE=token "
            "and RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH)"
        )
    if "403" in message or "Invalid authentication" in message:
        return f"the Ray cluster at {address} refused the authentication token"
    return f"Ray dashboard at {address}: {message}"


def _call(address: str, action: str, function: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return function(*args, **kwargs)
    except (requests.exceptions.RequestException, ConnectionError) as error:
        raise JobError(
            f"{action}: cannot reach the Ray dashboard at {address} ({error})"
        ) from error
    except RuntimeError as error:
        raise JobError(f"{action}: {_auth_hint(address, str(error))}") from error


def _package_dir() -> str:
    return str(Path(simpo_sweep.__file__).parent)


def submit(spec_path: str, overrides: list[str], address: str, wait: bool = False) -> str:
    spec = load_spec(spec_path, overrides)  # refuse a bad spec before anything reaches the cluster
    document = spec.model_dump(mode="json", exclude_none=True)
    storage = Path(spec.storage.path)
    if not storage.is_absolute() and "://" not in spec.storage.path:
        # The job runs in a temporary working directory that is deleted after it ends.
        document["storage"]["path"] = str(storage.resolve())
        print(f"note: storage.path is relative; the job uses {document['storage']['path']}")
    jobs = client(address)
    with tempfile.TemporaryDirectory(prefix="simpo-job-") as staging:
        (Path(staging) / "spec.yaml").write_text(yaml.safe_dump(document, sort_keys=False))
        job_id = _call(
            address,
            "submit",
            jobs.submit_job,
            entrypoint=f"{Path(sys.executable).name} -m simpo_sweep.cli run spec.yaml --address auto",
            runtime_env={"working_dir": staging, "py_modules": [_package_dir()]},
            metadata={JOB_METADATA_KEY: "1", "sweep": spec.name},
            submission_id=f"simpo-{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}",
        )
    print(f"submitted {job_id} to {address}")
    print(f"follow it: simpo-sweep logs {job_id} --address {address} --follow")
    print(f"dashboard: {address.rstrip('/')}/#/jobs/{job_id}")
    return str(job_id)


def status(job_id: str, address: str) -> tuple[str, str]:
    info = _call(address, f"status of {job_id}", client(address).get_job_info, job_id)
    return str(info.status), info.message or ""


def logs(job_id: str, address: str, follow: bool) -> None:
    jobs = client(address)
    if not follow:
        print(_call(address, f"logs of {job_id}", jobs.get_job_logs, job_id), end="")
        return

    async def tail() -> None:
        async for chunk in jobs.tail_job_logs(job_id):
            print(chunk, end="", flush=True)

    _call(address, f"logs of {job_id}", asyncio.run, tail())


def wait_for(job_id: str, address: str, timeout_s: float, poll_s: float = 2.0) -> str:
    jobs = client(address)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        current = _call(address, f"status of {job_id}", jobs.get_job_status, job_id)
        if current in TERMINAL:
            return str(current)
        time.sleep(poll_s)
    raise JobError(f"job {job_id} did not finish within {timeout_s:.0f} s")


def cli(args: argparse.Namespace) -> int:
    if args.command == "submit":
        submit(args.spec, args.overrides, args.address)
        return 0
    if args.command == "status":
        current, message = status(args.job_id, args.address)
        print(f"{args.job_id}: {current}" + (f" ({message})" if message else ""))
        return 0 if current != str(JobStatus.FAILED) else 1
    if args.command == "logs":
        logs(args.job_id, args.address, args.follow)
        return 0
    if args.command == "stop":
        stopped = _call(
            args.address, f"stop {args.job_id}", client(args.address).stop_job, args.job_id
        )
        print(f"{args.job_id}: {'stop requested' if stopped else 'already finished'}")
        return 0
    if args.command == "list":
        jobs = _call(args.address, "list", client(args.address).list_jobs)
        sweeps = [job for job in jobs if (job.metadata or {}).get(JOB_METADATA_KEY)]
        for job in sorted(sweeps, key=lambda job: job.start_time or 0):
            print(f"{job.submission_id}  {job.status}  sweep={job.metadata.get('sweep')}")
        if not sweeps:
            print("no sweeps submitted to this cluster")
        return 0
    raise AssertionError(args.command)
