"""Tenant-scoped reads of jobs and what hangs off them: the only way routes look rows up.

Every lookup takes the caller's `tenant_id`; a job of another tenant raises the same NotFound
as a missing one (404, never 403: ids of others must not be probeable).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    Row,
    Select,
    String,
    Text,
    and_,
    bindparam,
    case,
    cast,
    func,
    literal,
    or_,
    select,
    tuple_,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import Session, aliased

from lorajobs.core.errors import InvalidRequest, NotFound
from lorajobs.core.keys import check_key, check_presented, hash_key
from lorajobs.core.tables import (
    ApiKey,
    Artifact,
    Checkpoint,
    Job,
    JobEvent,
    JobMetric,
    JobStatus,
)

__all__ = [
    "get_job",
    "read_job_as",
    "JOB_AS_KEY",
    "JOBS_AS_KEYS",
    "job_row_as",
    "presented_digest",
    "list_jobs",
    "queue_position",
    "list_events",
    "list_metrics",
    "list_checkpoints",
    "checkpoint_artifacts",
    "list_artifacts",
    "get_artifact",
    "artifact_set",
]


def get_job(session: Session, *, tenant_id: str, job_id: str) -> Job:
    job = session.get(Job, job_id)
    if job is None or job.tenant_id != tenant_id:
        raise NotFound(f"no job {job_id!r}", param="job_id")
    return job


# GET /v1/jobs/{id}, the hottest route (clients poll it), in one round trip: the caller's key
# row (re-read on every request: a revocation bites at once), the job if it is that key's
# tenant's, and its queue position. Built once; psycopg prepares it after a few executions.
# Binds: `digest` (the presented key's sha256 hex), `job_id`.
_earlier = aliased(Job)
_JOB_FIELDS = ("id", "status", "stage", "attempt", "max_attempts", "cancel_requested",
               "progress", "metrics", "error", "created_at", "started_at", "finished_at",
               "base_model", "training_file", "validation_file", "suffix", "metadata_", "spec",
               "estimate", "compatibility")
_JOB_AS_KEY_COLUMNS = (
    ApiKey.key_hash.label("key_hash"), ApiKey.revoked_at.label("key_revoked_at"),
    *(getattr(Job, f).label(f) for f in _JOB_FIELDS),
    case((Job.status == JobStatus.QUEUED,
          select(func.count()).select_from(_earlier)
          .where(_earlier.status == JobStatus.QUEUED, _earlier.created_at < Job.created_at)
          .correlate(Job).scalar_subquery()),
         else_=None).label("queue_position"),
)
JOB_AS_KEY = (
    select(*_JOB_AS_KEY_COLUMNS)
    .select_from(ApiKey)
    .outerjoin(Job, and_(Job.id == bindparam("job_id"), Job.tenant_id == ApiKey.tenant_id))
    .where(ApiKey.key_hash == bindparam("digest"))
)
# The same read for many requests at once (PostgreSQL only: api/pg_job_reader.py coalesces the
# requests that arrive together into one round trip). Binds: `digests` and `job_ids`, equal
# length arrays; each result row carries `n`, the 1-based position of its request; a request
# whose key matches no row has no result row.
_requests = (func.unnest(bindparam("digests", type_=ARRAY(String)),
                         bindparam("job_ids", type_=ARRAY(String)))
             .table_valued("digest", "job_id", with_ordinality="n").render_derived(name="req"))
JOBS_AS_KEYS = (
    select(_requests.c.n, *_JOB_AS_KEY_COLUMNS)
    .select_from(_requests)
    .join(ApiKey, ApiKey.key_hash == _requests.c.digest)
    .outerjoin(Job, and_(Job.id == _requests.c.job_id, Job.tenant_id == ApiKey.tenant_id))
)


def read_job_as(session: Session, *, presented: str | None, job_id: str) -> Row:  # type: ignore[type-arg]
    """`get_job` for the holder of key `presented`, authenticated in the same query.

    Unauthorized exactly as `keys.authenticate` (missing, unknown or revoked key; checked
    before the job), then NotFound for a missing job or one of another tenant. The row has
    the job's fields by attribute name (as `JobPublic.from_row` reads them) and
    `queue_position`. The session's connection runs in autocommit: one SELECT, no
    BEGIN/ROLLBACK round trips."""
    digest = presented_digest(presented)
    conn = session.connection(execution_options={"isolation_level": "AUTOCOMMIT"})
    row = conn.execute(JOB_AS_KEY, {"digest": digest, "job_id": job_id}).first()
    return job_row_as(row, digest=digest, job_id=job_id)


def presented_digest(presented: str | None) -> str:
    """The digest to bind to JOB_AS_KEY; the "missing API key" 401 (no query) if none."""
    return hash_key(check_presented(presented))


def job_row_as(row: Any, *, digest: str, job_id: str) -> Any:
    """A JOB_AS_KEY result (None: no such key) -> the row, or 401 then 404 as `read_job_as`.
    Shared by the SQLAlchemy path and the asyncpg one, so both answer alike."""
    check_key(row.key_hash if row else None, row.key_revoked_at if row else None, digest)
    if row.id is None:
        raise NotFound(f"no job {job_id!r}", param="job_id")
    return row


def list_jobs(session: Session, *, tenant_id: str, status: str | None, limit: int,
              after: str | None,
              metadata: dict[str, str] | None = None) -> tuple[list[Job], bool]:
    """Newest first, keyset-paged on (created_at, id); `after` is the previous page's last id.
    `metadata`: keep jobs whose metadata holds every pair; `{}`: jobs with no metadata."""
    stmt = select(Job).where(Job.tenant_id == tenant_id)
    if metadata == {}:
        # An empty JSON object as stored by SQLAlchemy's JSON type on every backend.
        stmt = stmt.where(or_(Job.metadata_.is_(None), cast(Job.metadata_, Text) == "{}"))
    for key, value in (metadata or {}).items():
        stmt = stmt.where(Job.metadata_[key].as_string() == value)
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


def list_metrics(session: Session, *, job_id: str, limit: int,
                 after: int | None = None) -> tuple[list[JobMetric], bool]:
    """By step, keyset-paged: `after` is the last step of the previous page ((job, step) is
    unique). Returns (rows, has_more)."""
    stmt = select(JobMetric).where(JobMetric.job_id == job_id)
    if after is not None:
        stmt = stmt.where(JobMetric.step > after)
    return _page(session, stmt.order_by(JobMetric.step), limit)


def list_checkpoints(session: Session, *, job_id: str, limit: int, after: int | None = None,
                     newest_first: bool = False) -> tuple[list[Checkpoint], bool]:
    """By step (descending if `newest_first`), keyset-paged: `after` is the last step of the
    previous page, in the page's own order. Returns (rows, has_more)."""
    stmt = select(Checkpoint).where(Checkpoint.job_id == job_id)
    if after is not None:
        stmt = stmt.where(Checkpoint.step < after if newest_first else Checkpoint.step > after)
    order = Checkpoint.step.desc() if newest_first else Checkpoint.step
    return _page(session, stmt.order_by(order), limit)


def checkpoint_artifacts(session: Session, *, job_id: str, steps: list[int]) -> list[Artifact]:
    """The adapter and merged files of the given checkpoint steps (one page of checkpoints)."""
    if not steps:
        return []
    return list(session.scalars(select(Artifact).where(
        Artifact.job_id == job_id, Artifact.kind.in_(("adapter", "merged")),
        Artifact.step.in_(steps)).order_by(Artifact.kind, Artifact.step, Artifact.name)))


# Artifacts list by kind, checkpoints before the final files (step NULL) and by step, then by
# name; the id breaks ties. A page starts after the cursor artifact's place in that order.
def _artifact_sort_key(row: Any) -> tuple[Any, ...]:
    return (row.kind, 1 if row.step is None else 0, -1 if row.step is None else row.step,
            row.name, row.id)


_ARTIFACT_ORDER = (Artifact.kind, case((Artifact.step.is_(None), 1), else_=0),
                   func.coalesce(Artifact.step, -1), Artifact.name, Artifact.id)


def list_artifacts(session: Session, *, job_id: str, limit: int,
                   after: str | None = None) -> tuple[list[Artifact], bool]:
    """Every file of a job in a stable order, keyset-paged: `after` is the last artifact id
    of the previous page (unknown to this job: 422). Returns (rows, has_more)."""
    stmt = select(Artifact).where(Artifact.job_id == job_id)
    if after:
        anchor = session.get(Artifact, after)
        if anchor is None or anchor.job_id != job_id:
            raise InvalidRequest(f"unknown cursor {after!r}", param="after")
        stmt = stmt.where(tuple_(*_ARTIFACT_ORDER) > tuple_(
            *(literal(v) for v in _artifact_sort_key(anchor))))
    return _page(session, stmt.order_by(*_ARTIFACT_ORDER), limit)


def _page(session: Session, stmt: Select[Any], limit: int) -> tuple[list[Any], bool]:
    """One page in SQL: `limit + 1` rows are read to know whether there is another."""
    rows = list(session.scalars(stmt.limit(limit + 1)))
    return rows[:limit], len(rows) > limit


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
