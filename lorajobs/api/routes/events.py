"""`/v1/jobs/{id}/events`: the job's ordered event log, paged by event id, and as SSE."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request
from sse_starlette.sse import EventSourceResponse
from starlette.concurrency import run_in_threadpool

from lorajobs.api import queries
from lorajobs.api.deps import PrincipalDep, SessionDep
from lorajobs.api.schemas import MAX_EVENT_ID, EventPublic, EventsPublic
from lorajobs.service.models import JobStatus

router = APIRouter(prefix="/v1/jobs", tags=["events"])

STREAM_POLL_SECONDS = 0.5  # the DB is the source of truth; polling it keeps replicas simple
STREAM_BATCH = 100


@router.get("/{job_id}/events", response_model=EventsPublic)
def list_events(
    job_id: str,
    session: SessionDep,
    principal: PrincipalDep,
    after: Annotated[int | None, Query(ge=0, le=MAX_EVENT_ID)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> EventsPublic:
    """Events after the given id, oldest first."""
    queries.get_job(session, tenant_id=principal.tenant_id, job_id=job_id)
    rows, has_more = queries.list_events(session, job_id=job_id, after=after, limit=limit)
    return EventsPublic(data=[EventPublic.from_row(e) for e in rows], has_more=has_more,
                        next_cursor=rows[-1].id if rows else after)


@router.get("/{job_id}/events/stream")
async def stream_events(
    job_id: str,
    request: Request,
    principal: PrincipalDep,
    after: Annotated[int | None, Query(ge=0, le=MAX_EVENT_ID)] = None,
    last_event_id: Annotated[int | None, Header(ge=0, le=MAX_EVENT_ID)] = None,
) -> EventSourceResponse:
    """Server-sent events; ends after the job reaches a terminal status. Resumes from
    `Last-Event-ID` (or `after`)."""
    tenant_id = principal.tenant_id
    sessions = request.app.state.sessionmaker

    def poll(cursor: int | None) -> tuple[list[EventPublic], bool]:
        with sessions() as session:
            job = queries.get_job(session, tenant_id=tenant_id, job_id=job_id)
            rows, _ = queries.list_events(session, job_id=job_id, after=cursor,
                                          limit=STREAM_BATCH)
            return [EventPublic.from_row(r) for r in rows], job.status in JobStatus.TERMINAL

    await run_in_threadpool(poll, 0)  # 404 before the stream starts

    async def generate() -> AsyncIterator[dict[str, str]]:
        cursor = last_event_id if last_event_id is not None else after
        while not await request.is_disconnected():
            events, finished = await run_in_threadpool(poll, cursor)
            for event in events:
                cursor = event.id
                yield {"id": str(event.id), "event": event.type,
                       "data": json.dumps(event.model_dump(mode="json"))}
            if finished and len(events) < STREAM_BATCH:
                return
            if len(events) < STREAM_BATCH:
                await asyncio.sleep(STREAM_POLL_SECONDS)

    return EventSourceResponse(generate())
