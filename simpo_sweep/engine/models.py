"""Tokenizer and model loading from a `ModelSpec`: built-in demo names or Hugging Face ids/paths."""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from simpo_sweep.engine import demo
from simpo_sweep.spec.models import ModelSpec

_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_tokenizer(model: ModelSpec) -> PreTrainedTokenizerBase:
    """The spec's tokenizer (`tokenizer`, else `name`), always with a pad token.

    A `builtin:` name gives the demo tokenizer, so a built-in model can also be paired with a
    real tokenizer (its embedding table is sized from the tokenizer it is built with).
    """
    source = model.tokenizer or model.name
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
) -> PreTrainedModel:
    """The spec's causal LM on `device`, ready to train. `seed` fixes a built-in model's init."""
    dtype = resolve_dtype(model, device)
    attn_implementation = None if model.attn_implementation == "auto" else model.attn_implementation
    loaded: PreTrainedModel
    if demo.is_builtin(model.name):
        loaded = demo.build_demo_model(
            model.name, tokenizer, seed=seed, attn_implementation=attn_implementation
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
        loaded = AutoModelForCausalLM.from_pretrained(model.name, **options)
    loaded = _move(loaded, device=device)
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
