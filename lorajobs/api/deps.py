"""Dependency aliases, defined once: `SessionDep`, `SettingsDep`, `StoreDep`, `PrincipalDep`.

Everything comes from `app.state` (set by `create_app(settings)`), never from module globals,
so two apps with two settings objects (tests: SQLite and PostgreSQL) never share state.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from lorajobs.api.auth import PRINCIPAL_STATE, authenticate_presented, bearer, require_admin
from lorajobs.core.settings import Settings
from lorajobs.core.storage import ArtifactStore
from lorajobs.core.tables import ApiKey

__all__ = [
    "SessionDep",
    "SettingsDep",
    "StoreDep",
    "PrincipalDep",
    "AdminDep",
    "EnqueueDep",
    "get_session",
    "get_principal",
]


# The attribute reads are `async def`: FastAPI runs a plain `def` dependency in the threadpool,
# one thread hop (~0.1-0.3 ms of CPU under load) per dependency per request for a getattr.
async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_session(request: Request) -> Iterator[Session]:
    with request.app.state.sessionmaker() as session:
        yield session


async def get_store(request: Request) -> ArtifactStore:
    return request.app.state.store


async def get_enqueue(request: Request) -> Callable[[str], None]:
    """How a committed job id reaches the broker (tests swap it on `app.state`)."""
    return request.app.state.enqueue


SettingsDep = Annotated[Settings, Depends(get_settings)]
# scope="function": the session closes when the route returns, before the response starts,
# so a download read slowly (limits.ConcurrencyLimitMiddleware frees its slot at the response
# start) holds no database connection while its body streams.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]
StoreDep = Annotated[ArtifactStore, Depends(get_store)]
EnqueueDep = Annotated[Callable[[str], None], Depends(get_enqueue)]


async def get_principal(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)],
) -> ApiKey:
    """The caller's key: the row AuthMiddleware read from the headers before the body (every
    /v1 and /openai/v1 route but the self-authenticating GET /v1/jobs/{id}); read here
    otherwise. Either way in a session of its own that ends with the read: FastAPI runs each
    sync dependency and the route in separate threadpool calls, and a connection kept across
    those hops (or for a whole SSE stream) is one the threads of other requests can starve
    on."""
    principal = request.scope.get("state", {}).get(PRINCIPAL_STATE)
    if principal is None:
        principal = await run_in_threadpool(
            authenticate_presented, request.app.state.sessionmaker,
            credentials.credentials if credentials else None)
    return principal


PrincipalDep = Annotated[ApiKey, Depends(get_principal)]


def get_admin(principal: PrincipalDep) -> ApiKey:
    return require_admin(principal)


AdminDep = Annotated[ApiKey, Depends(get_admin)]
