"""Checkpoint retention: once trials end, only the best storage.keep_best_trials keep their
weights (their last checkpoint, optimizer state dropped), on a disk and in a bucket; a trial
pushed out of the best K loses them; a failed trial keeps its last whole checkpoint for resume.
The checkpoints are real ones written by the trainer, laid out the way Tune keeps them."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from simpo_sweep.engine.checkpoint import (
    OPTIMIZER_FOLDER,
    IncompleteCheckpointError,
    checkpoint_info,
    load_full_model_state,
    resumable,
)
from simpo_sweep.engine.data import PreparedData, prepare_data
from simpo_sweep.engine.models import load_model, load_tokenizer
from simpo_sweep.engine.train import SimPOTrainer
from simpo_sweep.service.export import trial_checkpoints
from simpo_sweep.service.retention import LEDGER_FILE, trial_ended
from simpo_sweep.service.storage import StorageLocation
from simpo_sweep.spec.models import DataSpec, ModelSpec, SimPOSpec, SweepSpec, TrainingSpec
from simpo_sweep.trial.outcome import TrialState
from tests.conftest import S3Server

MODEL = ModelSpec()
TOKENIZER = load_tokenizer(MODEL)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two real checkpoints (steps 2 and 4) of the demo model."""
    prepared: PreparedData = prepare_data(
        MODEL,
        DataSpec(max_length=64, max_prompt_length=24, max_train_pairs=16, max_eval_pairs=4),
        tmp_path_factory.mktemp("data"),
    )
    root = tmp_path_factory.mktemp("checkpoints")
    trainer = SimPOTrainer(
        load_model(MODEL, TOKENIZER, "cpu", seed=0),
        prepared.train,
        prepared.eval,
        training=TrainingSpec(batch_size=4, max_steps=4, checkpoint_every=2, eval_every=4),
        simpo=SimPOSpec(),
        pad_token_id=TOKENIZER.pad_token_id,
        device="cpu",
        checkpoint_root=root,
    )
    trainer.fit()
    return [root / "step_000002", root / "step_000004"]


def _lay_out_trial(sweep: StorageLocation, trial_id: str, checkpoints: list[Path]) -> None:
    """A single-worker trial's Tune folder with its checkpoints, as Tune names them."""
    for index, checkpoint in enumerate(checkpoints):
        target = sweep / f"run_trial_{trial_id}_1_lr=0.001_2026-12-04/checkpoint_{index:06d}"
        if target.is_remote:
            target.upload_folder(checkpoint)
        else:
            shutil.copytree(checkpoint, Path(target.uri))


def _spec(keep: int) -> SweepSpec:
    return SweepSpec.model_validate(
        {
            "name": "retention",
            "search": {"metric": "eval/rewards/accuracies", "mode": "max"},
            "storage": {"keep_best_trials": keep},
        }
    )


def _names(sweep: StorageLocation, trial_id: str) -> list[str]:
    return [checkpoint.name for checkpoint in trial_checkpoints(sweep, trial_id)]


def _check_retention(sweep: StorageLocation, checkpoints: list[Path], local: Path) -> None:
    for trial_id in ("00000", "00001", "00002", "00003", "00004"):
        _lay_out_trial(sweep, trial_id, checkpoints)
    whole = sum(checkpoint.size_bytes() for checkpoint in trial_checkpoints(sweep, "00000"))
    spec = _spec(keep=2)

    trial_ended(sweep, spec, "00000", TrialState.COMPLETED, 0.70)
    trial_ended(sweep, spec, "00001", TrialState.STOPPED_EARLY, 0.60)
    # the best two so far keep their last checkpoint, weights only
    assert _names(sweep, "00000") == _names(sweep, "00001") == ["checkpoint_000001"]
    trial_ended(sweep, spec, "00002", TrialState.DEGENERATE, 0.99)  # never ranks
    retention = trial_ended(sweep, spec, "00003", TrialState.COMPLETED, 0.80)
    trial_ended(sweep, spec, "00004", TrialState.FAILED, None)

    # 00003 pushed 00001 out of the best two; degenerate and pushed-out trials hold nothing
    assert _names(sweep, "00003") == _names(sweep, "00000") == ["checkpoint_000001"]
    assert _names(sweep, "00001") == _names(sweep, "00002") == []
    assert set(retention.kept) == {"00000", "00003"}
    # the failed trial keeps its last whole checkpoint, optimizer state and all: resume retries it
    assert _names(sweep, "00004") == ["checkpoint_000001"]

    kept = trial_checkpoints(sweep, "00003")[0]
    assert not (kept / OPTIMIZER_FOLDER).exists()
    retained = trial_ended(sweep, spec, "00004", TrialState.FAILED, None)  # idempotent
    assert retained.kept_for_retry.keys() == {"00004"}
    assert set(retained.kept) == {"00000", "00003"}
    held = sum(c.size_bytes() for t in ("00000", "00003") for c in trial_checkpoints(sweep, t))
    # AdamW's two moments are twice the weights: a kept trial holds a third of a checkpoint
    one_checkpoint = whole / 2
    assert held < 2 * one_checkpoint * 0.4, (held, one_checkpoint)
    # 00001's was dropped too while it was among the best two
    assert retained.freed_bytes > 0 and retained.optimizer_states_dropped == 3
    assert (sweep / LEDGER_FILE).is_file()

    # the kept weights export (the trained weights of step 4) but no longer resume
    if kept.is_remote:
        kept.download_folder(local)
    else:
        shutil.copytree(kept.uri, local)
    exported = load_full_model_state(local)
    original = load_full_model_state(checkpoints[1])
    assert exported.keys() == original.keys()
    for name, tensor in original.items():
        torch.testing.assert_close(exported[name], tensor, rtol=0, atol=0)
    assert not resumable(checkpoint_info(local))
    trainer = SimPOTrainer(
        load_model(MODEL, TOKENIZER, "cpu", seed=0),
        _Pairs(),
        _Pairs(),
        training=TrainingSpec(batch_size=1),
        simpo=SimPOSpec(),
        pad_token_id=TOKENIZER.pad_token_id,
        device="cpu",
    )
    with pytest.raises(IncompleteCheckpointError, match="weights only"):
        trainer.load_checkpoint(local)


class _Pairs:
    def __init__(self) -> None:
        self.prompt_ids, self.chosen_ids, self.rejected_ids = [[5, 6]], [[7]], [[8]]

    def __len__(self) -> int:
        return 1


def test_only_the_best_trials_keep_weights_on_a_disk(
    checkpoints: list[Path], tmp_path: Path
) -> None:
    _check_retention(StorageLocation.parse(str(tmp_path / "sweep")), checkpoints, tmp_path / "x")


@pytest.fixture
def bucket_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Server]:
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    yield s3_server


def test_only_the_best_trials_keep_weights_in_a_bucket(
    checkpoints: list[Path], bucket_env: S3Server, tmp_path: Path
) -> None:
    sweep = StorageLocation.parse(f"s3://{bucket_env.bucket}/retention-sweep")
    _check_retention(sweep, checkpoints, tmp_path / "x")
    assert not any(
        f"/{OPTIMIZER_FOLDER}/" in key
        for key in bucket_env.object_keys("retention-sweep/run_trial_00003")
    )
