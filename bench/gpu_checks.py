"""Correctness and memory checks of the engine on a GPU, in one process, one JSON out.

    python bench/gpu_checks.py --json checks.json              # on CUDA (about 1-2 minutes)
    python bench/gpu_checks.py --device cpu --small            # the script itself, on CPU

What it checks (each section reports its numbers, a `passed` flag and the tolerance it used):

- bf16_vs_fp32: one SimPO step from the same random init and batch, under bf16-mixed
  (autocast over float32 masters) and under fp32 (TF32 off): loss, log-probs, margins and the
  gradient norm agree within bf16's precision.
- fsdp_one_rank: the same step with FSDP2 (`fully_shard` per decoder layer and at the root, its
  MixedPrecisionPolicy instead of autocast) over a one-rank process group: runs, and agrees
  with the autocast step.
- prefix_sharing: log-probs and gradients of prompt+chosen+rejected under the 4D mask against
  the unshared padded path, float32 and bf16, with sdpa's kernel choice on CUDA recorded (which
  backends accept the boolean 4D mask).
- varlen: the one-row packed layout through torch's varlen flash kernel (torch_varlen) against
  the padded sdpa path, both bf16, measured against a float32 reference.
- memory_plan: engine.memory's plan of a trial against torch.cuda.max_memory_allocated of two
  training steps at the plan's worst case (every sequence at max_length), within 20%.
- trial_memory: three trials (load, train with compiled decoder layers, checkpoint, evaluate)
  one after another in this process, each released with engine.process_memory.release:
  allocated memory back to the baseline after each, each trial's own peak within 10% of the
  first's.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

from simpo_sweep.engine import process_memory  # noqa: E402
from simpo_sweep.engine.batching import PairExample, collate_layout  # noqa: E402
from simpo_sweep.engine.logps import PolicyLogps, register_torch_varlen_attention  # noqa: E402
from simpo_sweep.engine.loss import simpo_objective  # noqa: E402
from simpo_sweep.engine.memory import CUDA_RUNTIME_BYTES, KNOWN_CONFIGS, plan_trial  # noqa: E402
from simpo_sweep.engine.train import SimPOTrainer, settle_collectives  # noqa: E402
from simpo_sweep.spec.models import (  # noqa: E402
    DataSpec,
    ModelSpec,
    ResourcesSpec,
    SimPOSpec,
    TrainingSpec,
)

QWEN_05B = "Qwen/Qwen2.5-0.5B-Instruct"
QWEN_15B = "Qwen/Qwen2.5-1.5B-Instruct"
SIMPO = SimPOSpec(beta=2.0, gamma_beta_ratio=0.5, sft_weight=0.1)
# CPU runs of the script (--small): a Qwen2 of the same family, small enough for 2 cores
SMALL_SHAPE = {
    "model_type": "qwen2",
    "vocab_size": 4096,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "tie_word_embeddings": True,
}


@dataclass(frozen=True)
class Scale:
    """How big the checks run: the real shapes on CUDA, small ones for a CPU check."""

    model: str
    shape: dict[str, Any]
    pairs: int
    max_length: int
    plan_cases: tuple[tuple[str, int, int, bool], ...]  # model, pairs, max_length, checkpointing
    trial_steps: int


def scale_for(small: bool) -> Scale:
    if small:
        return Scale("small", SMALL_SHAPE, 4, 128, (("small", 2, 128, False),), 2)
    return Scale(
        QWEN_05B,
        KNOWN_CONFIGS[QWEN_05B],
        4,
        1024,
        (
            (QWEN_05B, 4, 1024, False),
            (QWEN_05B, 4, 1024, True),
            (QWEN_15B, 4, 2048, False),
        ),
        3,
    )


def build_model(shape: dict[str, Any], device: torch.device, attn: str, seed: int = 0) -> nn.Module:
    """A random-init causal LM of these shapes, float32, on the device (same seed, same init)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = {key: value for key, value in shape.items() if key != "model_type"}
    config = AutoConfig.for_model(shape["model_type"], **fields, pad_token_id=0)
    torch.manual_seed(seed)
    with device:
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn)
    return model.float()


def ragged_pairs(count: int, max_length: int, vocab: int, seed: int = 1) -> list[PairExample]:
    """Prompts and responses of random lengths (at most max_length together)."""
    rng = random.Random(seed)

    def words(length: int) -> list[int]:
        return [rng.randrange(3, vocab) for _ in range(length)]

    half = max_length // 2
    return [
        PairExample(
            words(rng.randint(8, half)),
            words(rng.randint(4, half)),
            words(rng.randint(4, half)),
        )
        for _ in range(count)
    ]


def full_length_pairs(count: int, max_length: int, vocab: int) -> list[PairExample]:
    """Every sequence at max_length: the memory plan's worst case."""
    rng = random.Random(2)
    half = max_length // 2
    return [
        PairExample(*([rng.randrange(3, vocab) for _ in range(n)] for n in (half, half, half)))
        for _ in range(count)
    ]


@dataclass
class Columns:
    """The trainer's PairDataset protocol over a list of examples."""

    examples: list[PairExample]

    @property
    def prompt_ids(self) -> list[list[int]]:
        return [list(e.prompt_ids) for e in self.examples]

    @property
    def chosen_ids(self) -> list[list[int]]:
        return [list(e.chosen_ids) for e in self.examples]

    @property
    def rejected_ids(self) -> list[list[int]]:
        return [list(e.rejected_ids) for e in self.examples]

    def __len__(self) -> int:
        return len(self.examples)


def training(**overrides: Any) -> TrainingSpec:
    settings: dict[str, Any] = {
        "learning_rate": 1e-6,
        "lr_scheduler": "constant",
        "warmup_ratio": 0.0,
        "max_steps": 2,
        "batch_size": 4,
        "eval_batch_size": 4,
        "max_grad_norm": 1.0,
    }
    settings.update(overrides)
    return TrainingSpec(**settings)


def one_step(
    model: nn.Module,
    examples: list[PairExample],
    device: torch.device,
    precision: str,
    strategy: str = "ddp",
) -> dict[str, float]:
    """One trainer step on exactly these pairs (one micro-batch of all of them)."""
    data = Columns(examples)
    trainer = SimPOTrainer(
        model,
        data,
        data,
        training=training(batch_size=len(examples), precision=precision),
        simpo=SIMPO,
        pad_token_id=0,
        device=device,
        strategy=strategy,  # type: ignore[arg-type]
    )
    metrics = trainer.train_step(iter([trainer._collate(examples)]))
    del trainer
    return metrics


COMPARED = ("train/loss", "train/logps/chosen", "train/logps/rejected", "train/rewards/margins")


def compare(
    reference: dict[str, float], other: dict[str, float], atol: float, grad_rtol: float
) -> dict[str, Any]:
    differences = {name: abs(reference[name] - other[name]) for name in COMPARED}
    grad_difference = abs(reference["train/grad_norm"] - other["train/grad_norm"])
    grad_relative = grad_difference / max(reference["train/grad_norm"], 1e-12)
    return {
        "reference": {name: reference[name] for name in (*COMPARED, "train/grad_norm")},
        "other": {name: other[name] for name in (*COMPARED, "train/grad_norm")},
        "abs_difference": differences,
        "grad_norm_relative_difference": grad_relative,
        "tolerance": {"atol": atol, "grad_norm_rtol": grad_rtol},
        "passed": all(d <= atol for d in differences.values()) and grad_relative <= grad_rtol,
    }


def check_bf16_vs_fp32(device: torch.device, scale: Scale, state: dict[str, Any]) -> dict[str, Any]:
    examples = ragged_pairs(scale.pairs, scale.max_length, scale.shape["vocab_size"])
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    fp32 = one_step(build_model(scale.shape, device, "sdpa"), examples, device, "fp32")
    process_memory.release(device)
    precision = "bf16-mixed"  # on CPU too: autocast runs there, slowly
    mixed = one_step(build_model(scale.shape, device, "sdpa"), examples, device, precision)
    process_memory.release(device)
    state["autocast_step"] = mixed
    # bf16 keeps 8 significant bits: log-probs near -12 move by a few 1e-2 at most
    result = compare(fp32, mixed, atol=5e-2, grad_rtol=5e-2)
    result["precision"] = precision
    return result


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def check_fsdp_one_rank(
    device: torch.device, scale: Scale, state: dict[str, Any]
) -> dict[str, Any]:
    examples = ragged_pairs(scale.pairs, scale.max_length, scale.shape["vocab_size"])
    backend = "nccl" if device.type == "cuda" else "gloo"
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    dist.init_process_group(
        backend, rank=0, world_size=1, device_id=device if backend == "nccl" else None
    )
    try:
        precision = "bf16-mixed"
        model = build_model(scale.shape, device, "sdpa")
        fsdp = one_step(model, examples, device, precision, strategy="fsdp")
        from torch.distributed.fsdp import FSDPModule

        sharded = isinstance(model.model.layers[0], FSDPModule)  # type: ignore[index,union-attr]
        del model
        settle_collectives()
    finally:
        dist.destroy_process_group()
    process_memory.release(device)
    reference = state.get("autocast_step")
    if reference is None:
        return {"error": "bf16_vs_fp32 did not run: nothing to compare with", "passed": False}
    # FSDP's MixedPrecisionPolicy casts weights once per layer, autocast per op: both bf16
    result = compare(reference, fsdp, atol=5e-2, grad_rtol=5e-2)
    result["decoder_layers_sharded"] = sharded
    result["passed"] = result["passed"] and sharded
    return result


def _logps_and_grads(
    model: nn.Module, examples: Sequence[PairExample], layout: str, bf16: bool
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    device = next(model.parameters()).device
    batch = collate_layout(examples, layout, 0).to(device)  # type: ignore[arg-type]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    with autocast:
        result = PolicyLogps(model)(batch)
        loss, _ = simpo_objective(result, SIMPO)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    averaged = result.summed.detach() / result.token_counts.clamp_min(1)
    return averaged, grads


def _grad_relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest per-parameter ||a - b|| / ||b||."""
    worst = 0.0
    for name, grad in b.items():
        norm = float(grad.float().norm())
        if norm > 0:
            worst = max(worst, float((a[name].float() - grad.float()).norm()) / norm)
    return worst


def _sdpa_backends_for_4d_mask(
    device: torch.device, shape: dict[str, Any], examples: Sequence[PairExample]
) -> dict[str, str]:
    """Which sdpa backends run the shared-prefix 4D boolean mask (bf16), one forced at a time."""
    if device.type != "cuda":
        return {}
    from torch.nn.attention import SDPBackend, sdpa_kernel

    batch = collate_layout(examples, "shared_prefix", 0).to(device)
    model = build_model(shape, device, "sdpa")
    outcome = {}
    for backend in (
        SDPBackend.FLASH_ATTENTION,
        SDPBackend.EFFICIENT_ATTENTION,
        SDPBackend.CUDNN_ATTENTION,
        SDPBackend.MATH,
    ):
        try:
            with sdpa_kernel([backend]), torch.autocast("cuda", dtype=torch.bfloat16):
                PolicyLogps(model)(batch)
            outcome[backend.name] = "runs"
        except Exception as error:  # a refusal is a result here, whatever its type
            outcome[backend.name] = f"refused: {str(error).splitlines()[0][:160]}"
    return outcome


def check_prefix_sharing(
    device: torch.device, scale: Scale, state: dict[str, Any]
) -> dict[str, Any]:
    examples = ragged_pairs(scale.pairs, scale.max_length, scale.shape["vocab_size"], seed=3)
    model = build_model(scale.shape, device, "sdpa")
    result: dict[str, Any] = {}
    passed = True
    for bf16, (logp_atol, grad_rtol) in ((False, (1e-4, 1e-3)), (True, (3e-2, 5e-2))):
        if bf16 and device.type != "cuda":
            continue
        shared, shared_grads = _logps_and_grads(model, examples, "shared_prefix", bf16)
        unshared, unshared_grads = _logps_and_grads(model, examples, "padded", bf16)
        difference = float((shared - unshared).abs().max())
        grads = _grad_relative_difference(shared_grads, unshared_grads)
        ok = difference <= logp_atol and grads <= grad_rtol
        passed = passed and ok
        result["bf16" if bf16 else "fp32"] = {
            "max_abs_difference_avg_logps": difference,
            "max_relative_difference_grads": grads,
            "tolerance": {"avg_logps_atol": logp_atol, "grads_rtol": grad_rtol},
            "passed": ok,
        }
    del model
    result["sdpa_backends_with_4d_mask"] = _sdpa_backends_for_4d_mask(
        device, scale.shape, examples[:2]
    )
    result["passed"] = passed
    process_memory.release(device)
    return result


def check_varlen(device: torch.device, scale: Scale, state: dict[str, Any]) -> dict[str, Any]:
    examples = ragged_pairs(scale.pairs, scale.max_length, scale.shape["vocab_size"], seed=4)
    reference_model = build_model(scale.shape, device, "sdpa")
    reference, _ = _logps_and_grads(reference_model, examples, "padded", bf16=False)
    bf16 = device.type == "cuda"
    padded, padded_grads = _logps_and_grads(reference_model, examples, "padded", bf16=bf16)
    del reference_model
    varlen_model = build_model(scale.shape, device, register_torch_varlen_attention())
    varlen, varlen_grads = _logps_and_grads(varlen_model, examples, "packed_one_row", bf16=bf16)
    del varlen_model
    process_memory.release(device)
    padded_error = float((padded - reference).abs().max())
    varlen_error = float((varlen - reference).abs().max())
    between = float((varlen - padded).abs().max())
    grads = _grad_relative_difference(varlen_grads, padded_grads)
    # the varlen path may not be further from float32 than bf16 sdpa is, beyond bf16's noise
    tolerance = 3e-2 if bf16 else 1e-4
    return {
        "max_abs_error_vs_fp32": {"padded_sdpa": padded_error, "varlen": varlen_error},
        "max_abs_difference_varlen_vs_padded": between,
        "max_relative_difference_grads_varlen_vs_padded": grads,
        "tolerance": {"avg_logps_atol": tolerance, "grads_rtol": 5e-2 if bf16 else 1e-3},
        "passed": between <= tolerance and grads <= (5e-2 if bf16 else 1e-3),
    }


def check_memory_plan(device: torch.device, scale: Scale, state: dict[str, Any]) -> dict[str, Any]:
    cases = []
    for name, pairs, max_length, checkpointing in scale.plan_cases:
        shape = scale.shape if name == "small" else KNOWN_CONFIGS[name]
        precision = "bf16-mixed" if device.type == "cuda" else "fp32"
        train = training(batch_size=pairs, precision=precision, max_steps=2)
        planned = None
        if name != "small":
            planned = plan_trial(
                ModelSpec(name=name, gradient_checkpointing=checkpointing),
                DataSpec(max_length=max_length, max_prompt_length=max_length // 2),
                train,
                ResourcesSpec(gpus_per_worker=1 if device.type == "cuda" else 0),
            ).plan
        model = build_model(shape, device, "sdpa")
        if checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
        examples = full_length_pairs(pairs * 2, max_length, shape["vocab_size"])
        data = Columns(examples)
        trainer = SimPOTrainer(
            model, data, data, training=train, simpo=SIMPO, pad_token_id=0, device=device
        )
        for _ in range(2):
            metrics = trainer.train_step(trainer._train_micro_batches())
        measured = process_memory.peak_bytes(device)
        reserved = torch.cuda.max_memory_reserved(device) if device.type == "cuda" else None
        del trainer, model
        process_memory.release(device)
        case: dict[str, Any] = {
            "model": name,
            "pairs": pairs,
            "max_length": max_length,
            "gradient_checkpointing": checkpointing,
            "measured_peak_allocated_bytes": measured,
            "measured_peak_reserved_bytes": reserved,
            "step_peak_memory_mb": metrics["perf/peak_memory_mb"],
        }
        if planned is not None:
            # the plan's CUDA runtime allowance (context, allocator slack) is outside the
            # allocator's count: compared without it
            allocator_part = planned.total_bytes - planned.components.get("runtime", 0.0)
            case.update(
                planned_bytes=planned.total_bytes,
                planned_components=planned.components,
                planned_allocator_bytes=allocator_part,
                plan_over_measured=allocator_part / measured,
                passed=abs(allocator_part / measured - 1) <= 0.20,
            )
        cases.append(case)
    planned_cases = [case for case in cases if "passed" in case]
    return {
        "runtime_allowance_bytes": CUDA_RUNTIME_BYTES,
        "cases": cases,
        "tolerance": "planned (without the runtime allowance) within 20% of the allocator peak",
        "passed": all(case["passed"] for case in planned_cases) if planned_cases else None,
    }


def check_trial_memory(device: torch.device, scale: Scale, state: dict[str, Any]) -> dict[str, Any]:
    compile_layers = device.type == "cuda"
    process_memory.release(device)
    baseline = _allocated(device)
    trials = []
    for index in range(3):
        started = time.perf_counter()
        examples = ragged_pairs(16, scale.max_length, scale.shape["vocab_size"], seed=10 + index)
        data = Columns(examples)
        precision = "bf16-mixed" if device.type == "cuda" else "fp32"
        with tempfile.TemporaryDirectory() as checkpoints:
            trainer = SimPOTrainer(
                build_model(scale.shape, device, "sdpa", seed=index),
                data,
                data,
                training=training(
                    max_steps=scale.trial_steps,
                    eval_every=scale.trial_steps,
                    checkpoint_every=scale.trial_steps,
                    precision=precision,
                    compile_layers=compile_layers,
                ),
                simpo=SIMPO,
                pad_token_id=0,
                device=device,
                checkpoint_root=Path(checkpoints),
            )
            first_step: list[float] = []

            def on_step(event: Any, first_step: list[float] = first_step) -> None:
                if not first_step:
                    first_step.append(time.perf_counter())

            result = trainer.fit(callback=on_step)
            del trainer
        process_memory.release(device)
        trials.append(
            {
                "peak_memory_mb": result.metrics["perf/peak_memory_mb"],
                "allocated_after_release_bytes": _allocated(device),
                "reserved_after_release_bytes": _reserved(device),
                "start_to_first_step_s": first_step[0] - started if first_step else None,
                "seconds": time.perf_counter() - started,
            }
        )
    first_peak = trials[0]["peak_memory_mb"]
    back_to_baseline = all(
        trial["allocated_after_release_bytes"] <= baseline + 64 * 2**20 for trial in trials
    )
    peaks_steady = all(abs(t["peak_memory_mb"] / first_peak - 1) <= 0.10 for t in trials)
    return {
        "compile_layers": compile_layers,
        "baseline_allocated_bytes": baseline,
        "trials": trials,
        "tolerance": "allocated back within 64 MiB of the baseline; peaks within 10% of the first",
        "passed": back_to_baseline and peaks_steady,
    }


def _allocated(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    return process_memory.resident_bytes()


def _reserved(device: torch.device) -> int | None:
    return int(torch.cuda.memory_reserved(device)) if device.type == "cuda" else None


CHECKS: dict[str, Callable[[torch.device, Scale, dict[str, Any]], dict[str, Any]]] = {
    "bf16_vs_fp32": check_bf16_vs_fp32,
    "fsdp_one_rank": check_fsdp_one_rank,
    "prefix_sharing": check_prefix_sharing,
    "varlen": check_varlen,
    "memory_plan": check_memory_plan,
    "trial_memory": check_trial_memory,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    parser.add_argument("--small", action="store_true", help="small shapes (a CPU check)")
    parser.add_argument("--only", nargs="+", choices=sorted(CHECKS), help="run just these")
    parser.add_argument("--json", type=Path, help="write the results here (after every check)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())  # NCCL wants an index
    scale = scale_for(args.small)
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "scale": scale.model,
    }
    state: dict[str, Any] = {}
    for name, check in CHECKS.items():
        if args.only and name not in args.only:
            continue
        started = time.perf_counter()
        try:
            result = check(device, scale, state)
        except Exception as error:  # one broken check must not hide the others' results
            result = {"error": f"{type(error).__name__}: {error}", "passed": False}
            result["traceback"] = traceback.format_exc()[-3000:]
        result["seconds"] = round(time.perf_counter() - started, 1)
        report[name] = result
        shown = {k: v for k, v in result.items() if k not in ("traceback",)}
        print(f"{name}: {json.dumps(shown, default=str)[:1500]}", flush=True)
        if args.json:
            args.json.write_text(json.dumps(report, indent=2, default=str))
    failed = [n for n, r in report.items() if isinstance(r, dict) and r.get("passed") is False]
    print(f"checks failed: {failed}" if failed else "all checks passed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
