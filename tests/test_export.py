"""The winning model, out: `export.best` at the end of a sweep and `simpo-sweep export` write a
Hugging Face folder that a fresh process loads with transformers alone and that reproduces
the trial's held-out reward accuracy; the registry holds it; clear errors for bad requests."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient

from simpo_sweep.engine.checkpoint import MODEL_FOLDER, checkpoint_info, resumable
from simpo_sweep.engine.models import load_model, load_tokenizer
from simpo_sweep.service.errors import SweepError
from simpo_sweep.service.export import export_trial, trial_checkpoints
from simpo_sweep.service.storage import StorageLocation
from simpo_sweep.service.sweep import SweepOutcome, run_sweep
from simpo_sweep.spec.models import ModelSpec, SweepSpec
from simpo_sweep.trial.outcome import TrialState

pytestmark = [pytest.mark.usefixtures("ray_local"), pytest.mark.slow]

# A fresh interpreter, transformers only for the model: the held-out reward accuracy of the
# exported folder on the sweep's prepared eval pairs, computed with plain torch.
ACCURACY_SCRIPT = r"""
import json, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from simpo_sweep.engine.data import load_prepared

folder, data = sys.argv[1], sys.argv[2]
model = AutoModelForCausalLM.from_pretrained(folder).eval()
tokenizer = AutoTokenizer.from_pretrained(folder)
assert tokenizer.chat_template, "no chat template in the export"
split = load_prepared(data).eval

def average_logp(prompt, response):
    ids = torch.tensor([list(prompt) + list(response)])
    with torch.no_grad():
        logits = model(ids).logits[0, :-1].float()
    logps = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None])[:, 0]
    return logps[len(prompt) - 1 :].mean().item()

wins = [
    average_logp(split.prompt_ids[i], split.chosen_ids[i])
    > average_logp(split.prompt_ids[i], split.rejected_ids[i])
    for i in range(len(split))
]
print(json.dumps({"accuracy": sum(wins) / len(wins), "pairs": len(wins)}))
"""


def _spec(tmp_path: Path, **sections: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": "exp",
        "data": {
            "source": "builtin:rule-following",
            "max_length": 64,
            "max_prompt_length": 24,
            "max_eval_pairs": 64,
        },
        "training": {
            "max_steps": 40,
            "batch_size": 8,
            "eval_every": 40,
            "checkpoint_every": 20,
            "learning_rate": 3e-3,
        },
        "search": {"algorithm": "grid", "space": {"beta": {"type": "grid", "values": [2.0, 4.0]}}},
        "resources": {"num_workers": 1, "cpus_per_worker": 1},
        "storage": {"path": str(tmp_path / "runs")},
        "export": {"best": True, "model_name": "simpo-demo"},
    }
    for section, value in sections.items():
        spec[section] = {**spec.get(section, {}), **value}
    return spec


def _run(spec: dict[str, Any]) -> SweepOutcome:
    return run_sweep(SweepSpec.model_validate(spec), printer=lambda _line: None)


def _accuracy_in_a_fresh_process(folder: Path, storage: Path) -> dict[str, float]:
    (data,) = [
        path for path in (storage / "data_cache").iterdir() if (path / "manifest.json").exists()
    ]
    done = subprocess.run(
        [sys.executable, "-c", ACCURACY_SCRIPT, str(folder), str(data)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def test_the_best_trial_is_exported_registered_and_reproduces_its_accuracy(
    tmp_path: Path,
) -> None:
    spec = _spec(tmp_path)
    outcome = _run(spec)
    assert outcome.status == "completed" and outcome.best is not None
    exported = outcome.exported
    assert exported is not None and exported.trial.trial_id == outcome.best.trial_id
    folder = exported.folder
    assert folder == outcome.sweep_dir / "export" / outcome.best.trial_id
    for name in (
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "README.md",
        "tokenizer_config.json",
    ):
        assert (folder / name).is_file(), name
    card = (folder / "README.md").read_text()
    assert outcome.best.trial_id in card and "gamma_beta_ratio" in card and outcome.sweep_id in card

    measured = _accuracy_in_a_fresh_process(folder, tmp_path / "runs")
    # The same weights and pairs; only the summation order of the log-probs differs, so at
    # most a tie-close pair may flip: one pair of the held-out split.
    assert abs(measured["accuracy"] - outcome.best.metric) <= 1 / measured["pairs"] + 1e-9, (
        measured,
        outcome.best.metric,
    )

    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    version = client.get_model_version("simpo-demo", "1")
    trial_run = client.search_runs(
        [client.get_experiment_by_name("exp").experiment_id],
        filter_string=f"tags.`simpo_sweep.trial_id` = '{outcome.best.trial_id}'",
    )[0]
    assert version.run_id == trial_run.info.run_id
    assert version.tags["simpo_sweep.trial_id"] == outcome.best.trial_id
    assert version.tags["simpo_sweep.sweep_id"] == outcome.sweep_id
    assert float(version.tags["simpo_sweep.metric_value"]) == outcome.best.metric
    # Registering used mlflow's process-wide URI only for itself: later sweeps of this
    # process, and the processes it starts, keep their own stores.
    assert "MLFLOW_TRACKING_URI" not in os.environ

    # The cost of every trial, and the checkpoints kept once the trials ended: the best
    # storage.keep_best_trials (default 2) keep their last one, weights only; the rest none.
    with (outcome.sweep_dir / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))  # ranked best first
    assert all(float(row["cpu_hours"]) > 0 for row in rows)
    metric = SweepSpec.model_validate(spec).search.metric
    ranked = [r["trial_id"] for r in rows if r[metric] and TrialState(r["state"]).usable]
    for row in rows:
        kept = trial_checkpoints(outcome.location, row["trial_id"])
        assert len(kept) == (1 if row["trial_id"] in ranked[:2] else 0), (row, kept)
        for checkpoint in kept:
            assert not resumable(checkpoint_info(Path(checkpoint.uri)))


# A fresh interpreter with transformers and peft: the adapter folder alone finds its base
# model (by the path it was trained from, as it would a hub id) and gives the merged folder's
# log-probs.
ADAPTER_SCRIPT = r"""
import json, sys
import torch
from peft import AutoPeftModelForCausalLM
from transformers import AutoModelForCausalLM

adapter, merged = sys.argv[1], sys.argv[2]
with_adapter = AutoPeftModelForCausalLM.from_pretrained(adapter).eval()
plain = AutoModelForCausalLM.from_pretrained(merged).eval()
ids = torch.arange(3, 40)[None]
with torch.no_grad():
    print(json.dumps({
        "base": with_adapter.peft_config["default"].base_model_name_or_path,
        "max_difference": (with_adapter(ids).logits - plain(ids).logits).abs().max().item(),
    }))
"""


def test_a_lora_trial_exports_its_adapter_or_merged_weights(tmp_path: Path) -> None:
    base = tmp_path / "base-model"  # a model folder, loaded by path as a hub id would be
    tokenizer = load_tokenizer(ModelSpec())
    load_model(ModelSpec(), tokenizer, "cpu", seed=0).save_pretrained(base)
    tokenizer.save_pretrained(base)
    spec = _spec(
        tmp_path,
        model={"name": str(base), "lora": {"r": 8, "alpha": 16}},
        export={"best": False},
        search={"space": {"beta": {"type": "grid", "values": [2.0]}}},
        training={"learning_rate": 1e-2},
    )
    outcome = _run(spec)
    assert outcome.best is not None
    sweep = str(outcome.sweep_dir)

    adapter = export_trial(sweep, out=str(tmp_path / "adapter"))
    merged = export_trial(sweep, out=str(tmp_path / "merged"), merge=True)

    assert adapter.adapter_only and not merged.adapter_only
    assert (adapter.folder / "adapter_config.json").is_file()
    assert (adapter.folder / "adapter_model.safetensors").is_file()
    assert not (adapter.folder / "model.safetensors").exists()
    assert (merged.folder / "model.safetensors").is_file()
    assert not (merged.folder / "adapter_config.json").exists()
    # The merged folder is a plain model with the trial's held-out accuracy...
    measured = _accuracy_in_a_fresh_process(merged.folder, tmp_path / "runs")
    assert abs(measured["accuracy"] - outcome.best.metric) <= 1 / measured["pairs"] + 1e-9
    # ...and the adapter on its base computes the same model.
    done = subprocess.run(
        [sys.executable, "-c", ADAPTER_SCRIPT, str(adapter.folder), str(merged.folder)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert loaded["base"] == str(base)
    assert loaded["max_difference"] < 1e-4, loaded


def test_export_errors_name_the_problem(tmp_path: Path) -> None:
    spec = _spec(
        tmp_path,
        export={"best": False},
        search={"space": {"beta": {"type": "grid", "values": [2.0]}}},
    )
    outcome = _run(spec)
    sweep = str(outcome.sweep_dir)
    with pytest.raises(SweepError, match="no trial 'nope' in this sweep; its trials: "):
        export_trial(sweep, trial_id="nope")
    taken = tmp_path / "taken"
    taken.mkdir()
    with pytest.raises(SweepError, match="exists: give another --out"):
        export_trial(sweep, out=str(taken))
    trial_id = outcome.rows[0].trial_id
    for checkpoint in trial_checkpoints(outcome.location, trial_id):
        shutil.rmtree(checkpoint.uri)
    with pytest.raises(SweepError, match=f"trial {trial_id} has no checkpoint"):
        export_trial(sweep, out=str(tmp_path / "out"))


def test_a_two_worker_fsdp_trial_exports_from_its_sharded_checkpoint(tmp_path: Path) -> None:
    spec = _spec(
        tmp_path,
        export={"best": False},
        search={"space": {"beta": {"type": "grid", "values": [2.0]}}},
        resources={"num_workers": 2, "cpus_per_worker": 1, "strategy": "fsdp"},
        training={"max_steps": 20, "eval_every": 20, "checkpoint_every": 10, "batch_size": 4},
    )
    outcome = _run(spec)
    assert outcome.best is not None
    out = tmp_path / "exported"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "simpo_sweep.cli",
            "export",
            str(outcome.sweep_dir),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"exported trial {outcome.best.trial_id}" in done.stdout
    assert (out / "model.safetensors").is_file()
    (checkpoint, *_) = reversed(trial_checkpoints(outcome.location, outcome.best.trial_id))
    model_shards = Path(checkpoint.uri) / MODEL_FOLDER
    shards = {path.name for path in model_shards.iterdir() if path.suffix == ".distcp"}
    assert len(shards) == 2, shards  # one shard per worker: the export merged them
    measured = _accuracy_in_a_fresh_process(out, tmp_path / "runs")
    assert abs(measured["accuracy"] - outcome.best.metric) <= 1 / measured["pairs"] + 1e-9
    assert StorageLocation.parse(str(outcome.sweep_dir / "train")).children()
