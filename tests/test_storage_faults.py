"""A checkpoint whose write fails half-way is never taken for a whole one: the write is cut by
the operating system itself (RLIMIT_FSIZE: writes past the limit fail with EFBIG, as on a full
disk; no root needed), the partial folder is refused by name, and training resumes from the
last complete checkpoint to the same weights as a run that never failed."""

from __future__ import annotations

import resource
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.api import CheckpointException

from simpo_sweep.engine.checkpoint import IncompleteCheckpointError, checkpoint_info
from simpo_sweep.engine.data import PreparedData, prepare_data
from simpo_sweep.engine.models import load_model, load_tokenizer
from simpo_sweep.engine.train import SimPOTrainer, StepEvent
from simpo_sweep.spec.models import DataSpec, ModelSpec, SimPOSpec, TrainingSpec

MODEL = ModelSpec()
TOKENIZER = load_tokenizer(MODEL)
TRAINING = {"learning_rate": 3e-3, "warmup_ratio": 0.0, "batch_size": 4, "max_steps": 6}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> PreparedData:
    return prepare_data(
        MODEL,
        DataSpec(max_length=64, max_prompt_length=24, max_train_pairs=22, max_eval_pairs=10),
        tmp_path_factory.mktemp("data"),
    )


def _trainer(prepared: PreparedData, root: Path) -> SimPOTrainer:
    return SimPOTrainer(
        load_model(MODEL, TOKENIZER, "cpu", seed=0),
        prepared.train,
        prepared.eval,
        training=TrainingSpec(**TRAINING, checkpoint_every=2),
        simpo=SimPOSpec(),
        pad_token_id=TOKENIZER.pad_token_id,
        device="cpu",
        checkpoint_root=root,
    )


@pytest.fixture
def file_size_limit() -> Iterator[None]:
    """Restore the limit and SIGXFSZ's default however the test ends."""
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)


def test_a_checkpoint_cut_half_way_is_refused_and_training_resumes_from_the_last_whole_one(
    prepared: PreparedData, tmp_path: Path, file_size_limit: None
) -> None:
    root = tmp_path / "checkpoints"
    failing = _trainer(prepared, root)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)

    def fill_the_disk_after_the_first_checkpoint(event: StepEvent) -> None:
        if event.checkpoint_dir is not None and event.step == 2:
            # The next checkpoint's first large file stops at 64 KiB: cut half-way.
            resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))

    # DCP reports its writer's failure (torch's zip writer meets the short write: "unexpected
    # pos") as a CheckpointException.
    with pytest.raises(CheckpointException, match=r"unexpected pos|File too large"):
        failing.fit(fill_the_disk_after_the_first_checkpoint)
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))

    whole, cut = root / "step_000002", root / "step_000004"
    assert checkpoint_info(whole)["step"] == 2
    assert cut.is_dir(), "the failed write should have left its partial folder"
    with pytest.raises(IncompleteCheckpointError, match="step_000004"):
        checkpoint_info(cut)
    resumed = _trainer(prepared, tmp_path / "resumed")
    with pytest.raises(IncompleteCheckpointError):
        resumed.load_checkpoint(cut)

    resumed.load_checkpoint(whole)
    assert resumed.step == 2
    resumed.fit()
    uninterrupted = _trainer(prepared, tmp_path / "uninterrupted")
    uninterrupted.fit()
    for (name, mine), (_, theirs) in zip(
        resumed.model.named_parameters(), uninterrupted.model.named_parameters(), strict=True
    ):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0, msg=name)
