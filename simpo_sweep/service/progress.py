"""Live progress in the terminal, and each trial's final state as soon as Tune knows it.

Tune pickles this callback with the sweep and brings it back on `resume`, so it holds only
plain values; final states go to a file in the sweep folder that later drivers read too.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from ray.tune import Callback

from simpo_sweep.service.results import STATE_FAILED, final_state
from simpo_sweep.spec.models import SweepSpec
from simpo_sweep.tracking.mlflow_runs import SweepTracking
from simpo_sweep.trial.worker import DIAGNOSIS, STEP

STATES_FILE = "trial_states.json"


def read_final_states(sweep_dir: Path) -> dict[str, tuple[str, str]]:
    """trial id -> (state, diagnosis), as recorded by every driver of the sweep so far."""
    path = sweep_dir / STATES_FILE
    if not path.is_file():
        return {}
    return {
        trial: (state, diagnosis)
        for trial, (state, diagnosis) in json.loads(path.read_text()).items()
    }


class SweepProgress(Callback):
    def __init__(
        self,
        spec: SweepSpec,
        sweep_dir: Path,
        tracking: tuple[str, str, str, str] | None,  # SweepTracking's arguments
        printer: Any = print,
    ):
        self.spec = spec
        self.sweep_dir = sweep_dir
        self.tracking_args = tracking
        self._tracking: SweepTracking | None = None
        self.printer = printer
        self.metric = spec.search.metric
        self.sign = 1.0 if spec.search.mode == "max" else -1.0
        self.best: tuple[float, str] | None = None
        self.started = time.monotonic()
        self.max_steps = spec.training.max_steps

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its callbacks; clients and the printer are rebuilt where it unpickles.
        return {**self.__dict__, "_tracking": None, "printer": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, printer=print)

    @property
    def tracking(self) -> SweepTracking | None:
        if self._tracking is None and self.tracking_args is not None:
            self._tracking = SweepTracking(*self.tracking_args)
        return self._tracking

    @property
    def final_states(self) -> dict[str, tuple[str, str]]:
        return read_final_states(self.sweep_dir)

    def _record(self, trial_id: str, state: str, diagnosis: str) -> None:
        states = read_final_states(self.sweep_dir)
        states[trial_id] = (state, diagnosis)
        temporary = self.sweep_dir / f".{STATES_FILE}.tmp"
        temporary.write_text(json.dumps(states, indent=1))
        temporary.replace(self.sweep_dir / STATES_FILE)

    def _elapsed(self) -> str:
        return f"{time.monotonic() - self.started:6.0f}s"

    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        running = sum(1 for t in trials if t.status == "RUNNING")
        self.printer(
            f"{self._elapsed()} {trial.trial_id} started ({running} running, {len(trials)} known)"
        )

    def on_trial_result(
        self, iteration: int, trials: list[Any], trial: Any, result: dict[str, Any], **info: Any
    ) -> None:
        value = result.get(self.metric)
        if isinstance(value, int | float) and math.isfinite(value):
            better = self.best is None or self.sign * value > self.sign * self.best[0]
            if better:
                self.best = (float(value), trial.trial_id)
        shown = f"{value:.4f}" if isinstance(value, int | float) else "-"
        best = f"{self.best[0]:.4f} ({self.best[1]})" if self.best else "-"
        self.printer(
            f"{self._elapsed()} {trial.trial_id} step {result.get(STEP, '?'):>5} "
            f"{self.metric}={shown}  best {best}"
        )

    def _finish(self, trial: Any, state: str, diagnosis: str) -> None:
        self._record(trial.trial_id, state, diagnosis)
        self.printer(f"{self._elapsed()} {trial.trial_id} {state}: {diagnosis}")
        if self.tracking is not None:
            run_id = self.tracking.run_id_for(trial.trial_id)
            if run_id is not None:
                self.tracking.finish_trial(run_id, state, diagnosis)

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        result = trial.last_result or {}
        state = final_state(result, self.spec.training.max_steps)
        self._finish(trial, state, str(result.get(DIAGNOSIS, "")))

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        error = getattr(trial, "error_file", None) or "see the trial's error file"
        self._finish(trial, STATE_FAILED, f"failed after retries ({error})")

    def on_experiment_end(self, trials: list[Any], **info: Any) -> None:
        # Trials restored as finished from an earlier driver (resume) never reach the hooks above.
        known = self.final_states
        for trial in trials:
            if trial.trial_id in known:
                continue
            result = trial.last_result or {}
            # A trial stopped by Ctrl-C is TERMINATED too, but it neither finished nor was
            # stopped by the scheduler (that goes through on_trial_complete): leave it
            # unrecorded, so that it shows as unfinished and `resume` continues it.
            finished = result.get("done") or int(result.get(STEP, 0)) >= self.max_steps
            if trial.status == "TERMINATED" and finished:
                state = final_state(result, self.max_steps)
                self._record(trial.trial_id, state, str(result.get(DIAGNOSIS, "")))
            elif trial.status == "ERROR":
                self._record(trial.trial_id, STATE_FAILED, "failed after retries")
