"""Bearer-key authentication: every request re-reads its key row, so a revocation bites at once.

The principal is the `ApiKey` row; its `tenant_id` scopes every query a route makes, and
`is_admin` gates the operator endpoints (model registration, creating other tenants).

`AuthMiddleware` checks the key from the headers alone, before a byte of the body is read and
before the request takes a concurrency slot (api/limits.py): a request without a valid key
answers 401 having held nothing. The row it found travels in `scope["state"]` to
`deps.get_principal`, so a route does not read it twice. On SQLite the row is read on the
event loop itself (api/key_reader.py: no threadpool hop, never a wait), on PostgreSQL in a
threadpool call. Keys are only ever read from the `Authorization` header: never from a query
string, which access logs and browser histories keep (api/observability.py redacts them from
the access log all the same).
"""

from __future__ import annotations

import asyncio
import re

from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Receive, Scope, Send

from lorajobs.api.errors import error_response
from lorajobs.api.key_reader import SqliteKeyReader
from lorajobs.api.limits import has_body
from lorajobs.core import keys
from lorajobs.core.errors import Forbidden
from lorajobs.core.tables import ApiKey

__all__ = ["bearer", "authenticate", "authenticate_presented", "bearer_token", "require_admin",
           "AuthMiddleware", "AUTH_PREFIXES", "LOOKUPS_IN_FLIGHT", "PRINCIPAL_STATE"]

# auto_error=False: a missing or malformed header must answer in our error shape (401), not
# FastAPI's default 403 {"detail": ...}.
bearer = HTTPBearer(auto_error=False, description="an API key: `Authorization: Bearer lj_...`")

# Every route under these needs a key.
AUTH_PREFIXES = ("/v1/", "/openai/v1/")
# GET /v1/jobs/{id} (the polled hot read) checks the key in the same query as the job
# (routes/jobs.py, api/pg_job_reader.py): checking it here too would double its cost. It has no
# body to wait for, and its one query is bounded (pg_job_reader.COMMAND_TIMEOUT_S).
_SELF_AUTHENTICATED = re.compile(r"/v1/jobs/[^/]+/?")
# Key lookups and probes running outside the request slots at once (app.state.lookups): each
# holds one pooled connection inside one thread call, so with the slots' two connections a
# request (2 x 16) they stay within db.POOL_CAPACITY (40), and they never wait on a thread
# that waits on them.
LOOKUPS_IN_FLIGHT = 4
PRINCIPAL_STATE = "principal"  # scope["state"] key of the authenticated ApiKey row


def authenticate(session: Session, credentials: HTTPAuthorizationCredentials | None) -> ApiKey:
    """The live key row for the request's bearer token, or Unauthorized."""
    return keys.authenticate(session, credentials.credentials if credentials else None)


def authenticate_presented(sessions: sessionmaker[Session], presented: str | None) -> ApiKey:
    """`keys.authenticate` in a session of its own, one autocommit read (no BEGIN/COMMIT
    round trips, no connection kept once it returns): runs in one threadpool call."""
    with sessions() as session:
        if presented:
            session.connection(execution_options={"isolation_level": "AUTOCOMMIT"})
        return keys.authenticate(session, presented)


def bearer_token(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The credentials of `Authorization: Bearer <key>`, as HTTPBearer reads them; else None."""
    for name, value in headers:
        if name == b"authorization":
            scheme, _, credentials = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and credentials:
                return credentials
            return None
    return None


def needs_key(scope: Scope) -> bool:
    path = scope["path"]
    if not path.startswith(AUTH_PREFIXES):
        return False
    return not (scope["method"] == "GET" and _SELF_AUTHENTICATED.fullmatch(path))


class AuthMiddleware:
    """401 from the headers, before any body is read or any slot taken (see the module)."""

    def __init__(self, app: ASGIApp, sessions: sessionmaker[Session],
                 lookups: asyncio.Semaphore, reader: SqliteKeyReader | None = None) -> None:
        self.app = app
        self.sessions = sessions
        self.lookups = lookups
        self.reader = reader

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not needs_key(scope):
            await self.app(scope, receive, send)
            return
        presented = bearer_token(scope["headers"])
        try:
            presented = keys.check_presented(presented)  # no header: 401 without a query
            principal = self.reader.authenticate(presented) if self.reader else None
            if principal is None:  # PostgreSQL, or SQLite would have had to wait
                async with self.lookups:
                    principal = await run_in_threadpool(authenticate_presented, self.sessions,
                                                        presented)
        except Exception as exc:  # noqa: BLE001 - answered as the app's handlers would
            response = error_response(scope, exc)
            if has_body(scope):  # unread: the connection cannot carry another request
                response.headers["Connection"] = "close"
            await response(scope, receive, send)
            return
        scope.setdefault("state", {})[PRINCIPAL_STATE] = principal
        await self.app(scope, receive, send)


def require_admin(principal: ApiKey) -> ApiKey:
    if not principal.is_admin:
        raise Forbidden("this endpoint needs an admin key", param="Authorization")
    return principal
