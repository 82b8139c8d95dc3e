"""The memory plan: peak memory per worker of one trial, from the model's config alone.

No weights are read: the parameter count comes from the model built on the meta device from
its config (AutoConfig for hub ids and local folders, the demo's own config for builtin:), so
a spec for an 8B model is planned on a laptop. What one worker holds at its peak:

    weights      trained weights in their training dtype (float32 masters under bf16-mixed and
                 fp32, bfloat16 under bf16-true); frozen ones (LoRA's base) in model.dtype
    gradients    one per trainable weight, same dtype; DDP keeps them in its buckets
                 (gradient_as_bucket_view), so there is no second copy
    optimizer    AdamW: exp_avg and exp_avg_sq per trainable weight, in the weight's dtype
    compute copy bf16 copies of the weights made for the compute: under DDP, autocast caches
                 one per weight for the whole forward; under FSDP, the gathered layers in
                 flight (two) and the root group (embeddings, head), plus their unsharded
                 gradients before the reduce-scatter
    activations  what the forward keeps for backward: per token and layer, from the layer's
                 shapes; with gradient checkpointing only each layer's input, plus one layer
                 recomputed at a time. Tokens = 2 x batch_size x max_length per micro-batch
                 (the worst case: every sequence at full length; packing only removes padding),
                 or max_tokens_per_batch when the micro-batches are filled to a token budget
    log-probs    one chunk of logits (logprob_chunk_tokens x vocab) in float32 and the compute
                 dtype, the same again in backward, and the head's float32 gradient accumulator
    runtime      CUDA context and allocator slack (1.5 GB on CUDA; none on CPU)

FSDP divides weights, gradients and optimizer state by the number of workers; DDP does not.
Calibrated against measured peaks on CPU (tests/test_memory_plan.py); treat it as within
20-25%, not as an exact figure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from simpo_sweep.engine.models import Precision, resolve_dtype, resolve_precision
from simpo_sweep.spec.models import DataSpec, LoraSpec, ModelSpec, ResourcesSpec, TrainingSpec

GB = 1e9
CUDA_RUNTIME_BYTES = 1.5 * GB
# FSDP prefetches the next layer while one computes: two layers gathered at once.
FSDP_LAYERS_IN_FLIGHT = 2

Strategy = Literal["ddp", "fsdp"]


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs to know about a model: sizes, never weights."""

    name: str
    parameters: int
    trainable: int  # all of them, or the LoRA adapters'
    layer_parameters: int  # one decoder layer's
    root_parameters: int  # outside the decoder layers: embeddings, final norm, head
    num_layers: int
    hidden_size: int
    kv_size: int  # key/value width per token (num_key_value_heads x head_dim)
    intermediate_size: int
    vocab_size: int
    head_trainable: bool


@dataclass(frozen=True)
class MemoryPlan:
    shape: ModelShape
    precision: Precision
    strategy: Strategy
    workers: int
    tokens_per_micro_batch: int
    gradient_checkpointing: bool
    components: dict[str, float]  # bytes per worker, by component
    token_budget: bool = False  # micro-batches filled to training.max_tokens_per_batch

    @property
    def total_bytes(self) -> float:
        return sum(self.components.values())

    @property
    def total_gb(self) -> float:
        return self.total_bytes / GB

    def fits(self, gpu_memory_gb: float) -> bool:
        return self.total_gb <= gpu_memory_gb

    def lines(self) -> list[str]:
        shape = self.shape
        lora = (
            ""
            if shape.trainable == shape.parameters
            else f", LoRA: {_count(shape.trainable)} trainable"
        )
        parts = ", ".join(
            f"{name} {_size(value)}" for name, value in self.components.items() if value
        )
        return [
            f"model: {shape.name}: {_count(shape.parameters)} parameters, "
            f"{shape.num_layers} layers, vocab {shape.vocab_size}{lora}",
            f"per worker: ~{_size(self.total_bytes)} ({self.precision}, {self.strategy} over "
            f"{self.workers} worker(s), {self.tokens_per_micro_batch} tokens per micro-batch, "
            f"gradient checkpointing {'on' if self.gradient_checkpointing else 'off'})",
            f"  {parts}",
        ]

    def refusal(self, gpu_memory_gb: float) -> str:
        """Why it does not fit, with the ways out."""
        fixes = []
        if self.strategy == "ddp" and self.workers > 1:
            fixes.append("strategy fsdp")
        elif self.strategy == "ddp":
            fixes.append("more workers with strategy fsdp")
        else:
            fixes.append("more workers")
        if self.shape.trainable == self.shape.parameters:
            fixes.append("LoRA (model.lora)")
        if not self.gradient_checkpointing:
            fixes.append("model.gradient_checkpointing: true")
        smaller = "max_tokens_per_batch" if self.token_budget else "batch_size"
        fixes.append(f"a smaller {smaller} with more gradient_accumulation_steps")
        return (
            f"{self.shape.name} ({self.shape.parameters / 1e9:.1f}B) with {self.strategy} over "
            f"{self.workers} worker(s) needs ~{self.total_gb:.0f} GB per GPU, the GPU has "
            f"{gpu_memory_gb:g}: use {', '.join(fixes)}"
        )


# The published configs (config.json on the hub) of the models the shipped specs and the
# README name, for planning where the hub cannot be reached (a laptop checking a cluster spec;
# Llama 3 is gated). Shapes only: what model_shape reads.
KNOWN_CONFIGS: dict[str, dict[str, Any]] = {
    "meta-llama/Meta-Llama-3-8B-Instruct": {
        "model_type": "llama",
        "vocab_size": 128256,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "tie_word_embeddings": False,
    },
    "Qwen/Qwen2.5-0.5B-Instruct": {
        "model_type": "qwen2",
        "vocab_size": 151936,
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "tie_word_embeddings": True,
    },
    "Qwen/Qwen2.5-1.5B-Instruct": {
        "model_type": "qwen2",
        "vocab_size": 151936,
        "hidden_size": 1536,
        "intermediate_size": 8960,
        "num_hidden_layers": 28,
        "num_attention_heads": 12,
        "num_key_value_heads": 2,
        "tie_word_embeddings": True,
    },
}
KNOWN_CONFIGS["meta-llama/Llama-3.1-8B-Instruct"] = KNOWN_CONFIGS[
    "meta-llama/Meta-Llama-3-8B-Instruct"
]


def _size(num_bytes: float) -> str:
    return f"{num_bytes / GB:.1f} GB" if num_bytes >= 0.1 * GB else f"{num_bytes / 1e6:.1f} MB"


def _count(parameters: int) -> str:
    return f"{parameters / 1e9:.2f}B" if parameters >= 1e8 else f"{parameters / 1e6:.2f}M"


def model_config(model: ModelSpec) -> Any:
    """The model's transformers config: the demo's for a demo builtin:, else AutoConfig (a hub
    id needs the hub or its local cache; a local folder or a built-in real model's converted
    one needs its config.json only), else, for a model of KNOWN_CONFIGS, its published shape.
    ValueError when none of them answers."""
    from simpo_sweep.engine import demo
    from simpo_sweep.engine.models import load_tokenizer
    from simpo_sweep.engine.pretrained import resolve_model_source

    name = resolve_model_source(model.name)
    if demo.is_builtin(name):
        return demo.demo_model_config(name, load_tokenizer(model))
    from transformers import AutoConfig

    known = KNOWN_CONFIGS.get(model.name)
    try:
        # A known model is not worth the hub's retries (half a minute offline): its cached
        # config, else the table.
        return AutoConfig.from_pretrained(
            name,
            revision=model.revision,
            trust_remote_code=model.trust_remote_code,
            local_files_only=known is not None,
        )
    except (OSError, ValueError) as error:
        if known is None:
            raise ValueError(f"no config for {model.name}: {error}") from error
        values = dict(known)
        return AutoConfig.for_model(values.pop("model_type"), **values)


def _lora_targets(name: str, module: nn.Module, lora: LoraSpec) -> bool:
    """peft's matching: a module name equal to, or ending in '.' + , a target."""
    if not isinstance(module, nn.Linear):
        return False
    if lora.target_modules == "all-linear":
        return not name.endswith("lm_head")
    return any(name == target or name.endswith("." + target) for target in lora.target_modules)


def model_shape(config: Any, name: str, lora: LoraSpec | None = None) -> ModelShape:
    """Sizes of the model `config` describes, from an instance on the meta device (exact for
    any architecture transformers knows, and free: meta tensors hold no memory)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    parameters = sum(p.numel() for p in model.parameters())  # shared (tied) weights once
    layers = model.get_decoder().layers
    layer_parameters = sum(p.numel() for p in layers[0].parameters())
    hidden = int(config.hidden_size)
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    trainable = parameters
    if lora is not None:
        trainable = sum(
            lora.r * (module.in_features + module.out_features)
            for module_name, module in model.named_modules()
            if _lora_targets(module_name, module, lora)
        )
    return ModelShape(
        name=name,
        parameters=parameters,
        trainable=trainable,
        layer_parameters=layer_parameters,
        root_parameters=parameters - layer_parameters * len(layers),
        num_layers=len(layers),
        hidden_size=hidden,
        kv_size=kv_heads * head_dim,
        intermediate_size=int(config.intermediate_size),
        vocab_size=int(config.vocab_size),
        head_trainable=lora is None,
    )


def _activation_bytes_per_token_and_layer(shape: ModelShape, compute_bytes: int) -> float:
    """What one decoder layer (attention + gated MLP, flash/SDPA attention) keeps for backward
    per token: the casts and projections of attention (input, q and k before and after the
    rotary embedding, v, output: 5 hidden + 3 kv widths) and of the MLP (input, gate, up, the
    activation and its product: 1 hidden + 4 intermediate widths) in the compute dtype, and
    the two RMSNorms' float32 intermediates (3 hidden widths each, 4 bytes)."""
    hidden, kv, intermediate = shape.hidden_size, shape.kv_size, shape.intermediate_size
    return compute_bytes * (6 * hidden + 3 * kv + 4 * intermediate) + 2 * 3 * hidden * 4


def estimate_memory(
    shape: ModelShape,
    *,
    precision: Precision,
    strategy: Strategy,
    workers: int,
    batch_size: int,
    max_length: int,
    gradient_checkpointing: bool,
    logprob_chunk_tokens: int,
    frozen_dtype_bytes: int,
    device_type: str = "cuda",
    max_tokens_per_batch: int | None = None,
) -> MemoryPlan:
    """Peak bytes per worker (see the module docstring for each component).

    `frozen_dtype_bytes`: the bytes per weight of frozen weights (LoRA's base) as loaded
    (model.dtype): 2 for bfloat16, 4 for float32.
    """
    sharded = strategy == "fsdp" and workers > 1
    divisor = workers if sharded else 1
    train_bytes = 2 if precision == "bf16-true" else 4
    compute_bytes = 4 if precision == "fp32" else 2
    frozen = shape.parameters - shape.trainable
    frozen_bytes = frozen_dtype_bytes if precision == "bf16-mixed" else train_bytes
    components: dict[str, float] = {
        "weights": (shape.trainable * train_bytes + frozen * frozen_bytes) / divisor,
        "gradients": shape.trainable * train_bytes / divisor,
        "optimizer": shape.trainable * 2 * train_bytes / divisor,
    }
    compute_copy = 0.0
    if sharded:
        gathered = FSDP_LAYERS_IN_FLIGHT * shape.layer_parameters + shape.root_parameters
        # the gathered weights in the compute dtype, and the unsharded gradients of the root
        # group and one layer in the reduce dtype (float32) before their reduce-scatter
        compute_copy = gathered * compute_bytes
        if shape.trainable == shape.parameters:
            compute_copy += (shape.layer_parameters + shape.root_parameters) * train_bytes
    elif precision == "bf16-mixed":
        # autocast's cache: a bf16 copy of every float32 weight a matmul reads, for the whole
        # forward (frozen bf16 weights need none)
        compute_copy = (shape.parameters - frozen if frozen_bytes == 2 else shape.parameters) * 2
    components["compute copy"] = compute_copy

    tokens = max_tokens_per_batch or 2 * batch_size * max_length
    per_layer = _activation_bytes_per_token_and_layer(shape, compute_bytes)
    residual_bytes = 4 if precision != "bf16-true" else 2  # the residual stream's dtype
    if gradient_checkpointing:
        activations = tokens * (shape.num_layers * shape.hidden_size * residual_bytes + per_layer)
    else:
        activations = tokens * shape.num_layers * per_layer
    # the final hidden states, kept for the chunked head's backward
    activations += tokens * shape.hidden_size * (residual_bytes + compute_bytes)
    components["activations"] = activations

    chunk = min(logprob_chunk_tokens, tokens)
    logprobs = 2 * chunk * shape.vocab_size * (4 + compute_bytes)
    if shape.head_trainable and tokens > chunk:
        logprobs += shape.vocab_size * shape.hidden_size * 4
    components["log-probs"] = logprobs
    components["runtime"] = CUDA_RUNTIME_BYTES if device_type == "cuda" else 0.0
    return MemoryPlan(
        shape=shape,
        precision=precision,
        strategy=strategy if workers > 1 else "ddp",
        workers=workers,
        tokens_per_micro_batch=tokens,
        gradient_checkpointing=gradient_checkpointing,
        components=components,
        token_budget=max_tokens_per_batch is not None,
    )


def gpu_share_gb(gpu_memory_gb: float, gpus_per_worker: float) -> float:
    """The memory one worker may use: its fraction of a shared GPU (packed LoRA trials), or
    one GPU's (a worker with several GPUs still trains on one)."""
    return gpu_memory_gb * min(gpus_per_worker, 1.0) if gpus_per_worker > 0 else gpu_memory_gb


def choose_strategy(
    requested: str, plan_of: Any, workers: int, memory_gb: float | None
) -> Strategy:
    """`auto`: ddp when a whole replica fits one worker's memory (or nothing is known about
    it), fsdp when it does not. `plan_of(strategy)` gives the plan under a strategy."""
    if requested in ("ddp", "fsdp"):
        return requested  # type: ignore[return-value]
    if workers <= 1 or memory_gb is None:
        return "ddp"
    return "ddp" if plan_of("ddp").fits(memory_gb) else "fsdp"


def bytes_of_dtype(dtype: torch.dtype) -> int:
    return math.ceil(torch.finfo(dtype).bits / 8)


@dataclass(frozen=True)
class TrialMemory:
    """A trial's plan under the strategy it will train with, and what it is checked against."""

    plan: MemoryPlan
    memory_gb: float | None  # one worker's share of its GPU, when resources.gpu_memory_gb is set

    @property
    def fits(self) -> bool:
        return self.memory_gb is None or self.plan.fits(self.memory_gb)

    def lines(self) -> list[str]:
        lines = self.plan.lines()
        if self.memory_gb is not None:
            verdict = "fits" if self.fits else "does NOT fit"
            lines.append(f"  {verdict} the {self.memory_gb:g} GB each worker has")
        return lines

    def refusal(self) -> str | None:
        if self.fits or self.memory_gb is None:
            return None
        return self.plan.refusal(self.memory_gb)


def trial_strategy(
    model: ModelSpec, data: DataSpec, training: TrainingSpec, resources: ResourcesSpec
) -> Strategy:
    """The strategy a trial trains with: resources.strategy, with `auto` decided by the
    memory plan (which reads the model's config only when it has something to decide)."""
    if resources.strategy != "auto":
        return resources.strategy
    if resources.num_workers <= 1 or resources.gpu_memory_gb is None:
        return "ddp"
    return plan_trial(model, data, training, resources).plan.strategy


def plan_trial(
    model: ModelSpec,
    data: DataSpec,
    training: TrainingSpec,
    resources: ResourcesSpec,
    shape: ModelShape | None = None,
) -> TrialMemory:
    """The memory plan of one trial of these settings, on the device its resources ask for
    (a GPU when gpus_per_worker > 0), under the strategy `resources.strategy` resolves to."""
    device = "cuda" if resources.gpus_per_worker > 0 else "cpu"
    shape = shape or model_shape(model_config(model), model.name, model.lora)
    precision = resolve_precision(training.precision, device)
    frozen_bytes = bytes_of_dtype(resolve_dtype(model, device))
    memory_gb = (
        gpu_share_gb(resources.gpu_memory_gb, resources.gpus_per_worker)
        if resources.gpu_memory_gb is not None and device == "cuda"
        else None
    )

    def plan_of(strategy: Strategy) -> MemoryPlan:
        return estimate_memory(
            shape,
            precision=precision,
            strategy=strategy,
            workers=resources.num_workers,
            batch_size=training.batch_size,
            max_length=data.max_length,
            max_tokens_per_batch=training.max_tokens_per_batch,
            gradient_checkpointing=model.gradient_checkpointing,
            logprob_chunk_tokens=training.logprob_chunk_tokens,
            frozen_dtype_bytes=frozen_bytes,
            device_type=device,
        )

    strategy = choose_strategy(resources.strategy, plan_of, resources.num_workers, memory_gb)
    return TrialMemory(plan_of(strategy), memory_gb)
