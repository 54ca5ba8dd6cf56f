"""`/v1/jobs/{id}/checkpoints`: each saved step, whether it resumes, and its downloadable files."""

from __future__ import annotations

from collections import defaultdict

from fastapi import APIRouter

from lorajobs.api import queries
from lorajobs.api.deps import PrincipalDep, SessionDep
from lorajobs.api.schemas import ArtifactPublic, ArtifactSet, CheckpointPublic, CheckpointsPublic

router = APIRouter(prefix="/v1/jobs", tags=["checkpoints"])


@router.get("/{job_id}/checkpoints", response_model=CheckpointsPublic)
def list_checkpoints(job_id: str, session: SessionDep,
                     principal: PrincipalDep) -> CheckpointsPublic:
    """Checkpoints by step with their adapter (and merged, if merged) files."""
    queries.get_job(session, tenant_id=principal.tenant_id, job_id=job_id)
    files: dict[tuple[str, int | None], list[ArtifactPublic]] = defaultdict(list)
    for row in queries.list_artifacts(session, job_id=job_id):
        files[(row.kind, row.step)].append(ArtifactPublic.from_row(row))

    def artifact_set(kind: str, step: int) -> ArtifactSet | None:
        found = files.get((kind, step))
        return ArtifactSet(files=found, url=f"/v1/jobs/{job_id}/{kind}?step={step}") \
            if found else None

    return CheckpointsPublic(data=[
        CheckpointPublic(step=c.step, resumable=c.resumable,
                         adapter=artifact_set("adapter", c.step),
                         merged=artifact_set("merged", c.step), metrics=c.metrics or {},
                         created_at=c.created_at)
        for c in queries.list_checkpoints(session, job_id=job_id)
    ])
