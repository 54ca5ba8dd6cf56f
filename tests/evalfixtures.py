"""Graded-generation rows for a finished fake-trainer job, written as the worker's recorder
writes them (lorajobs.core.evaluations.record): the dashboard and CLI tests read them back."""

from __future__ import annotations

from sqlalchemy import update

from lora_core.events import EvaluationEvent
from lorajobs.core import evaluations
from lorajobs.core.db import get_sessionmaker
from lorajobs.core.tables import Job
from tests.client.live import Live

__all__ = ["record_evaluations", "BEST_REASON", "EVALUATION_CURVE"]

BEST_REASON = "step 2 has the highest exact_match (1.0) of 2 evaluated checkpoint(s)"

# What GET /v1/jobs/{id}/evaluations answers once `record_evaluations` ran.
EVALUATION_CURVE = [{"step": 0, "scores": {"exact_match": 0.0}},
                    {"step": 2, "scores": {"exact_match": 1.0}},
                    {"step": 4, "scores": {"exact_match": 0.5}}]


def _sample(i: int, out: str, score: float) -> dict:
    return {"index": i, "prompt": f"Name the animal: red fox {i}", "reference": "fox",
            "base_output": "tree", "output": out, "scores": {"exact_match": score}}


def record_evaluations(live: Live, job_id: str) -> None:
    """Steps 0 (base: 'tree'), 2 ('fox', best) and 4 ('fix'); two samples each, the second an
    output that looks like markup."""
    with get_sessionmaker(live.svc.settings)() as session:
        metrics: dict = {}
        for step, score, out in ((0, 0.0, "tree"), (2, 1.0, "fox"), (4, 0.5, "fix")):
            evaluations.record(session, job_id, EvaluationEvent(
                step=step, scores={"exact_match": score}, best_step=2 if step else None,
                best_metric="exact_match" if step else None,
                selection_reason=BEST_REASON if step else None,
                samples=[_sample(0, out, score), _sample(1, "<b>x</b>", 0.0)]), metrics)
        job = session.get(Job, job_id)
        assert job is not None
        session.execute(update(Job).where(Job.id == job_id)
                        .values(metrics={**(job.metrics or {}), **metrics}))
        session.commit()
