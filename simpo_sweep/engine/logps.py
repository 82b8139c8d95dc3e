"""Sequence log-probs of chosen+rejected responses in one forward pass, without the vocab-sized tensor.

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
    logit_sums: torch.Tensor  # [2 * pairs], detached: response tokens' mean-over-vocab logit, summed


class _ChunkedResponseLogps(torch.autograd.Function):
    """log_softmax(hidden @ weight.T)[target] for N response positions, chunk by chunk."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        targets: torch.Tensor,
        chunk_size: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        token_logps = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        mean_logits = torch.empty_like(token_logps)
        for start in range(0, hidden.shape[0], chunk_size):
            end = start + chunk_size
            logits = (hidden[start:end] @ weight.T).float()
            mean_logits[start:end] = logits.mean(-1)
            log_norm = torch.logsumexp(logits, dim=-1)
            token_logps[start:end] = logits.gather(-1, targets[start:end, None]).squeeze(-1) - log_norm
        ctx.save_for_backward(hidden, weight, targets)
        ctx.chunk_size = chunk_size  # type: ignore[attr-defined]
        ctx.mark_non_differentiable(mean_logits)
        return token_logps, mean_logits

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        grad_token_logps: torch.Tensor,
        _grad_mean_logits: torch.Tensor,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:
        hidden, weight, targets = ctx.saved_tensors  # type: ignore[attr-defined]
        chunk_size: int = ctx.chunk_size  # type: ignore[attr-defined]
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None  # type: ignore[attr-defined]
        grad_weight = (
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            if ctx.needs_input_grad[1]  # type: ignore[attr-defined]
            else None
        )
        for start in range(0, hidden.shape[0], chunk_size):
            end = start + chunk_size
            chunk_hidden = hidden[start:end]
            logits = (chunk_hidden @ weight.T).float()
            # d logp[target] / d logits = onehot(target) - softmax(logits)
            grad_logits = -torch.softmax(logits, dim=-1)
            grad_logits.scatter_add_(
                -1, targets[start:end, None], torch.ones_like(grad_logits[:, :1])
            )
            grad_logits *= grad_token_logps[start:end, None]
            grad_logits = grad_logits.to(hidden.dtype)
            if grad_hidden is not None:
                grad_hidden[start:end] = grad_logits @ weight
            if grad_weight is not None:
                grad_weight += (grad_logits.T @ chunk_hidden).float()
        return (
            grad_hidden,
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
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
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
            head: nn.Linear = self.model.get_output_embeddings()  # type: ignore[operator,assignment]
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
