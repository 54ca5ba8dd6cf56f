"""`/v1/jobs/{id}/checkpoints`: each saved step, whether it resumes, and its downloadable files."""

from __future__ import annotations

from collections import defaultdict
from typing import Annotated

from fastapi import APIRouter, Query

from lorajobs.api import queries
from lorajobs.api.deps import PrincipalDep, SessionDep
from lorajobs.api.schemas import (
    MAX_STEP,
    ArtifactPublic,
    ArtifactSet,
    CheckpointPublic,
    CheckpointsPublic,
)
from lorajobs.core.evaluations import with_scores

router = APIRouter(prefix="/v1/jobs", tags=["checkpoints"])

CHECKPOINTS_PAGE_MAX = 1000  # checkpoints are kept bounded per job: one page is all of them


@router.get("/{job_id}/checkpoints", response_model=CheckpointsPublic)
def list_checkpoints(job_id: str, session: SessionDep, principal: PrincipalDep,
                     after: Annotated[int | None, Query(ge=0, le=MAX_STEP,
                                                        description="the last step already seen")]
                     = None,
                     limit: Annotated[int, Query(ge=1, le=CHECKPOINTS_PAGE_MAX)]
                     = CHECKPOINTS_PAGE_MAX) -> CheckpointsPublic:
    """Checkpoints by step with their adapter (and merged, if merged) files."""
    queries.get_job(session, tenant_id=principal.tenant_id, job_id=job_id)
    rows, has_more = queries.list_checkpoints(session, job_id=job_id, after=after, limit=limit)
    files: dict[tuple[str, int | None], list[ArtifactPublic]] = defaultdict(list)
    for row in queries.checkpoint_artifacts(session, job_id=job_id, steps=[c.step for c in rows]):
        files[(row.kind, row.step)].append(ArtifactPublic.from_row(row))

    def artifact_set(kind: str, step: int) -> ArtifactSet | None:
        found = files.get((kind, step))
        return ArtifactSet(files=found, url=f"/v1/jobs/{job_id}/{kind}?step={step}") \
            if found else None

    metrics = with_scores(session, job_id, rows)  # + graded-generation scores (issue 14)
    return CheckpointsPublic(data=[
        CheckpointPublic(step=c.step, resumable=c.resumable,
                         adapter=artifact_set("adapter", c.step),
                         merged=artifact_set("merged", c.step), metrics=metrics[c.step],
                         created_at=c.created_at)
        for c in rows
    ], has_more=has_more, next_cursor=rows[-1].step if rows else after)
