"""LoRA adapters through peft: `model.lora` turns full fine-tuning into adapter training.

peft injects the adapter layers into the transformers model in place; the engine keeps
training that same model (its get_decoder/get_output_embeddings, which PolicyLogps and FSDP
sharding read, are unchanged), with only the adapters requiring grad. So the trainer, DDP,
FSDP and the checkpoints need nothing LoRA-specific: the optimizer gets the adapters only and
the checkpoints (engine.checkpoint skips frozen weights) hold the adapters and their optimizer
state only.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from simpo_sweep.spec.models import LoraSpec


def lora_config(lora: LoraSpec) -> Any:
    """The spec's adapters as peft's LoraConfig (training and export build the same)."""
    from peft import LoraConfig

    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        bias="none",
    )


def apply_lora(model: nn.Module, lora: LoraSpec) -> nn.Module:
    """`model` with LoRA adapters on `lora.target_modules`, every other weight frozen.

    Adapters are created in float32 whatever the base's dtype (peft's autocast_adapter_dtype),
    so a bf16 base trains float32 adapters: the base is never updated, the adapters are.
    """
    from peft import get_peft_model

    peft_model: Any = get_peft_model(model, lora_config(lora), autocast_adapter_dtype=True)
    # The transformers model itself, adapters injected: no PeftModel wrapper in between.
    base: nn.Module = peft_model.get_base_model()
    return base


def trainable_fraction(model: nn.Module) -> float:
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad) / total
