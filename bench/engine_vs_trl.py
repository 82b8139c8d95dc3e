"""The engine's SimPO training step against TRL's CPOTrainer (loss_type="simpo", cpo_alpha=0).

Same model config and random init, same synthetic token data in the same order, same batch, same
hardware, one run. Every peer trains in its own subprocess (a clean allocator and a clean peak):

    python bench/engine_vs_trl.py --device cpu
    python bench/engine_vs_trl.py --device cuda --peers trl ours ours+fused_adamw+compile

A peer is `trl`, `liger` or `ours`, the last plus `+`-joined modifiers. `liger` is the HF model's
body over TRL's padded chosen+rejected batches with Liger-Kernel's LigerFusedLinearSimPOLoss on
the last hidden states and the LM head's weight (TRL 1.16's CPOTrainer has no Liger option);
`liger+nocompile` runs Liger's chunk loop without torch.compile. Modifiers of `ours`:
    fused_adamw   AdamW(fused=True) for the engine (TRL's Trainer already defaults to it on CUDA)
    compile       torch.compile every decoder layer (dynamic shapes)
    flex          attn_implementation="flex_attention" (varlen: every sequence in one row)
    varlen        attn_implementation="torch_varlen": torch's varlen flash kernel, one packed row
                  (engine.logps.register_torch_varlen_attention)
    eager_softmax the chunked LM head's eager float32 softmax instead of the compiled kernels
    onerow        every sequence in one packed row whatever the attention (with sdpa: one
                  dense [L, L] mask over all tokens, what choose_layout avoids)
    chunkN        N response tokens through the LM head at once (default: the engine's 1024)
    shared        training.prefix_sharing=on: prompt + chosen + rejected as one sequence per pair
                  under a 4D mask, the prompt computed once (`--prefix-sharing` adds an
                  `ours...+shared` peer after every `ours...` one)

Presets: `cpu` (a 4-layer, vocabulary-dominated Llama), `cpu_smollm2` (SmolLM2-135M's shapes,
float32), `cuda` (Qwen2-0.5B shapes), `cuda_1p5b` (Qwen2-1.5B shapes), `tiny`, the prompt-heavy
`cpu_prompt_heavy` / `tiny_prompt_heavy` (prompts ~4x the responses), and at 2048 tokens
`cuda_2k` (the `cuda` model) and `cuda_1p5b_2k` (the `cuda_1p5b` model, prompt-heavy).

`--json` writes the preset's fields and the machine, and per peer its raw result with `peer`,
`preset` (the name), `gpu`, `tokens_per_s`, `step_ms`, `mfu`, `mfu_useful` and `peak_bytes`
(MFU on CUDA only, against H100_H200_SXM_DENSE_BF16_PEAK_TFLOPS).

Tokens are the real (non-padding) prompt+response tokens of a step, identical for every peer.
Peak memory: CUDA torch.cuda.max_memory_allocated over the training steps (weights, gradients
and optimizer states included); CPU the peak resident set sampled every 2 ms during training
minus the resident set just before the first step (model, data and imports excluded: TRL's
process imports far more). See bench/README.md for the measured tables.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence, Sized
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, cast

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch import nn  # noqa: E402

PAD, BOS, EOS, UNK = 0, 1, 2, 3
FIRST_WORD = 4  # ids below are special tokens
# The MFU denominator: NVIDIA's dense (no 2:4 sparsity) bf16 tensor-core peak of the H100 SXM,
# 989.4 TFLOP/s; NVIDIA lists the same figure for the H200 SXM (the same GH100 compute, more and
# faster memory). MFU on any other GPU is printed against this peak too.
H100_H200_SXM_DENSE_BF16_PEAK_TFLOPS = 989.4


@dataclass(frozen=True)
class Preset:
    arch: str  # "llama" | "qwen2"
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    tie: bool
    max_length: int  # longest prompt+response
    pairs: int  # pairs per optimizer step (one micro-batch)
    prompt_range: tuple[int, int]  # prompt tokens, uniform, BOS included
    response_range: tuple[int, int]  # response tokens, uniform, EOS included
    dtype: str  # weights: "float32" | "bfloat16"
    attn: str
    warmup: int
    steps: int


PRESETS = {
    # vocab-dominated: the LM head is ~2/3 of the parameters and of the FLOPs
    "cpu": Preset(
        arch="llama",
        vocab=32_000,
        hidden=256,
        layers=4,
        heads=8,
        kv_heads=4,
        intermediate=688,
        tie=False,
        max_length=512,
        pairs=8,
        prompt_range=(32, 256),
        response_range=(32, 256),
        dtype="float32",
        attn="sdpa",
        warmup=1,
        steps=3,
    ),
    # the cpu model, prompts ~4x the responses (mean 256 vs 56 tokens): what prefix sharing is for
    "cpu_prompt_heavy": Preset(
        arch="llama",
        vocab=32_000,
        hidden=256,
        layers=4,
        heads=8,
        kv_heads=4,
        intermediate=688,
        tie=False,
        max_length=512,
        pairs=8,
        prompt_range=(128, 384),
        response_range=(16, 96),
        dtype="float32",
        attn="sdpa",
        warmup=1,
        steps=3,
    ),
    # SmolLM2-135M's shapes (LlamaForCausalLM, 134.5M parameters, tied 49152-word embedding),
    # random init, float32: a real architecture on CPU, where the 30-layer body, not the head,
    # does most of the work (the `cpu` model is a 4-layer one dominated by its vocabulary)
    "cpu_smollm2": Preset(
        arch="llama",
        vocab=49_152,
        hidden=576,
        layers=30,
        heads=9,
        kv_heads=3,
        intermediate=1536,
        tie=True,
        max_length=512,
        pairs=4,
        prompt_range=(64, 256),
        response_range=(64, 256),
        dtype="float32",
        attn="sdpa",
        warmup=1,
        steps=3,
    ),
    # seconds, for checking the script and the peers' modifiers
    "tiny_prompt_heavy": Preset(
        arch="qwen2",
        vocab=1024,
        hidden=64,
        layers=2,
        heads=4,
        kv_heads=2,
        intermediate=128,
        tie=True,
        max_length=128,
        pairs=4,
        prompt_range=(32, 96),
        response_range=(4, 24),
        dtype="float32",
        attn="sdpa",
        warmup=1,
        steps=2,
    ),
    # seconds, for checking the script and the peers' modifiers
    "tiny": Preset(
        arch="llama",
        vocab=1024,
        hidden=64,
        layers=2,
        heads=4,
        kv_heads=2,
        intermediate=128,
        tie=False,
        max_length=128,
        pairs=4,
        prompt_range=(4, 64),
        response_range=(4, 64),
        dtype="float32",
        attn="sdpa",
        warmup=1,
        steps=2,
    ),
    # Qwen2-0.5B's shapes (494M parameters, tied 151936-word embedding), random init
    "cuda": Preset(
        arch="qwen2",
        vocab=151_936,
        hidden=896,
        layers=24,
        heads=14,
        kv_heads=2,
        intermediate=4864,
        tie=True,
        max_length=1024,
        pairs=8,
        prompt_range=(16, 512),
        response_range=(16, 512),
        dtype="bfloat16",
        attn="sdpa",
        warmup=3,
        steps=10,
    ),
    # Qwen2-1.5B's shapes (1.54B parameters, tied embedding), random init, prompt-heavy lengths
    # (prompts ~4x the responses, the case prefix sharing is for)
    "cuda_1p5b": Preset(
        arch="qwen2",
        vocab=151_936,
        hidden=1536,
        layers=28,
        heads=12,
        kv_heads=2,
        intermediate=8960,
        tie=True,
        max_length=1024,
        pairs=8,
        prompt_range=(128, 768),
        response_range=(16, 256),
        dtype="bfloat16",
        attn="sdpa",
        warmup=3,
        steps=8,
    ),
    # the `cuda` model (Qwen2-0.5B shapes) at 2048 tokens: prompts and responses 16-1024 each
    "cuda_2k": Preset(
        arch="qwen2",
        vocab=151_936,
        hidden=896,
        layers=24,
        heads=14,
        kv_heads=2,
        intermediate=4864,
        tie=True,
        max_length=2048,
        pairs=8,
        prompt_range=(16, 1024),
        response_range=(16, 1024),
        dtype="bfloat16",
        attn="sdpa",
        warmup=2,
        steps=4,
    ),
    # the `cuda_1p5b` model (Qwen2-1.5B shapes) at 2048 tokens, prompt-heavy: prompts 128-1536,
    # responses 16-512 (means 832 vs 264)
    "cuda_1p5b_2k": Preset(
        arch="qwen2",
        vocab=151_936,
        hidden=1536,
        layers=28,
        heads=12,
        kv_heads=2,
        intermediate=8960,
        tie=True,
        max_length=2048,
        pairs=8,
        prompt_range=(128, 1536),
        response_range=(16, 512),
        dtype="bfloat16",
        attn="sdpa",
        warmup=2,
        steps=4,
    ),
}

BETA = 2.0
GAMMA_BETA_RATIO = 0.5
LEARNING_RATE = 1e-6


# ---- shared by every peer -----------------------------------------------------------------------


def build_model(preset: Preset, device: torch.device, attn: str, seed: int = 0) -> nn.Module:
    """The same random init in every process: seeded, created on the target device."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    common: dict[str, Any] = {
        "vocab_size": preset.vocab,
        "hidden_size": preset.hidden,
        "num_hidden_layers": preset.layers,
        "num_attention_heads": preset.heads,
        "num_key_value_heads": preset.kv_heads,
        "intermediate_size": preset.intermediate,
        "tie_word_embeddings": preset.tie,
        "max_position_embeddings": max(4096, preset.max_length),
        "pad_token_id": PAD,
        "bos_token_id": BOS,
        "eos_token_id": EOS,
    }
    config: Any
    model_class: Any
    if preset.arch == "qwen2":
        config, model_class = Qwen2Config(**common), Qwen2ForCausalLM
    else:
        config, model_class = LlamaConfig(**common), LlamaForCausalLM
    config._attn_implementation = attn
    torch.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed_all(seed)
    with device:
        model = model_class(config)
    return model.to(getattr(torch, preset.dtype))


def make_pairs(
    preset: Preset, extra_steps: int = 0, seed: int = 1
) -> list[tuple[list[int], list[int], list[int]]]:
    """(prompt, chosen, rejected) token ids: BOS-led prompts, EOS-ended responses.

    Already carrying the special tokens TRL's tokenize_row would add, so both peers see the
    very same sequences.
    """
    generator = torch.Generator().manual_seed(seed)

    def length(bounds: tuple[int, int]) -> int:
        return int(torch.randint(bounds[0], bounds[1] + 1, (1,), generator=generator))

    def words(count: int) -> list[int]:
        return torch.randint(FIRST_WORD, preset.vocab, (count,), generator=generator).tolist()

    pairs = []
    for _ in range((preset.warmup + preset.steps + extra_steps) * preset.pairs):
        prompt = [BOS, *words(length(preset.prompt_range) - 1)]
        chosen = [*words(length(preset.response_range) - 1), EOS]
        rejected = [*words(length(preset.response_range) - 1), EOS]
        assert len(prompt) + max(len(chosen), len(rejected)) <= preset.max_length
        pairs.append((prompt, chosen, rejected))
    return pairs


@dataclass
class StepData:
    tokens: int  # real prompt+response tokens
    response_tokens: int
    squared_lengths: int  # sum over sequences of length^2 (attention FLOPs)


def step_data(preset: Preset, pairs: Sequence[tuple[list[int], list[int], list[int]]]) -> StepData:
    lengths = [len(p) + len(r) for p, c, rj in pairs for r in (c, rj)]
    responses = sum(len(c) + len(rj) for _, c, rj in pairs)
    return StepData(sum(lengths), responses, sum(n * n for n in lengths))


class PeakMemory:
    """CUDA: allocator peak. CPU: a thread sampling the resident set every 2 ms."""

    def __init__(self, device: torch.device):
        self.device = device
        self.baseline = 0
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self._rss())

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.baseline = torch.cuda.memory_allocated()
        else:
            self.baseline = self.peak = self._rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            assert self._thread is not None
            self._thread.join()
            self.peak = max(self.peak, self._rss())

    @property
    def reported(self) -> int:
        """CUDA: the whole peak (weights included); CPU: growth over the pre-training baseline."""
        return self.peak if self.device.type == "cuda" else self.peak - self.baseline


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def profiler(device: torch.device) -> torch.profiler.profile:
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    return torch.profiler.profile(activities=activities)


# kernel / operator names by what they are part of (lower-cased substrings); first match wins
PROFILE_CATEGORIES = {
    "attention": ("flash", "fmha", "attention", "sdpa", "efficient_attention", "cudnn_attn"),
    "softmax_and_loss": ("softmax", "logsumexp", "cross_entropy", "nll_loss", "triton_"),
    "matmul": ("gemm", "mm", "matmul", "linear", "cutlass", "sm90", "nvjet"),
    "optimizer": ("adam", "foreach", "multi_tensor"),
}


def profile_breakdown(events: Any, device: torch.device, wall_s: float) -> dict[str, float]:
    """Milliseconds of one step by category, and the host-bound share.

    On CUDA: device-busy time per category from the kernels' self device time, and
    `host_bound_ms` = wall - device busy (time the GPU waited on the host issuing work). The
    engine's LM head (forward and the recomputing backward) is a labelled range,
    `simpo.lm_head`, whose total is reported on its own. On CPU the same from self CPU time.
    """
    cuda = device.type == "cuda"
    totals = dict.fromkeys([*PROFILE_CATEGORIES, "other"], 0.0)
    head_ms = 0.0
    for event in events:
        name = event.key.lower()
        if event.key.startswith("simpo."):
            if event.key == "simpo.lm_head":
                head_ms += (event.device_time_total if cuda else event.cpu_time_total) / 1000
            continue
        self_ms = (event.self_device_time_total if cuda else event.self_cpu_time_total) / 1000
        category = next(
            (c for c, keys in PROFILE_CATEGORIES.items() if any(k in name for k in keys)), "other"
        )
        totals[category] += self_ms
    busy = sum(totals.values())
    result = {f"{name}_ms": value for name, value in totals.items()}
    result.update(wall_ms=wall_s * 1000, busy_ms=busy, lm_head_range_ms=head_ms)
    if cuda:
        result["host_bound_ms"] = max(0.0, wall_s * 1000 - busy)
    return result


def write_profile(
    profile: torch.profiler.profile, device: torch.device, path: Path, wall_s: float
) -> None:
    """Top operators of one profiled step, how busy the device was, a breakdown and a trace.

    Writes `path` (the table), `path` with `.trace.json` (chrome://tracing / Perfetto) and
    with `.breakdown.json` (`profile_breakdown`).
    """
    events = profile.key_averages()
    if device.type == "cuda":
        busy_ms = sum(event.self_device_time_total for event in events) / 1000
        summary = f"one step: wall {wall_s * 1000:.1f} ms (profiled), device busy {busy_ms:.1f} ms"
        sort_by = "self_cuda_time_total"
    else:
        summary = f"one step: wall {wall_s * 1000:.1f} ms (profiled)"
        sort_by = "self_cpu_time_total"
    table = events.table(sort_by=sort_by, row_limit=40, max_name_column_width=70)
    path.write_text(summary + "\n" + table)
    profile.export_chrome_trace(str(path.with_suffix(".trace.json")))
    breakdown = profile_breakdown(events, device, wall_s)
    path.with_suffix(".breakdown.json").write_text(json.dumps(breakdown, indent=2))
    print(summary, json.dumps({k: round(v, 1) for k, v in breakdown.items()}), flush=True)


@dataclass
class PeerResult:
    peer: str
    layout: str
    step_seconds: list[float]
    # CPU time of the whole process (all threads) per measured step: on a shared CPU machine,
    # wall time also counts other processes' load, CPU time much less so
    step_cpu_seconds: list[float]
    tokens: int  # measured steps together
    response_tokens: int
    squared_lengths: int
    slots: int  # token positions the model body ran over, padding included (measured steps)
    peak_bytes: int
    baseline_bytes: int
    first_step_logps_chosen: float
    params: int
    notes: list[str] = field(default_factory=list)
    preset: str = ""  # the preset's name (its fields are the JSON's top-level "preset")
    gpu: str | None = None  # torch.cuda.get_device_name() on CUDA
    # filled in by the parent from summarise(), so that every peer's JSON entry holds them
    tokens_per_s: float | None = None
    step_ms: float | None = None
    mfu: float | None = None
    mfu_useful: float | None = None


# ---- our engine ---------------------------------------------------------------------------------


def run_ours(
    preset: Preset, device: torch.device, modifiers: set[str], chunk: int, profile: Path | None
) -> PeerResult:
    from simpo_sweep.engine.batching import PairBatch, PairExample, collate_layout
    from simpo_sweep.engine.logps import PolicyLogps, register_torch_varlen_attention
    from simpo_sweep.engine.train import SimPOTrainer
    from simpo_sweep.spec.models import SimPOSpec, TrainingSpec

    attn = preset.attn
    if "flex" in modifiers:
        attn = "flex_attention"
    if "varlen" in modifiers:
        attn = register_torch_varlen_attention()
    model = build_model(preset, device, attn)
    params = sum(p.numel() for p in model.parameters())
    pairs = make_pairs(preset)
    examples = [PairExample(p, c, r) for p, c, r in pairs]

    @dataclass
    class Columns:  # the trainer's PairDataset protocol
        prompt_ids: list[list[int]]
        chosen_ids: list[list[int]]
        rejected_ids: list[list[int]]

        def __len__(self) -> int:
            return len(self.prompt_ids)

    data = Columns(*(list(column) for column in zip(*pairs, strict=True)))
    training = TrainingSpec(
        learning_rate=LEARNING_RATE,
        lr_scheduler="constant",
        warmup_ratio=0.0,
        max_steps=preset.warmup + preset.steps,
        batch_size=preset.pairs,
        max_grad_norm=1.0,
        precision="bf16-mixed" if device.type == "cuda" else "fp32",
        padding_free="auto",
        prefix_sharing="on" if "shared" in modifiers else "off",
        logprob_chunk_tokens=chunk,
    )
    simpo = SimPOSpec(beta=BETA, gamma_beta_ratio=GAMMA_BETA_RATIO)
    trainer = SimPOTrainer(
        model,
        data,
        data,
        training=training,
        simpo=simpo,
        pad_token_id=PAD,
        device=device,
        layout="packed_one_row" if "onerow" in modifiers else None,
    )
    layout = trainer.layout  # choose_layout(padding_free="auto", attn) unless onerow
    notes = []
    if "eager_softmax" in modifiers:
        trainer.policy = PolicyLogps(model, chunk_tokens=chunk, fused_softmax=False)
        notes.append("eager head softmax")
    if "fused_adamw" in modifiers:
        # optimizer state is created lazily at the first step, so switching the flag before it
        # gives exactly AdamW(fused=True)
        for group in trainer.optimizer.param_groups:
            group["fused"], group["foreach"] = True, False
        notes.append("AdamW fused")
    if "compile" in modifiers:
        for layer in model.model.layers:  # type: ignore[union-attr]
            layer.compile(dynamic=True)
        notes.append("decoder layers torch.compile'd")

    def batches() -> Iterator[PairBatch]:
        # the trainer's own collation (SimPOTrainer._collate), lazily inside the timed step as
        # TRL's DataLoader collates inside its step; in order, unlike the trainer's shuffled
        # epoch, so that TRL times the very same batches
        for start in range(0, len(examples), preset.pairs):
            yield trainer._collate(examples[start : start + preset.pairs])

    slots = 0
    step_seconds: list[float] = []
    step_cpu_seconds: list[float] = []
    first_logps = float("nan")
    iterator = batches()

    def counting() -> Iterator[PairBatch]:
        nonlocal slots
        for index, batch in enumerate(iterator):
            if index >= preset.warmup:
                slots += batch.input_ids.numel()
            yield batch

    micro_batches = counting()
    with PeakMemory(device) as memory:
        for step in range(preset.warmup + preset.steps):
            synchronize(device)
            started, started_cpu = time.perf_counter(), time.process_time()
            metrics = trainer.train_step(micro_batches)
            synchronize(device)
            if step == 0:
                first_logps = metrics["train/logps/chosen"]
            if step >= preset.warmup:
                step_seconds.append(time.perf_counter() - started)
                step_cpu_seconds.append(time.process_time() - started_cpu)
        # One more step, the first batch again, outside the timing but inside the memory
        # measurement, as TRL's profiled step is.
        if profile is not None:
            extra = collate_layout(examples[: preset.pairs], layout, PAD).to(device)
            with profiler(device) as recorded:
                started = time.perf_counter()
                trainer.train_step(iter([extra]))
                synchronize(device)
            write_profile(recorded, device, profile, time.perf_counter() - started)
    measured = step_data(preset, pairs[preset.warmup * preset.pairs :])
    return PeerResult(
        peer="",
        layout=layout,
        step_seconds=step_seconds,
        step_cpu_seconds=step_cpu_seconds,
        tokens=measured.tokens,
        response_tokens=measured.response_tokens,
        squared_lengths=measured.squared_lengths,
        slots=slots,
        peak_bytes=memory.reported,
        baseline_bytes=memory.baseline,
        first_step_logps_chosen=first_logps,
        params=params,
        notes=notes,
    )


# ---- TRL ----------------------------------------------------------------------------------------


def word_level_tokenizer(vocab: int) -> Any:
    """Token `t<i>` is id i: text made of those words tokenises to exactly the ids drawn."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": PAD, "<s>": BOS, "</s>": EOS, "<unk>": UNK}
    words.update({f"t{i}": i for i in range(FIRST_WORD, vocab)})
    backend = Tokenizer(WordLevel(words, unk_token="<unk>"))
    backend.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )


def run_trl(
    preset: Preset, device: torch.device, modifiers: set[str], profile: Path | None
) -> PeerResult:
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import TrainerCallback
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    if modifiers:
        raise ValueError(f"TRL runs as configured by CPOConfig; no modifiers ({modifiers})")
    model = build_model(preset, device, preset.attn)
    params = sum(p.numel() for p in model.parameters())
    extra_steps = 0 if profile is None else 1  # profiled after the timed steps
    all_pairs = make_pairs(preset, extra_steps)
    pairs = all_pairs[: (preset.warmup + preset.steps) * preset.pairs]

    def text(ids: Sequence[int]) -> str:
        return " ".join(f"t{i}" for i in ids)

    # TRL adds the BOS and EOS itself, and concatenates prompt + answer as strings: the leading
    # space keeps the word boundary
    dataset = Dataset.from_dict(
        {
            "prompt": [text(p[1:]) for p, _, _ in all_pairs],
            "chosen": [" " + text(c[:-1]) for _, c, _ in all_pairs],
            "rejected": [" " + text(r[:-1]) for _, _, r in all_pairs],
        }
    )

    class Timer(TrainerCallback):
        def __init__(self) -> None:
            self.ends: list[float] = []
            self.cpu_ends: list[float] = []

        def on_train_begin(self, *args: Any, **kwargs: Any) -> None:
            synchronize(device)
            self.ends.append(time.perf_counter())
            self.cpu_ends.append(time.process_time())

        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            synchronize(device)
            self.ends.append(time.perf_counter())
            self.cpu_ends.append(time.process_time())

    class InOrderCPOTrainer(CPOTrainer):
        """The engine's batch order, so that both peers time the very same batches."""

        def _get_train_sampler(self, *args: Any, **kwargs: Any) -> SequentialSampler:
            return SequentialSampler(cast(Sized, self.train_dataset))

    class Profiler(TrainerCallback):
        """Records the step after the timed ones."""

        def __init__(self) -> None:
            self.recording: torch.profiler.profile | None = None
            self.started = 0.0

        def on_step_begin(self, args: Any, state: Any, *rest: Any, **kwargs: Any) -> None:
            if profile is not None and state.global_step == preset.warmup + preset.steps:
                self.recording = profiler(device)
                self.recording.__enter__()
                self.started = time.perf_counter()

        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            if self.recording is not None and profile is not None:
                synchronize(device)
                wall = time.perf_counter() - self.started
                self.recording.__exit__(None, None, None)
                write_profile(self.recording, device, profile, wall)
                self.recording = None

    timer = Timer()
    with tempfile.TemporaryDirectory() as output_dir:
        args = CPOConfig(
            output_dir=output_dir,
            loss_type="simpo",
            cpo_alpha=0.0,
            beta=BETA,
            simpo_gamma=GAMMA_BETA_RATIO * BETA,  # TRL's gamma is absolute
            per_device_train_batch_size=preset.pairs,
            gradient_accumulation_steps=1,
            max_length=preset.max_length,
            max_steps=preset.warmup + preset.steps + extra_steps,
            learning_rate=LEARNING_RATE,
            lr_scheduler_type="constant",
            max_grad_norm=1.0,
            bf16=device.type == "cuda",
            use_cpu=device.type == "cpu",
            gradient_checkpointing=False,
            report_to=[],
            logging_strategy="no",
            save_strategy="no",
            disable_tqdm=True,
            dataloader_num_workers=0,
            remove_unused_columns=False,
            seed=0,
        )
        trainer = InOrderCPOTrainer(
            model=model,
            args=args,
            train_dataset=dataset,
            processing_class=word_level_tokenizer(preset.vocab),
            callbacks=[timer, Profiler()],
        )
        tokenized = cast(Dataset, trainer.train_dataset)
        for index in (0, len(pairs) - 1):  # TRL tokenised to exactly our sequences
            prompt, chosen, _ = pairs[index]
            assert tokenized[index]["chosen_input_ids"] == prompt + chosen, "tokenisation differs"
        with PeakMemory(device) as memory:
            trainer.train()
    optim = str(trainer.args.optim)
    first_logps = float(trainer._stored_metrics["train"]["logps/chosen"][0])
    measured_pairs = pairs[preset.warmup * preset.pairs :]
    measured = step_data(preset, measured_pairs)
    slots = 0
    for start in range(0, len(measured_pairs), preset.pairs):
        group = measured_pairs[start : start + preset.pairs]
        slots += 2 * len(group) * max(len(p) + len(r) for p, c, rj in group for r in (c, rj))
    ends, warmup = timer.ends[: preset.warmup + preset.steps + 1], preset.warmup
    cpu_ends = timer.cpu_ends
    assert len(ends) == warmup + preset.steps + 1, "TRL ran fewer steps"
    return PeerResult(
        peer="",
        layout="padded (DPODataCollatorWithPadding)",
        step_seconds=[ends[step + 1] - ends[step] for step in range(warmup, len(ends) - 1)],
        step_cpu_seconds=[
            cpu_ends[step + 1] - cpu_ends[step] for step in range(warmup, len(ends) - 1)
        ],
        tokens=measured.tokens,
        response_tokens=measured.response_tokens,
        squared_lengths=measured.squared_lengths,
        slots=slots,
        peak_bytes=memory.reported,
        baseline_bytes=memory.baseline,
        first_step_logps_chosen=first_logps,
        params=params,
        notes=[f"optim {optim.split('.')[-1].lower()}"],
    )


# ---- Liger-Kernel's fused linear SimPO loss ------------------------------------------------------

LIGER_NOTE = "HF model + Liger fused linear SimPO loss (TRL's CPOTrainer has no Liger path)"
IGNORE = -100


def trl_style_batch(
    group: Sequence[tuple[list[int], list[int], list[int]]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TRL's CPO batch: chosen rows then rejected rows, right-padded to the widest of all.

    input_ids, attention_mask and labels (prompt and padding at -100), as TRL's
    DataCollatorWithPadding + concatenated_inputs build them from the same sequences.
    """
    sequences = [(p, c) for p, c, _ in group] + [(p, r) for p, _, r in group]
    width = max(len(p) + len(r) for p, r in sequences)
    input_ids = torch.full((len(sequences), width), PAD, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, IGNORE)
    for row, (prompt, response) in enumerate(sequences):
        end = len(prompt) + len(response)
        input_ids[row, :end] = torch.tensor(prompt + response)
        attention_mask[row, :end] = 1
        labels[row, len(prompt) : end] = torch.tensor(response)
    return input_ids.to(device), attention_mask.to(device), labels.to(device)


def run_liger(
    preset: Preset, device: torch.device, modifiers: set[str], profile: Path | None
) -> PeerResult:
    """The model body over TRL's padded chosen+rejected batches, the loss by Liger-Kernel.

    TRL 1.16's CPOTrainer computes the full logits and has no Liger option (its
    `use_liger_kernel` only patches the model's layers), so this is what Liger's own SimPO
    benchmark does: `LigerFusedLinearSimPOLoss` takes the last hidden states and the LM head's
    weight and runs head, log-softmax, SimPO loss and their gradients one pair at a time
    (`chunk_size=1`, the chunk loop torch.compile'd unless `nocompile`), never holding the whole
    batch's logits. Same data, order, batch, beta, gamma (absolute: gamma_beta_ratio * beta, as
    TRL's simpo_gamma), cpo_alpha 0 (no NLL term), AdamW(fused=True) as TRL's default optim,
    max_grad_norm 1.0, constant lr, bf16 autocast over the model on CUDA as TRL's bf16=True.
    """
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearSimPOLoss
    except Exception as error:  # not installed, or a torch/triton it cannot load
        raise SystemExit(
            f"liger peer: liger_kernel.chunked_loss cannot be imported "
            f"({type(error).__name__}: {error}); install liger-kernel (pip install --no-deps "
            f"liger-kernel, or its wheel from .whl/)"
        ) from error

    model = build_model(preset, device, preset.attn)
    model.train()
    params = sum(p.numel() for p in model.parameters())
    hf_model = cast(Any, model)  # a transformers *ForCausalLM
    body = cast(nn.Module, hf_model.model)
    head = cast(nn.Linear, hf_model.get_output_embeddings())
    compiled = "nocompile" not in modifiers
    loss_fn = LigerFusedLinearSimPOLoss(
        ignore_index=IGNORE,
        beta=BETA,
        alpha=0.0,  # cpo_alpha=0: no NLL term
        label_smoothing=0.0,
        compute_nll_loss=False,
        compiled=compiled,
        gamma=GAMMA_BETA_RATIO * BETA,  # absolute, as TRL's simpo_gamma: beta * dlogp - gamma
        chunk_size=1,
    )
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=LEARNING_RATE,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0.0,
        fused=True,
    )
    autocast: Any = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cuda"
        else contextlib.nullcontext()
    )
    pairs = make_pairs(preset)

    def train_step(group: Sequence[tuple[list[int], list[int], list[int]]]) -> tuple[float, int]:
        input_ids, attention_mask, labels = trl_style_batch(group, device)
        with autocast:
            hidden = body(
                input_ids=input_ids, attention_mask=attention_mask, use_cache=False
            ).last_hidden_state
        # position t predicts token t + 1, as TRL's get_batch_logps shifts
        loss, aux = loss_fn(head.weight, hidden[:, :-1], labels[:, 1:], head.bias)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(aux[0].detach().float().mean()), input_ids.numel()

    slots = 0
    step_seconds: list[float] = []
    step_cpu_seconds: list[float] = []
    first_logps = float("nan")
    with PeakMemory(device) as memory:
        for step in range(preset.warmup + preset.steps):
            group = pairs[step * preset.pairs : (step + 1) * preset.pairs]
            synchronize(device)
            started, started_cpu = time.perf_counter(), time.process_time()
            logps_chosen, positions = train_step(group)  # .item() synchronises too
            synchronize(device)
            if step == 0:
                first_logps = logps_chosen
            if step >= preset.warmup:
                step_seconds.append(time.perf_counter() - started)
                step_cpu_seconds.append(time.process_time() - started_cpu)
                slots += positions
        if profile is not None:  # the first batch again, untimed, as the other peers
            with profiler(device) as recorded:
                started = time.perf_counter()
                train_step(pairs[: preset.pairs])
                synchronize(device)
            write_profile(recorded, device, profile, time.perf_counter() - started)
    measured = step_data(preset, pairs[preset.warmup * preset.pairs :])
    notes = [
        LIGER_NOTE,
        "AdamW fused",
        "chunk loop " + ("torch.compile'd" if compiled else "eager"),
    ]
    return PeerResult(
        peer="",
        layout="padded (TRL-style chosen+rejected), Liger chunked head+loss",
        step_seconds=step_seconds,
        step_cpu_seconds=step_cpu_seconds,
        tokens=measured.tokens,
        response_tokens=measured.response_tokens,
        squared_lengths=measured.squared_lengths,
        slots=slots,
        peak_bytes=memory.reported,
        baseline_bytes=memory.baseline,
        first_step_logps_chosen=first_logps,
        params=params,
        notes=notes,
    )


# ---- the parent: run every peer, compare --------------------------------------------------------


def parse_peer(peer: str) -> tuple[str, set[str], int]:
    name, *modifiers = peer.split("+")
    chunk = 1024
    rest = set()
    if name not in {"ours", "trl", "liger"}:
        raise ValueError(f"unknown peer {name!r}")
    for modifier in modifiers:
        if name == "liger":  # only its own modifier
            if modifier != "nocompile":
                raise ValueError(f"liger takes only the modifier nocompile, not {modifier!r}")
            rest.add(modifier)
        elif modifier.startswith("chunk"):
            chunk = int(modifier.removeprefix("chunk"))
        elif modifier in {
            "fused_adamw",
            "compile",
            "flex",
            "varlen",
            "eager_softmax",
            "onerow",
            "shared",
        }:
            rest.add(modifier)
        else:
            raise ValueError(f"unknown modifier {modifier!r} in {peer!r}")
    return name, rest, chunk


def child(
    peer: str,
    preset: Preset,
    preset_name: str,
    device: torch.device,
    profile_dir: Path | None,
) -> PeerResult:
    name, modifiers, chunk = parse_peer(peer)
    profile = None
    if profile_dir is not None:
        profile = profile_dir / f"profile_{peer.replace('+', '-')}.txt"
    if name == "ours":
        result = run_ours(preset, device, modifiers, chunk, profile)
    elif name == "liger":
        result = run_liger(preset, device, modifiers, profile)
    else:
        result = run_trl(preset, device, modifiers, profile)
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else None
    return replace(result, peer=peer, preset=preset_name, gpu=gpu)


@dataclass
class Row:
    result: PeerResult
    tokens_per_s: float
    step_ms: float
    mfu: float | None  # brief's convention: 6 * params * tokens + causal attention
    mfu_useful: float | None  # body on every token, LM head on response tokens only
    tokens_per_cpu_s: float


def summarise(result: PeerResult, preset: Preset, device: torch.device) -> Row:
    seconds = sum(result.step_seconds)
    tokens_per_s = result.tokens / seconds
    mfu = mfu_useful = None
    if device.type == "cuda":
        head = preset.vocab * preset.hidden
        body = result.params - head * (1 if preset.tie else 2)  # embedding (and untied head)
        # causal attention: QK^T and AV over half of each sequence's length^2, forward and
        # backward (x3): 6 * length^2 * hidden per layer
        attention = 6 * preset.layers * preset.hidden * result.squared_lengths
        conventional = 6 * result.params * result.tokens + attention
        useful = 6 * body * result.tokens + 6 * head * result.response_tokens + attention
        peak = H100_H200_SXM_DENSE_BF16_PEAK_TFLOPS * 1e12
        mfu, mfu_useful = conventional / seconds / peak, useful / seconds / peak
    step_ms = 1000 * seconds / len(result.step_seconds)
    tokens_per_cpu_s = result.tokens / sum(result.step_cpu_seconds)
    return Row(result, tokens_per_s, step_ms, mfu, mfu_useful, tokens_per_cpu_s)


def table(rows: list[Row], device: torch.device) -> str:
    reference = next((row for row in rows if row.result.peer == "trl"), None)
    memory_name = "peak alloc" if device.type == "cuda" else "peak RSS growth"
    header = ["peer", "layout", "tokens/s", "ms/step", f"{memory_name} (GiB)", "padding"]
    if device.type == "cuda":
        header += ["MFU", "MFU useful"]
    else:
        header += ["tokens/CPU-s"]
    if reference is not None:
        header += ["tokens/s vs TRL", "memory vs TRL"]
        if device.type == "cpu":
            header += ["tokens/CPU-s vs TRL"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row in rows:
        result = row.result
        padding = 1 - result.tokens / result.slots
        cells = [
            result.peer + (f" ({', '.join(result.notes)})" if result.notes else ""),
            result.layout,
            f"{row.tokens_per_s:,.0f}",
            f"{row.step_ms:,.1f}",
            f"{result.peak_bytes / 2**30:.2f}",
            f"{padding:.0%}",
        ]
        if device.type == "cuda":
            cells += [f"{row.mfu:.1%}", f"{row.mfu_useful:.1%}"]
        else:
            cells += [f"{row.tokens_per_cpu_s:,.0f}"]
        if reference is not None:
            cells += [
                f"{row.tokens_per_s / reference.tokens_per_s:.2f}x",
                f"{result.peak_bytes / reference.result.peak_bytes:.2f}x",
            ]
            if device.type == "cpu":
                cells += [f"{row.tokens_per_cpu_s / reference.tokens_per_cpu_s:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def describe_machine(device: torch.device) -> str:
    import platform

    import transformers

    parts = [f"torch {torch.__version__}", f"transformers {transformers.__version__}"]
    with contextlib.suppress(ImportError):
        import trl

        parts.append(f"trl {trl.__version__}")
    with contextlib.suppress(Exception):  # its version without importing it (and triton)
        from importlib.metadata import version

        parts.append(f"liger-kernel {version('liger-kernel')}")
    if device.type == "cuda":
        parts.insert(0, torch.cuda.get_device_name())
    else:
        parts.insert(0, f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
    return ", ".join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--preset", choices=sorted(PRESETS), help="defaults to --device")
    parser.add_argument("--peers", nargs="+", default=["trl", "ours"])
    parser.add_argument("--steps", type=int, help="measured steps (preset's otherwise)")
    parser.add_argument("--warmup", type=int, help="untimed first steps (at least 1)")
    parser.add_argument("--pairs", type=int, help="pairs per step")
    parser.add_argument("--max-length", type=int, help="longest prompt+response")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per peer")
    parser.add_argument(
        "--threads", type=int, help="torch CPU threads per peer (default: torch's choice)"
    )
    parser.add_argument("--json", type=Path, help="write every peer's raw result here")
    parser.add_argument(
        "--profile", type=Path, help="profile one extra step per peer into this folder"
    )
    parser.add_argument(
        "--prefix-sharing",
        action="store_true",
        help="compare prefix sharing: an ours...+shared peer after every ours... peer",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.prefix_sharing and not args.child:
        peers: list[str] = []
        for peer in args.peers:
            peers.append(peer)
            if peer.startswith("ours") and "shared" not in peer.split("+"):
                peers.append(peer + "+shared")
        args.peers = list(dict.fromkeys(peers))

    device = torch.device(args.device)
    preset = PRESETS[args.preset or args.device]
    overrides: dict[str, Any] = {}
    if args.steps:
        overrides["steps"] = args.steps
    if args.warmup:
        overrides["warmup"] = args.warmup
    if args.pairs:
        overrides["pairs"] = args.pairs
    if args.max_length:
        half = args.max_length // 2
        overrides.update(
            max_length=args.max_length,
            prompt_range=(min(preset.prompt_range[0], half), half),
            response_range=(min(preset.response_range[0], half), half),
        )
    preset = replace(preset, **overrides)
    if preset.warmup < 1:
        parser.error("--warmup must be at least 1")

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        result = child(args.child, preset, args.preset or args.device, device, args.profile)
        print("RESULT " + json.dumps(asdict(result)), flush=True)
        return 0

    for peer in args.peers:
        parse_peer(peer)  # fail before spending minutes on the first peer
    print(f"machine: {describe_machine(device)}, torch threads {torch.get_num_threads()}")
    print(f"preset: {preset}", flush=True)
    rows: list[Row] = []
    raw: dict[str, Any] = {"preset": asdict(preset), "machine": describe_machine(device)}
    for peer in args.peers:
        command = [sys.executable, __file__, "--child", peer, "--device", args.device]
        command += ["--preset", args.preset or args.device]
        for flag, value in (
            ("--steps", preset.steps),
            ("--warmup", preset.warmup),
            ("--pairs", preset.pairs),
        ):
            command += [flag, str(value)]
        if args.max_length:
            command += ["--max-length", str(args.max_length)]
        if args.profile:
            args.profile.mkdir(parents=True, exist_ok=True)
            command += ["--profile", str(args.profile)]
        if args.threads:
            command += ["--threads", str(args.threads)]
        started = time.perf_counter()
        try:
            done = subprocess.run(
                command, capture_output=True, text=True, timeout=args.timeout, check=False
            )
        except subprocess.TimeoutExpired:
            print(f"{peer}: timed out after {args.timeout:.0f} s", flush=True)
            raw[peer] = "timeout"
            if args.json:
                args.json.write_text(json.dumps(raw, indent=2))
            continue
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode != 0 or not lines:
            tail = (done.stderr or done.stdout)[-3000:]
            print(f"{peer}: failed (exit {done.returncode})\n{tail}", flush=True)
            raw[peer] = f"failed: {tail}"
            if args.json:
                args.json.write_text(json.dumps(raw, indent=2))
            continue
        result = PeerResult(**json.loads(lines[-1].removeprefix("RESULT ")))
        row = summarise(result, preset, device)
        rows.append(row)
        raw[peer] = asdict(
            replace(
                result,
                tokens_per_s=row.tokens_per_s,
                step_ms=row.step_ms,
                mfu=row.mfu,
                mfu_useful=row.mfu_useful,
            )
        )
        print(
            f"{peer}: {row.tokens_per_s:,.0f} tokens/s, {row.step_ms:,.1f} ms/step, "
            f"peak {result.peak_bytes / 2**30:.2f} GiB, first-step logps/chosen "
            f"{result.first_step_logps_chosen:.5f} ({time.perf_counter() - started:.0f} s)",
            flush=True,
        )
        if args.json:  # after every peer: a run cut short keeps what it measured
            args.json.write_text(json.dumps(raw, indent=2))
    if rows:
        print()
        print(table(rows, device))
        first = {row.result.peer: row.result.first_step_logps_chosen for row in rows}
        print(f"\nfirst-step logps/chosen (same weights, same batch): {first}")
    if args.json:
        args.json.write_text(json.dumps(raw, indent=2))
    return 0 if len(rows) == len(args.peers) else 1


if __name__ == "__main__":
    sys.exit(main())
