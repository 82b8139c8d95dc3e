"""Response log-probs of chosen+rejected in one forward pass, without the vocab-sized tensor.

The plain computation projects every position through the LM head and keeps a
[rows, length, vocab] float32 tensor alive for backward. Here the model body runs once, only the
hidden states of response positions are projected, chunk by chunk, and the backward recomputes
each chunk's softmax instead of storing it: memory is bounded by one chunk of logits.
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from simpo_sweep.engine.batching import IGNORE_INDEX, PairBatch


@dataclass
class ResponseLogps:
    """Per sequence (chosen of every pair, then rejected): response log-prob sum and counts."""

    summed: torch.Tensor  # [2 * pairs], float32, differentiable
    token_counts: torch.Tensor  # [2 * pairs]
    # [2 * pairs], detached: the response tokens' mean-over-vocab logits, summed
    logit_sums: torch.Tensor


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The matmul dtype the plain LM head would use here (autocast's, else the weight's)."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return weight.dtype


class _ChunkedResponseLogps(torch.autograd.Function):
    """log_softmax(hidden @ weight.T)[target] for N response positions, chunk by chunk.

    Nothing vocab-sized is kept between forward and backward: the forward saves the hidden
    states, the targets and the N log-normalisers; the backward recomputes one chunk of logits
    at a time, turns it into the chunk's gradient in place (softmax = exp(logits - lse)) and
    folds it into the hidden and weight gradients. Peak extra memory: one [chunk, vocab]
    float32 block (plus its low-precision copy under bf16) and a weight-sized accumulator;
    with `fused` (compiled kernels) the softmax never materialises in float32, only the
    low-precision logits and gradient of one chunk. The matmuls run in the dtype the plain head
    would use (autocast's, else the weight's); the softmax always computes in float32. Autocast
    is switched off inside so forward and backward recompute bit-identical logits.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        chunk_size: int,
        fused: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = _compute_dtype(hidden, weight)
        log_norm_of = _fused_log_norm() if fused else _chunk_log_norm
        with torch.autocast(hidden.device.type, enabled=False):
            chunk_hidden_all, chunk_weight = hidden.to(dtype), weight.to(dtype)
            count = hidden.shape[0]
            token_logps = torch.empty(count, dtype=torch.float32, device=hidden.device)
            log_norm = torch.empty_like(token_logps)
            for start in range(0, count, chunk_size):
                end = start + chunk_size
                logits = chunk_hidden_all[start:end] @ chunk_weight.T
                target_logits = logits.gather(-1, targets[start:end, None]).squeeze(-1).float()
                chunk_norm = log_norm_of(logits)
                log_norm[start:end] = chunk_norm
                token_logps[start:end] = target_logits - chunk_norm
                del logits
            # mean over the vocabulary of hidden @ W.T is hidden @ mean(W): no vocab pass needed
            # (the mean reduces in float32 without a float32 copy of the weight)
            mean_logits = chunk_hidden_all.float() @ chunk_weight.mean(0, dtype=torch.float32)
        ctx.save_for_backward(hidden, weight, targets, log_norm)
        ctx.chunk_size = chunk_size  # type: ignore[attr-defined]
        ctx.compute_dtype = dtype  # type: ignore[attr-defined]
        ctx.fused = fused  # type: ignore[attr-defined]
        ctx.mark_non_differentiable(mean_logits)
        return token_logps, mean_logits

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx,
        grad_token_logps: torch.Tensor,
        _grad_mean_logits: torch.Tensor,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None, None]:
        hidden, weight, targets, log_norm = ctx.saved_tensors  # type: ignore[attr-defined]
        chunk_size: int = ctx.chunk_size  # type: ignore[attr-defined]
        dtype: torch.dtype = ctx.compute_dtype  # type: ignore[attr-defined]
        fused: bool = ctx.fused  # type: ignore[attr-defined]
        grad_logits_of = _fused_grad_logits() if fused else _chunk_grad_logits
        needs_hidden, needs_weight = ctx.needs_input_grad[:2]  # type: ignore[attr-defined]
        count = hidden.shape[0]
        grad_hidden: torch.Tensor | None = None
        grad_weight: torch.Tensor | None = None
        with (
            torch.profiler.record_function("simpo.lm_head"),
            torch.autocast(hidden.device.type, enabled=False),
        ):
            all_hidden, chunk_weight = hidden.to(dtype), weight.to(dtype)
            scale = grad_token_logps.float()
            if needs_hidden:
                grad_hidden = torch.empty_like(all_hidden)
            if needs_weight:
                # one chunk writes its product directly; several accumulate, in float32 when
                # the matmuls run in a low-precision dtype
                several = count > chunk_size
                accumulate_dtype = torch.float32 if several and dtype.itemsize < 4 else dtype
                grad_weight = torch.zeros(
                    weight.shape, dtype=accumulate_dtype, device=weight.device
                )
            for start in range(0, count, chunk_size):
                end = start + chunk_size
                chunk_hidden = all_hidden[start:end]
                grad_logits = grad_logits_of(
                    chunk_hidden @ chunk_weight.T,
                    log_norm[start:end],
                    scale[start:end],
                    targets[start:end],
                )
                if grad_hidden is not None:
                    torch.mm(grad_logits, chunk_weight, out=grad_hidden[start:end])
                if grad_weight is not None:
                    if grad_weight.dtype == dtype:
                        grad_weight.addmm_(grad_logits.T, chunk_hidden)
                    else:
                        grad_weight += grad_logits.T @ chunk_hidden
                del grad_logits
        return (
            grad_hidden.to(hidden.dtype) if grad_hidden is not None else None,
            grad_weight.to(weight.dtype) if grad_weight is not None else None,
            None,
            None,
            None,
        )


def _chunk_log_norm(logits: torch.Tensor) -> torch.Tensor:
    """float32 logsumexp over the vocabulary, consuming `logits` (a fresh matmul output).

    In place, so that eager mode holds one float32 copy of the chunk at most.
    """
    logits = logits.float()
    maxima = logits.amax(-1, keepdim=True)
    return logits.sub_(maxima).exp_().sum(-1).log_().add_(maxima.squeeze(-1))


def _chunk_grad_logits(
    logits: torch.Tensor, log_norm: torch.Tensor, scale: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """d(scale * logp[target]) / d logits = scale * (onehot(target) - softmax), in logits' dtype.

    Built in place in a float32 copy of the recomputed logits (softmax = exp(logits - lse)).
    """
    low_dtype = logits.dtype
    grad = logits.float()
    grad.sub_(log_norm[:, None]).exp_().mul_(-scale[:, None])
    grad.scatter_add_(-1, targets[:, None], scale[:, None])
    return grad.to(low_dtype)


def _fused_log_norm_eager(logits: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(logits.float(), dim=-1)


def _fused_grad_logits_eager(
    logits: torch.Tensor, log_norm: torch.Tensor, scale: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    vocab = torch.arange(logits.shape[-1], device=logits.device)
    onehot = (vocab[None, :] == targets[:, None]).float()
    softmax = (logits.float() - log_norm[:, None]).exp()
    return ((onehot - softmax) * scale[:, None]).to(logits.dtype)


_COMPILED: dict[str, Callable[..., torch.Tensor]] = {}


def _compiled(name: str, function: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    # Compiled once per process, on first use: the eager chunk math makes about eight float32
    # passes over each [chunk, vocab] block, the compiled kernels one pass that reads the
    # low-precision logits and writes the low-precision gradient.
    if name not in _COMPILED:
        _COMPILED[name] = torch.compile(function, fullgraph=True, dynamic=True)
    return _COMPILED[name]


def _fused_log_norm() -> Callable[..., torch.Tensor]:
    return _compiled("log_norm", _fused_log_norm_eager)


def _fused_grad_logits() -> Callable[..., torch.Tensor]:
    return _compiled("grad_logits", _fused_grad_logits_eager)


def fused_softmax_available(device: torch.device) -> bool:
    """Compiled chunk kernels by default only where inductor emits Triton (CUDA)."""
    if device.type != "cuda":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


TORCH_VARLEN_ATTENTION = "torch_varlen"
# varlen_attn's keyword names, read once (not inside a torch.compile'd layer)
_VARLEN_PARAMETERS: frozenset[str] = frozenset()


def _varlen_causal_options() -> dict[str, Any]:
    # torch 2.9-2.11 spell causality is_causal, later versions as a (-1, 0) window
    if "is_causal" in _VARLEN_PARAMETERS:
        return {"is_causal": True}
    return {"window_size": (-1, 0)}


def _torch_varlen_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Causal attention over one packed row, each sequence on its own (transformers interface).

    query [1, heads, tokens, dim], key/value [1, kv_heads, tokens, dim]; the boundaries come
    from `cu_seq_lens_q` / `max_length_q` (PairBatch.model_inputs of a one-row packed batch).
    CUDA: torch's flash kernel for variable-length batches (cost per sequence, no padding, no
    mask); elsewhere a per-sequence sdpa loop with the same semantics, for tests.
    """
    cu_seq_lens = kwargs.get("cu_seq_lens_q")
    max_length = kwargs.get("max_length_q")
    if cu_seq_lens is None or max_length is None or query.shape[0] != 1:
        raise ValueError(
            "torch_varlen attention needs one packed row and its cu_seq_lens (a batch from "
            "collate_packed(examples) without max_row_tokens)"
        )
    if dropout or kwargs.get("sliding_window"):
        raise NotImplementedError("torch_varlen attention has no dropout and no sliding window")
    q, k, v = (tensor[0].transpose(0, 1).contiguous() for tensor in (query, key, value))
    group = q.shape[1] // k.shape[1]
    if query.is_cuda:
        from torch.nn.attention.varlen import varlen_attn

        if torch.is_autocast_enabled("cuda"):
            # varlen_attn is a custom op that autocast does not cast (sdpa it does), and under
            # bf16-mixed the rotary embedding leaves q and k in float32 (float32 residual
            # stream): flash attention takes bf16/fp16 only, so cast as autocast would.
            compute = torch.get_autocast_dtype("cuda")
            q, k, v = q.to(compute), k.to(compute), v.to(compute)

        options = _varlen_causal_options()
        if "scale" in _VARLEN_PARAMETERS:
            options["scale"] = scaling
        elif scaling is not None and abs(scaling - q.shape[-1] ** -0.5) > 1e-6:
            raise NotImplementedError("this torch's varlen_attn has no scale argument")
        if group > 1 and _VARLEN_PARAMETERS and "enable_gqa" in _VARLEN_PARAMETERS:
            options["enable_gqa"] = True
        elif group > 1:
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        out = varlen_attn(q, k, v, cu_seq_lens, cu_seq_lens, max_length, max_length, **options)
        assert isinstance(out, torch.Tensor)  # no auxiliary outputs were asked for
        return out.unsqueeze(0), None
    bounds = cu_seq_lens.tolist()
    outputs = []
    for start, end in itertools.pairwise(bounds):
        # [heads, length, dim] per sequence
        sq, sk, sv = (t[start:end].transpose(0, 1) for t in (q, k, v))
        attended = torch.nn.functional.scaled_dot_product_attention(
            sq, sk, sv, is_causal=True, scale=scaling, enable_gqa=group > 1
        )
        outputs.append(attended.transpose(0, 1))
    return torch.cat(outputs).unsqueeze(0), None


def register_torch_varlen_attention() -> str:
    """Make attn_implementation="torch_varlen" available to transformers models; its name.

    No mask function is registered on purpose: transformers then builds no mask at all, and the
    boundaries travel as cu_seq_lens. Collate with `choose_layout`, which packs one row for it.
    """
    from transformers import AttentionInterface

    global _VARLEN_PARAMETERS
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # torch < 2.9: the CPU fallback still works; CUDA calls will fail
        pass
    else:
        _VARLEN_PARAMETERS = frozenset(inspect.signature(varlen_attn).parameters)
    AttentionInterface.register(TORCH_VARLEN_ATTENTION, _torch_varlen_attention)
    return TORCH_VARLEN_ATTENTION


def _supports_response_only_head(model: nn.Module) -> bool:
    """Models that post-process logits (soft-capping, scaling) need the plain head."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "final_logit_softcapping", None):
        return False
    if getattr(config, "logit_scale", None) not in (None, 1, 1.0):
        return False
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    return isinstance(head, nn.Linear) and head.bias is None and hasattr(model, "get_decoder")


class PolicyLogps(nn.Module):
    """Wraps a causal LM so that one `forward(batch)` returns response log-probs per row.

    A single module (not two calls into the model) so that DistributedDataParallel wrapping it
    sees one forward per step and synchronises gradients as usual.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        chunk_tokens: int = 1024,
        response_only: bool = True,
        fused_softmax: bool | None = None,
    ):
        """`fused_softmax` None: compiled chunk kernels on CUDA with Triton, eager elsewhere."""
        super().__init__()
        self.model = model
        self.chunk_tokens = chunk_tokens
        self.response_only = response_only and _supports_response_only_head(model)
        self.fused_softmax = fused_softmax
        # fused_softmax None, resolved once per device type rather than on every forward (it
        # tries an import); per device type because the model may move after construction
        self._fused_by_device_type: dict[str, bool] = {}

    def _use_fused_softmax(self, device: torch.device) -> bool:
        if self.fused_softmax is not None:
            return self.fused_softmax
        fused = self._fused_by_device_type.get(device.type)
        if fused is None:
            fused = self._fused_by_device_type[device.type] = fused_softmax_available(device)
        return fused

    def _as_model_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """A boolean 4D mask as the model's attention reads it (transformers passes it as is).

        sdpa takes booleans (True: attend); eager adds the mask to the scores, so it needs 0 /
        the dtype's minimum, in the weights' floating dtype.
        """
        config = getattr(self.model, "config", None)
        if getattr(config, "_attn_implementation", None) != "eager":
            return mask
        dtype = next(
            (p.dtype for p in self.model.parameters() if p.is_floating_point()), torch.float32
        )
        if torch.is_autocast_enabled(mask.device.type):
            dtype = torch.get_autocast_dtype(mask.device.type)
        additive = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
        return additive.masked_fill_(~mask, torch.finfo(dtype).min)

    def forward(self, batch: PairBatch) -> ResponseLogps:
        if batch.predicted_from is None:
            # position t predicts token t+1: responses are read off the shifted labels
            shifted_labels = batch.labels[:, 1:]
            response_mask = shifted_labels != IGNORE_INDEX
            rows, positions = response_mask.nonzero(as_tuple=True)
            targets = shifted_labels[rows, positions]
            sequence_of_token = batch.sequence_ids[:, 1:][rows, positions]
        else:
            # shared prefix: the token at t is predicted from predicted_from[t] (t - 1, except
            # the first rejected token, predicted from the prompt's last position)
            rows, label_positions = (batch.labels != IGNORE_INDEX).nonzero(as_tuple=True)
            targets = batch.labels[rows, label_positions]
            sequence_of_token = batch.sequence_ids[rows, label_positions]
            positions = batch.predicted_from[rows, label_positions]
        model_inputs = batch.model_inputs()
        mask = model_inputs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.ndim == 4 and mask.dtype == torch.bool:
            model_inputs["attention_mask"] = self._as_model_mask(mask)

        if self.response_only:
            decoder = self.model.get_decoder()  # type: ignore[operator]
            hidden = decoder(**model_inputs, use_cache=False).last_hidden_state
            head = self.model.get_output_embeddings()  # type: ignore[operator]
            response_hidden = hidden[rows, positions]
            # a labelled range, so that profiles (bench/engine_vs_trl.py --profile) can tell the
            # LM head's time from the body's; costs nothing measurable when nobody profiles
            with torch.profiler.record_function("simpo.lm_head"):
                token_logps, mean_logits = _ChunkedResponseLogps.apply(
                    response_hidden,
                    head.weight,
                    targets,
                    self.chunk_tokens,
                    self._use_fused_softmax(response_hidden.device),
                )
        else:
            logits = self.model(**model_inputs, use_cache=False).logits[rows, positions]
            log_probs = torch.log_softmax(logits.float(), dim=-1)
            token_logps = log_probs.gather(-1, targets[:, None]).squeeze(-1)
            mean_logits = logits.detach().float().mean(-1)

        num_sequences = 2 * batch.num_pairs
        zeros = torch.zeros(num_sequences, dtype=torch.float32, device=targets.device)
        return ResponseLogps(
            summed=zeros.index_add(0, sequence_of_token, token_logps),
            token_counts=torch.bincount(sequence_of_token, minlength=num_sequences),
            logit_sums=zeros.index_add(0, sequence_of_token, mean_logits.detach()),
        )
