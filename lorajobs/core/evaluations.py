"""Graded generations of a job (lora_core.evaluation), stored and read: `job_evaluations` rows.

    record(session, job_id, event, metrics)   the worker's recorder, for each "evaluation" event:
                                              upserts the (job, step) row, adds a compact job
                                              event (scores, best step; no samples) and puts the
                                              job-level fields into `metrics` (the job row's
                                              metrics snapshot the recorder writes)
    scores_by_step(session, job_id)           {step: scores}: checkpoints' metrics, the curve
    samples(session, job_id, step)            one step's samples beside the base's, or None

Job-level fields (in `job.metrics`): `scores` (the latest evaluation's), `best_step`,
`best_metric`, `best_value`, `selection_reason`, `stopped_early`, `stop_reason`.

This module owns the table's writes (the recorder's calls, guarded by its lease).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from lora_core.evaluation.spec import EvaluationSpec
from lora_core.events import EvaluationEvent
from lorajobs.core import jobs
from lorajobs.core.errors import InvalidRequest
from lorajobs.core.settings import Settings
from lorajobs.core.tables import JobEvaluation

__all__ = ["record", "scores_by_step", "with_scores", "samples", "check_evaluation_bounds",
           "JOB_FIELDS", "SUMMARY_FIELDS"]

JOB_FIELDS = ("best_step", "best_metric", "best_value", "selection_reason", "stop_reason")
# what GET /v1/jobs/{id} shows of them (api/schemas.JobMetricsSummary)
SUMMARY_FIELDS = ("scores", "base_scores", *JOB_FIELDS, "stopped_early")


def record(session: Session, job_id: str, event: EvaluationEvent,
           metrics: dict[str, Any]) -> None:
    """Store one evaluation (a resumed run's repeat of a step overwrites it)."""
    row = session.scalar(select(JobEvaluation).where(JobEvaluation.job_id == job_id,
                                                     JobEvaluation.step == event.step))
    if row is None:
        row = JobEvaluation(job_id=job_id, step=event.step)
        session.add(row)
    row.scores = dict(event.scores)
    row.samples = list(event.samples)
    metrics["scores"] = dict(event.scores)
    if event.step == 0:
        metrics["base_scores"] = dict(event.scores)
    for name in JOB_FIELDS:
        value = getattr(event, name)
        if value is not None:
            metrics[name] = value
    if event.stop:
        metrics["stopped_early"] = True
    shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                      for k, v in event.scores.items())
    what = "base model" if event.step == 0 else f"step {event.step}"
    message = f"evaluation of the {what}: {shown or 'no scores'}"
    if event.stop:
        message += f"; stopping early: {event.stop_reason}"
    jobs.add_event(session, job_id, "evaluation", message, data={
        "step": event.step, "scores": event.scores, "best_step": event.best_step,
        "stop": event.stop, "stop_reason": event.stop_reason})


def scores_by_step(session: Session, job_id: str) -> dict[int, dict[str, Any]]:
    rows = session.execute(select(JobEvaluation.step, JobEvaluation.scores)
                           .where(JobEvaluation.job_id == job_id)
                           .order_by(JobEvaluation.step))
    return {step: scores or {} for step, scores in rows}


def with_scores(session: Session, job_id: str, rows: list[Any]) -> dict[int, dict[str, Any]]:
    """{step: checkpoint metrics + `scores`} for Checkpoint rows (scores only where evaluated)."""
    scores = scores_by_step(session, job_id) if rows else {}
    return {c.step: {**(c.metrics or {}), **({"scores": scores[c.step]}
                                              if c.step in scores else {})} for c in rows}


def samples(session: Session, job_id: str, step: int) -> dict[str, Any] | None:
    """{step, scores, base_scores, samples} or None when that step was not evaluated."""
    rows = {r.step: r for r in session.scalars(
        select(JobEvaluation).where(JobEvaluation.job_id == job_id,
                                    JobEvaluation.step.in_([0, step])))}
    row = rows.get(step)
    if row is None:
        return None
    base = rows.get(0)
    return {"step": step, "scores": row.scores or {},
            "base_scores": (base.scores or {}) if base is not None else None,
            "samples": row.samples or []}


def check_evaluation_bounds(spec: EvaluationSpec, settings: Settings) -> None:
    """422 naming the field when an evaluation asks more of a shared node than allowed."""
    for field, value, limit in (
            ("evaluation.num_samples", spec.num_samples, settings.evaluation_max_samples),
            ("evaluation.max_new_tokens", spec.max_new_tokens,
             settings.evaluation_max_new_tokens)):
        if value > limit:
            raise InvalidRequest(f"{field}={value} exceeds the limit of {limit}", param=field,
                                 code="limit_exceeded")
