"""`/v1/jobs`: create (idempotent with `Idempotency-Key`), list, get, cancel, pause, resume."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response, Security
from fastapi.security import HTTPAuthorizationCredentials
from starlette.concurrency import run_in_threadpool

from lorajobs.api import queries
from lorajobs.api.auth import bearer
from lorajobs.api.deps import EnqueueDep, PrincipalDep, SessionDep, SettingsDep, StoreDep
from lorajobs.api.schemas import JobCreate, JobPublic, JobsPublic
from lorajobs.core import jobs, submit

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


@router.post("", status_code=201, response_model=JobPublic)
def create_job(
    body: JobCreate,
    response: Response,
    session: SessionDep,
    settings: SettingsDep,
    store: StoreDep,
    enqueue: EnqueueDep,
    principal: PrincipalDep,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
) -> JobPublic:
    """Create a job: 201; a replay of the same Idempotency-Key and body: the same job, 200."""
    job, created, position = submit.submit_job(
        session, tenant_id=principal.tenant_id, request=body, settings=settings, store=store,
        idempotency_key=idempotency_key, enqueue=enqueue,
    )
    if not created:
        response.status_code = 200
        position = queries.queue_position(session, job)
    return JobPublic.from_row(job, queue_position=position)


@router.get("", response_model=JobsPublic)
def list_jobs(
    session: SessionDep,
    principal: PrincipalDep,
    status: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: str | None = None,
) -> JobsPublic:
    """The tenant's jobs, newest first; `after` = the previous page's `next_cursor`."""
    rows, has_more = queries.list_jobs(session, tenant_id=principal.tenant_id, status=status,
                                       limit=limit, after=after)
    data = [JobPublic.from_row(j, queue_position=queries.queue_position(session, j))
            for j in rows]
    return JobsPublic(data=data, has_more=has_more,
                      next_cursor=rows[-1].id if has_more else None)


@router.get("/{job_id}", response_model=JobPublic)
async def get_job(
    job_id: str,
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)],
) -> Response:
    """One job with progress, estimate, compatibility and queue position."""
    # The hot path (clients poll it): one query for key + job + queue position, awaited on
    # the event loop through asyncpg on PostgreSQL (api/pg_job_reader.py), one threadpool call on
    # SQLite; the JSON written by pydantic once (a returned Response skips FastAPI's
    # re-validation against response_model, which stays for the docs).
    presented = credentials.credentials if credentials else None
    reader = request.app.state.pg_reader
    if reader is not None:
        digest = queries.presented_digest(presented)
        row = queries.job_row_as(await reader.job_as(digest=digest, job_id=job_id),
                                 digest=digest, job_id=job_id)
    else:
        row = await run_in_threadpool(_read_job_as, request, presented, job_id)
    job = JobPublic.from_row(row, queue_position=row.queue_position)
    return Response(job.model_dump_json(), media_type="application/json")


def _read_job_as(request: Request, presented: str | None, job_id: str) -> Any:
    with request.app.state.sessionmaker() as session:
        return queries.read_job_as(session, presented=presented, job_id=job_id)


@router.post("/{job_id}/cancel", response_model=JobPublic)
def cancel_job(job_id: str, session: SessionDep, principal: PrincipalDep) -> JobPublic:
    """Queued: cancelled now. Running: the worker stops it. Finished: 409."""
    job = queries.get_job(session, tenant_id=principal.tenant_id, job_id=job_id)
    job = jobs.request_cancel(session, job)
    return JobPublic.from_row(job, queue_position=queries.queue_position(session, job))


@router.post("/{job_id}/pause", response_model=JobPublic)
def pause_job(job_id: str, session: SessionDep, principal: PrincipalDep) -> JobPublic:
    """Queued: paused now. Running: checkpointed and stopped, worker freed. Finished: 409."""
    job = queries.get_job(session, tenant_id=principal.tenant_id, job_id=job_id)
    job = jobs.request_pause(session, job)
    return JobPublic.from_row(job, queue_position=queries.queue_position(session, job))


@router.post("/{job_id}/resume", response_model=JobPublic)
def resume_job(job_id: str, session: SessionDep, enqueue: EnqueueDep,
               principal: PrincipalDep) -> JobPublic:
    """Paused: queued again; training continues from its last checkpoint. Otherwise 409."""
    job = queries.get_job(session, tenant_id=principal.tenant_id, job_id=job_id)
    job = jobs.request_resume(session, job)
    enqueue(job.id)
    return JobPublic.from_row(job, queue_position=queries.queue_position(session, job))
