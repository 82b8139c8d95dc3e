"""How a trial ended: one `TrialState`, decided in one place (`TrialOutcome.decide`).

The worker reports facts (the step reached, the engine's verdict); the driver decides the state
once from Tune's view of the trial, records it, and everything else (the progress lines, the
results table, MLflow's state tag and run status, the relabelling on resume) only reads it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

# Keys of what a trial reports to Tune, besides its metrics.
STEP = "step"
VERDICT = "verdict"
DIAGNOSIS = "diagnosis"


class TrialState(str, Enum):
    RUNNING = "running"
    COMPLETED = "completed"  # trained to max_steps
    STOPPED_EARLY = "stopped_early"  # the scheduler (ASHA) stopped it: a normal end
    DEGENERATE = "degenerate"  # stopped by its own diagnosis (NaN, collapse, ...)
    FAILED = "failed"  # crashed on every retry
    UNFINISHED = "unfinished"  # interrupted (Ctrl-C, `stop`, a dead driver): `resume` goes on

    def __str__(self) -> str:
        return self.value

    @property
    def usable(self) -> bool:
        """Its metric says something about its configuration (it may rank and win)."""
        return self not in {TrialState.FAILED, TrialState.DEGENERATE}


UNFINISHED_DIAGNOSIS = "interrupted; `simpo-sweep resume` continues it"


@dataclass(frozen=True)
class TrialOutcome:
    state: TrialState
    diagnosis: str
    step: int = 0

    @classmethod
    def decide(
        cls,
        last_result: Mapping[str, Any] | None,
        *,
        max_steps: int,
        error: str | None = None,
        ended: bool = True,
    ) -> TrialOutcome:
        """`ended`: Tune finished the trial (it returned, or the scheduler stopped it);
        False for a trial that was cut off (Ctrl-C) and will continue on resume."""
        result = last_result or {}
        step = int(result.get(STEP, 0) or 0)
        diagnosis = str(result.get(DIAGNOSIS, "") or "")
        if error is not None:
            reason = f"failed after retries ({error})" if error else "failed after retries"
            return cls(TrialState.FAILED, reason, step)
        if result.get(VERDICT) == "degenerate":
            return cls(TrialState.DEGENERATE, diagnosis, step)
        if step >= max_steps:
            return cls(TrialState.COMPLETED, diagnosis, step)
        if ended:
            return cls(TrialState.STOPPED_EARLY, diagnosis or f"stopped at step {step}", step)
        return cls(TrialState.UNFINISHED, UNFINISHED_DIAGNOSIS, step)

    def to_json(self) -> dict[str, Any]:
        return {"state": self.state.value, "diagnosis": self.diagnosis, "step": self.step}

    @classmethod
    def from_json(cls, document: Any) -> TrialOutcome:
        if isinstance(document, list):  # files of the first version: [state, diagnosis]
            state, diagnosis = document
            return cls(TrialState(state), str(diagnosis))
        return cls(TrialState(document["state"]), document["diagnosis"], document.get("step", 0))
