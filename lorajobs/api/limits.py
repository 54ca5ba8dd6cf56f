"""Request body limits, enforced before and while a body arrives (OWASP API4).

A declared `Content-Length` over the limit is refused before one byte is read; a body without
one (chunked) is counted as it streams and refused the moment it passes the limit, so nothing
is ever buffered past the cap. Upload paths get `max_upload_bytes` (+ multipart framing);
every other body gets `max_request_bytes`.

Also here: `ConcurrencyLimitMiddleware` (at most `api_max_concurrent_requests` requests in the
app at once; the rest wait in the event loop, holding nothing) and `NulByteMiddleware` (a NUL
in the path or query is refused with 422 before it reaches a database that cannot store it).
"""

from __future__ import annotations

import asyncio

from fastapi import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lorajobs.api.errors import error_body
from lorajobs.service.settings import Settings

__all__ = ["BodyLimitMiddleware", "ConcurrencyLimitMiddleware", "NulByteMiddleware",
           "UPLOAD_PATHS", "MULTIPART_OVERHEAD", "UNLIMITED_SUFFIXES"]

UPLOAD_PATHS = frozenset({"/v1/datasets", "/openai/v1/files"})
# Boundaries, part headers and small form fields around the file; the file itself is capped
# exactly by the dataset service.
MULTIPART_OVERHEAD = 64 * 1024
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
# Long-lived or database-free requests that must not wait behind (or hold) a request slot:
# an SSE stream lasts as long as its job and polls with short sessions of its own.
UNLIMITED_SUFFIXES = ("/events/stream", "/healthz")


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    def limit_for(self, path: str) -> int:
        if path.rstrip("/") in UPLOAD_PATHS:
            return self.settings.max_upload_bytes + MULTIPART_OVERHEAD
        return self.settings.max_request_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in _BODY_METHODS:
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _too_large(limit)(scope, receive, send)
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # fastapi.HTTPException passes through FastAPI's body parsing unchanged
                    # and reaches our handler as a 413 in the error shape.
                    raise HTTPException(413, f"request body exceeds {limit} bytes")
            return message

        await self.app(scope, counting_receive, send)


def _too_large(limit: int) -> JSONResponse:
    return JSONResponse(error_body("payload_too_large", f"request body exceeds {limit} bytes"),
                        status_code=413, headers={"Connection": "close"})


class ConcurrencyLimitMiddleware:
    """A bulkhead: at most `limit` requests inside the app; the rest queue here, in the event
    loop, without a thread or a database connection.

    Sync routes and dependencies run in a 40-thread pool and a request keeps its session's
    connection between those calls. Unbounded, 200 concurrent POST /v1/jobs held every pooled
    connection while all 40 threads waited for one: 30 s pool timeouts, then 500s. Bounded
    below the pool (db.POOL_CAPACITY) and the thread pool, no request ever waits on either.
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.slots = asyncio.Semaphore(limit)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].endswith(UNLIMITED_SUFFIXES):
            await self.app(scope, receive, send)
            return
        async with self.slots:
            await self.app(scope, receive, send)


class NulByteMiddleware:
    """NUL in a path or query parameter: 422. PostgreSQL text cannot hold NUL (psycopg raises
    DataError, which was a 500 on every id route) and no id or name of ours contains one."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and ("\x00" in scope["path"]
                                        or b"%00" in scope.get("query_string", b"")):
            response = JSONResponse(error_body("invalid_request",
                                               "NUL bytes are not allowed in the URL",
                                               "path"), status_code=422)
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)
