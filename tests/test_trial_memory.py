"""Trials run one after another in one process hold what the first did.

Tune reuses a single-worker trial's process, and each trial trains on a new thread. glibc gives
a new thread a new malloc arena, and a freed arena keeps its pages: without
`process_memory.release` the resident set grew by about one trial's training state per trial
(2.8 -> 3.8 -> 4.6 -> 5.8 GB over four trials of a 106M-parameter model). Measured as the
resident set now (VmRSS), not ru_maxrss, which never falls; and each trial's reported peak is its
own, not the largest of the process so far.

At this test's size (a ~40M-parameter model, short sequences, 3 trials) the arena growth itself
does not show within 10% even without the release (checked 2026-12-04); what this test catches
is a trial's objects outliving it (a cache or a global holding the model, its optimizer or its
data: each trial's training state is ~0.6 GB here). The arena growth was measured on real
sweeps (README: "Trial memory").
"""

from __future__ import annotations

import gc
import threading
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from simpo_sweep.engine import process_memory
from simpo_sweep.engine.train import SimPOTrainer
from simpo_sweep.spec.models import SimPOSpec, TrainingSpec

VOCAB = 8192


class _Pairs:
    def __init__(self, count: int, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)

        def words(low: int, high: int) -> list[int]:
            length = int(torch.randint(low, high, (1,), generator=generator))
            return torch.randint(4, VOCAB, (length,), generator=generator).tolist()

        self.prompt_ids = [words(32, 64) for _ in range(count)]
        self.chosen_ids = [words(16, 48) for _ in range(count)]
        self.rejected_ids = [words(16, 48) for _ in range(count)]

    def __len__(self) -> int:
        return len(self.prompt_ids)


def _trial(seed: int, results: dict[str, Any]) -> None:
    """One trial's life: a fresh ~40M-parameter model, a trainer, steps, then nothing held."""
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    data = _Pairs(8, seed)
    trainer = SimPOTrainer(
        LlamaForCausalLM(config),
        data,
        data,
        training=TrainingSpec(batch_size=4, max_steps=2, eval_every=2, eval_batch_size=4),
        simpo=SimPOSpec(),
        pad_token_id=0,
        device="cpu",
    )
    results["peak_mb"] = trainer.fit().metrics["perf/peak_memory_mb"]


def test_the_nth_trial_of_a_process_holds_what_the_first_did(one_thread: None) -> None:
    process_memory.release()
    resident, peaks = [], []
    for seed in range(3):
        results: dict[str, Any] = {}
        # a new thread per trial, as Ray runs each trial's training function
        thread = threading.Thread(target=_trial, args=(seed, results))
        thread.start()
        thread.join()
        gc.collect()
        process_memory.release()
        resident.append(process_memory.resident_bytes() / 2**20)
        peaks.append(results["peak_mb"])
    first = resident[0]
    assert all(abs(later / first - 1) <= 0.10 for later in resident[1:]), resident
    # the peak is each trial's own: it does not ratchet up with the process's history
    assert all(abs(later / peaks[0] - 1) <= 0.10 for later in peaks[1:]), peaks
