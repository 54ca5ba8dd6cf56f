"""Liveness, readiness and Prometheus metrics: outside /v1, cheap, and outside the request
slots (api/limits.py), so they answer while the API is saturated; their database work goes
through `app.state.lookups`. /healthz and /readyz are open; /metrics is, unless
`metrics_token` is set."""

from __future__ import annotations

import hmac
import importlib
import logging

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from lorajobs.core.errors import Unauthorized
from lorajobs.core.settings import Settings

router = APIRouter(tags=["health"])
log = logging.getLogger(__name__)


def _broker_ok(settings: Settings) -> bool | None:
    """`lorajobs.core.queue.broker_ok()` when that module exists; None when it does not."""
    try:
        queue = importlib.import_module("lorajobs.core.queue")
    except ImportError:
        return None
    check = getattr(queue, "broker_ok", None)
    if check is None:
        return None
    try:
        return bool(check(settings))
    except Exception:  # noqa: BLE001 - a failing check means "not ready", never a 500
        log.exception("broker check failed")
        return False


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process answers (on the event loop: no thread, no slot, no database)."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    """Ready (200) when the database (and the broker, if checkable) answers and a request
    slot is free; 503 otherwise: `unavailable` (a dependency is down) or `degraded` (every
    slot busy: requests here wait). Answers while the API is saturated (no slot of its own).
    `checks.store` reports the object store but does not change the status: its outage fails
    downloads and uploads only (503 each), and every replica sees it alike, so taking them all
    out of rotation would fail every other request too."""
    app = request.app
    async with app.state.lookups:  # the database check only: a broker that is down makes
        database = await run_in_threadpool(_database_ok, app.state.sessionmaker)
    broker = await run_in_threadpool(_broker_ok, app.state.settings)  # its check wait
    store = await run_in_threadpool(app.state.store.reachable)
    checks = {"database": "ok" if database else "unreachable",
              "broker": {None: "unchecked", True: "ok", False: "unreachable"}[broker]}
    slots = app.state.request_slots
    checks["requests"] = "saturated" if slots.saturated else "ok"
    checks["store"] = "ok" if store else "unreachable"
    down = not database or broker is False
    status = "unavailable" if down else "degraded" if slots.saturated else "ok"
    body = {"status": status, "checks": checks,
            "requests": {"in_flight": slots.in_use, "limit": slots.limit,
                         "waiting": slots.waiting}}
    return JSONResponse(body, status_code=200 if status == "ok" else 503)


def _database_ok(sessions: sessionmaker[Session]) -> bool:
    try:
        with sessions() as session:
            session.execute(text("SELECT 1"))
        return True
    except Exception as exc:  # noqa: BLE001
        log.warning("readiness: database unreachable: %s", exc)
        return False


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    """Prometheus exposition of this app's registry; with `metrics_token` set, only for
    `Authorization: Bearer <metrics_token>`."""
    app = request.app
    _check_metrics_token(app.state.settings.metrics_token, request.headers.get("authorization"))
    async with app.state.lookups:
        body = await run_in_threadpool(generate_latest, app.state.metrics_registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)


def _check_metrics_token(token: str | None, authorization: str | None) -> None:
    if token is None:
        return
    scheme, _, presented = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not presented:
        raise Unauthorized("/metrics needs 'Authorization: Bearer <metrics token>'",
                           param="Authorization")
    if not hmac.compare_digest(presented.encode(), token.encode()):
        raise Unauthorized("invalid metrics token", param="Authorization")
