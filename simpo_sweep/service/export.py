"""`simpo-sweep export`: a trial's trained weights as a Hugging Face folder, and the winner in
MLflow's Model Registry.

The folder loads with `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained`
alone: config, safetensors in `model.dtype`, the tokenizer with its chat template, a generation
config and a model card. It is built from the trial's last complete checkpoint, whatever wrote
it (one worker, DDP, or FSDP's sharded checkpoint: `load_full_model_state` reads them all in one
process); a LoRA trial gives its adapter, or merged weights with `merge`.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from simpo_sweep.service.errors import SweepError
from simpo_sweep.service.storage import (
    StorageLocation,
    find_sweep_dir,
    load_sweep_spec,
    tracking_uri,
)
from simpo_sweep.spec.models import SweepSpec
from simpo_sweep.spec.space import param_name, searched_keys, spec_with_trial
from simpo_sweep.trial.outcome import TrialState

EXPORT_FOLDER = "export"


@dataclass(frozen=True)
class TrialRecord:
    """A trial as results.csv records it."""

    trial_id: str
    state: str
    step: int
    metric: float | None
    knobs: dict[str, Any]  # flat names (learning_rate, beta, model.lora.r)
    metrics: dict[str, float]


@dataclass(frozen=True)
class ExportedModel:
    folder: Path
    trial: TrialRecord
    checkpoint: str
    adapter_only: bool


def read_trials(spec: SweepSpec, sweep_dir: StorageLocation) -> list[TrialRecord]:
    """results.csv's rows, ranked as written (best first)."""
    results = sweep_dir / "results.csv"
    if not results.is_file():
        raise SweepError(f"{sweep_dir} has no results.csv yet: the sweep has not ended")
    knob_names = [param_name(path) for path in searched_keys(spec)]
    records = []
    for row in csv.DictReader(io.StringIO(results.read_text())):
        metric = row.get(spec.search.metric) or ""
        metrics = {}
        for key, value in row.items():
            if "/" in key and value not in ("", None):
                try:
                    metrics[key] = float(value)
                except ValueError:
                    continue
        records.append(
            TrialRecord(
                trial_id=row["trial_id"],
                state=row["state"],
                step=int(row["step"] or 0),
                metric=float(metric) if metric else None,
                knobs={name: _value(row.get(name)) for name in knob_names},
                metrics=metrics,
            )
        )
    return records


def _value(text: str | None) -> Any:
    """A knob as results.csv wrote it, back to its YAML value (0.001, sigmoid, None)."""
    return None if text in (None, "") else yaml.safe_load(text)


def choose_trial(spec: SweepSpec, trials: list[TrialRecord], trial_id: str | None) -> TrialRecord:
    if trial_id is not None:
        for trial in trials:
            if trial.trial_id == trial_id:
                return trial
        known = ", ".join(trial.trial_id for trial in trials)
        raise SweepError(f"no trial {trial_id!r} in this sweep; its trials: {known}")
    for trial in trials:
        if trial.metric is not None and TrialState(trial.state).usable:
            return trial
    raise SweepError(
        "the sweep has no usable trial to export (every trial failed or was degenerate); "
        "name one with --trial"
    )


def trial_checkpoints(sweep_dir: StorageLocation, trial_id: str) -> list[StorageLocation]:
    """A trial's checkpoints, oldest first, wherever Ray kept them: in its Tune trial folder
    (single-worker trials) or in its Ray Train run (worker groups)."""
    folders = [
        child
        for child in sweep_dir.children()
        if child.name.startswith("run_trial_") and f"_{trial_id}_" in f"{child.name}_"
    ]
    folders += [
        child for child in (sweep_dir / "train").children() if child.name.endswith(f"-{trial_id}")
    ]
    checkpoints = [
        checkpoint
        for folder in folders
        for checkpoint in folder.children()
        # Ray Train keeps checkpoint_manager_snapshot.json beside its checkpoint folders.
        if checkpoint.name.startswith("checkpoint_") and checkpoint.is_dir()
    ]
    return sorted(checkpoints, key=lambda location: location.name)


def checkpoint_bytes(sweep_dir: StorageLocation) -> int:
    """What the sweep's checkpoints hold on storage."""
    import pyarrow.fs as pafs

    total = 0
    selector = pafs.FileSelector(sweep_dir.fs_path, recursive=True, allow_not_found=True)
    for info in sweep_dir.filesystem.get_file_info(selector):
        if info.type == pafs.FileType.File and "/checkpoint_" in info.path:
            total += info.size or 0
    return total


def _latest_complete(checkpoints: list[StorageLocation], staging: Path) -> tuple[str, Path]:
    """The newest checkpoint that is whole (a partial one is never used), on local disk."""
    from simpo_sweep.engine.checkpoint import IncompleteCheckpointError, checkpoint_info

    for checkpoint in reversed(checkpoints):
        local = checkpoint.local_path
        if local is None:
            local = staging / checkpoint.name
            checkpoint.download_folder(local)
        try:
            checkpoint_info(local)
        except IncompleteCheckpointError:
            continue
        return checkpoint.uri, local
    raise SweepError("none of the trial's checkpoints is complete")


def export_trial(
    sweep: str,
    *,
    trial_id: str | None = None,
    out: str | None = None,
    merge: bool = False,
) -> ExportedModel:
    sweep_dir = find_sweep_dir(sweep)
    spec = load_sweep_spec(sweep_dir)
    trial = choose_trial(spec, read_trials(spec, sweep_dir), trial_id)
    folder = Path(out) if out else Path.cwd() / f"{sweep_dir.name}-{trial.trial_id}"
    return export_to(spec, sweep_dir, trial, folder, merge=merge)


def export_to(
    spec: SweepSpec,
    sweep_dir: StorageLocation,
    trial: TrialRecord,
    folder: Path,
    *,
    merge: bool = False,
) -> ExportedModel:
    if folder.exists():
        raise SweepError(f"{folder} exists: give another --out, or remove it first")
    checkpoints = trial_checkpoints(sweep_dir, trial.trial_id)
    if not checkpoints:
        raise SweepError(
            f"trial {trial.trial_id} has no checkpoint in {sweep_dir}: it ended before its "
            "first one, or it was not among the best storage.keep_best_trials trials, whose "
            "weights alone stay once trials end"
        )
    sampled = _sampled_paths(spec, trial)
    trained = spec_with_trial(spec, sampled)
    with tempfile.TemporaryDirectory(prefix="simpo-export-") as staging:
        uri, local = _latest_complete(checkpoints, Path(staging))
        adapter_only = _write_model(trained, local, folder, merge=merge)
    _write_card(trained, sweep_dir, trial, uri, folder, adapter_only)
    return ExportedModel(folder, trial, uri, adapter_only)


def _sampled_paths(spec: SweepSpec, trial: TrialRecord) -> dict[str, Any]:
    by_name = {param_name(path): path for path in searched_keys(spec)}
    return {
        by_name[name]: value
        for name, value in trial.knobs.items()
        if name in by_name and value is not None
    }


def _write_model(spec: SweepSpec, checkpoint: Path, folder: Path, *, merge: bool) -> bool:
    """Weights, tokenizer and generation config into `folder`; True when it is an adapter."""
    import torch
    from transformers import GenerationConfig

    from simpo_sweep.engine.checkpoint import load_full_model_state
    from simpo_sweep.engine.models import load_tokenizer, resolve_dtype

    model_spec = spec.model
    tokenizer = load_tokenizer(model_spec)
    base_spec = model_spec.model_copy(update={"lora": None, "gradient_checkpointing": False})
    from simpo_sweep.engine.models import load_model

    model: Any = load_model(base_spec, tokenizer, "cpu", seed=spec.training.seed)
    state = load_full_model_state(checkpoint)
    dtype = (
        resolve_dtype(model_spec, "cpu")
        if model_spec.dtype != "auto"
        else getattr(model.config, "dtype", None) or torch.float32
    )
    adapter_only = False
    if model_spec.lora is not None:
        from peft import get_peft_model

        from simpo_sweep.engine.lora import lora_config

        peft_model: Any = get_peft_model(model, lora_config(model_spec.lora))
        missing = peft_model.get_base_model().load_state_dict(state, strict=False)
        if missing.unexpected_keys:
            raise SweepError(f"checkpoint weights the model lacks: {missing.unexpected_keys[:5]}")
        if merge:
            model = peft_model.merge_and_unload()
        else:
            model, adapter_only = peft_model, True
    else:
        model.load_state_dict(state)
    model = torch.nn.Module.to(model, dtype=dtype)
    folder.mkdir(parents=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    generation = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    generation.save_pretrained(folder)
    return adapter_only


def _write_card(
    spec: SweepSpec,
    sweep_dir: StorageLocation,
    trial: TrialRecord,
    checkpoint: str,
    folder: Path,
    adapter_only: bool,
) -> None:
    simpo = spec.simpo
    smoothing = f"{simpo.label_smoothing:g}" if simpo.loss_type == "sigmoid" else "n/a"
    front = {
        "library_name": "peft" if adapter_only else "transformers",
        "base_model": spec.model.name,
        "tags": ["simpo", "simpo-sweep", "preference-optimization"],
        "datasets": [spec.data.source],
    }
    metrics = "\n".join(
        f"| {name} | {value:.4g} |" for name, value in sorted(trial.metrics.items())
    )
    knobs = "\n".join(f"| {name} | {value} |" for name, value in trial.knobs.items())
    card = f"""---
{yaml.safe_dump(front, sort_keys=False).strip()}
---

# {spec.name}: trial {trial.trial_id}

Trained with SimPO by simpo-sweep: trial `{trial.trial_id}` of sweep `{sweep_dir.name}`
({trial.state} at step {trial.step}), ranked by `{spec.search.metric}` = {trial.metric}.
{"LoRA adapter: load it with peft on top of " + spec.model.name if adapter_only else ""}

## SimPO

| parameter | value |
|---|---|
| beta | {simpo.beta:g} |
| gamma_beta_ratio | {simpo.gamma_beta_ratio:g} (gamma = {simpo.beta * simpo.gamma_beta_ratio:g}) |
| loss_type | {simpo.loss_type} |
| label_smoothing | {smoothing} |
| sft_weight | {simpo.sft_weight:g} |
| average_log_prob | {simpo.average_log_prob} |
| learning_rate | {spec.training.learning_rate:g} |
| max_steps | {spec.training.max_steps} |

Searched knobs of this trial:

| knob | value |
|---|---|
{knobs}

## Metrics (last report)

| metric | value |
|---|---|
{metrics}

## Data

`{spec.data.source}` (split `{spec.data.split}`, max_length {spec.data.max_length},
max_prompt_length {spec.data.max_prompt_length}).

## Where it came from

- sweep: `{sweep_dir.uri}`
- checkpoint: `{checkpoint}`
"""
    (folder / "README.md").write_text(card)
    (folder / "simpo_sweep.json").write_text(
        json.dumps(
            {
                "sweep": sweep_dir.name,
                "trial_id": trial.trial_id,
                "metric": {spec.search.metric: trial.metric},
                "checkpoint": checkpoint,
                "config": spec.model_dump(mode="json", include={"model", "simpo", "training"}),
            },
            indent=1,
        )
    )


def _requirements() -> list[str]:
    from importlib.metadata import version

    return [f"{name}=={version(name)}" for name in ("torch", "transformers", "tokenizers")]


def register_best(
    spec: SweepSpec,
    sweep_dir: StorageLocation,
    exported: ExportedModel,
    run_id: str,
    model_name: str,
) -> str:
    """Log the exported folder to the trial's MLflow run and register it; returns the
    registered version, loadable as models:/NAME/VERSION."""
    import mlflow

    uri = tracking_uri(spec)
    if uri is None:
        raise SweepError("export.register needs tracking on (tracking.enabled: true)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Loaded from the folder, as a user would: MLflow's own path-based logging does not read
    # transformers 5's pipeline registry.
    components = {
        "model": AutoModelForCausalLM.from_pretrained(exported.folder),
        "tokenizer": AutoTokenizer.from_pretrained(exported.folder),
    }
    tags = {
        "simpo_sweep.sweep_id": sweep_dir.name,
        "simpo_sweep.trial_id": exported.trial.trial_id,
        "simpo_sweep.metric": spec.search.metric,
        "simpo_sweep.metric_value": str(exported.trial.metric),
    }
    with _global_tracking_uri(uri):
        with mlflow.start_run(run_id=run_id):
            info = mlflow.transformers.log_model(
                transformers_model=components,
                name="model",
                task="text-generation",
                # Named, not inferred: inference imports every optional torch package it knows.
                pip_requirements=_requirements(),
            )
        version = mlflow.register_model(info.model_uri, model_name, tags=tags)
    return str(version.version)


@contextlib.contextmanager
def _global_tracking_uri(uri: str) -> Iterator[None]:
    """mlflow's fluent API reads one process-wide URI, and set_tracking_uri also exports it
    as MLFLOW_TRACKING_URI to every process started later: set both only for this block."""
    import mlflow

    previous_env = os.environ.get("MLFLOW_TRACKING_URI")
    previous = mlflow.get_tracking_uri() if previous_env is not None else None
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        if previous is not None and previous_env is not None:
            mlflow.set_tracking_uri(previous)
            os.environ["MLFLOW_TRACKING_URI"] = previous_env
        else:
            mlflow.set_tracking_uri(None)  # type: ignore[arg-type]  # None: back to the default
            os.environ.pop("MLFLOW_TRACKING_URI", None)
