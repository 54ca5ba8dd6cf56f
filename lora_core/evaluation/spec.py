"""`evaluation` in a run/job spec: held-out prompts, generation settings, graders, selection.

    {"file": null,                 # default: the validation file; in a job a dataset id, in a
                                   # RunSpec a path
     "num_samples": 32,            # the first N records of that file
     "max_new_tokens": 32, "temperature": 0.0,   # 0 = greedy
     "batch_size": 16,             # prompts generated together (left-padded)
     "graders": [{"type": "string_check", "name": "exact_match", "operation": "eq",
                  "input": "{{sample.output_text}}", "reference": "{{item.reference}}"}],
     "select": {"metric": "exact_match", "mode": "max"},   # or "valid_loss" (mode min)
     "early_stopping": {"patience": 3, "min_delta": 0.0}}

Torch-free: the API validates job specs with it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from lora_core.evaluation.graders import Grader, exact_match_grader

__all__ = ["EvaluationSpec", "SelectSpec", "EarlyStoppingSpec", "VALID_LOSS",
           "MAX_NEW_TOKENS", "MAX_SAMPLES"]

VALID_LOSS = "valid_loss"
MAX_NEW_TOKENS = 4096  # what is meaningful; a service caps it lower (settings)
MAX_SAMPLES = 4096
MAX_GRADERS = 16


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SelectSpec(_Strict):
    """Which checkpoint becomes the job's result. `mode` default: min for valid_loss, max for a
    grader's score."""

    metric: str = Field(VALID_LOSS, min_length=1, max_length=64)
    mode: Literal["min", "max"] | None = None

    @property
    def resolved_mode(self) -> Literal["min", "max"]:
        if self.mode is not None:
            return self.mode
        return "min" if self.metric == VALID_LOSS else "max"


class EarlyStoppingSpec(_Strict):
    """Stop when `patience` evaluations in a row did not beat the best by more than
    `min_delta` (in the select metric's direction)."""

    patience: int = Field(ge=1, le=1000)
    min_delta: float = Field(0.0, ge=0)


class EvaluationSpec(_Strict):
    file: str | None = Field(None, min_length=1, max_length=4096)
    num_samples: int = Field(32, ge=1, le=MAX_SAMPLES)
    max_new_tokens: int = Field(32, ge=1, le=MAX_NEW_TOKENS)
    temperature: float = Field(0.0, ge=0, le=2)
    batch_size: int = Field(16, ge=1, le=512)
    graders: list[Grader] = Field(default_factory=lambda: list[Grader]([exact_match_grader()]),
                                  min_length=1, max_length=MAX_GRADERS)
    select: SelectSpec | None = None
    early_stopping: EarlyStoppingSpec | None = None

    @model_validator(mode="after")
    def _consistent(self) -> EvaluationSpec:
        names = [g.name for g in self.graders]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"graders: names must be unique; repeated: {dupes}")
        if VALID_LOSS in names:
            raise ValueError(f"graders: {VALID_LOSS!r} is reserved for the validation loss")
        if self.select is not None and self.select.metric not in (VALID_LOSS, *names):
            raise ValueError(f"select.metric {self.select.metric!r} is neither "
                             f"{VALID_LOSS!r} nor a grader's name ({names})")
        if self.early_stopping is not None and self.select is None:
            raise ValueError("early_stopping needs select: {metric, mode} to know what "
                             "improving means")
        return self
