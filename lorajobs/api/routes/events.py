"""`/v1/jobs/{id}/events`: the job's ordered event log, paged by event id, and as SSE."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request
from sse_starlette.sse import EventSourceResponse
from starlette.types import Receive, Scope, Send

from lorajobs.api import queries
from lorajobs.api.deps import PrincipalDep, SessionDep
from lorajobs.api.errors import error_body
from lorajobs.api.schemas import MAX_EVENT_ID, EventPublic, EventsPublic
from lorajobs.api.streams import End, Subscription, hub_for

router = APIRouter(prefix="/v1/jobs", tags=["events"])
# A client that stops reading fills its socket; a send blocked this long ends the stream and
# frees its slot (it resumes with Last-Event-ID when it reads again).
SEND_TIMEOUT_SECONDS = 30.0


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
    """Server-sent events, resumed from `Last-Event-ID` (or `after`). Ends with `event: end`
    once the job is terminal and every event was sent; ends without it after
    stream_max_seconds (reconnect with Last-Event-ID), and with `event: error` when the key
    is revoked. 429 past the open-stream limits (api/streams.py)."""
    hub = hub_for(request.app.state)
    cursor = last_event_id if last_event_id is not None else (after or 0)
    sub = hub.subscribe(job_id=job_id, key_id=principal.id, cursor=cursor)
    try:
        await hub.check_job(tenant_id=principal.tenant_id, job_id=job_id)  # 404 before 200
    except BaseException:
        hub.unsubscribe(sub)
        raise
    max_seconds = request.app.state.settings.stream_max_seconds
    return _Stream(_sse(sub, max_seconds), release=lambda: hub.unsubscribe(sub))


async def _sse(sub: Subscription, max_seconds: float) -> AsyncIterator[dict[str, str]]:
    """The stream's frames: its events as they are queued, then how it ended."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + max_seconds
    while True:
        try:
            item = await asyncio.wait_for(sub.queue.get(), deadline - loop.time())
        except TimeoutError:
            yield {"comment": "stream_max_seconds reached: reconnect with Last-Event-ID"}
            return
        if isinstance(item, End):
            if item.reason == "finished":
                yield {"event": "end", "data": json.dumps({"reason": "finished"})}
            elif item.reason == "revoked":
                yield {"event": "error", "data": json.dumps(
                    error_body("unauthorized", "API key revoked", "Authorization"))}
            else:
                yield {"comment": f"stream ended ({item.reason}): reconnect with Last-Event-ID"}
            return
        for event in item:
            yield {"id": str(event.id), "event": event.type,
                   "data": json.dumps(event.model_dump(mode="json"))}


class _Stream(EventSourceResponse):
    """Releases its subscription however the response ends (client gone, server shutdown,
    a send error), even if the generator never started."""

    def __init__(self, content: AsyncIterator[dict[str, str]],
                 release: Callable[[], None]) -> None:
        super().__init__(content, send_timeout=SEND_TIMEOUT_SECONDS)
        self._release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()
