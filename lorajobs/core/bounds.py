"""Resource bounds of a job spec: what one tenant's job may ask of a shared node.

`lora_core.spec` bounds what is meaningful at all (a LoRA rank, a step count); these bound what
one job may take from hardware other tenants share, from settings and from the model. Checked at
submit (`submit.resolve`), before anything is stored; every problem is collected, then one 422
names the first field in `param` and lists all of them in `errors: [{field, message}]`.

    training.max_seq_length               <= settings.max_seq_length, the model's position limit
    training.batch_size                   <= settings.max_batch_size
    training.gradient_accumulation_steps  <= settings.max_gradient_accumulation_steps
    batch_size x max_seq_length           <= settings.max_batch_tokens (activation memory)
    distributed.num_processes             <= settings.max_processes_per_job
    checkpoints written                   <= settings.max_checkpoints_per_job
    merge "all": kept checkpoints + final <= settings.max_merges_per_job
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lora_core.spec import DistributedSpec, TrainingSpec
from lorajobs.core.errors import InvalidRequest
from lorajobs.core.settings import Settings

__all__ = ["JobShape", "check_job_bounds", "checkpoints_written", "merges_written",
           "spread_checkpoints"]


@dataclass(frozen=True)
class JobShape:
    """What the bounds look at: the spec's sections plus what the data and model make of it."""

    training: TrainingSpec
    distributed: DistributedSpec
    merge: str
    num_examples: int
    total_steps: int
    max_positions: int | None  # the model's position limit (config.json), None if unstated


def checkpoints_written(shape: JobShape) -> int:
    """Checkpoints the trainer saves: one per `save_steps`, else one per epoch (HF's rule)."""
    t = shape.training
    if t.save_steps:
        return shape.total_steps // t.save_steps
    per_step = t.batch_size * t.gradient_accumulation_steps * shape.distributed.num_processes
    steps_per_epoch = max(1, math.ceil(shape.num_examples / per_step))
    return math.ceil(shape.total_steps / steps_per_epoch)


def spread_checkpoints(shape: JobShape, settings: Settings) -> int | None:
    """`save_steps` for a spec that left it unset: None (once per epoch) while that stays
    within max_checkpoints_per_job, else the interval that writes at most that many."""
    if checkpoints_written(shape) <= settings.max_checkpoints_per_job:
        return None
    return math.ceil(shape.total_steps / settings.max_checkpoints_per_job)


def merges_written(shape: JobShape) -> int:
    """Merged models (each a full copy of the base weights): "all" merges every kept
    checkpoint (`save_total_limit` rotates the older ones away) and the final adapter."""
    if shape.merge == "none":
        return 0
    if shape.merge == "final":
        return 1
    kept = checkpoints_written(shape)
    if shape.training.save_total_limit is not None:
        kept = min(kept, shape.training.save_total_limit)
    return kept + 1


def _problems(shape: JobShape, settings: Settings, model_name: str) -> list[tuple[str, str]]:
    t, problems = shape.training, []

    def over(field: str, value: int, limit: int, what: str) -> None:
        if value > limit:
            problems.append((field, f"{field}={value} exceeds {what} of {limit}"))

    over("training.max_seq_length", t.max_seq_length, settings.max_seq_length, "the limit")
    if shape.max_positions is not None:
        over("training.max_seq_length", t.max_seq_length, shape.max_positions,
             f"the position limit of model {model_name!r}")
    over("training.batch_size", t.batch_size, settings.max_batch_size, "the limit")
    over("training.gradient_accumulation_steps", t.gradient_accumulation_steps,
         settings.max_gradient_accumulation_steps, "the limit")
    tokens = t.batch_size * t.max_seq_length
    if tokens > settings.max_batch_tokens:
        problems.append(("training.batch_size",
                         f"batch_size x max_seq_length = {tokens} tokens per micro-batch "
                         f"exceeds the limit of {settings.max_batch_tokens}; lower either, or "
                         "raise gradient_accumulation_steps instead"))
    over("distributed.num_processes", shape.distributed.num_processes,
         settings.max_processes_per_job, "the processes a worker has")
    saves = checkpoints_written(shape)
    if saves > settings.max_checkpoints_per_job:
        field = "training.save_steps" if t.save_steps else "training.epochs"
        problems.append((field, f"this run writes {saves} checkpoints; the limit is "
                                f"{settings.max_checkpoints_per_job}: raise save_steps"))
    merges = merges_written(shape)
    if merges > settings.max_merges_per_job:
        problems.append(("merge", f"merge 'all' writes {merges} merged models (every kept "
                                  f"checkpoint + the final one); the limit is "
                                  f"{settings.max_merges_per_job}: use merge 'final', a larger "
                                  "save_steps, or save_total_limit"))
    return problems


def check_job_bounds(shape: JobShape, settings: Settings, *, model_name: str) -> None:
    """Raise one InvalidRequest (code `spec_limit_exceeded`) listing every bound the spec breaks."""
    problems = _problems(shape, settings, model_name)
    if problems:
        field, message = problems[0]
        raise InvalidRequest(message, param=field, code="spec_limit_exceeded", details={
            "errors": [{"field": f, "message": m} for f, m in problems]})
