"""Tokenizer and model loading from a `ModelSpec`: built-in names or Hugging Face ids/paths.

A built-in real model (engine/pretrained.py) resolves to its converted folder first and is then
loaded like any local path; the other built-in names are the demo's (engine/demo.py).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from simpo_sweep.engine import demo
from simpo_sweep.engine.pretrained import resolve_model_source
from simpo_sweep.spec.models import ModelSpec

_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

Precision = Literal["bf16-mixed", "fp32", "bf16-true"]
# bfloat16 keeps 8 significant bits: a weight w moves only when its update exceeds half its
# spacing, |w| * 2**-8. AdamW's update is about the learning rate, so under bf16-true every
# weight with |w| > 256 * lr stays where it is (at lr 1e-6: |w| > 2.6e-4, nearly all of them).
BF16_RELATIVE_SPACING = 2.0**-8


def resolve_precision(precision: str, device: torch.device | str) -> Precision:
    """`auto` = bf16-mixed on CUDA (bf16 tensor cores, fp32 master weights), fp32 elsewhere:
    CPUs have no fast bf16 matmuls to pay for the casts."""
    if precision == "auto":
        return "bf16-mixed" if torch.device(device).type == "cuda" else "fp32"
    if precision not in ("bf16-mixed", "fp32", "bf16-true"):
        raise ValueError(f"unknown precision {precision!r}")
    return precision  # type: ignore[return-value]


def lost_update_warning(learning_rate: float) -> str:
    """What bf16-true costs at this learning rate, in words a user can act on."""
    threshold = learning_rate / BF16_RELATIVE_SPACING
    return (
        f"training.precision bf16-true updates bfloat16 weights in place: at learning rate "
        f"{learning_rate:g} an AdamW step (about the learning rate) is rounded away on every "
        f"weight larger than {threshold:.2g} in magnitude, which is most weights of a real "
        "model, so most updates are lost; use bf16-mixed (float32 master weights, bf16 "
        "compute) unless memory forbids it"
    )


def training_dtype(precision: Precision) -> torch.dtype:
    """The dtype trained weights are held (and updated) in."""
    return torch.bfloat16 if precision == "bf16-true" else torch.float32


def load_tokenizer(model: ModelSpec) -> PreTrainedTokenizerBase:
    """The spec's tokenizer (`tokenizer`, else `name`), always with a pad token.

    A built-in real model's name gives its own tokenizer; another `builtin:` name gives the
    demo tokenizer, so a demo model can also be paired with a real tokenizer (its embedding
    table is sized from the tokenizer it is built with).
    """
    source = resolve_model_source(model.tokenizer or model.name)
    tokenizer: PreTrainedTokenizerBase
    if demo.is_builtin(source):
        tokenizer = demo.build_demo_tokenizer()
    else:
        tokenizer = AutoTokenizer.from_pretrained(
            source, revision=model.revision, trust_remote_code=model.trust_remote_code
        )
    if tokenizer.pad_token is None:
        # Padding positions are masked out of attention and loss, so any existing token can
        # stand in; adding a new one would change the vocabulary the model was trained with.
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise ValueError(
                f"tokenizer {source!r} has no pad, eos or unk token to pad batches with"
            )
        tokenizer.pad_token = fallback
    return tokenizer


def resolve_dtype(model: ModelSpec, device: torch.device | str) -> torch.dtype:
    """`auto` = bfloat16 on CUDA (halves memory, full speed on tensor cores), float32 elsewhere."""
    if model.dtype != "auto":
        return _TORCH_DTYPES[model.dtype]
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def _move(
    model: PreTrainedModel,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> PreTrainedModel:
    # PreTrainedModel.to is wrapped with functools.wraps, which hides its signature from
    # type checkers; nn.Module.to is what it delegates to for unquantised models.
    return torch.nn.Module.to(model, device=device, dtype=dtype)


def load_model(
    model: ModelSpec,
    tokenizer: PreTrainedTokenizerBase,
    device: torch.device | str,
    *,
    seed: int = 0,
    precision: Precision | None = None,
) -> PreTrainedModel:
    """The spec's causal LM on `device`, ready to train. `seed` fixes a built-in model's init.

    With a `precision`, the weights are loaded straight into the dtype training holds them in
    (float32 master weights under bf16-mixed, even when model.dtype is bfloat16: a bf16 file
    loads into float32 exactly), so no second copy in model.dtype is ever made. Without one,
    they load in model.dtype (what export writes).
    """
    dtype = resolve_dtype(model, device) if precision is None else training_dtype(precision)
    if model.lora is not None and precision == "bf16-mixed":
        # LoRA's base is frozen: it is never updated, so it stays in model.dtype (bf16 on
        # CUDA, half the memory of float32); only the adapters are float32.
        dtype = resolve_dtype(model, device)
    attn_implementation = None if model.attn_implementation == "auto" else model.attn_implementation
    loaded: PreTrainedModel
    name = resolve_model_source(model.name)
    if demo.is_builtin(name):
        loaded = demo.build_demo_model(
            name, tokenizer, seed=seed, attn_implementation=attn_implementation
        )
        loaded = _move(loaded, dtype=dtype)
    else:
        options: dict[str, Any] = {
            "revision": model.revision,
            "trust_remote_code": model.trust_remote_code,
            "dtype": dtype,
        }
        if attn_implementation is not None:
            options["attn_implementation"] = attn_implementation
        loaded = AutoModelForCausalLM.from_pretrained(name, **options)
    loaded = _move(loaded, device=device)
    if model.lora is not None:
        from simpo_sweep.engine.lora import apply_lora

        # peft draws lora_A from the global RNG: seeded (in a fork), the same seed gives the
        # same adapters in every process, as it gives the same built-in model.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            loaded = apply_lora(loaded, model.lora)  # type: ignore[assignment]
    if model.gradient_checkpointing:
        # Non-reentrant checkpointing works with inputs that do not require grad and with DDP.
        options = {"use_reentrant": False}
        enable = getattr(loaded, "activation_checkpointing_enable", None)
        if callable(enable):
            enable(activation_checkpointing_kwargs=options)
        else:  # transformers before the rename (the name above is deprecated from 5.2x)
            loaded.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
        # The KV cache is useless in training and conflicts with checkpointing.
        loaded.config.use_cache = False
    return loaded
