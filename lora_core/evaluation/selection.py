"""Best checkpoint and early stopping: a small state machine over evaluation results.

    sel = Selector(metric="exact_match", mode="max", patience=2)
    sel.observe(step=100, value=0.4)   -> improved
    sel.observe(step=200, value=0.9)   -> improved (best: 200)
    sel.observe(step=300, value=0.8)   -> 1 without improvement
    sel.observe(step=400, value=0.9)   -> 2 without improvement: should_stop (0.9 is not > 0.9)

Step 0 (the base model) is never a candidate: the job's result is a trained checkpoint. A value
of None (e.g. no validation loss at that step) counts as no improvement. Ties keep the earlier
step. Torch-free.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["Selector"]


@dataclass
class Selector:
    metric: str
    mode: Literal["min", "max"]
    patience: int | None = None
    min_delta: float = 0.0
    best_step: int | None = None
    best_value: float | None = None
    since_best: int = 0
    history: list[tuple[int, float | None]] = field(default_factory=list)

    def _better(self, value: float) -> bool:
        if self.best_value is None:
            return True
        if self.mode == "max":
            return value > self.best_value + self.min_delta
        return value < self.best_value - self.min_delta

    def observe(self, step: int, value: float | None) -> bool:
        """Record one evaluation of a checkpoint; True if it is the new best."""
        self.history.append((step, value))
        if value is not None and math.isfinite(value) and self._better(value):
            self.best_step, self.best_value, self.since_best = step, value, 0
            return True
        self.since_best += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.since_best >= self.patience

    def stop_reason(self) -> str:
        return (f"{self.metric} did not improve (mode {self.mode}, min_delta {self.min_delta}) "
                f"for {self.since_best} evaluation(s) after its best {self.best_value} at step "
                f"{self.best_step} (patience {self.patience})")

    def summary(self) -> dict[str, Any]:
        """The job-level fields: which step is the result and why."""
        if self.best_step is None:
            return {}
        return {"best_step": self.best_step, "best_metric": self.metric,
                "best_value": self.best_value,
                "selection_reason": f"step {self.best_step} has the "
                f"{'highest' if self.mode == 'max' else 'lowest'} {self.metric} "
                f"({self.best_value}) of {len(self.history)} evaluated checkpoint(s)"}
