"""Checkpoint retention: what a sweep keeps on storage once its trials have ended.

A running trial keeps its last `training.keep_checkpoints` checkpoints, weights and optimizer
state (a retry resumes from them). Once a trial has ended for good, it needs neither: only the
best `storage.keep_best_trials` trials by the search metric keep their last checkpoint, and
without its optimizer state (AdamW's two moments, twice the weights), which is enough to export
and register them. Everything else an ended trial held is deleted, and a kept trial's weights go
as soon as a better trial pushes it out of the best K. Failed trials keep their last whole
checkpoint, untouched: `resume` retries them from it. Unfinished (interrupted) trials are never
touched.

The ledger (`checkpoint_retention.json` in the sweep folder) records every ended trial's state
and metric, so each pass ranks the whole sweep, a resumed sweep included, and what has been
freed so far. A pass is idempotent: run after each trial ends, and once more at the sweep's end.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from simpo_sweep.engine.checkpoint import (
    COMPLETE_MARKER,
    OPTIMIZER_FOLDER,
    resumable,
    weights_only_marker,
)
from simpo_sweep.service.export import trial_checkpoints
from simpo_sweep.service.storage import StorageLocation
from simpo_sweep.spec.models import SweepSpec
from simpo_sweep.trial.outcome import TrialState

LEDGER_FILE = "checkpoint_retention.json"


@dataclass
class Retention:
    """Where a sweep's checkpoints stand after a retention pass."""

    kept: dict[str, int] = field(default_factory=dict)  # trial id -> bytes of its weights
    kept_for_retry: dict[str, int] = field(default_factory=dict)  # failed trials
    freed_bytes: int = 0  # by every pass so far
    optimizer_states_dropped: int = 0
    checkpoints_deleted: int = 0

    def format(self) -> str:
        def trials(held: dict[str, int]) -> str:
            return ", ".join(sorted(held)) or "none"

        parts = [
            f"checkpoints: kept the weights of the best {len(self.kept)} trial(s) "
            f"({sum(self.kept.values()) / 1e9:.2f} GB: {trials(self.kept)})"
        ]
        if self.kept_for_retry:
            parts.append(
                f"the last whole checkpoint of {len(self.kept_for_retry)} failed trial(s) for "
                f"resume ({sum(self.kept_for_retry.values()) / 1e9:.2f} GB: "
                f"{trials(self.kept_for_retry)})"
            )
        parts.append(
            f"freed {self.freed_bytes / 1e9:.2f} GB ({self.optimizer_states_dropped} optimizer "
            f"state(s) dropped, {self.checkpoints_deleted} checkpoint(s) deleted)"
        )
        return "; ".join(parts)


def _read_ledger(sweep_dir: StorageLocation) -> dict[str, Any]:
    location = sweep_dir / LEDGER_FILE
    if not location.is_file():
        return {"ended": {}, "freed_bytes": 0, "optimizer_states_dropped": 0, "deleted": 0}
    ledger: dict[str, Any] = json.loads(location.read_text())
    return ledger


def trial_ended(
    sweep_dir: StorageLocation,
    spec: SweepSpec,
    trial_id: str,
    state: TrialState,
    metric: float | None,
) -> Retention:
    """Record how a trial ended, then apply retention to the whole sweep."""
    if state in (TrialState.RUNNING, TrialState.UNFINISHED):
        return apply_retention(sweep_dir, spec)
    ledger = _read_ledger(sweep_dir)
    finite = metric is not None and math.isfinite(metric)
    ledger["ended"][trial_id] = {"state": state.value, "metric": metric if finite else None}
    (sweep_dir / LEDGER_FILE).write_text(json.dumps(ledger, indent=1))
    return apply_retention(sweep_dir, spec)


def apply_retention(sweep_dir: StorageLocation, spec: SweepSpec) -> Retention:
    ledger = _read_ledger(sweep_dir)
    ended: dict[str, dict[str, Any]] = ledger["ended"]
    sign = 1.0 if spec.search.mode == "max" else -1.0
    candidates = [
        trial_id
        for trial_id, record in ended.items()
        if record["metric"] is not None and TrialState(record["state"]).usable
    ]
    candidates.sort(key=lambda trial_id: -sign * ended[trial_id]["metric"])
    best = set(candidates[: spec.storage.keep_best_trials])

    retention = Retention()
    for trial_id, record in ended.items():
        checkpoints = trial_checkpoints(sweep_dir, trial_id)
        whole = [c for c in checkpoints if (c / COMPLETE_MARKER).is_file()]
        last = whole[-1] if whole else None
        failed = TrialState(record["state"]) == TrialState.FAILED
        keep = last if (trial_id in best or failed) else None
        for checkpoint in checkpoints:
            if checkpoint != keep:
                ledger["freed_bytes"] += checkpoint.size_bytes()
                ledger["deleted"] += 1
                checkpoint.remove()
        if keep is None:
            continue
        if failed:
            retention.kept_for_retry[trial_id] = keep.size_bytes()
            continue
        freed = _drop_optimizer_state(keep)
        if freed is not None:
            ledger["freed_bytes"] += freed
            ledger["optimizer_states_dropped"] += 1
        retention.kept[trial_id] = keep.size_bytes()
    retention.freed_bytes = ledger["freed_bytes"]
    retention.checkpoints_deleted = ledger["deleted"]
    retention.optimizer_states_dropped = ledger["optimizer_states_dropped"]
    (sweep_dir / LEDGER_FILE).write_text(json.dumps(ledger, indent=1))
    return retention


def _drop_optimizer_state(checkpoint: StorageLocation) -> int | None:
    """Make a checkpoint weights-only; the bytes freed, or None when there was nothing to drop
    (dropped already, or the first format, whose weights and optimizer state share files)."""
    marker = checkpoint / COMPLETE_MARKER
    text = marker.read_text()
    info = json.loads(text)
    if not resumable(info) or info.get("format_version", 1) == 1:
        return None
    optimizer = checkpoint / OPTIMIZER_FOLDER
    freed = optimizer.size_bytes()
    # The marker first: a removal stopped half-way leaves a weights-only checkpoint.
    marker.write_text(weights_only_marker(text))
    optimizer.remove()
    return freed
