"""Request body limits, enforced before and while a body arrives (OWASP API4).

A declared `Content-Length` over the limit is refused before one byte is read; a body without
one (chunked) is counted as it streams and refused the moment it passes the limit, so nothing
is ever buffered past the cap. Upload paths get `max_upload_bytes` (+ multipart framing);
every other body gets `max_request_bytes`.

Also here: `BodyTimeoutMiddleware` (a body that does not arrive in time: 408; a JSON body is
read whole before the request takes a slot), `ConcurrencyLimitMiddleware` (at most
`api_max_concurrent_requests` requests in the app at once; the rest wait in the event loop,
holding nothing; `RequestSlots` is its state, which /readyz reports) and `NulByteMiddleware`
(a NUL in the path or query is refused with 422 before it reaches a database that cannot
store it). The order, outermost first (app.py):

    BodyLimit (declared 413) -> Auth (401 from the headers, api/auth.py) -> BodyTimeout
    (408; JSON read whole) -> ConcurrencyLimit (slot) -> the app

so a request without a valid key, or whose body is still arriving, holds no slot; and a
request whose response has started (its route and session are done: what is left is sending)
gives its slot back, each body send bounded by response_send_timeout_seconds.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lorajobs.api.errors import error_body
from lorajobs.core.settings import Settings

__all__ = ["BodyLimitMiddleware", "BodyTimeoutMiddleware", "ConcurrencyLimitMiddleware",
           "NulByteMiddleware", "RequestSlots", "UPLOAD_PATHS", "MULTIPART_UPLOAD_PATHS",
           "MULTIPART_OVERHEAD",
           "UNLIMITED_PATHS", "UNLIMITED_SUFFIXES", "has_body", "is_upload"]

UPLOAD_PATHS = frozenset({"/v1/datasets", "/openai/v1/files"})
# Uploads only when multipart (a model's files, up to max_model_bytes); JSON bodies otherwise
# (POST /v1/models {"name", "source"}).
MULTIPART_UPLOAD_PATHS = frozenset({"/v1/models"})
# Boundaries, part headers and small form fields around the file; the file itself is capped
# exactly by the dataset service.
MULTIPART_OVERHEAD = 64 * 1024
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_TIMED_METHODS = _BODY_METHODS | {"DELETE"}
# Requests that must not wait behind (or hold) a request slot: probes and scrapes must answer
# while the API is saturated (their database work goes through app.state.lookups, one
# connection inside one thread call each); an SSE stream lasts as long as its job and polls
# with short sessions of its own.
UNLIMITED_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
UNLIMITED_SUFFIXES = ("/events/stream",)
# JSON bodies held in memory at once (read, waiting for a slot, or being served): 64 bodies
# of the 1 MiB max_request_bytes, thousands of ordinary ones. Past it, a request waits with
# its body unread (TCP holds it back), so waiting requests cannot grow the API's memory.
BUFFERED_BODIES_BYTES = 64 * 1024 * 1024
# scope["state"] key of the authenticated ApiKey row (auth.PRINCIPAL_STATE; auth imports us).
_PRINCIPAL = "principal"
logger = logging.getLogger(__name__)


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    def limit_for(self, scope: Scope) -> int:
        if scope["path"].rstrip("/") in MULTIPART_UPLOAD_PATHS and is_upload(scope):
            return self.settings.max_model_bytes + MULTIPART_OVERHEAD
        if scope["path"].rstrip("/") in UPLOAD_PATHS:
            return self.settings.max_upload_bytes + MULTIPART_OVERHEAD
        return self.settings.max_request_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in _BODY_METHODS:
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope)
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
    return _error(413, "payload_too_large", f"request body exceeds {limit} bytes")


class RequestSlots:
    """The bulkhead's state: at most `limit` requests inside the app, of which at most
    `uploads` uploads. Shared by ConcurrencyLimitMiddleware and /readyz (`saturated`)."""

    def __init__(self, limit: int, uploads: int) -> None:
        self.limit = limit
        self.in_use = 0
        self.waiting = 0
        self._slots = asyncio.Semaphore(limit)
        self._uploads = asyncio.Semaphore(min(uploads, limit))

    @property
    def saturated(self) -> bool:
        """No slot free: the next request would wait."""
        return self.in_use >= self.limit

    async def acquire(self, *, upload: bool = False) -> None:
        """Wait for a slot (an upload: for an upload slot first), counted in `waiting`."""
        self.waiting += 1
        try:
            if upload:
                await self._uploads.acquire()
            try:
                await self._slots.acquire()
            except BaseException:
                if upload:
                    self._uploads.release()
                raise
        finally:
            self.waiting -= 1
        self.in_use += 1

    def release(self, *, upload: bool = False) -> None:
        self.in_use -= 1
        self._slots.release()
        if upload:
            self._uploads.release()


class ConcurrencyLimitMiddleware:
    """A bulkhead: at most `limit` requests inside the app; the rest queue here, in the event
    loop, without a thread or a database connection.

    Sync routes and dependencies run in a 40-thread pool and a request keeps its session's
    connection between those calls. Unbounded, 200 concurrent POST /v1/jobs held every pooled
    connection while all 40 threads waited for one: 30 s pool timeouts, then 500s. Bounded
    below the pool (db.POOL_CAPACITY) and the thread pool, no request ever waits on either.

    It counts requests being served, not sockets: it sits inside AuthMiddleware and
    BodyTimeoutMiddleware, so a request takes its slot once its key is valid and its JSON body
    has arrived whole. An upload streams inside its slot (BodyTimeoutMiddleware paces it).
    A request gives its slot back once its response has started: the route has returned and
    its session is closed (deps.SessionDep), what is left is sending a body from memory or from
    files. Before, 16 downloads read at 1 byte/s held every slot for as long as they lasted.
    Each body send must complete within response_send_timeout_seconds, else the response is
    abandoned and uvicorn closes the connection (once what it already buffered is flushed).
    """

    def __init__(self, app: ASGIApp, slots: RequestSlots, send_timeout: float) -> None:
        self.app = app
        self.slots = slots
        self.send_timeout = send_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or _unlimited(scope["path"]):
            await self.app(scope, receive, send)  # event streams bound their own sends
            return
        upload = is_upload(scope)
        await self.slots.acquire(upload=upload)
        held = True

        def release() -> None:
            nonlocal held
            if held:
                held = False
                self.slots.release(upload=upload)

        async def timed_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                await send(message)
                release()
                return
            try:
                async with asyncio.timeout(self.send_timeout):
                    await send(message)
            except TimeoutError:
                raise _SendTimedOut from None

        try:
            await self.app(scope, receive, timed_send)
        except _SendTimedOut:
            # Returning with the response incomplete: uvicorn closes the connection.
            logger.warning("%s %s: a response send did not complete within %g s; the "
                           "connection is closed", scope["method"], scope["path"],
                           self.send_timeout)
        finally:
            release()


class _SendTimedOut(Exception):
    """A response body send did not complete in time (the client stopped reading)."""


def _unlimited(path: str) -> bool:
    return path in UNLIMITED_PATHS or path.endswith(UNLIMITED_SUFFIXES)


def is_upload(scope: Scope) -> bool:
    if scope["method"] not in _BODY_METHODS:
        return False
    path = scope["path"].rstrip("/")
    if path in MULTIPART_UPLOAD_PATHS:
        ctype = dict(scope["headers"]).get(b"content-type", b"")
        return ctype.lower().startswith(b"multipart/")
    return path in UPLOAD_PATHS


def has_body(scope: Scope) -> bool:
    """The request declares a body (a Content-Length over 0, or chunked)."""
    headers = dict(scope["headers"])
    declared = headers.get(b"content-length")
    return b"transfer-encoding" in headers or (declared is not None and declared != b"0")


class BodyTimeoutMiddleware:
    """Slow and stalled bodies (a slowloris on the body): 408, and nothing held meanwhile.

    uvicorn has no body timeout (h11 and httptools wait as long as the socket is open; its
    only timer is keep-alive, between requests). A JSON body (POST/PUT/PATCH/DELETE, at most
    max_request_bytes) is read here, whole, within body_timeout_seconds, before
    ConcurrencyLimitMiddleware gives the request a slot; the app then gets it from memory.
    An upload (UPLOAD_PATHS, up to max_upload_bytes) cannot be buffered: the app streams it
    inside its slot through a receive that answers 408 after body_timeout_seconds without a
    byte, or when, after that grace, the average rate falls below
    upload_min_bytes_per_second (a deadline that grows with every byte: a declared 200 MiB
    has about an hour at 64 KiB/s). Either 408 closes the connection. JSON bodies held in
    memory share BUFFERED_BODIES_BYTES: waiting requests cannot grow the API's memory. One
    tenant's bodies hold at most buffered_body_share_per_tenant of it (past it: 429 at once),
    and a body waits at most body_timeout_seconds for room in the budget (then 503), so one
    tenant's stalled bodies cannot hold every other tenant's POSTs.
    """

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self.budget = _ByteBudget(
            BUFFERED_BODIES_BYTES,
            share=int(BUFFERED_BODIES_BYTES * settings.buffered_body_share_per_tenant))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] != "http" or scope["method"] not in _TIMED_METHODS
                or not has_body(scope)):
            await self.app(scope, receive, send)
            return
        if is_upload(scope):
            await self.app(scope, _PacedReceive(receive, self.settings), send)
            return
        limit = self.settings.max_request_bytes
        declared = dict(scope["headers"]).get(b"content-length", b"")
        size = int(declared) if declared.isdigit() else limit
        if size > limit:
            await _too_large(limit)(scope, receive, send)
            return
        # Held until the response: the body stays in memory while the request waits for its
        # slot and is served. A request waits here, body unread, while the budget (or its
        # tenant's share) is spent; body_timeout_seconds at most.
        principal = scope.get("state", {}).get(_PRINCIPAL)
        owner = getattr(principal, "tenant_id", None)
        timeout = self.settings.body_timeout_seconds
        try:
            async with self.budget.reserve(size, owner=owner, timeout=timeout):
                await self._buffered(scope, receive, send, limit)
        except _NoRoom as full:
            await _busy(full, timeout)(scope, receive, send)

    async def _buffered(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        timeout = self.settings.body_timeout_seconds
        try:
            body = await _read_body(receive, timeout, limit)
        except TimeoutError:
            await _timed_out(timeout)(scope, receive, send)
            return
        except HTTPException:  # over the limit: BodyLimitMiddleware's or ours
            await _too_large(limit)(scope, receive, send)
            return
        if body is None:  # the client went away
            return
        await self.app(scope, _replay(body, receive), send)


class _NoRoom(Exception):
    """`own`: the owner's share is full (at once); else no room in the budget in time."""

    def __init__(self, own: bool) -> None:
        super().__init__(own)
        self.own = own


class _ByteBudget:
    """At most `capacity` bytes reserved at once, at most `share` (if set) by one owner.
    `reserve(n, owner=...)` past the owner's share: _NoRoom(own=True) at once (its own
    requests fill it; waiting would let them queue without end); past the capacity: waits for
    room (FIFO-ish), `timeout` seconds at most, then _NoRoom(own=False)."""

    def __init__(self, capacity: int, share: int | None = None) -> None:
        self.capacity = capacity
        self.share = share  # None: no cap per owner
        self.used = 0
        self.by_owner: dict[str | None, int] = {}
        self._room = asyncio.Condition()

    @asynccontextmanager
    async def reserve(self, n: int, *, owner: str | None = None,
                      timeout: float | None = None) -> AsyncIterator[None]:
        n = min(n, self.capacity, self.share or self.capacity)
        if self.share is not None and self.by_owner.get(owner, 0) + n > self.share:
            raise _NoRoom(own=True)
        # Counted against the owner while it waits, so its waiting requests are capped too.
        self.by_owner[owner] = self.by_owner.get(owner, 0) + n
        try:
            async with asyncio.timeout(timeout), self._room:
                await self._room.wait_for(lambda: self.used + n <= self.capacity)
                self.used += n
        except BaseException as exc:
            self._forget(owner, n)
            if isinstance(exc, TimeoutError):
                raise _NoRoom(own=False) from None
            raise
        try:
            yield
        finally:
            async with self._room:
                self.used -= n
                self._forget(owner, n)
                self._room.notify_all()

    def _forget(self, owner: str | None, n: int) -> None:
        left = self.by_owner[owner] - n
        if left:
            self.by_owner[owner] = left
        else:
            del self.by_owner[owner]


async def _read_body(receive: Receive, timeout: float, limit: int) -> bytes | None:
    """The whole body within `timeout` seconds (TimeoutError), at most `limit` bytes
    (HTTPException 413), or None on a disconnect."""
    chunks: list[bytes] = []
    size = 0
    async with asyncio.timeout(timeout):
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise HTTPException(413, f"request body exceeds {limit} bytes")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """The buffered body as one message; then the client's own receive (disconnects)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay


class _PacedReceive:
    """An upload's receive: 408 after `body_timeout_seconds` without a byte, or below
    `upload_min_bytes_per_second` on average once that grace has passed (see above)."""

    def __init__(self, receive: Receive, settings: Settings) -> None:
        self.receive = receive
        self.grace = settings.body_timeout_seconds
        self.min_rate = settings.upload_min_bytes_per_second
        self.started: float | None = None
        self.received = 0
        self.done = False

    def _time_left(self, now: float) -> float:
        assert self.started is not None
        left = self.grace  # idle: bytes must keep coming
        if self.min_rate:
            left = min(left, self.started + self.grace + self.received / self.min_rate - now)
        return left

    async def __call__(self) -> Message:
        if self.done:  # after the body: only a disconnect is left to wait for
            return await self.receive()
        now = asyncio.get_running_loop().time()
        if self.started is None:
            self.started = now
        left = self._time_left(now)
        try:
            if left <= 0:
                raise TimeoutError
            async with asyncio.timeout(left):
                message = await self.receive()
        except TimeoutError:
            raise HTTPException(408, f"the upload stalled: no byte for {self.grace:g} s, or "
                                f"under {self.min_rate} bytes/s on average",
                                headers={"Connection": "close"}) from None
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            self.done = not message.get("more_body", False)
        return message


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse(error_body(code, message), status_code=status,
                        headers={"Connection": "close"})


def _busy(full: _NoRoom, timeout: float) -> JSONResponse:
    """No room to buffer the body: 429 at once when the tenant's own bodies fill its share,
    503 after `timeout` when the whole budget is full; the body was never read, so the
    connection closes."""
    if full.own:
        response = _error(429, "limit_exceeded", "this tenant's request bodies in memory fill "
                          "its share of the server's buffer (too many large bodies at once)")
    else:
        response = _error(503, "server_busy", "the server's buffer for request bodies is full; "
                          f"none freed in {timeout:g} s")
    response.headers["Retry-After"] = "1"
    return response


def _timed_out(timeout: float) -> JSONResponse:
    return _error(408, "request_timeout",
                  f"the request body did not arrive within {timeout:g} s")


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
