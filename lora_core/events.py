"""The trainer child's report channel: JSON lines appended to an events file, and the protocol
they follow, defined once here as pydantic models for both sides.

Why a file and not stdout: torch, transformers and DeepSpeed print to stdout/stderr freely, and
under torchrun several ranks share them. Only rank 0 writes this file; the supervising worker
tails it. Each line is one `TrainerEvent`, told apart by its `type` (every event also has
`time`, seconds since the epoch):

    started     StartedEvent     {total_steps, world_size, resumed_from_step, num_examples,
                                  num_tokens, num_truncated, num_dropped}  (tokens of the
                                  training file: the service stores them, service/tokencounts)
    progress    ProgressEvent    {step, total_steps, epoch, loss, learning_rate, grad_norm,
                                  tokens_per_second, tokens_seen, eta_seconds; method "dpo"
                                  adds rewards_chosen, rewards_rejected, reward_margin,
                                  reward_accuracy}
    eval        EvalEvent        {step, eval_loss}
    evaluation  EvaluationEvent  {step, scores, samples, best_step, best_metric, best_value,
                                  selection_reason, stop, stop_reason}  (graded generations)
    checkpoint  CheckpointEvent  {step, path, adapter_path, resumable, save_seconds}
    stage       StageEvent       {stage: Stage}  preparing | training | saving | merging |
                                                 verifying
    merged      MergedEvent      {step, path, max_abs_diff, files, final}
    warning     WarningEvent     {message}
    finished    FinishedEvent    {status: completed | stopped, adapter_path, metrics, merged}
    error       ErrorEvent       {code, message, param, user_fault, errors}  (a `JobError`,
                                  + a dataset error's `[{line, field, message}]`)

The writer validates what it writes (`EventWriter.emit` builds the model: a misspelt field is
an error in the child, not a silently dropped value in the service); the reader
(`parse_event`) validates what it reads, so the worker dispatches on model types. Lines that
are not JSON or not a valid event are skipped by the worker (logged), never fatal.

`JobError` is the `{code, message, param, user_fault}` shape of every job failure, the
trainer's and the service's alike; the service stores it as the job's `error`.

Torch-free: the worker and the API import it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

__all__ = [
    "Stage",
    "JobError",
    "StartedEvent",
    "ProgressEvent",
    "EvalEvent",
    "EvaluationEvent",
    "CheckpointEvent",
    "StageEvent",
    "MergedEvent",
    "WarningEvent",
    "FinishedEvent",
    "ErrorEvent",
    "TrainerEvent",
    "parse_event",
    "EventWriter",
    "NullEventWriter",
    "read_events",
    "iter_events",
]


class Stage(StrEnum):
    """Where a running job is, in order (lora_core.workflow emits them; the job row shows it)."""

    PREPARING = "preparing"  # model headers, LoRA spec, every data line
    TRAINING = "training"
    SAVING = "saving"        # adapters get their sha256 manifests
    MERGING = "merging"
    VERIFYING = "verifying"  # merged dirs re-hashed, headers parsed


class JobError(BaseModel):
    """Why a job failed. `param`: the field to fix, if one; `user_fault`: bad data or spec (the
    user fixes it) vs. the system's (OOM, worker lost: not the user's doing)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    code: str
    message: str
    param: str | None = None
    user_fault: bool = False


class _Event(BaseModel):
    model_config = ConfigDict(extra="forbid")

    time: float = Field(default_factory=time.time)


class StartedEvent(_Event):
    type: Literal["started"] = "started"
    total_steps: int
    world_size: int = 1
    resumed_from_step: int | None = None
    num_examples: int | None = None
    num_tokens: int | None = None     # loss-bearing tokens of the training file, after
    num_truncated: int | None = None  # truncation at max_seq_length; examples cut, and
    num_dropped: int | None = None    # dropped (no response token left)


class ProgressEvent(_Event):
    type: Literal["progress"] = "progress"
    step: int
    total_steps: int | None = None
    epoch: float | None = None
    loss: float | None = None
    learning_rate: float | None = None
    grad_norm: float | None = None
    tokens_per_second: float | None = None
    tokens_seen: int | None = None  # running total, all ranks: a bench times any window
    eta_seconds: float | None = None
    # DPO (method "dpo") only, means over the logged steps' pairs: implicit rewards
    # beta * (log pi - log ref) of the chosen and the rejected completion, their difference,
    # and the fraction of pairs whose chosen reward is the higher
    rewards_chosen: float | None = None
    rewards_rejected: float | None = None
    reward_margin: float | None = None
    reward_accuracy: float | None = None


class EvalEvent(_Event):
    type: Literal["eval"] = "eval"
    step: int
    eval_loss: float | None = None


class EvaluationEvent(_Event):
    """Graded generations (lora_core.evaluation): step 0 = the base model, else the checkpoint
    of that step. `scores`: mean per grader (+ valid_loss when known); `samples`: [{index,
    prompt, reference, base_output, output, scores}]; best_* and stop: the selection so far."""

    type: Literal["evaluation"] = "evaluation"
    step: int
    scores: dict[str, float | None] = Field(default_factory=dict)
    samples: list[dict[str, Any]] = Field(default_factory=list)
    best_step: int | None = None
    best_metric: str | None = None
    best_value: float | None = None
    selection_reason: str | None = None
    stop: bool = False
    stop_reason: str | None = None


class CheckpointEvent(_Event):
    type: Literal["checkpoint"] = "checkpoint"
    step: int
    path: str                        # checkpoint-<step>/, sealed (COMPLETE written)
    adapter_path: str | None = None  # its PEFT adapter dir
    resumable: bool = True
    # The training loop's stall for this checkpoint: from the end of its step to the seal
    # (Trainer's save + adapter export + COMPLETE); what bench/checkpoint_bench.py divides by
    # the step time. Uploading it is the worker's business and never stalls the trainer.
    save_seconds: float | None = None


class StageEvent(_Event):
    type: Literal["stage"] = "stage"
    stage: Stage


class MergedEvent(_Event):
    type: Literal["merged"] = "merged"
    step: int | None = None
    path: str
    max_abs_diff: float | None = None  # merged vs. base+adapter logits
    files: list[Any] = Field(default_factory=list)  # [{path, size, sha256}] (manifest.json)
    final: bool | None = None  # the final adapter's merge (None: told by the dir name)


class WarningEvent(_Event):
    type: Literal["warning"] = "warning"
    message: str


class FinishedEvent(_Event):
    type: Literal["finished"] = "finished"
    status: Literal["completed", "stopped"]
    adapter_path: str | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)
    merged: list[str] = Field(default_factory=list)


class ErrorEvent(_Event):
    type: Literal["error"] = "error"
    code: str
    message: str
    param: str | None = None
    user_fault: bool = False
    errors: list[dict[str, Any]] | None = None  # a DatasetError's [{line, field, message}]

    @classmethod
    def of(cls, error: JobError, **extra: Any) -> ErrorEvent:
        return cls(**error.model_dump(), **extra)

    def job_error(self) -> JobError:
        return JobError(code=self.code, message=self.message, param=self.param,
                        user_fault=self.user_fault)


TrainerEvent = Annotated[
    StartedEvent | ProgressEvent | EvalEvent | CheckpointEvent | StageEvent | MergedEvent
    | WarningEvent | FinishedEvent | ErrorEvent | EvaluationEvent,
    Field(discriminator="type"),
]
_ADAPTER: TypeAdapter[TrainerEvent] = TypeAdapter(TrainerEvent)


def parse_event(obj: Any) -> TrainerEvent:
    """One decoded JSON object -> its event model; pydantic.ValidationError if it is none."""
    return _ADAPTER.validate_python(obj)


class EventWriter:
    """Appends one validated event per line and flushes, so a reader never sees half a line."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - lives with the writer

    def emit(self, type_: str, **fields: Any) -> None:
        """The `on_event(type, **fields)` callback lora_core's train/run take."""
        self.write(parse_event({"type": type_, **fields}))

    def write(self, event: _Event) -> None:
        self._fh.write(event.model_dump_json() + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


class NullEventWriter:
    """Used on ranks other than 0 and when no events file is asked for."""

    def emit(self, type_: str, **fields: Any) -> None:  # noqa: D102 - same as EventWriter
        return None

    def write(self, event: _Event) -> None:  # noqa: D102 - same as EventWriter
        return None

    def close(self) -> None:
        return None


def read_events(path: str | os.PathLike[str], offset: int = 0) -> tuple[list[dict[str, Any]], int]:
    """Read complete lines from `offset`; return (JSON objects, new_offset). A partial tail is
    left for the next read; lines that are not JSON objects are skipped. `parse_event` types
    them."""
    p = Path(path)
    if not p.exists():
        return [], offset
    with open(p, "rb") as fh:
        fh.seek(offset)
        data = fh.read()
    end = data.rfind(b"\n")
    if end < 0:
        return [], offset
    events = []
    for raw in data[: end + 1].splitlines():
        if raw.strip():
            try:
                obj = json.loads(raw)
            except ValueError:  # not JSON, or not even UTF-8 (UnicodeDecodeError)
                continue
            if isinstance(obj, dict):
                events.append(obj)
    return events, offset + end + 1


def iter_events(path: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """All complete events in a file, in order."""
    events, _ = read_events(path, 0)
    yield from events
