"""Graded generations of a job (issue 14): the score curve and one step's samples.

    GET /v1/jobs/{id}/evaluations                   [{step, scores}], step 0 = the base model
    GET /v1/jobs/{id}/checkpoints/{step}/samples    {step, scores, base_scores, samples:
                                                     [{index, prompt, reference, base_output,
                                                       output, scores}]}

The checkpoints' own metrics (`GET /v1/jobs/{id}/checkpoints`) carry the same scores.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path

from lorajobs.api import queries
from lorajobs.api.deps import PrincipalDep, SessionDep
from lorajobs.api.schemas import MAX_STEP
from lorajobs.core import evaluations
from lorajobs.core.errors import NotFound

router = APIRouter(prefix="/v1/jobs", tags=["evaluations"])


@router.get("/{job_id}/evaluations")
def list_evaluations(job_id: str, session: SessionDep,
                     principal: PrincipalDep) -> dict[str, Any]:
    """Mean score per grader at each evaluated step (step 0: the base model)."""
    queries.get_job(session, tenant_id=principal.tenant_id, job_id=job_id)
    scores = evaluations.scores_by_step(session, job_id)
    return {"object": "list", "data": [{"step": step, "scores": s} for step, s in scores.items()]}


@router.get("/{job_id}/checkpoints/{step}/samples")
def checkpoint_samples(job_id: str, session: SessionDep, principal: PrincipalDep,
                       step: Annotated[int, Path(ge=0, le=MAX_STEP)]) -> dict[str, Any]:
    """The step's graded samples beside the base model's outputs (step 0: the base alone)."""
    queries.get_job(session, tenant_id=principal.tenant_id, job_id=job_id)
    found = evaluations.samples(session, job_id, step)
    if found is None:
        raise NotFound(f"job {job_id} has no evaluation at step {step}", param="step")
    return {"object": "evaluation.samples", "job_id": job_id, **found}
