"""Verdicts read statistics that mean something (engine.metrics.MetricWindow and diagnose).

Rules on a trial's level (not learning preferences, over-fitting, collapse) read held-out
metrics where the trial was evaluated recently, otherwise the mean of its recent train steps,
and say which; single events (NaN loss, positive log-probs) stay per step. Pure arithmetic on
made-up metrics, except the last test, which trains the demo model for a few steps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import pydantic
import pytest

from simpo_sweep.engine.metrics import Diagnosis, LogpsStart, MetricWindow, diagnose
from simpo_sweep.spec.models import DiagnosticsSpec

RULES = DiagnosticsSpec()  # window_steps 8, low_margin 0.5, high_margin 5, late_fraction 0.5
START = LogpsStart(chosen=-1.5, rejected=-2.5)
EVAL_PAIRS = 20
# The issue's trial `01 lr=1e-6` (SmolLM2-135M-Instruct, 4-pair steps): its last 8 train
# margins swung between -1.3 and +12.1 and ended at -0.494, while 20 held-out pairs read +2.18.
SWINGING_MARGINS = (3.1, -1.3, 12.1, 0.7, -0.9, 6.4, 1.8, -0.494)


def _metrics(
    prefix: str,
    margin: float,
    *,
    accuracy: float = 0.75,
    chosen: float = -1.4,
    rejected: float = -2.6,
    loss: float = 0.6,
) -> dict[str, float]:
    return {
        f"{prefix}/loss": loss,
        f"{prefix}/rewards/margins": margin,
        f"{prefix}/rewards/accuracies": accuracy,
        f"{prefix}/logps/chosen": chosen,
        f"{prefix}/logps/rejected": rejected,
    }


def _run(
    train: Sequence[dict[str, float]],
    evaluations: dict[int, dict[str, float]] | None = None,
    *,
    max_steps: int = 24,
    first_step: int = 1,
    rules: DiagnosticsSpec = RULES,
    window: MetricWindow | None = None,
) -> Diagnosis:
    """Feed steps first_step.. the way SimPOTrainer.fit does; the last step's diagnosis."""
    if window is None:
        window = MetricWindow(rules.window_steps)
    evaluations = evaluations or {}
    diagnosis = Diagnosis()
    for step, train_metrics in enumerate(train, start=first_step):
        window.add_train(step, train_metrics)
        metrics = dict(train_metrics)
        if step in evaluations:
            window.add_eval(step, evaluations[step], pairs=EVAL_PAIRS)
            metrics.update(evaluations[step])
        diagnosis = diagnose(
            metrics,
            step=step,
            max_steps=max_steps,
            rules=rules,
            length_averaged=True,
            start=START,
            window=window,
        )
    return diagnosis


def _issue_steps() -> list[dict[str, float]]:
    """24 steps whose last 8 are the issue's swinging train margins."""
    early = [_metrics("train", 0.2 + 0.1 * step) for step in range(16)]
    return early + [_metrics("train", margin) for margin in SWINGING_MARGINS]


def _not_learning(diagnosis: Diagnosis) -> list[str]:
    return [w for w in diagnosis.warnings if w.startswith("not learning preferences")]


# ---- the issue ---------------------------------------------------------------------------------


def test_a_swinging_train_batch_does_not_contradict_the_held_out_margin() -> None:
    """Last train margin -0.494 < 0.5, held-out +2.18 at the same (last) step: no warning."""
    assert min(SWINGING_MARGINS) == -1.3 and max(SWINGING_MARGINS) == 12.1
    last = _issue_steps()[-1]
    # What the verdict used to be: one 4-pair batch's margin, read alone.
    alone = diagnose(last, step=24, max_steps=24, rules=RULES, length_averaged=True, start=START)
    assert _not_learning(alone), alone.summary()

    diagnosis = _run(_issue_steps(), {24: _metrics("eval", 2.18)})

    assert not _not_learning(diagnosis), diagnosis.summary()
    assert diagnosis.verdict == "healthy", diagnosis.summary()


def test_a_low_held_out_margin_is_the_warning_and_says_it_is_held_out() -> None:
    diagnosis = _run(_issue_steps(), {24: _metrics("eval", 0.1)})

    (warning,) = _not_learning(diagnosis)
    assert warning.startswith(
        "not learning preferences: held-out reward margin 0.1 < 0.5 at step 24 of 24 "
        "(eval/rewards/margins over 20 pairs); raise the learning rate first"
    ), warning


# ---- where a level rule reads ------------------------------------------------------------------


def test_a_recent_evaluation_is_read_between_evaluations_then_the_train_mean() -> None:
    """Evaluated at step 16 (eval_every 16): steps 17-23 read it (within 8 steps), step 24
    reads the mean of train steps 17-24."""
    steps = [_metrics("train", 0.3) for _ in range(24)]
    low_eval = {16: _metrics("eval", 0.2)}

    at_20 = _run(steps[:20], low_eval)
    (warning,) = _not_learning(at_20)
    assert "held-out reward margin 0.2 < 0.5 at step 20 of 24" in warning
    assert "(eval/rewards/margins over 20 pairs, evaluated at step 16)" in warning

    at_24 = _run(steps, low_eval)
    (warning,) = _not_learning(at_24)
    assert "mean train reward margin 0.3 < 0.5 at step 24 of 24" in warning
    assert "(train/rewards/margins over steps 17-24)" in warning

    # a good held-out margin at step 16 holds off a low train mean until it is out of the window
    good_eval = {16: _metrics("eval", 1.5)}
    assert not _not_learning(_run(steps[:23], good_eval))
    assert _not_learning(_run(steps, good_eval))


def test_the_train_mean_is_over_the_window_not_the_last_batch() -> None:
    """No evaluation in reach: one low batch after good ones is noise; a low mean is not."""
    one_low = [_metrics("train", 2.0) for _ in range(23)] + [_metrics("train", -1.0)]
    assert not _not_learning(_run(one_low)), _run(one_low).summary()

    low_mean = [_metrics("train", 2.0) for _ in range(16)] + [
        _metrics("train", margin) for margin in (1.2, -0.8, 0.9, -0.4, 1.1, 0.2, -0.6, 0.6)
    ]
    (warning,) = _not_learning(_run(low_mean))
    assert "mean train reward margin 0.275 < 0.5 at step 24 of 24" in warning
    assert "(train/rewards/margins over steps 17-24)" in warning


def test_not_learning_is_still_only_judged_late() -> None:
    early = _run([_metrics("train", 0.1) for _ in range(11)], {11: _metrics("eval", 0.1)})
    assert not _not_learning(early)


# ---- collapse ----------------------------------------------------------------------------------


def _fallen(prefix: str, margin: float = 1.0) -> dict[str, float]:
    """Both log-probs 6 nats per token below START: more than collapse_drop (5)."""
    return _metrics(prefix, margin, chosen=START.chosen - 6, rejected=START.rejected - 6)


def test_collapse_reads_the_window_mean_of_the_log_probs() -> None:
    healthy = [_metrics("train", 1.0) for _ in range(12)]

    one_bad_batch = _run([*healthy, _fallen("train")])
    assert not one_bad_batch.degenerate, one_bad_batch.summary()

    sustained = _run(healthy + [_fallen("train")] * 8)
    (reason,) = sustained.degenerate
    assert reason.startswith("collapse: logps/chosen fell from -1.5 to -7.5"), reason
    assert "mean train log-probs: train/logps/* over steps 13-20" in reason


def test_collapse_prefers_the_held_out_log_probs() -> None:
    """Train batches that read collapsed while held-out pairs do not: no collapse; and the
    converse is one, named held-out."""
    fallen_train = [_metrics("train", 1.0)] * 4 + [_fallen("train")] * 8
    spared = _run(fallen_train, {12: _metrics("eval", 1.0)}, max_steps=12)
    assert not spared.degenerate, spared.summary()

    healthy_train = [_metrics("train", 1.0)] * 12
    collapsed = _run(healthy_train, {12: _fallen("eval")}, max_steps=12)
    (reason,) = collapsed.degenerate
    assert "held-out log-probs: eval/logps/* over 20 pairs" in reason, reason


# ---- single events -----------------------------------------------------------------------------


def test_a_single_nan_loss_or_positive_log_prob_is_judged_on_its_step() -> None:
    healthy = [_metrics("train", 1.0) for _ in range(12)]

    diverged = _run([*healthy, _metrics("train", 1.0, loss=math.nan)])
    (reason,) = diverged.degenerate
    assert reason.startswith("diverged: loss is nan at step 13 (train/loss)"), reason

    unstable = _run([*healthy, _metrics("train", 1.0, chosen=0.3)])
    (reason,) = unstable.degenerate
    assert reason.startswith("numerical instability: positive log-prob (chosen 0.3"), reason

    held_out_nan = _run(healthy, {12: _metrics("eval", 1.0, loss=math.inf)})
    (reason,) = held_out_nan.degenerate
    assert reason.startswith("diverged: loss is inf at step 12 (eval/loss)"), reason


# ---- over-fitting ------------------------------------------------------------------------------


def test_over_fitting_with_an_evaluation_at_hand_needs_held_out_accuracy_to_lag() -> None:
    high = [_metrics("train", 7.0, accuracy=0.95) for _ in range(24)]

    generalises = _run(high, {24: _metrics("eval", 6.0, accuracy=0.9)})
    assert generalises.verdict == "healthy", generalises.summary()

    lags = _run(high, {24: _metrics("eval", 1.0, accuracy=0.6)})
    (warning,) = lags.warnings
    assert warning.startswith(
        "probably over-fitting: mean train reward margin 7 > 5.0 at step 24 "
        "(train/rewards/margins over steps 17-24), and held-out reward accuracy 0.6 lags "
        "train's 0.95 by more than 0.1 (eval/rewards/accuracies over 20 pairs)"
    ), warning

    # no evaluation within the window: the train mean alone, with the old advice to check
    unchecked = _run(high, {10: _metrics("eval", 6.0, accuracy=0.9)})
    (warning,) = unchecked.warnings
    assert "no recent held-out evaluation to compare with" in warning


# ---- resume, spec ------------------------------------------------------------------------------


def test_a_resumed_window_judges_held_out_only_until_it_refills() -> None:
    """A trainer resumed at step 16 with an empty window: no train-mean verdict off steps
    17-20 alone; from step 24 (8 steps fed) it judges again."""
    low = [_metrics("train", 0.1) for _ in range(8)]

    refilling = _run(low[:4], first_step=17)
    assert refilling.verdict == "healthy", refilling.summary()
    assert _not_learning(_run(low[:4], {20: _metrics("eval", 0.1)}, first_step=17))
    assert _not_learning(_run(low, first_step=17))

    # restored from a state_dict, nothing refills
    before = MetricWindow(RULES.window_steps)
    _run([_metrics("train", 0.1)] * 16, window=before)
    restored = MetricWindow(RULES.window_steps)
    restored.load_state_dict(before.state_dict())
    assert _not_learning(_run(low[:1], first_step=17, window=restored))


def test_window_steps_is_validated() -> None:
    assert RULES.window_steps == 8
    with pytest.raises(pydantic.ValidationError):
        DiagnosticsSpec(window_steps=0)
    with pytest.raises(pydantic.ValidationError):
        DiagnosticsSpec(accuracy_lag=-0.1)


# ---- the trainer -------------------------------------------------------------------------------


def test_the_trainer_judges_its_last_step_on_the_held_out_metrics(tmp_path: Path) -> None:
    """SimPOTrainer.fit feeds the window: its last step (always evaluated) reads eval/...."""
    import torch

    from simpo_sweep.engine.data import prepare_data
    from simpo_sweep.engine.models import load_model, load_tokenizer
    from simpo_sweep.engine.train import SimPOTrainer
    from simpo_sweep.spec.models import DataSpec, ModelSpec, SimPOSpec, TrainingSpec

    model_spec = ModelSpec()
    tokenizer = load_tokenizer(model_spec)
    prepared = prepare_data(
        model_spec,
        DataSpec(max_length=64, max_prompt_length=24, max_train_pairs=8, max_eval_pairs=6),
        tmp_path,
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer = SimPOTrainer(
            load_model(model_spec, tokenizer, "cpu", seed=0),
            prepared.train,
            prepared.eval,
            training=TrainingSpec(learning_rate=1e-3, warmup_ratio=0.0, batch_size=4, max_steps=3),
            simpo=SimPOSpec(),
            # any margin is "low", and late from step 1
            diagnostics=DiagnosticsSpec(low_margin=100.0, late_fraction=0.01),
            pad_token_id=tokenizer.pad_token_id,
            device="cpu",
        )
        result = trainer.fit()
    finally:
        torch.set_num_threads(threads)

    (warning,) = _not_learning(result.diagnosis)
    margin = result.metrics["eval/rewards/margins"]
    assert f"held-out reward margin {margin:.3g} < 100.0 at step 3 of 3" in warning, warning
    assert f"(eval/rewards/margins over {len(prepared.eval)} pairs)" in warning, warning
