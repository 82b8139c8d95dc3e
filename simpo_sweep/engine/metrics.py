"""SimPO step metrics (docs/simpo.md names) and the verdict on a trial's health."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from simpo_sweep.spec.models import DiagnosticsSpec

# The metrics engine.loss.simpo_objective sums over pairs inside a step; turned into means once
# all micro-batches and workers are in.
PAIR_SUMS = (
    "loss",
    "sft_loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
    "logits/chosen",
    "logits/rejected",
)

# What the rules on a trial's level (not learning, over-fitting, collapse) read.
LEVEL_METRICS = ("rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected")


def sums_to_means(sums: Mapping[str, float], num_pairs: float, prefix: str) -> dict[str, float]:
    return {f"{prefix}/{name}": value / num_pairs for name, value in sums.items()}


@dataclass
class Diagnosis:
    """`degenerate` reasons stop a trial; `warnings` only label it."""

    degenerate: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        if self.degenerate:
            return "degenerate"
        return "warning" if self.warnings else "healthy"

    def summary(self) -> str:
        return "; ".join(self.degenerate + self.warnings) or "healthy"


@dataclass(frozen=True)
class LogpsStart:
    """Mean log-probs where a trial started: its first step's, computed before any update.

    Collapse is a fall from here. The trainer keeps it (and its checkpoints do), because a
    resumed trial's first step is not where the trial started.
    """

    chosen: float
    rejected: float

    @classmethod
    def read(cls, metrics: Mapping[str, float], prefix: str = "train") -> LogpsStart | None:
        """From one step's metrics; None when they lack the log-probs or these are not finite."""
        chosen = metrics.get(f"{prefix}/logps/chosen")
        rejected = metrics.get(f"{prefix}/logps/rejected")
        if chosen is None or rejected is None:
            return None
        if not (math.isfinite(chosen) and math.isfinite(rejected)):
            return None
        return cls(chosen=float(chosen), rejected=float(rejected))


@dataclass(frozen=True)
class Reading:
    """Statistics the rules on a trial's level read, and where they come from: one held-out
    evaluation (`prefix` "eval") or the mean of train steps `first_step`..`last_step`.

    `values` are keyed without the prefix ("rewards/margins"); missing or non-finite ones are
    absent. `pairs`: how many held-out pairs the evaluation averaged over, when known.
    """

    prefix: str
    values: Mapping[str, float]
    first_step: int
    last_step: int
    pairs: int | None = None

    @property
    def held_out(self) -> bool:
        return self.prefix == "eval"

    def get(self, name: str) -> float | None:
        return self.values.get(name)

    def label(self, what: str) -> str:
        """'held-out reward margin', 'mean train reward margin' (or 'train ...' for one step)."""
        if self.held_out:
            return f"held-out {what}"
        return f"mean train {what}" if self.first_step < self.last_step else f"train {what}"

    def source(self, name: str, step: int) -> str:
        """The metric as MLflow shows it, and over what, for a verdict at `step`."""
        if self.held_out:
            pairs = f" over {self.pairs} pairs" if self.pairs else ""
            when = f", evaluated at step {self.last_step}" if self.last_step != step else ""
            return f"eval/{name}{pairs}{when}"
        if self.first_step == self.last_step:
            return f"train/{name} of step {self.last_step} alone"
        return f"train/{name} over steps {self.first_step}-{self.last_step}"


def _level_values(metrics: Mapping[str, float], prefix: str) -> dict[str, float]:
    values = {name: metrics.get(f"{prefix}/{name}") for name in LEVEL_METRICS}
    return {
        name: float(value)
        for name, value in values.items()
        if value is not None and math.isfinite(value)
    }


class MetricWindow:
    """What the rules on a trial's level read: recent held-out metrics, or recent train steps.

    One step's train metrics are one batch's (a few pairs): their reward margin swings by
    several units from step to step, so a verdict read off them says more about the batch
    than about the trial. The trainer feeds every step's train metrics (`add_train`) and
    every evaluation (`add_eval`); `reading` picks what to judge by.

    A trainer that resumes from a checkpoint starts with an empty window unless it restores
    `state_dict()`: until the window has refilled, only held-out metrics are judged.
    """

    def __init__(self, steps: int) -> None:
        if steps < 1:
            raise ValueError(f"a window of {steps} steps")
        self.steps = steps
        self._train: deque[tuple[int, dict[str, float]]] = deque(maxlen=steps)
        self._eval: Reading | None = None

    @classmethod
    def of(cls, step: int, metrics: Mapping[str, float]) -> MetricWindow:
        """One step's metrics alone (train, and eval when they hold any)."""
        window = cls(1)
        window.add_train(step, metrics)
        if any(key.startswith("eval/") for key in metrics):
            window.add_eval(step, metrics)
        return window

    def add_train(self, step: int, metrics: Mapping[str, float]) -> None:
        self._train.append((step, _level_values(metrics, "train")))

    def add_eval(self, step: int, metrics: Mapping[str, float], pairs: int | None = None) -> None:
        self._eval = Reading("eval", _level_values(metrics, "eval"), step, step, pairs)

    def held_out(self, step: int) -> Reading | None:
        """The latest evaluation, if it was within the last `steps` steps."""
        if self._eval is not None and step - self.steps < self._eval.last_step <= step:
            return self._eval
        return None

    def train_mean(self, step: int) -> Reading | None:
        """The mean of the last `steps` train steps (all since step 1, early on); None while
        the window lacks some of them (a resumed trial's, refilling)."""
        recent = [(s, values) for s, values in self._train if step - self.steps < s <= step]
        if not recent or len(recent) < min(self.steps, step):
            return None
        means: dict[str, float] = {}
        for name in LEVEL_METRICS:
            seen = [values[name] for _, values in recent if name in values]
            if seen:
                means[name] = math.fsum(seen) / len(seen)
        return Reading("train", means, recent[0][0], recent[-1][0])

    def reading(self, step: int) -> Reading | None:
        """Held-out metrics when evaluated recently (at this step, best), else the train mean."""
        return self.held_out(step) or self.train_mean(step)

    def state_dict(self) -> dict[str, Any]:
        evaluation = self._eval
        return {
            "train": [[step, dict(values)] for step, values in self._train],
            "eval": None
            if evaluation is None
            else {
                "step": evaluation.last_step,
                "values": dict(evaluation.values),
                "pairs": evaluation.pairs,
            },
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._train.clear()
        for step, values in state["train"]:
            self._train.append((int(step), dict(values)))
        evaluation = state.get("eval")
        self._eval = None
        if evaluation is not None:
            step = int(evaluation["step"])
            values = dict(evaluation["values"])
            self._eval = Reading("eval", values, step, step, evaluation["pairs"])


def diagnose(
    metrics: Mapping[str, float],
    *,
    step: int,
    max_steps: int,
    rules: DiagnosticsSpec,
    length_averaged: bool,
    start: LogpsStart | None = None,
    window: MetricWindow | None = None,
) -> Diagnosis:
    """Read a step the way docs/simpo.md's diagnostics table does.

    `metrics`: this step's (train, and eval when evaluated at it). Single events are judged on
    them: a NaN/inf loss, a positive log-prob. Rules on the trial's level (collapse, not
    learning preferences, over-fitting) read `window` (MetricWindow.reading): held-out metrics
    evaluated within `rules.window_steps` steps, else the mean of that many train steps; every
    message names which. Without `window`, `metrics` alone are the window.

    `length_averaged`: whether the log-probs are averaged over response tokens
    (SimPOSpec.average_log_prob). The collapse and reward-margin thresholds are defined on
    averaged log-probs; summed ones scale with response length (a healthy -2 per token reads
    -200 over 100 tokens), so without averaging only the scale-free rules apply: NaN/inf loss
    and positive log-probs.

    `start`: the log-probs the trial started from (LogpsStart.read of its first step). Collapse
    is both log-probs falling more than `rules.collapse_drop` below them; without `start` it is
    not judged. An absolute floor cannot work: an untrained model starts near -log(vocabulary
    size), already below any floor a trained model's collapse would be read against.
    """
    window = window if window is not None else MetricWindow.of(step, metrics)
    diagnosis = Diagnosis()
    unstable = _judge_step_events(metrics, step, diagnosis)
    if not length_averaged:
        return diagnosis
    reading = window.reading(step)
    collapse = _collapse(reading, start, step, rules) if not unstable else None
    if collapse:
        diagnosis.degenerate.append(collapse)
    margin = reading.get("rewards/margins") if reading is not None else None
    late = step >= rules.late_fraction * max_steps
    if reading is not None and margin is not None and late and margin < rules.low_margin:
        diagnosis.warnings.append(
            f"not learning preferences: {reading.label('reward margin')} {margin:.3g} < "
            f"{rules.low_margin} at step {step} of {max_steps} "
            f"({reading.source('rewards/margins', step)}); raise the learning rate first, "
            "then gamma_beta_ratio or beta"
        )
    overfitting = _overfitting(window.train_mean(step), window.held_out(step), step, rules)
    if overfitting:
        diagnosis.warnings.append(overfitting)
    return diagnosis


def _judge_step_events(metrics: Mapping[str, float], step: int, diagnosis: Diagnosis) -> bool:
    """Single events, real on one step: a NaN/inf loss, a positive log-prob (train's first,
    then a held-out evaluation's at this step). Whether a log-prob was positive."""
    for prefix in ("train", "eval"):
        loss = metrics.get(f"{prefix}/loss")
        if loss is not None and not math.isfinite(loss):
            diagnosis.degenerate.append(
                f"diverged: loss is {loss} at step {step} ({prefix}/loss); lower the learning "
                "rate, and keep gradient clipping on (training.max_grad_norm)"
            )
            break
    for prefix in ("train", "eval"):
        chosen = metrics.get(f"{prefix}/logps/chosen")
        rejected = metrics.get(f"{prefix}/logps/rejected")
        if chosen is not None and rejected is not None and (chosen > 0 or rejected > 0):
            diagnosis.degenerate.append(
                f"numerical instability: positive log-prob (chosen {chosen:.3g}, "
                f"rejected {rejected:.3g}) at step {step} ({prefix}/logps/*); a "
                "log-probability cannot exceed 0, so the computation is broken, not the "
                "hyperparameters: try model.dtype float32, training.precision fp32 or "
                "training.padding_free off"
            )
            return True
    return False


def _collapse(
    reading: Reading | None, start: LogpsStart | None, step: int, rules: DiagnosticsSpec
) -> str | None:
    """Both log-probs more than `rules.collapse_drop` below where the trial started."""
    if reading is None or start is None:
        return None
    chosen, rejected = reading.get("logps/chosen"), reading.get("logps/rejected")
    if chosen is None or rejected is None:
        return None
    if min(start.chosen - chosen, start.rejected - rejected) <= rules.collapse_drop:
        return None
    return (
        f"collapse: logps/chosen fell from {start.chosen:.3g} to {chosen:.3g} and "
        f"logps/rejected from {start.rejected:.3g} to {rejected:.3g} by step {step} (more "
        f"than {rules.collapse_drop} nats per token each; {reading.label('log-probs')}: "
        f"{reading.source('logps/*', step)}; the start: the trial's first train step): the "
        "model is losing the language it started with; lower the learning rate, or add an "
        "SFT term (simpo.sft_weight) to hold the chosen responses' likelihood"
    )


def _overfitting(
    train: Reading | None, held_out: Reading | None, step: int, rules: DiagnosticsSpec
) -> str | None:
    """A high mean train reward margin; with a recent evaluation at hand, only when held-out
    accuracy lags train's by more than `rules.accuracy_lag` (a margin that generalises is no
    over-fitting)."""
    margin = train.get("rewards/margins") if train is not None else None
    if train is None or margin is None or margin <= rules.high_margin:
        return None
    high = (
        f"probably over-fitting: {train.label('reward margin')} {margin:.3g} > "
        f"{rules.high_margin} at step {step} ({train.source('rewards/margins', step)})"
    )
    if held_out is None:
        return (
            f"{high}; no recent held-out evaluation to compare with: if "
            "eval/rewards/accuracies lags train's at the next one, lower the learning rate "
            "or beta"
        )
    train_accuracy = train.get("rewards/accuracies")
    held_out_accuracy = held_out.get("rewards/accuracies")
    if train_accuracy is None or held_out_accuracy is None:
        return None
    if train_accuracy - held_out_accuracy <= rules.accuracy_lag:
        return None
    return (
        f"{high}, and held-out reward accuracy {held_out_accuracy:.3g} lags train's "
        f"{train_accuracy:.3g} by more than {rules.accuracy_lag} "
        f"({held_out.source('rewards/accuracies', step)}); lower the learning rate or beta"
    )
