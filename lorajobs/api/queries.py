"""Tenant-scoped reads of jobs and what hangs off them: the only way routes look rows up.

Every lookup takes the caller's `tenant_id`; a job of another tenant raises the same NotFound
as a missing one (404, never 403: ids of others must not be probeable).
"""

from __future__ import annotations

from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import Session

from lorajobs.service.errors import InvalidRequest, NotFound
from lorajobs.service.models import Artifact, Checkpoint, Job, JobEvent, JobMetric, JobStatus

__all__ = [
    "get_job",
    "list_jobs",
    "queue_position",
    "list_events",
    "list_metrics",
    "list_checkpoints",
    "list_artifacts",
    "get_artifact",
    "artifact_set",
]


def get_job(session: Session, *, tenant_id: str, job_id: str) -> Job:
    job = session.get(Job, job_id)
    if job is None or job.tenant_id != tenant_id:
        raise NotFound(f"no job {job_id!r}", param="job_id")
    return job


def list_jobs(session: Session, *, tenant_id: str, status: str | None, limit: int,
              after: str | None) -> tuple[list[Job], bool]:
    """Newest first, keyset-paged on (created_at, id); `after` is the previous page's last id."""
    stmt = select(Job).where(Job.tenant_id == tenant_id)
    if status is not None:
        if status not in JobStatus.ALL:
            raise InvalidRequest(f"unknown status {status!r}; one of {list(JobStatus.ALL)}",
                                 param="status")
        stmt = stmt.where(Job.status == status)
    if after:
        try:
            anchor = get_job(session, tenant_id=tenant_id, job_id=after)
        except NotFound as exc:
            raise InvalidRequest(f"unknown cursor {after!r}", param="after") from exc
        stmt = stmt.where(or_(Job.created_at < anchor.created_at,
                              and_(Job.created_at == anchor.created_at, Job.id < anchor.id)))
    rows = list(session.scalars(stmt.order_by(Job.created_at.desc(), Job.id.desc())
                                .limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def queue_position(session: Session, job: Job) -> int | None:
    """Queued jobs of every tenant created before this one (0 = next to be picked up)."""
    if job.status != JobStatus.QUEUED:
        return None
    return session.scalar(select(func.count()).select_from(Job).where(
        Job.status == JobStatus.QUEUED, Job.created_at < job.created_at))


def list_events(session: Session, *, job_id: str, after: int | None,
                limit: int) -> tuple[list[JobEvent], bool]:
    """Ordered by the global event id: `after` is the last id the client saw."""
    stmt = select(JobEvent).where(JobEvent.job_id == job_id)
    if after is not None:
        stmt = stmt.where(JobEvent.id > after)
    rows = list(session.scalars(stmt.order_by(JobEvent.id).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def list_metrics(session: Session, *, job_id: str) -> list[JobMetric]:
    return list(session.scalars(
        select(JobMetric).where(JobMetric.job_id == job_id).order_by(JobMetric.step)))


def list_checkpoints(session: Session, *, job_id: str) -> list[Checkpoint]:
    return list(session.scalars(
        select(Checkpoint).where(Checkpoint.job_id == job_id).order_by(Checkpoint.step)))


def list_artifacts(session: Session, *, job_id: str) -> list[Artifact]:
    return list(session.scalars(select(Artifact).where(Artifact.job_id == job_id).order_by(
        Artifact.kind, Artifact.step.is_(None), Artifact.step, Artifact.name)))


def get_artifact(session: Session, *, job_id: str, artifact_id: str) -> Artifact:
    row = session.get(Artifact, artifact_id)
    if row is None or row.job_id != job_id:
        raise NotFound(f"no artifact {artifact_id!r}", param="artifact_id")
    return row


def artifact_set(session: Session, *, job_id: str, kind: str,
                 step: int | None) -> list[Artifact]:
    """The files of one adapter/merged model. No step: the final one (rows with step NULL),
    else the highest step present. NotFound if there are none."""
    base = select(Artifact).where(Artifact.job_id == job_id, Artifact.kind == kind)
    if step is None:
        rows = list(session.scalars(base.where(Artifact.step.is_(None)).order_by(Artifact.name)))
        if not rows:
            last = session.scalar(select(func.max(Artifact.step)).where(
                Artifact.job_id == job_id, Artifact.kind == kind))
            if last is not None:
                rows = list(session.scalars(
                    base.where(Artifact.step == last).order_by(Artifact.name)))
    else:
        rows = list(session.scalars(base.where(Artifact.step == step).order_by(Artifact.name)))
    if not rows:
        where = f" at step {step}" if step is not None else ""
        raise NotFound(f"job {job_id} has no {kind} artifacts{where}", param="step")
    return rows
