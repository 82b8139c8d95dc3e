"""Every fast log-prob path against the plain computation (issue 6).

- padded vs packed (one row, and rows bounded by the longest sequence) vs each sequence run on
  its own, for the sdpa and eager attention implementations, ragged lengths, several layers;
- the response-only chunked head vs the plain full-logits path: values and the gradient of every
  parameter, chunk sizes 1, 7 and larger than the number of response tokens, tied and untied;
- the plain path vs a naive per-token Python loop;
- bf16 weights on CPU: float32 log-probs close to the float32 model's;
- memory: the chunked path saves nothing vocabulary-sized for backward and never creates a
  tensor larger than one chunk of logits (or a weight-sized gradient);
- the fused (torch.compile'd) chunk kernels, the CUDA default, against the eager chunk math and
  the plain path (compiled by inductor on CPU where a C++ compiler exists);
- the automatic padded/packed layout choice per attention implementation, and its log line;
- the project's torch_varlen attention (one packed row, boundaries as cu_seq_lens, no mask)
  against the padded sdpa path (its CPU fallback here; torch's varlen flash kernel on CUDA).

Tolerances (float32 unless said): log-prob sums rtol 1e-5 / atol 1e-5 (measured differences
are below 1e-5 on sums of magnitude ~100); gradients rtol 1e-4 / atol 1e-6 (summation order
differs between chunked and plain matmuls). bf16: per-token average log-prob within 0.05 nats
of the float32 model, and within 0.02 nats of the bf16 plain path.
"""

from __future__ import annotations

import copy
import itertools
import logging
import shutil
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import LlamaConfig, LlamaForCausalLM

from simpo_sweep.engine import logps as logps_module
from simpo_sweep.engine.batching import (
    Layout,
    PaddingFree,
    PairBatch,
    PairExample,
    choose_layout,
    collate_for_attention,
    collate_layout,
    collate_packed,
    collate_padded,
    packing_layout,
)
from simpo_sweep.engine.logps import (
    PolicyLogps,
    ResponseLogps,
    _chunk_grad_logits,
    _chunk_log_norm,
    _fused_grad_logits,
    _fused_grad_logits_eager,
    _fused_log_norm,
    _fused_log_norm_eager,
    fused_softmax_available,
    register_torch_varlen_attention,
)
from simpo_sweep.engine.loss import simpo_objective
from simpo_sweep.spec.models import SimPOSpec

VALUES: dict[str, Any] = {"rtol": 1e-5, "atol": 1e-5}
GRADS: dict[str, Any] = {"rtol": 1e-4, "atol": 1e-6}
PAD = 0


def _model(
    *,
    attn: str = "sdpa",
    vocab: int = 211,
    hidden: int = 32,
    layers: int = 3,
    tie: bool = False,
    seed: int = 0,
) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
        # a wider init than the default 0.02 so that the distributions are far from uniform
        # and a wrong token, position or mask shows in the numbers
        initializer_range=0.2,
        pad_token_id=PAD,
        bos_token_id=1,
        eos_token_id=2,
    )
    config._attn_implementation = attn
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).float()


def _examples(
    num_pairs: int = 5,
    vocab: int = 211,
    max_prompt: int = 20,
    max_response: int = 30,
    seed: int = 1,
) -> list[PairExample]:
    """Ragged lengths, including one-token prompts and responses."""
    generator = torch.Generator().manual_seed(seed)

    def tokens(length: int) -> list[int]:
        return torch.randint(3, vocab, (length,), generator=generator).tolist()

    def length(high: int) -> int:
        return int(torch.randint(1, high + 1, (1,), generator=generator))

    examples = [PairExample(tokens(1), tokens(1), tokens(max_response))]
    examples += [
        PairExample(tokens(length(max_prompt)), tokens(length(max_response)), tokens(length(5)))
        for _ in range(num_pairs - 1)
    ]
    return examples


def _alone(policy: PolicyLogps, examples: Sequence[PairExample]) -> torch.Tensor:
    """Each sequence on its own: no padding, no packing. Chosen of every pair, then rejected."""
    sums = []
    for field in ("chosen_ids", "rejected_ids"):
        for example in examples:
            response = getattr(example, field)
            single = collate_padded([PairExample(example.prompt_ids, response, response)], PAD)
            sums.append(policy(single).summed[0])
    return torch.stack(sums)


LAYOUTS: dict[str, Callable[[Sequence[PairExample]], PairBatch]] = {
    "padded": lambda examples: collate_padded(examples, PAD),
    "packed_one_row": lambda examples: collate_packed(examples, pad_token_id=PAD),
    "packed_rows": lambda examples: collate_packed(examples, max_row_tokens=0, pad_token_id=PAD),
}


# ---- padded vs packed --------------------------------------------------------------------------


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_layouts_match_each_sequence_alone(attn: str, layout: str) -> None:
    model = _model(attn=attn).eval()
    examples = _examples()
    policy = PolicyLogps(model, response_only=False)
    with torch.no_grad():
        expected = _alone(policy, examples)
        got = policy(LAYOUTS[layout](examples))
    torch.testing.assert_close(got.summed, expected, **VALUES)
    expected_counts = [len(e.chosen_ids) for e in examples] + [
        len(e.rejected_ids) for e in examples
    ]
    assert got.token_counts.tolist() == expected_counts


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_gradients_match_padded(attn: str) -> None:
    examples = _examples()
    grads = {}
    for layout in ("padded", "packed_one_row", "packed_rows"):
        model = _model(attn=attn)
        loss, _ = simpo_objective(PolicyLogps(model)(LAYOUTS[layout](examples)), SimPOSpec())
        loss.backward()
        grads[layout] = {name: p.grad for name, p in model.named_parameters()}
    for layout in ("packed_one_row", "packed_rows"):
        for name, grad in grads["padded"].items():
            torch.testing.assert_close(grads[layout][name], grad, **GRADS, msg=f"{layout} {name}")


def test_packing_without_position_restarts_would_be_caught() -> None:
    """The equality above is not vacuous: packed rows whose positions run on mix sequences."""
    model = _model().eval()
    examples = _examples()
    policy = PolicyLogps(model, response_only=False)
    packed = collate_packed(examples)
    assert packed.position_ids is not None
    broken = PairBatch(
        packed.input_ids,
        packed.labels,
        packed.sequence_ids,
        None,
        torch.arange(packed.input_ids.shape[1])[None],
        packed.num_pairs,
        packed.num_tokens,
    )
    with torch.no_grad():
        good, bad = policy(packed).summed, policy(broken).summed
    assert (good - bad).abs().max() > 1e-2


def test_packed_rows_layout() -> None:
    examples = _examples(num_pairs=8, max_prompt=6, max_response=12, seed=3)
    lengths = [len(e.prompt_ids) + len(e.chosen_ids) for e in examples]
    lengths += [len(e.prompt_ids) + len(e.rejected_ids) for e in examples]
    batch = collate_packed(examples, max_row_tokens=0, pad_token_id=PAD)
    assert batch.position_ids is not None and batch.attention_mask is None
    assert batch.input_ids.shape[1] == max(lengths)  # rows never longer than the longest sequence
    assert batch.input_ids.shape[0] < len(lengths)  # and fewer rows than the padded layout
    assert batch.num_tokens == sum(lengths)
    for layout in LAYOUTS.values():
        # an int counted at collate time, equal to the real tokens the tensors hold
        collated = layout(examples)
        assert type(collated.num_tokens) is int
        assert collated.num_tokens == int((collated.sequence_ids >= 0).sum()) == sum(lengths)
    for index, length in enumerate(lengths):
        where = (batch.sequence_ids == index).nonzero()
        assert len(where) == length and where[:, 0].unique().numel() == 1  # whole, in one row
        assert batch.position_ids[batch.sequence_ids == index].tolist() == list(range(length))
    padding = batch.sequence_ids < 0
    assert bool((batch.input_ids[padding] == PAD).all())
    assert bool((batch.labels[padding] == -100).all())
    wide = collate_packed(examples, max_row_tokens=10_000)
    assert wide.input_ids.shape[0] == 1


def test_layout_per_attention_implementation() -> None:
    assert packing_layout("flash_attention_2") == "packed_one_row"
    assert packing_layout("flex_attention") == "packed_one_row"
    assert packing_layout("sdpa") == "packed_rows"
    assert packing_layout("eager") == "packed_rows"
    assert packing_layout("some_kernel_hub_attention") == "padded"
    assert packing_layout(None) == "padded"
    examples = _examples()
    assert collate_for_attention(examples, "flash_attention_2", PAD).input_ids.shape[0] == 1
    assert collate_for_attention(examples, None, PAD).attention_mask is not None


# ---- response-only chunked head vs the plain path -----------------------------------------------


def _run(model: LlamaForCausalLM, batch: PairBatch, **policy: Any) -> tuple[ResponseLogps, dict]:
    model.zero_grad(set_to_none=True)
    out = PolicyLogps(model, **policy)(batch)
    loss, _ = simpo_objective(out, SimPOSpec(sft_weight=0.3))
    # plus a weighting that differs per sequence, so every token's upstream gradient differs
    weights = torch.linspace(0.5, 1.5, out.summed.shape[0])
    (loss + (weights * out.summed).sum() / 100).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("chunk", [1, 7, 100_000])
def test_chunked_head_matches_plain_values_and_gradients(chunk: int, tie: bool) -> None:
    model = _model(tie=tie)
    batch = collate_packed(_examples(), max_row_tokens=0, pad_token_id=PAD)
    response_tokens = int((batch.labels != -100).sum())
    assert 7 < response_tokens < 100_000
    plain, plain_grads = _run(model, batch, response_only=False)
    chunked, chunked_grads = _run(model, batch, response_only=True, chunk_tokens=chunk)
    assert PolicyLogps(model, response_only=True).response_only  # the fast path really ran
    torch.testing.assert_close(chunked.summed, plain.summed, **VALUES)
    assert torch.equal(chunked.token_counts, plain.token_counts)
    torch.testing.assert_close(chunked.logit_sums, plain.logit_sums, **VALUES)
    assert set(chunked_grads) == {name for name, _ in model.named_parameters()}
    assert set(chunked_grads) == set(plain_grads)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(chunked_grads[name], grad, **GRADS, msg=name)


def test_plain_path_matches_naive_token_loop() -> None:
    model = _model().eval()
    examples = _examples()
    naive = []
    with torch.no_grad():
        for field in ("chosen_ids", "rejected_ids"):
            for example in examples:
                prompt, response = list(example.prompt_ids), list(getattr(example, field))
                tokens = prompt + response
                logits = model(input_ids=torch.tensor([tokens])).logits[0].double()
                total = torch.zeros((), dtype=torch.float64)
                for t in range(len(prompt), len(tokens)):
                    total += torch.log_softmax(logits[t - 1], dim=-1)[tokens[t]]
                naive.append(total)
        expected = torch.stack(naive).float()
        for response_only in (False, True):
            got = PolicyLogps(model, response_only=response_only)(collate_padded(examples, PAD))
            torch.testing.assert_close(got.summed, expected, **VALUES)


# ---- bf16 weights on CPU ------------------------------------------------------------------------


def test_bf16_weights_give_float32_logps_close_to_float32_model() -> None:
    model = _model()
    model_bf16 = copy.deepcopy(model).bfloat16()
    batch = collate_packed(_examples(), max_row_tokens=0, pad_token_id=PAD)
    with torch.no_grad():
        reference = PolicyLogps(model)(batch)
        plain_bf16 = PolicyLogps(model_bf16, response_only=False)(batch)
    chunked_bf16 = PolicyLogps(model_bf16, chunk_tokens=7)(batch)
    assert chunked_bf16.summed.dtype == torch.float32
    counts = reference.token_counts
    average = chunked_bf16.summed / counts
    torch.testing.assert_close(average, reference.summed / counts, rtol=0, atol=0.05)
    torch.testing.assert_close(average, plain_bf16.summed / counts, rtol=0, atol=0.02)
    chunked_bf16.summed.sum().backward()
    head = model_bf16.get_output_embeddings().weight
    assert head.grad is not None and head.grad.dtype == torch.bfloat16
    assert bool(head.grad.isfinite().all()) and bool(head.grad.abs().sum() > 0)


# ---- memory ---------------------------------------------------------------------------------


class _LargestOutput(TorchDispatchMode):
    """Largest tensor (numel) any operator creates, forward and backward."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self.largest = max(self.largest, leaf.numel())
        return out


def _largest_saved(model: LlamaForCausalLM, batch: PairBatch, **policy: Any) -> tuple[int, int]:
    """(largest non-parameter tensor autograd keeps for backward, largest tensor created)."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    largest = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal largest
        if tensor.untyped_storage().data_ptr() not in parameters:
            largest = max(largest, tensor.numel())
        return tensor

    with _LargestOutput() as created:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            out = PolicyLogps(model, **policy)(batch)
        loss, _ = simpo_objective(out, SimPOSpec())
        loss.backward()
    return largest, created.largest


def test_chunked_backward_memory_is_bounded_by_the_chunk() -> None:
    vocab, hidden, chunk = 32_768, 16, 8
    model = _model(vocab=vocab, hidden=hidden, layers=2)
    batch = collate_packed(
        _examples(num_pairs=3, vocab=vocab, max_prompt=6, max_response=10, seed=5),
        max_row_tokens=0,
        pad_token_id=PAD,
    )
    response_tokens = int((batch.labels != -100).sum())
    assert response_tokens > 2 * max(chunk, hidden)

    saved, created = _largest_saved(model, batch, chunk_tokens=chunk)
    # nothing per-token and vocabulary-sized survives to backward: not even one row of logits
    assert saved < vocab
    # the largest thing ever created is one chunk of logits or a weight-sized gradient
    assert created <= max(chunk, hidden) * vocab

    # the same measurements catch the plain path, which keeps [tokens, vocab] logits
    plain_saved, plain_created = _largest_saved(model, batch, response_only=False)
    assert plain_saved >= response_tokens * vocab
    assert plain_created >= response_tokens * vocab


# ---- fused (compiled) chunk kernels -------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_chunk_math_matches_eager(dtype: torch.dtype) -> None:
    """The compiled kernels (default on CUDA) compute what the in-place eager chunk math does.

    Checked on their eager definitions (every device) and compiled by inductor where this
    machine can compile (CPU needs a C++ compiler; CUDA, Triton).
    """
    generator = torch.Generator().manual_seed(0)
    logits = (torch.randn(37, 503, generator=generator) * 4).to(dtype)
    targets = torch.randint(0, 503, (37,), generator=generator)
    scale = torch.randn(37, generator=generator)
    log_norm = _chunk_log_norm(logits.clone())
    expected_grad = _chunk_grad_logits(logits.clone(), log_norm, scale, targets)
    reference = torch.log_softmax(logits.double(), -1)
    torch.testing.assert_close(log_norm.double(), -reference[:, 0] + logits[:, 0].double())
    kernels = [(_fused_log_norm_eager, _fused_grad_logits_eager)]
    if shutil.which("cc") or shutil.which("gcc"):
        kernels.append((_fused_log_norm(), _fused_grad_logits()))
    tolerance: dict[str, Any] = {} if dtype == torch.float32 else {"rtol": 1.6e-2, "atol": 1e-5}
    for log_norm_of, grad_of in kernels:
        torch.testing.assert_close(log_norm_of(logits), log_norm, rtol=1e-6, atol=1e-5)
        grad = grad_of(logits, log_norm, scale, targets)
        assert grad.dtype == dtype
        torch.testing.assert_close(grad, expected_grad, **tolerance)


@pytest.mark.skipif(not shutil.which("cc"), reason="inductor on CPU needs a C++ compiler")
def test_fused_head_matches_plain_values_and_gradients() -> None:
    model = _model()
    batch = collate_packed(_examples(), max_row_tokens=0, pad_token_id=PAD)
    plain, plain_grads = _run(model, batch, response_only=False)
    fused, fused_grads = _run(model, batch, chunk_tokens=7, fused_softmax=True)
    torch.testing.assert_close(fused.summed, plain.summed, **VALUES)
    torch.testing.assert_close(fused.logit_sums, plain.logit_sums, **VALUES)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, **GRADS, msg=name)


def test_fused_softmax_is_the_cuda_default_only() -> None:
    assert not fused_softmax_available(torch.device("cpu"))


def test_fused_softmax_default_is_resolved_once_not_every_forward(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    asked: list[str] = []

    def available(device: torch.device) -> bool:
        asked.append(device.type)
        return False

    monkeypatch.setattr(logps_module, "fused_softmax_available", available)
    policy = PolicyLogps(_model().eval(), chunk_tokens=7)
    batch = collate_packed(_examples(), max_row_tokens=0, pad_token_id=PAD)
    with torch.no_grad():
        first, second = policy(batch), policy(batch)

    assert policy.response_only and asked == ["cpu"]
    torch.testing.assert_close(first.summed, second.summed)


# ---- the automatic layout choice ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("padding_free", "attn", "layout"),
    [
        ("auto", "flash_attention_2", "packed_one_row"),
        ("auto", "flash_attention_3", "packed_one_row"),
        ("auto", "flex_attention", "packed_one_row"),
        ("auto", "sdpa", "packed_rows"),
        ("auto", "eager", "packed_rows"),
        ("auto", "some_kernel_hub_attention", "padded"),
        ("auto", None, "padded"),
        ("on", "sdpa", "packed_rows"),
        ("on", "flash_attention_2", "packed_one_row"),
        ("off", "flash_attention_2", "padded"),
        ("off", "sdpa", "padded"),
    ],
)
def test_layout_choice_is_automatic_and_logged(
    padding_free: PaddingFree, attn: str | None, layout: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="simpo_sweep.engine.batching"):
        assert choose_layout(padding_free, attn) == layout
    (record,) = caplog.records
    assert record.levelno == logging.INFO
    message = record.getMessage()
    assert f"batch layout {layout}" in message and f"padding_free={padding_free}" in message
    if padding_free != "off":
        assert repr(attn) in message  # the reason names the attention implementation


def test_padding_free_on_refuses_an_unknown_attention() -> None:
    with pytest.raises(ValueError, match="not known to keep packed sequences apart"):
        choose_layout("on", "some_kernel_hub_attention")


@pytest.mark.parametrize("layout", ["padded", "packed_rows", "packed_one_row"])
def test_collate_layout_matches_the_named_collator(layout: Layout) -> None:
    examples = _examples()
    got, expected = collate_layout(examples, layout, PAD), LAYOUTS[layout](examples)
    for name in ("input_ids", "labels", "sequence_ids", "attention_mask", "position_ids"):
        a, b = getattr(got, name), getattr(expected, name)
        assert (a is None and b is None) or torch.equal(a, b), name


# ---- torch_varlen attention (one packed row, no mask) -------------------------------------------


def test_torch_varlen_attention_matches_padded_values_and_gradients() -> None:
    """On CPU the per-sequence fallback runs; CUDA swaps in torch's varlen flash kernel."""
    name = register_torch_varlen_attention()
    assert choose_layout("auto", name) == "packed_one_row"
    examples = _examples()
    results = {}
    runs: tuple[tuple[str, Layout], ...] = (("sdpa", "padded"), (name, "packed_one_row"))
    for attn, layout in runs:
        model = _model(attn=attn)
        batch = collate_layout(examples, layout, PAD)
        results[attn] = _run(model, batch)
    (padded, padded_grads), (varlen, varlen_grads) = results["sdpa"], results[name]
    torch.testing.assert_close(varlen.summed, padded.summed, **VALUES)
    # per-sequence 3-D sdpa calls sum in another order than the batched 4-D one: gradients of
    # magnitude ~1 differ by up to ~2e-6 in float32
    for param, grad in padded_grads.items():
        torch.testing.assert_close(varlen_grads[param], grad, rtol=1e-4, atol=1e-5, msg=param)


def test_one_row_batches_carry_sequence_boundaries() -> None:
    examples = _examples()
    batch = collate_packed(examples)
    lengths = [len(e.prompt_ids) + len(e.chosen_ids) for e in examples]
    lengths += [len(e.prompt_ids) + len(e.rejected_ids) for e in examples]
    assert batch.cu_seq_lens is not None and batch.cu_seq_lens.dtype == torch.int32
    assert batch.cu_seq_lens.tolist() == [0, *itertools.accumulate(lengths)]
    assert batch.max_length == max(lengths)
    inputs = batch.model_inputs()
    assert inputs["cu_seq_lens_q"] is batch.cu_seq_lens and inputs["max_length_k"] == max(lengths)
    # bounded rows and padded batches carry none: sdpa/eager read the boundaries off positions
    for other in (collate_packed(examples, max_row_tokens=0), collate_padded(examples, PAD)):
        assert other.cu_seq_lens is None and "cu_seq_lens_q" not in other.model_inputs()


def test_torch_varlen_attention_refuses_a_batch_without_boundaries() -> None:
    model = _model(attn=register_torch_varlen_attention())
    with pytest.raises(ValueError, match="needs one packed row"):
        PolicyLogps(model)(collate_padded(_examples(), PAD))
