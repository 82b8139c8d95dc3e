"""FSDP2 (resources.strategy fsdp) on CPU: 2 gloo processes train like DDP and like one
process with the same global batch, write sharded DCP checkpoints that resume exactly and load
whole in one process; and as Ray Train trials, including a worker killed mid-trial."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import ragged_pairs
from mlflow.tracking import MlflowClient
from torch.distributed.tensor import DTensor

from simpo_sweep.engine.checkpoint import (
    COMPLETE_MARKER,
    MODEL_FOLDER,
    IncompleteCheckpointError,
    checkpoint_info,
    load_full_model_state,
)
from simpo_sweep.engine.data import PreparedData, load_prepared, prepare_data
from simpo_sweep.engine.models import load_model, load_tokenizer
from simpo_sweep.engine.train import SimPOTrainer, settle_collectives
from simpo_sweep.spec.models import DataSpec, ModelSpec, SimPOSpec, TrainingSpec

MODEL = ModelSpec()
GLOBAL_BATCH = 8
# Gradient accumulation and gradient checkpointing on: the FSDP paths that differ from DDP.
SETTINGS: dict[str, Any] = {
    "learning_rate": 3e-3,
    "warmup_ratio": 0.0,
    "max_steps": 6,
    "eval_every": 3,
    "checkpoint_every": 3,
    "gradient_accumulation_steps": 2,
}
# Float reduction order differs between 1 and 2 processes and between all-reduce and
# reduce-scatter: measured max relative difference of any metric over 6 steps 4e-5.
TOLERANCE: dict[str, Any] = {"rel": 2e-4, "abs": 1e-6}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> PreparedData:
    return prepare_data(
        MODEL,
        DataSpec(max_length=64, max_prompt_length=24, max_train_pairs=40, max_eval_pairs=10),
        tmp_path_factory.mktemp("data"),
    )


def _model_metrics(metrics: dict[str, float]) -> dict[str, float]:
    return {key: value for key, value in metrics.items() if not key.startswith("perf/")}


def _worker(rank: int, world: int, job: dict[str, Any]) -> None:
    """One rank: trains (or stops at `stop_at`, or resumes), writes what it saw to JSON."""
    torch.set_num_threads(1)
    out = Path(job["out"])
    if world > 1:
        dist.init_process_group(
            "gloo", init_method=f"file://{out}.rendezvous", rank=rank, world_size=world
        )
    try:
        model_spec = ModelSpec(gradient_checkpointing=True)
        tokenizer = load_tokenizer(model_spec)
        prepared = load_prepared(job["data"])
        train = ragged_pairs(prepared.train) if job.get("ragged") else prepared.train
        trainer = SimPOTrainer(
            load_model(model_spec, tokenizer, "cpu", seed=job.get("model_seed", 0)),
            train,
            prepared.eval,
            training=TrainingSpec(
                **{"batch_size": GLOBAL_BATCH // world, **SETTINGS, **job.get("training", {})}
            ),
            simpo=SimPOSpec(),
            pad_token_id=tokenizer.pad_token_id,
            device="cpu",
            strategy=job["strategy"],
            checkpoint_root=Path(job["checkpoints"]) if job.get("checkpoints") else None,
        )
        sharded = [isinstance(p, DTensor) for p in trainer.model.parameters()]
        local = sum(
            (p.to_local() if isinstance(p, DTensor) else p).numel()
            for p in trainer.model.parameters()
        )
        events: list[dict[str, float]] = []
        stop_at = job.get("stop_at")
        resume = Path(job["resume"]) if job.get("resume") else None

        def record(event: Any) -> str | None:
            events.append(_model_metrics(event.metrics))
            return "stop" if event.step == stop_at else None

        result = trainer.fit(
            record,
            resume_from=resume,
        )
        full = {
            name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
            for name, p in trainer.model.named_parameters()
        }
        model: Any = trainer.model
        tied = model.lm_head.weight is model.model.embed_tokens.weight
        if rank == 0:
            torch.save(full, f"{out}.weights.pt")
            out.write_text(
                json.dumps(
                    {
                        "events": events,
                        "final": _model_metrics(result.metrics),
                        "all_sharded": all(sharded),
                        "local_parameters": local,
                        "tied": tied,
                    }
                )
            )
        settle_collectives()
    finally:
        if world > 1:
            dist.destroy_process_group()


def _run(world: int, tmp_path: Path, name: str, **job: Any) -> dict[str, Any]:
    job["out"] = str(tmp_path / f"{name}.json")
    if world == 1:
        _worker(0, 1, job)
    else:
        mp.spawn(_worker, args=(world, job), nprocs=world)
    result: dict[str, Any] = json.loads(Path(job["out"]).read_text())
    result["weights"] = torch.load(f"{job['out']}.weights.pt")
    return result


@pytest.fixture(scope="module")
def runs(prepared: PreparedData, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """6 steps on 1 process, on 2 with DDP, on 2 with FSDP (checkpointing at steps 3 and 6)."""
    folder = tmp_path_factory.mktemp("runs")
    data = str(prepared.path)
    return {
        "folder": folder,
        "one": _run(1, folder, "one", data=data, strategy="ddp"),
        "ddp": _run(2, folder, "ddp", data=data, strategy="ddp"),
        "fsdp": _run(
            2, folder, "fsdp", data=data, strategy="fsdp", checkpoints=str(folder / "fsdp_ckpt")
        ),
    }


def _assert_same_run(first: dict[str, Any], second: dict[str, Any], **tolerance: Any) -> None:
    assert len(first["events"]) == len(second["events"])
    for mine, theirs in zip(first["events"], second["events"], strict=True):
        assert mine.keys() == theirs.keys()
        for key, value in theirs.items():
            assert mine[key] == pytest.approx(value, **tolerance), key


def test_fsdp_trains_like_ddp_and_like_one_process(runs: dict[str, Any]) -> None:
    one, ddp, fsdp = runs["one"], runs["ddp"], runs["fsdp"]

    # really sharded: every parameter a DTensor, each rank holding about half of them, the
    # tied embedding and head still one parameter
    total = sum(tensor.numel() for tensor in one["weights"].values())
    assert fsdp["all_sharded"] and not ddp["all_sharded"]
    assert fsdp["local_parameters"] <= total / 2 + 1000
    assert fsdp["tied"]
    _assert_same_run(fsdp, one, **TOLERANCE)
    _assert_same_run(fsdp, ddp, **TOLERANCE)
    # Weight by weight, AdamW's division by sqrt(v) turns last-bit gradient differences of
    # near-zero entries into visible ones; each tensor as a whole agrees to 1e-3 of its norm.
    for name, weight in one["weights"].items():
        difference = torch.linalg.vector_norm(fsdp["weights"][name] - weight)
        assert difference <= 1e-3 * torch.linalg.vector_norm(weight), name


def test_token_budget_micro_batches_split_across_ranks_train_like_one_process(
    prepared: PreparedData, tmp_path: Path
) -> None:
    """Ragged pairs, micro-batches of at most 160 tokens (different pair counts on the two
    ranks): 2 ranks x 2 micro-batches, DDP and FSDP, take the steps one process takes with
    the same 4 micro-batches a step. Every rank's pairs count in the step's mean, so each
    rank's loss is weighted by its share of all the step's pairs, not by 1/world_size."""
    budget = {"max_tokens_per_batch": 160, "max_steps": 3}  # 3 steps: within the first epoch
    job = {"data": str(prepared.path), "ragged": True}
    one = _run(
        1,
        tmp_path,
        "one",
        **job,
        strategy="ddp",
        training={**budget, "gradient_accumulation_steps": 4},
    )
    for strategy in ("ddp", "fsdp"):
        two = _run(2, tmp_path, strategy, **job, strategy=strategy, training=budget)
        _assert_same_run(two, one, **TOLERANCE)
        for name, weight in one["weights"].items():
            difference = torch.linalg.vector_norm(two["weights"][name] - weight)
            assert difference <= 1e-3 * torch.linalg.vector_norm(weight), (strategy, name)


def test_sharded_checkpoint_resumes_exactly_and_loads_whole(
    prepared: PreparedData, runs: dict[str, Any], tmp_path: Path
) -> None:
    """6 steps straight vs new processes, with a differently initialised model, resuming from
    the sharded checkpoint of step 3 to step 6: the same metrics and weights, bit for bit."""
    straight = runs["fsdp"]
    checkpoint = runs["folder"] / "fsdp_ckpt" / "step_000003"
    resumed = _run(
        2,
        tmp_path,
        "resumed",
        data=str(prepared.path),
        strategy="fsdp",
        model_seed=1,
        resume=str(checkpoint),
    )

    assert COMPLETE_MARKER in {path.name for path in checkpoint.iterdir()}
    assert {"__0_0.distcp", "__1_0.distcp"} <= {
        path.name for path in (checkpoint / MODEL_FOLDER).iterdir()
    }
    assert checkpoint_info(checkpoint)["strategy"] == "fsdp"
    assert resumed["final"] == straight["final"]
    for name, weight in straight["weights"].items():
        torch.testing.assert_close(resumed["weights"][name], weight, rtol=0, atol=0, msg=name)
    # one process, no process group: the whole model's weights at step 3, under plain names
    whole = load_full_model_state(checkpoint)
    plain = load_model(MODEL, load_tokenizer(MODEL), "cpu")
    assert set(whole) == set(plain.state_dict())
    plain.load_state_dict(whole)
    assert whole["lm_head.weight"].shape == plain.lm_head.weight.shape


def test_a_checkpoint_missing_a_shard_or_its_marker_is_refused(
    runs: dict[str, Any], tmp_path: Path
) -> None:
    checkpoint = tmp_path / "step_000006"
    shutil.copytree(runs["folder"] / "fsdp_ckpt" / "step_000006", checkpoint)
    load_full_model_state(checkpoint)

    (checkpoint / "model" / "__1_0.distcp").unlink()
    with pytest.raises(IncompleteCheckpointError, match=r"model/__1_0\.distcp"):
        load_full_model_state(checkpoint)
    (checkpoint / COMPLETE_MARKER).unlink()
    with pytest.raises(IncompleteCheckpointError, match=r"no checkpoint_complete\.json"):
        checkpoint_info(checkpoint)


# ---- as Ray Train trials ----------------------------------------------------------------


def _demo_spec(tmp_path: Path, **sections: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": "t",
        "model": {"name": "builtin:tiny-llama"},
        "data": {"source": "builtin:rule-following", "max_length": 64, "max_prompt_length": 24},
        "training": {"max_steps": 10, "learning_rate": 3.0e-3, "eval_every": 5},
        "search": {"algorithm": "random", "num_samples": 1, "max_concurrent_trials": 1},
        "storage": {"path": str(tmp_path / "runs")},
    }
    for section, value in sections.items():
        spec[section] = {**spec.get(section, {}), **value}
    return spec


def _sweep(spec: dict[str, Any]) -> Any:
    from simpo_sweep.service.sweep import run_sweep
    from simpo_sweep.spec.models import SweepSpec

    return run_sweep(SweepSpec.model_validate(spec), printer=lambda _line: None)


@pytest.mark.slow
@pytest.mark.usefixtures("ray_local")
def test_two_fsdp_workers_match_two_ddp_workers_and_one_worker(tmp_path: Path) -> None:
    from simpo_sweep.service.results import STATE_COMPLETED

    finals = {}
    for name, workers, strategy in (("one", 1, "ddp"), ("ddp", 2, "ddp"), ("fsdp", 2, "fsdp")):
        spec = _demo_spec(
            tmp_path / name,
            training={"batch_size": 8 // workers, "checkpoint_every": 10},
            resources={"num_workers": workers, "cpus_per_worker": 1, "strategy": strategy},
        )
        (row,) = _sweep(spec).rows
        assert row.state == STATE_COMPLETED
        finals[name] = row.metrics
    for key in ("eval/loss", "eval/rewards/margins", "eval/logps/chosen", "train/loss"):
        for name in ("ddp", "fsdp"):
            assert finals[name][key] == pytest.approx(finals["one"][key], **TOLERANCE), key


def _results(storage: Path) -> list[dict[str, Any]]:
    return [
        json.loads(line)
        for result_file in storage.rglob("result.json")
        for line in result_file.read_text().splitlines()
    ]


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.usefixtures("ray_local")
def test_killed_fsdp_worker_resumes_from_its_sharded_checkpoint(tmp_path: Path) -> None:
    """SIGKILL one of two FSDP workers once a checkpoint is reported: the trial restarts its
    worker group from the sharded checkpoint and MLflow gets every step exactly once."""
    import ray

    from simpo_sweep.service.results import STATE_COMPLETED

    max_steps = 300
    spec = _demo_spec(
        tmp_path,
        training={
            "max_steps": max_steps,
            "eval_every": 100,
            "checkpoint_every": 20,
            "batch_size": 2,
        },
        resources={"num_workers": 2, "cpus_per_worker": 1, "strategy": "fsdp", "max_failures": 2},
    )
    outcome: list[Any] = []
    runner = threading.Thread(target=lambda: outcome.append(_sweep(spec)))
    runner.start()
    storage = Path(spec["storage"]["path"])
    # A two-worker group takes 20-200 s to start on a busy 2-core machine.
    deadline = time.monotonic() + 300
    while not _results(storage) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _results(storage), "no result before the deadline"
    # A Train worker of this trial, not the trial driver: a process titled RayTrainWorker
    # under this session's own raylet (other Ray instances may run on the machine).
    node: Any = ray._private.worker._global_node
    raylet = node.all_processes["raylet"][0].process.pid
    workers = [
        child
        for child in psutil.Process(raylet).children(recursive=True)
        if "RayTrainWorker" in " ".join(child.cmdline())
    ]
    assert len(workers) >= 2, [" ".join(child.cmdline()) for child in workers]
    os.kill(workers[-1].pid, signal.SIGKILL)
    runner.join(timeout=500)
    assert outcome, "the sweep did not finish"
    (row,) = outcome[0].rows
    assert row.state == STATE_COMPLETED and row.step == max_steps
    from simpo_sweep.spec.models import SweepSpec
    from simpo_sweep.tracking.mlflow_runs import SweepTracking

    validated = SweepSpec.model_validate(spec)
    uri = f"sqlite:///{storage.resolve() / 'mlflow.db'}"
    tracking = SweepTracking(uri, validated.name, validated.name, outcome[0].sweep_id)
    (run,) = tracking.child_runs().values()
    resumed_from = int(run.data.tags["simpo_sweep.resumed_from_step"])
    assert 20 <= resumed_from < max_steps and resumed_from % 20 == 0
    steps = [m.step for m in MlflowClient(uri).get_metric_history(run.info.run_id, "train/loss")]
    assert steps == list(range(1, max_steps + 1)), "steps lost or logged twice across the retry"
