"""Trainer checkpoints with torch.distributed.checkpoint (DCP), one format for every strategy.

A checkpoint is a folder:

    model/       .metadata, __<rank>_<n>.distcp   DCP: {"model": ...}, every rank its part
    optimizer/   .metadata, __<rank>_<n>.distcp   DCP: {"optimizer": ...}, every rank its part
    trainer_state.pt                 rank 0: step, data position, scheduler, RNG (small)
    checkpoint_complete.json         rank 0, written last: what the folder holds

Weights and optimizer state are two DCP checkpoints so that a finished trial's optimizer state
(twice its weights under AdamW) can be dropped by deleting a folder, on a bucket as on a disk,
without rewriting the weights (`drop_optimizer_state`): the marker then says so, and the
checkpoint still exports, but no longer resumes. Format 1 (one DCP checkpoint at the folder's
root holding both) is still read.

Under FSDP each rank writes its own shard of the weights and optimizer state (nobody gathers
a whole model); under DDP, or in one process, the tensors are whole on every rank and DCP's
planner writes each once, spread across the ranks. The files never collide by name, so the
ranks' folders can be merged into one (Ray Train uploads every worker's folder into the same
checkpoint) or written into one shared folder.

Weights are keyed by the plain model's parameter names (`get_state_dict` strips the FSDP and
DDP wrappers), so `load_full_model_state` turns any checkpoint into the state dict of an
unsharded model, in one process, with no process group. Under LoRA the folder holds only the
trainable (adapter) weights and their optimizer state: the frozen base is the model's own.

A folder without the marker, or whose marker names files that are missing, is not a
checkpoint: a crash mid-write, or a merge that lost a rank's shard, is never mistaken for one.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

TRAINER_STATE_FILE = "trainer_state.pt"
COMPLETE_MARKER = "checkpoint_complete.json"
FORMAT_VERSION = 2
_DCP_METADATA = ".metadata"
MODEL_FOLDER = "model"
OPTIMIZER_FOLDER = "optimizer"
# In the marker: the optimizer state was dropped (the trial ended; export only, no resume).
OPTIMIZER_DROPPED = "optimizer_state_dropped"

# Frozen parameters (the base model under LoRA) are not saved: they are the model's own and
# would make every checkpoint as large as the model. strict=False on loading: DCP has already
# refused any key the checkpoint lacks, and the frozen ones are meant to be absent.
_OPTIONS = StateDictOptions(ignore_frozen_params=True, strict=False)


class IncompleteCheckpointError(ValueError):
    """The folder is not a whole checkpoint (no completion marker, or shards missing)."""


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if _world()[1] > 1:
        dist.barrier()


def _trained_state(
    model: nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Model (trainable weights only) and optimizer state dicts, keyed by plain names.

    ignore_frozen_params misses a frozen weight's second name (a tied LM head under LoRA:
    named_parameters() lists a shared weight once), so every name of a frozen one is dropped.
    """
    model_state, optimizer_state = get_state_dict(model, optimizer, options=_OPTIONS)
    frozen = {
        name
        for name, parameter in model.named_parameters(remove_duplicate=False)
        if not parameter.requires_grad
    }
    return {k: v for k, v in model_state.items() if k not in frozen}, dict(optimizer_state)


def save_checkpoint(
    directory: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    info: dict[str, Any] | None = None,
) -> Path:
    """Every rank calls this (the DCP save is a collective); rank 0 writes the marker last.

    `model` is the plain model (its submodules may be fully_shard-ed); `info` goes into the
    marker (strategy, world size, LoRA settings: what an exporter needs to know).
    """
    rank, world_size = _world()
    if rank == 0 and directory.exists():
        # A folder left by an attempt that died mid-write: never mix its files with ours.
        shutil.rmtree(directory)
    _barrier()
    directory.mkdir(parents=True, exist_ok=True)
    model_state, optimizer_state = _trained_state(model, optimizer)
    dcp.save(
        {"model": model_state}, checkpoint_id=directory / MODEL_FOLDER, no_dist=world_size == 1
    )
    dcp.save(
        {"optimizer": optimizer_state},
        checkpoint_id=directory / OPTIMIZER_FOLDER,
        no_dist=world_size == 1,
    )
    if rank == 0:
        torch.save(trainer_state, directory / TRAINER_STATE_FILE)
        marker = {
            "format_version": FORMAT_VERSION,
            "world_size": world_size,
            "step": trainer_state.get("step"),
            **(info or {}),
        }
        # Written last, and atomically (rename): its presence means everything else is there.
        temporary = directory / (COMPLETE_MARKER + ".tmp")
        temporary.write_text(json.dumps(marker, indent=1, sort_keys=True))
        temporary.rename(directory / COMPLETE_MARKER)
    _barrier()
    return directory


def checkpoint_info(directory: Path) -> dict[str, Any]:
    """The marker's contents; IncompleteCheckpointError unless the checkpoint is whole."""
    marker = directory / COMPLETE_MARKER
    if not marker.is_file():
        raise IncompleteCheckpointError(
            f"{directory} has no {COMPLETE_MARKER}: an unfinished or foreign checkpoint"
        )
    info: dict[str, Any] = json.loads(marker.read_text())
    if info.get("format_version", 1) == 1:
        parts = [""]
    elif info.get(OPTIMIZER_DROPPED):
        parts = [MODEL_FOLDER]
    else:
        parts = [MODEL_FOLDER, OPTIMIZER_FOLDER]
    missing = [
        f"{part}/{name}" if part else name
        for part in parts
        for name in _dcp_files(directory / part)
        if not (directory / part / name).is_file()
    ]
    if not (directory / TRAINER_STATE_FILE).is_file():
        missing.append(TRAINER_STATE_FILE)
    if missing:
        raise IncompleteCheckpointError(f"{directory} lacks {', '.join(sorted(missing))}")
    return info


def _dcp_files(directory: Path) -> set[str]:
    """Every file the DCP metadata says holds a part of the checkpoint, and the metadata."""
    if not (directory / _DCP_METADATA).is_file():
        return {_DCP_METADATA}
    metadata = dcp.FileSystemReader(str(directory)).read_metadata()
    storage = metadata.storage_data or {}
    return {_DCP_METADATA, *(str(item.relative_path) for item in storage.values())}


def _weights_folder(directory: Path, info: dict[str, Any]) -> Path:
    return directory if info.get("format_version", 1) == 1 else directory / MODEL_FOLDER


def resumable(info: dict[str, Any]) -> bool:
    """Whether a checkpoint (its marker's contents) still holds its optimizer state."""
    return not info.get(OPTIMIZER_DROPPED)


def weights_only_marker(marker: str) -> str:
    """The marker text of the same checkpoint once its optimizer/ folder is gone.

    Whoever drops the optimizer state (service.retention, on a disk or a bucket) writes this
    marker first and removes the folder after, so a removal stopped half-way leaves a
    weights-only checkpoint, never one that reads as incomplete.
    """
    info = json.loads(marker)
    if info.get("format_version", 1) == 1:
        raise ValueError("a format-1 checkpoint keeps weights and optimizer state together")
    info[OPTIMIZER_DROPPED] = True
    return json.dumps(info, indent=1, sort_keys=True)


def load_checkpoint(
    directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """Weights and optimizer state into `model` and `optimizer` (sharded as they are now, on
    the same number of ranks for FSDP); returns the trainer state. Every rank calls it."""
    info = checkpoint_info(directory)
    if not resumable(info):
        raise IncompleteCheckpointError(
            f"{directory} holds weights only: its trial had ended, and the sweep's checkpoint "
            "retention dropped its optimizer state (it exports, it does not resume)"
        )
    model_state, optimizer_state = _trained_state(model, optimizer)
    # In place: DCP reads each rank's shard into the tensors (DTensors) given here.
    single = _world()[1] == 1
    if info.get("format_version", 1) == 1:
        dcp.load(
            {"model": model_state, "optimizer": optimizer_state},
            checkpoint_id=directory,
            no_dist=single,
        )
    else:
        dcp.load({"model": model_state}, checkpoint_id=directory / MODEL_FOLDER, no_dist=single)
        dcp.load(
            {"optimizer": optimizer_state},
            checkpoint_id=directory / OPTIMIZER_FOLDER,
            no_dist=single,
        )
    set_state_dict(
        model,
        optimizer,
        model_state_dict=model_state,
        optim_state_dict=optimizer_state,
        options=_OPTIONS,
    )
    # RNG states must stay CPU byte tensors: load on the CPU.
    trainer_state: dict[str, Any] = torch.load(
        directory / TRAINER_STATE_FILE, map_location="cpu", weights_only=False
    )
    return trainer_state


def load_full_model_state(checkpoint_dir: str | Path) -> dict[str, torch.Tensor]:
    """The trained weights of any checkpoint, whole, keyed like the plain model's state dict.

    One process, no process group (DCP reads without one), whatever strategy and number of
    workers wrote it. Under LoRA these are the adapter weights only (peft's names,
    `...lora_A.default.weight`); `checkpoint_info(dir)["lora"]` says how they were made.
    """
    directory = Path(checkpoint_dir)
    weights = _weights_folder(directory, checkpoint_info(directory))
    with warnings.catch_warnings():
        # "assuming the intent is to load in a single process": it is.
        warnings.simplefilter("ignore", UserWarning)
        loaded = _load_state_dict_from_keys(keys={"model"}, checkpoint_id=str(weights))
    model_state: dict[str, Any] = loaded["model"]
    return {
        name: tensor for name, tensor in model_state.items() if isinstance(tensor, torch.Tensor)
    }
