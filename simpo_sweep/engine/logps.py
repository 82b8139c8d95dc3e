"""Response log-probs of chosen+rejected in one forward pass, without the vocab-sized tensor.

The plain computation projects every position through the LM head and keeps a
[rows, length, vocab] float32 tensor alive for backward. Here the model body runs once, only the
hidden states of response positions are projected, chunk by chunk, and the backward recomputes
each chunk's softmax instead of storing it: memory is bounded by one chunk of logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from simpo_sweep.engine.batching import PairBatch

IGNORE_INDEX = -100


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
    float32 block (plus its low-precision copy under bf16) and a weight-sized accumulator.
    The matmuls run in the dtype the plain head would use (autocast's, else the weight's); the
    softmax always runs in float32. Autocast is switched off inside so forward and backward
    recompute bit-identical logits.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        chunk_size: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = _compute_dtype(hidden, weight)
        with torch.autocast(hidden.device.type, enabled=False):
            chunk_hidden_all, chunk_weight = hidden.to(dtype), weight.to(dtype)
            count = hidden.shape[0]
            token_logps = torch.empty(count, dtype=torch.float32, device=hidden.device)
            log_norm = torch.empty_like(token_logps)
            for start in range(0, count, chunk_size):
                end = start + chunk_size
                logits = (chunk_hidden_all[start:end] @ chunk_weight.T).float()
                target_logits = logits.gather(-1, targets[start:end, None]).squeeze(-1)
                # logsumexp in place: the chunk's logits are not needed afterwards
                maxima = logits.amax(-1, keepdim=True)
                chunk_norm = logits.sub_(maxima).exp_().sum(-1).log_().add_(maxima.squeeze(-1))
                log_norm[start:end] = chunk_norm
                token_logps[start:end] = target_logits - chunk_norm
                del logits
            # mean over the vocabulary of hidden @ W.T is hidden @ mean(W): no vocab pass needed
            mean_logits = chunk_hidden_all.float() @ chunk_weight.float().mean(0)
        ctx.save_for_backward(hidden, weight, targets, log_norm)
        ctx.chunk_size = chunk_size  # type: ignore[attr-defined]
        ctx.compute_dtype = dtype  # type: ignore[attr-defined]
        ctx.mark_non_differentiable(mean_logits)
        return token_logps, mean_logits

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx,
        grad_token_logps: torch.Tensor,
        _grad_mean_logits: torch.Tensor,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:
        hidden, weight, targets, log_norm = ctx.saved_tensors  # type: ignore[attr-defined]
        chunk_size: int = ctx.chunk_size  # type: ignore[attr-defined]
        dtype: torch.dtype = ctx.compute_dtype  # type: ignore[attr-defined]
        needs_hidden, needs_weight = ctx.needs_input_grad[:2]  # type: ignore[attr-defined]
        count = hidden.shape[0]
        grad_hidden: torch.Tensor | None = None
        grad_weight: torch.Tensor | None = None
        with torch.autocast(hidden.device.type, enabled=False):
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
                chunk_scale = scale[start:end, None]
                # d logp[target] / d logits = onehot(target) - softmax(logits), times the
                # upstream gradient, built in place in the recomputed logits
                grad_logits = (chunk_hidden @ chunk_weight.T).float()
                grad_logits.sub_(log_norm[start:end, None]).exp_().mul_(-chunk_scale)
                grad_logits.scatter_add_(-1, targets[start:end, None], chunk_scale)
                grad_logits_low = grad_logits.to(dtype)
                del grad_logits
                if grad_hidden is not None:
                    torch.mm(grad_logits_low, chunk_weight, out=grad_hidden[start:end])
                if grad_weight is not None:
                    if grad_weight.dtype == dtype:
                        grad_weight.addmm_(grad_logits_low.T, chunk_hidden)
                    else:
                        grad_weight += grad_logits_low.T @ chunk_hidden
                del grad_logits_low
        return (
            grad_hidden.to(hidden.dtype) if grad_hidden is not None else None,
            grad_weight.to(weight.dtype) if grad_weight is not None else None,
            None,
            None,
        )


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

    def __init__(self, model: nn.Module, *, chunk_tokens: int = 1024, response_only: bool = True):
        super().__init__()
        self.model = model
        self.chunk_tokens = chunk_tokens
        self.response_only = response_only and _supports_response_only_head(model)

    def forward(self, batch: PairBatch) -> ResponseLogps:
        # position t predicts token t+1: responses are read off the shifted labels
        shifted_labels = batch.labels[:, 1:]
        response_mask = shifted_labels != IGNORE_INDEX
        rows, positions = response_mask.nonzero(as_tuple=True)
        targets = shifted_labels[rows, positions]
        sequence_of_token = batch.sequence_ids[:, 1:][rows, positions]
        model_inputs = batch.model_inputs()

        if self.response_only:
            decoder = self.model.get_decoder()  # type: ignore[operator]
            hidden = decoder(**model_inputs, use_cache=False).last_hidden_state[:, :-1]
            head = self.model.get_output_embeddings()  # type: ignore[operator]
            token_logps, mean_logits = _ChunkedResponseLogps.apply(
                hidden[rows, positions], head.weight, targets, self.chunk_tokens
            )
        else:
            logits = self.model(**model_inputs, use_cache=False).logits[:, :-1][rows, positions]
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
