"""The SimPO training loop (issue 2): metrics, schedule, clipping, gradient accumulation, the
step hook, checkpoint resume, and the model/tokenizer loading it trains.

Everything trains the demo model on a few dozen demo pairs for a few steps, on CPU.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from conftest import ragged_pairs
from torch import nn
from transformers import PreTrainedModel

from simpo_sweep.engine import demo
from simpo_sweep.engine.data import PreparedData, TokenizedSplit, prepare_data
from simpo_sweep.engine.metrics import LogpsStart, diagnose
from simpo_sweep.engine.models import load_model, load_tokenizer
from simpo_sweep.engine.train import CHECKPOINT_FILE, PairDataset, SimPOTrainer, StepEvent, pair_at
from simpo_sweep.spec.models import DataSpec, DiagnosticsSpec, ModelSpec, SimPOSpec, TrainingSpec

MODEL = ModelSpec()
TOKENIZER = load_tokenizer(MODEL)
SIMPO_METRICS = {
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
    "logits/chosen",
    "logits/rejected",
}
# Settings where a few steps move the weights visibly.
QUICK: dict[str, Any] = {"learning_rate": 3e-3, "warmup_ratio": 0.0, "batch_size": 4}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> PreparedData:
    """22 training pairs: 5 micro-batches of 4 an epoch, so a dozen steps cross epochs."""
    return prepare_data(
        MODEL,
        DataSpec(max_length=64, max_prompt_length=24, max_train_pairs=22, max_eval_pairs=10),
        tmp_path_factory.mktemp("data"),
    )


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Exact comparisons between runs need one summation order; one thread also keeps these
    tiny steps fast on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _trainer(
    prepared: PreparedData,
    *,
    model_seed: int = 0,
    model: PreTrainedModel | None = None,
    checkpoint_root: Path | None = None,
    simpo: SimPOSpec | None = None,
    train_data: PairDataset | None = None,
    **training: Any,
) -> SimPOTrainer:
    """A trainer on `prepared` (`train_data` replaces its training split)."""
    return SimPOTrainer(
        model or load_model(MODEL, TOKENIZER, "cpu", seed=model_seed),
        train_data if train_data is not None else prepared.train,
        prepared.eval,
        training=TrainingSpec(**{**QUICK, **training}),
        simpo=simpo or SimPOSpec(),
        pad_token_id=TOKENIZER.pad_token_id,
        device="cpu",
        checkpoint_root=checkpoint_root,
    )


def _collect(events: list[StepEvent]) -> Any:
    def callback(event: StepEvent) -> None:
        events.append(event)

    return callback


def _model_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """Everything but timings and memory, which differ between any two runs."""
    return {key: value for key, value in metrics.items() if not key.startswith("perf/")}


def _assert_same_parameters(first: torch.nn.Module, second: torch.nn.Module, **tolerance: Any):
    for (name, mine), (_, theirs) in zip(
        first.named_parameters(), second.named_parameters(), strict=True
    ):
        torch.testing.assert_close(mine, theirs, msg=name, **tolerance)


# ---- metrics -----------------------------------------------------------------------------------


def test_every_simpo_metric_is_reported_for_train_and_eval(prepared: PreparedData) -> None:
    events: list[StepEvent] = []

    _trainer(prepared, max_steps=2, eval_every=2, simpo=SimPOSpec(sft_weight=0.1)).fit(
        _collect(events)
    )

    train, evaluation = events[-1].train_metrics, events[-1].eval_metrics
    assert evaluation is not None
    expected = SIMPO_METRICS | {"sft_loss"}
    assert {f"train/{name}" for name in expected | {"grad_norm", "learning_rate"}} <= set(train)
    assert {f"eval/{name}" for name in expected} == set(evaluation)
    for name, value in {**train, **evaluation}.items():
        assert math.isfinite(value), name
    assert train["train/rewards/margins"] == pytest.approx(
        train["train/rewards/chosen"] - train["train/rewards/rejected"], abs=1e-5
    )
    assert evaluation["eval/rewards/chosen"] == pytest.approx(
        2.0 * evaluation["eval/logps/chosen"], rel=1e-5
    )
    assert 0.0 <= evaluation["eval/rewards/accuracies"] <= 1.0


def test_sft_loss_is_reported_only_when_it_is_trained(prepared: PreparedData) -> None:
    result = _trainer(prepared, max_steps=1).fit()

    assert "train/sft_loss" not in result.metrics and "eval/sft_loss" not in result.metrics


def test_eval_metrics_cover_the_whole_eval_split(prepared: PreparedData) -> None:
    """Batches of 3 over 10 pairs: the ragged last batch counts once per pair."""
    whole = _trainer(prepared, max_steps=1, eval_batch_size=len(prepared.eval)).evaluate()
    in_threes = _trainer(prepared, max_steps=1, eval_batch_size=3).evaluate()

    for name, value in whole.items():
        assert in_threes[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name


# ---- optimisation ------------------------------------------------------------------------------


DECAY = {
    "cosine": lambda progress: 0.5 * (1 + math.cos(math.pi * progress)),
    "linear": lambda progress: 1 - progress,
}


@pytest.mark.parametrize("schedule", list(DECAY))
def test_learning_rate_warms_up_then_decays(prepared: PreparedData, schedule: str) -> None:
    """10 steps, 3 of warmup: the peak is reached at the 4th step, then decays towards 0 at the
    step after the last one."""
    events: list[StepEvent] = []

    _trainer(
        prepared, max_steps=10, warmup_ratio=0.3, lr_scheduler=schedule, learning_rate=1e-3
    ).fit(_collect(events))

    rates = [event.train_metrics["train/learning_rate"] for event in events]
    warmup = [1e-3 * (step + 1) / 4 for step in range(3)]
    decay = [1e-3 * DECAY[schedule](step / 7) for step in range(7)]
    assert rates == pytest.approx(warmup + decay)


def test_constant_schedule_keeps_the_rate_after_warmup(prepared: PreparedData) -> None:
    events: list[StepEvent] = []

    _trainer(prepared, max_steps=5, lr_scheduler="constant", learning_rate=1e-3).fit(
        _collect(events)
    )

    assert [e.train_metrics["train/learning_rate"] for e in events] == [1e-3] * 5


def test_gradients_are_clipped_to_max_grad_norm(prepared: PreparedData) -> None:
    """After one AdamW step, exp_avg = (1 - beta1) * the gradient the optimizer was given."""
    trainer = _trainer(prepared, max_steps=1, max_grad_norm=0.01, adam_beta1=0.9)

    result = trainer.fit()

    given = torch.linalg.vector_norm(
        torch.stack(
            [
                torch.linalg.vector_norm(state["exp_avg"])
                for state in trainer.optimizer.state.values()
            ]
        )
    ) / (1 - 0.9)
    assert result.metrics["train/grad_norm"] > 0.1  # the norm before clipping is reported
    assert given.item() == pytest.approx(0.01, rel=1e-4)


def test_gradient_accumulation_matches_one_larger_batch(prepared: PreparedData) -> None:
    """2 micro-batches of 2 pairs take the step 1 batch of the same 4 pairs takes."""
    accumulated = _trainer(prepared, max_steps=3, batch_size=2, gradient_accumulation_steps=2)
    single = _trainer(prepared, max_steps=3, batch_size=4)

    accumulated_result, single_result = accumulated.fit(), single.fit()

    # AdamW divides by sqrt(v) + eps: a gradient entry near 1e-8 whose last bits differ moves
    # its weight by up to ~1e-6 either way, well under one step (lr 3e-3).
    _assert_same_parameters(accumulated.model, single.model, rtol=1e-4, atol=1e-5)
    for name, value in _model_metrics(single_result.metrics).items():
        assert accumulated_result.metrics[name] == pytest.approx(value, rel=1e-4, abs=1e-6), name


def test_gradient_checkpointing_keeps_fewer_activations_and_trains_the_same(
    prepared: PreparedData,
) -> None:
    checkpointed_spec = MODEL.model_copy(update={"gradient_checkpointing": True})
    plain = _trainer(prepared, max_steps=3)
    checkpointed = _trainer(
        prepared, max_steps=3, model=load_model(checkpointed_spec, TOKENIZER, "cpu")
    )
    saved: dict[str, int] = {}
    for name, trainer in (("plain", plain), ("checkpointed", checkpointed)):
        saved[name] = 0

        def keep(tensor: torch.Tensor, name: str = name) -> torch.Tensor:
            saved[name] += 1
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
            trainer.fit()

    # what the forward keeps for backward: per layer, its input instead of every intermediate
    assert saved["checkpointed"] < saved["plain"] / 2
    _assert_same_parameters(checkpointed.model, plain.model, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_when_asked_for_on_cpu(prepared: PreparedData) -> None:
    full = _trainer(prepared, max_steps=1).evaluate()
    bf16 = _trainer(prepared, max_steps=1, precision="bf16-mixed")

    assert bf16.autocast_bf16
    low = bf16.evaluate()
    # log-softmax runs in float32 either way; bf16 matmuls move mean log-probs by < 0.05 nats
    assert low["eval/logps/chosen"] == pytest.approx(full["eval/logps/chosen"], abs=0.05)
    # ... but they do move them (by ~1e-4 on this model): autocast really ran in bf16
    assert low["eval/logps/chosen"] != full["eval/logps/chosen"]


def test_evaluation_does_not_run_through_the_ddp_wrapper(
    prepared: PreparedData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DDP's forward syncs buffers across ranks, a collective that a rank without an eval batch
    never joins: evaluation must call the unwrapped policy (a one-process gloo group here)."""
    trainer = _trainer(prepared, max_steps=1)
    expected = trainer.evaluate()
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1
    )
    try:
        trainer.policy = nn.parallel.DistributedDataParallel(trainer.policy)

        def refuse(*args: Any, **kwargs: Any) -> None:
            raise AssertionError("evaluation ran through DistributedDataParallel")

        monkeypatch.setattr(nn.parallel.DistributedDataParallel, "forward", refuse)
        assert trainer.evaluate() == expected
    finally:
        dist.destroy_process_group()


def test_group_by_length_still_visits_every_pair_once_an_epoch(prepared: PreparedData) -> None:
    trainer = _trainer(prepared, group_by_length=True, batch_size=2)

    order = trainer._epoch_order(0)

    assert sorted(order) == list(range(len(prepared.train)))
    assert order != trainer._epoch_order(1)


def test_pair_lengths_for_grouping_are_counted_from_the_columns(prepared: PreparedData) -> None:
    """Arrow-backed columns count from their offsets; in-memory lists count the same."""
    expected = []
    for index in range(len(prepared.train)):
        pair = pair_at(prepared.train, index)
        expected.append(len(pair.prompt_ids) + max(len(pair.chosen_ids), len(pair.rejected_ids)))
    in_memory = TokenizedSplit(
        [list(ids) for ids in prepared.train.prompt_ids],
        [list(ids) for ids in prepared.train.chosen_ids],
        [list(ids) for ids in prepared.train.rejected_ids],
    )

    from_cache = _trainer(prepared, group_by_length=True)
    from_lists = _trainer(prepared, group_by_length=True, train_data=in_memory)

    assert from_cache._train_pair_lengths == expected
    assert from_lists._train_pair_lengths == expected
    assert from_cache._epoch_order(0) == from_lists._epoch_order(0)


def test_too_few_pairs_for_one_micro_batch_is_an_error(prepared: PreparedData) -> None:
    with pytest.raises(ValueError, match="cannot fill one micro-batch"):
        _trainer(prepared, batch_size=len(prepared.train) + 1)


# ---- token-budget micro-batches ----------------------------------------------------------------

BUDGET = 160  # tokens


@pytest.fixture(scope="module")
def ragged(prepared: PreparedData) -> TokenizedSplit:
    return ragged_pairs(prepared.train)


@pytest.mark.parametrize("layout", ["packed_rows", "padded"])
def test_token_budget_micro_batches_cover_the_epoch_within_the_budget(
    prepared: PreparedData, ragged: TokenizedSplit, layout: str
) -> None:
    trainer = _trainer(prepared, train_data=ragged, max_tokens_per_batch=BUDGET)
    trainer.layout = layout  # type: ignore[assignment]
    order = trainer._epoch_order(0)

    micro_batches = trainer._epoch_micro_batches(0)

    assert [index for batch in micro_batches for index in batch] == order
    assert len({len(batch) for batch in micro_batches}) > 1
    for batch in micro_batches:
        # what the collated micro-batch really holds: real tokens packed, rows x width padded
        collated = trainer._collate([pair_at(ragged, index) for index in batch])
        held = collated.num_tokens if layout == "packed_rows" else collated.input_ids.numel()
        assert held <= BUDGET, (batch, held)


def test_a_token_budget_step_takes_the_step_one_batch_of_its_pairs_takes(
    prepared: PreparedData, ragged: TokenizedSplit
) -> None:
    """3 budgeted micro-batches of different pair counts: the step is the mean over all their
    pairs, as one fixed batch of the same pairs, not the mean of the micro-batches' means."""
    budgeted = _trainer(
        prepared,
        train_data=ragged,
        max_steps=1,
        max_tokens_per_batch=BUDGET,
        gradient_accumulation_steps=3,
    )
    first_step = budgeted._epoch_micro_batches(0)[:3]
    assert len({len(batch) for batch in first_step}) > 1, first_step
    pairs = sum(len(batch) for batch in first_step)
    single = _trainer(prepared, train_data=ragged, max_steps=1, batch_size=pairs)

    budgeted_result, single_result = budgeted.fit(), single.fit()

    # The gradient is the claim: its norm (before clipping) tells the pair mean from a mean of
    # micro-batch means (weights 4/9, 2/9, 3/9 against 1/3 each). AdamW's first step is about
    # lr x sign(gradient), so the weights agree only to the last bits of near-zero entries.
    assert budgeted_result.metrics["train/grad_norm"] == pytest.approx(
        single_result.metrics["train/grad_norm"], rel=1e-5
    )
    _assert_same_parameters(budgeted.model, single.model, rtol=1e-4, atol=1e-4)
    for name, value in _model_metrics(single_result.metrics).items():
        assert budgeted_result.metrics[name] == pytest.approx(value, rel=1e-4, abs=1e-6), name


# ---- diagnostics -------------------------------------------------------------------------------


def _logps_reading(chosen: float, rejected: float, margin: float = 1.0) -> dict[str, float]:
    return {
        "train/loss": 0.5,
        "train/logps/chosen": chosen,
        "train/logps/rejected": rejected,
        "train/rewards/margins": margin,
    }


def test_collapse_is_judged_on_length_averaged_logps_only() -> None:
    """From -1.5/-2.5 per token to -12/-13 is collapse; -225 summed over a response of ~100
    tokens is a healthy -2.25, even from a summed start of -150."""
    rules = DiagnosticsSpec()

    def read(reading: dict[str, float], length_averaged: bool) -> Any:
        start = LogpsStart(-1.5, -2.5) if length_averaged else LogpsStart(-150.0, -200.0)
        return diagnose(
            reading,
            step=10,
            max_steps=10,
            rules=rules,
            length_averaged=length_averaged,
            start=start,
        )

    averaged = read(_logps_reading(-12.0, -13.0), length_averaged=True)
    summed = read(_logps_reading(-225.0, -260.0), length_averaged=False)

    assert averaged.verdict == "degenerate" and "collapse" in averaged.summary()
    assert summed.verdict == "healthy", summed.summary()
    # the margin thresholds are on the averaged scale too: a summed margin of 20 is no
    # over-fitting sign, nor 0.1 a sign of not learning
    for margin in (20.0, 0.1):
        assert read(_logps_reading(-225.0, -260.0, margin), length_averaged=False).verdict == (
            "healthy"
        )
        assert read(_logps_reading(-1.2, -2.5, margin), length_averaged=True).verdict == "warning"
    # the scale-free rules hold either way
    for length_averaged in (True, False):
        assert read(
            {**_logps_reading(-2.0, -3.0), "train/loss": math.nan}, length_averaged
        ).degenerate
        assert read(_logps_reading(0.5, -3.0), length_averaged).degenerate


def test_summed_logps_train_without_a_collapse_verdict(prepared: PreparedData) -> None:
    """The demo model's summed log-probs are far below -10 from the first step: not collapse."""
    result = _trainer(prepared, max_steps=2, simpo=SimPOSpec(average_log_prob=False)).fit()

    assert result.metrics["train/logps/chosen"] < -10
    assert result.metrics["train/logps/rejected"] < -10
    assert not result.diagnosis.degenerate and result.stopped_reason is None, result.diagnosis


# ---- the step hook and checkpoints -------------------------------------------------------------


def test_hook_gets_every_step_evaluations_and_checkpoints(
    prepared: PreparedData, tmp_path: Path
) -> None:
    events: list[StepEvent] = []

    _trainer(prepared, max_steps=7, eval_every=3, checkpoint_every=5, checkpoint_root=tmp_path).fit(
        _collect(events)
    )

    assert [event.step for event in events] == list(range(1, 8))
    assert [event.step for event in events if event.eval_metrics] == [3, 6, 7]
    checkpoints = [event for event in events if event.checkpoint_dir is not None]
    assert [event.step for event in checkpoints] == [5, 7]
    for event in checkpoints:
        assert event.checkpoint_dir is not None
        assert (event.checkpoint_dir / CHECKPOINT_FILE).is_file()
    assert events[-1].is_last and not events[-2].is_last


def test_hook_can_stop_training(prepared: PreparedData) -> None:
    result = _trainer(prepared, max_steps=10).fit(
        lambda event: "enough" if event.step == 4 else None
    )

    assert (result.step, result.stopped_reason) == (4, "enough")


@pytest.mark.parametrize("batching", ["pairs", "token budget"])
def test_stop_and_resume_ends_like_an_uninterrupted_run(
    prepared: PreparedData, ragged: TokenizedSplit, tmp_path: Path, batching: str
) -> None:
    """12 steps straight vs 7 steps, a checkpoint, and a new trainer (new process in real life,
    a differently initialised model here) resuming to step 12. The 5-batch epochs make the
    checkpoint fall mid-epoch and the resumed run cross an epoch boundary (a token budget
    on the ragged pairs makes micro-batches of different sizes, 9 an epoch)."""
    settings: dict[str, Any] = {
        "max_steps": 12,
        "eval_every": 4,
        "checkpoint_every": 7,
        "warmup_ratio": 0.2,
    }
    if batching == "token budget":
        settings.update(max_tokens_per_batch=BUDGET, train_data=ragged)
    straight = _trainer(prepared, **settings)
    straight_result = straight.fit()

    first = _trainer(prepared, checkpoint_root=tmp_path, **settings)
    first.fit(lambda event: "stopped" if event.step == 7 else None)
    resumed = _trainer(prepared, model_seed=1, **settings)
    resumed_result = resumed.fit(resume_from=tmp_path / "step_000007")

    assert resumed_result.step == 12
    _assert_same_parameters(resumed.model, straight.model, rtol=0, atol=0)
    straight_metrics = _model_metrics(straight_result.metrics)
    assert _model_metrics(resumed_result.metrics) == straight_metrics
    for key, state in straight.optimizer.state_dict()["state"].items():
        torch.testing.assert_close(resumed.optimizer.state_dict()["state"][key], state)


# ---- models and tokenizers ---------------------------------------------------------------------


def test_tokenizer_without_pad_token_pads_with_eos(tmp_path: Path) -> None:
    tokenizer = demo.build_demo_tokenizer()
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path)

    loaded = load_tokenizer(ModelSpec(tokenizer=str(tmp_path)))

    assert loaded.pad_token == loaded.eos_token == "</s>"


def test_a_saved_model_folder_loads_like_a_hub_model(tmp_path: Path) -> None:
    built = load_model(MODEL, TOKENIZER, "cpu", seed=3)
    built.save_pretrained(tmp_path / "model")
    TOKENIZER.save_pretrained(tmp_path / "model")
    spec = ModelSpec(name=str(tmp_path / "model"), dtype="bfloat16")

    loaded = load_model(spec, load_tokenizer(spec), "cpu")

    assert next(loaded.parameters()).dtype == torch.bfloat16
    torch.testing.assert_close(
        loaded.lm_head.weight.float(), built.lm_head.weight.to(torch.bfloat16).float()
    )


def test_auto_dtype_is_float32_on_cpu() -> None:
    model = load_model(MODEL, TOKENIZER, "cpu")

    assert {parameter.dtype for parameter in model.parameters()} == {torch.float32}


def test_trainer_accepts_a_tokenized_split_built_in_memory(prepared: PreparedData) -> None:
    """The engine works without the cache folder: a plain in-memory split trains too."""
    in_memory = TokenizedSplit(
        [list(ids) for ids in prepared.train.prompt_ids],
        [list(ids) for ids in prepared.train.chosen_ids],
        [list(ids) for ids in prepared.train.rejected_ids],
    )
    from_cache = _trainer(prepared, max_steps=2)
    trainer = _trainer(prepared, max_steps=2, train_data=in_memory)

    assert _model_metrics(trainer.fit().metrics) == _model_metrics(from_cache.fit().metrics)


def test_the_trainer_judges_collapse_from_its_first_step(
    prepared: PreparedData, tmp_path: Path
) -> None:
    """The start is the first step's log-probs (before any update), kept in checkpoints; a
    learning rate far too high makes both fall from there within a couple of steps."""
    healthy = _trainer(prepared, max_steps=4, checkpoint_every=2, checkpoint_root=tmp_path)
    healthy.fit(lambda event: "stopped" if event.step == 2 else None)
    assert healthy.logps_start is not None
    resumed = _trainer(prepared, max_steps=4)
    resumed.load_checkpoint(tmp_path / "step_000002")
    assert resumed.logps_start == healthy.logps_start

    falling = SimPOTrainer(
        load_model(MODEL, TOKENIZER, "cpu"),
        prepared.train,
        prepared.eval,
        training=TrainingSpec(**{**QUICK, "learning_rate": 0.3, "max_steps": 30}),
        simpo=SimPOSpec(),
        diagnostics=DiagnosticsSpec(collapse_drop=1.0),
        pad_token_id=TOKENIZER.pad_token_id,
        device="cpu",
    )
    result = falling.fit()

    assert result.step < 30 and result.stopped_reason is not None
    assert result.stopped_reason.startswith("degenerate: collapse: logps/chosen fell from")
