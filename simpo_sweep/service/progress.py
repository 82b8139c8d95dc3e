"""Live progress in the terminal, and each trial's outcome as soon as Tune knows it.

Tune pickles this callback with the sweep and brings it back on `resume`, so it holds only
plain values; outcomes go to a file in the sweep folder (local or in the bucket) that later
drivers read too. The outcome is decided once, by `TrialOutcome.decide`, here.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from ray.tune import Callback

from simpo_sweep.service.retention import trial_ended
from simpo_sweep.service.storage import StorageLocation
from simpo_sweep.spec.models import SweepSpec
from simpo_sweep.tracking.mlflow_runs import SweepTracking
from simpo_sweep.trial.outcome import STEP, TrialOutcome

OUTCOMES_FILE = "trial_states.json"

Printer = Callable[[str], None]


def read_outcomes(sweep: StorageLocation) -> dict[str, TrialOutcome]:
    """trial id -> outcome, as recorded by every driver of the sweep so far."""
    location = sweep / OUTCOMES_FILE
    if not location.is_file():
        return {}
    return {
        trial: TrialOutcome.from_json(document)
        for trial, document in json.loads(location.read_text()).items()
    }


def record_outcome(sweep: StorageLocation, trial_id: str, outcome: TrialOutcome) -> None:
    outcomes = read_outcomes(sweep)
    outcomes[trial_id] = outcome
    document = {trial: known.to_json() for trial, known in outcomes.items()}
    (sweep / OUTCOMES_FILE).write_text(json.dumps(document, indent=1))


class LiveView:
    """On a terminal: a rich live panel (trials running/done/stopped, best so far, elapsed and
    remaining) under the event lines. Elsewhere: the event lines only."""

    def __init__(self, total_trials: int, metric: str):
        from rich.console import Console
        from rich.live import Live

        self.console = Console()
        self.total = total_trials
        self.metric = metric
        self.started = time.monotonic()
        self.counts: Counter[str] = Counter()
        self.running = 0
        self.best = "-"
        # get_renderable: every refresh re-renders, so elapsed and remaining keep moving.
        self.live = Live(
            console=self.console,
            get_renderable=self._render,
            refresh_per_second=2,
            transient=True,
        )
        self.live.start()

    def _render(self) -> Any:
        from rich.table import Table

        elapsed = time.monotonic() - self.started
        done = sum(self.counts.values())
        remaining = (
            f"~{elapsed / done * (self.total - done):.0f}s" if 0 < done < self.total else "-"
        )
        table = Table.grid(padding=(0, 2))
        table.add_row(
            f"[bold]trials[/] {done}/{self.total} done",
            f"running {self.running}",
            f"completed {self.counts['completed']}",
            f"stopped early {self.counts['stopped_early']}",
            f"degenerate {self.counts['degenerate']}",
            f"failed {self.counts['failed']}",
        )
        table.add_row(
            f"[bold]best[/] {self.metric} {self.best}",
            f"elapsed {elapsed:.0f}s",
            f"remaining {remaining}",
        )
        return table

    def line(self, text: str) -> None:
        self.console.print(text, highlight=False, markup=False)
        self.live.update(self._render())

    def update(self, *, running: int, best: str, state: str | None = None) -> None:
        self.running = running
        self.best = best
        if state is not None:
            self.counts[state] += 1
        self.live.update(self._render())

    def stop(self) -> None:
        self.live.stop()


class SweepProgress(Callback):
    def __init__(
        self,
        spec: SweepSpec,
        sweep: StorageLocation,
        tracking: tuple[str, str, str, str] | None,  # SweepTracking's arguments
        printer: Printer = print,
        view: LiveView | None = None,
    ):
        self.spec = spec
        self.sweep = sweep
        self.tracking_args = tracking
        self._tracking: SweepTracking | None = None
        self.printer = printer
        self.view = view
        self.metric = spec.search.metric
        self.sign = 1.0 if spec.search.mode == "max" else -1.0
        self.best: tuple[float, str] | None = None
        self.started = time.monotonic()
        self.max_steps = spec.training.max_steps

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its callbacks; clients, printer and view are rebuilt where it unpickles.
        return {**self.__dict__, "_tracking": None, "printer": None, "view": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, printer=print)

    @property
    def tracking(self) -> SweepTracking | None:
        if self._tracking is None and self.tracking_args is not None:
            self._tracking = SweepTracking(*self.tracking_args)
        return self._tracking

    def _say(self, text: str) -> None:
        line = f"{time.monotonic() - self.started:6.0f}s {text}"
        if self.view is not None:
            self.view.line(line)
        else:
            self.printer(line)

    def _best_text(self) -> str:
        return f"{self.best[0]:.4f} ({self.best[1]})" if self.best else "-"

    def _refresh(self, trials: list[Any], state: str | None = None) -> None:
        if self.view is not None:
            running = sum(1 for trial in trials if trial.status == "RUNNING")
            self.view.update(running=running, best=self._best_text(), state=state)

    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._say(f"{trial.trial_id} started")
        self._refresh(trials)

    def on_trial_result(
        self, iteration: int, trials: list[Any], trial: Any, result: dict[str, Any], **info: Any
    ) -> None:
        reported = result.get(self.metric)
        # NaN: a metric not measured at this step (generations are scored every
        # evaluation.every steps, reward metrics every eval_every).
        value = float(reported) if isinstance(reported, int | float) else math.nan
        if math.isfinite(value):
            better = self.best is None or self.sign * value > self.sign * self.best[0]
            if better:
                self.best = (value, trial.trial_id)
        shown = f"{value:.4f}" if math.isfinite(value) else "-"
        self._say(
            f"{trial.trial_id} step {result.get(STEP, '?'):>5} {self.metric}={shown}  "
            f"best {self._best_text()}"
        )
        self._refresh(trials)

    def _finish(self, trials: list[Any], trial: Any, outcome: TrialOutcome) -> None:
        record_outcome(self.sweep, trial.trial_id, outcome)
        self._say(f"{trial.trial_id} {outcome.state}: {outcome.diagnosis}")
        self._retain(trial.trial_id, outcome, trial.last_result)
        self._refresh(trials, outcome.state.value)
        if self.tracking is not None:
            run_id = self.tracking.run_id_for(trial.trial_id)
            if run_id is not None:
                self.tracking.finish_trial(run_id, outcome.state.value, outcome.diagnosis)

    def _retain(
        self, trial_id: str, outcome: TrialOutcome, last_result: dict[str, Any] | None
    ) -> None:
        """The ended trial's checkpoints as service.retention says (the best K keep their
        weights); storage trouble here is said, never fatal to the sweep."""
        reported = (last_result or {}).get(self.metric)
        metric = float(reported) if isinstance(reported, int | float) else None
        try:
            trial_ended(self.sweep, self.spec, trial_id, outcome.state, metric)
        except (OSError, ValueError) as error:
            self._say(f"{trial_id}: checkpoint retention skipped ({error})")

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._finish(
            trials, trial, TrialOutcome.decide(trial.last_result, max_steps=self.max_steps)
        )

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        error = getattr(trial, "error_file", None) or "see the trial's error file"
        outcome = TrialOutcome.decide(trial.last_result, max_steps=self.max_steps, error=error)
        self._finish(trials, trial, outcome)

    def on_experiment_end(self, trials: list[Any], **info: Any) -> None:
        # Trials restored as finished from an earlier driver (resume) never reach the hooks above.
        known = read_outcomes(self.sweep)
        for trial in trials:
            if trial.trial_id in known:
                continue
            result = trial.last_result or {}
            # A trial stopped by Ctrl-C is TERMINATED too, but it neither finished nor was
            # stopped by the scheduler (that goes through on_trial_complete): leave it
            # unrecorded, so that it shows as unfinished and `resume` continues it.
            finished = result.get("done") or int(result.get(STEP, 0)) >= self.max_steps
            if trial.status == "TERMINATED" and finished:
                outcome = TrialOutcome.decide(result, max_steps=self.max_steps)
            elif trial.status == "ERROR":
                outcome = TrialOutcome.decide(result, max_steps=self.max_steps, error="")
            else:
                continue
            record_outcome(self.sweep, trial.trial_id, outcome)
            self._retain(trial.trial_id, outcome, result)
