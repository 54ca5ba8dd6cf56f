"""Liveness, readiness and Prometheus metrics: unauthenticated, cheap, outside /v1."""

from __future__ import annotations

import importlib
import logging

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from lorajobs.api.deps import SessionDep, SettingsDep
from lorajobs.service.settings import Settings

router = APIRouter(tags=["health"])
log = logging.getLogger(__name__)


def _broker_ok(settings: Settings) -> bool | None:
    """`lorajobs.service.queue.broker_ok()` when that module exists; None when it does not."""
    try:
        queue = importlib.import_module("lorajobs.service.queue")
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
def healthz() -> dict[str, str]:
    """The process answers."""
    return {"status": "ok"}


@router.get("/readyz")
def readyz(session: SessionDep, settings: SettingsDep) -> JSONResponse:
    """Ready when the database (and the broker, if checkable) answers; 503 otherwise."""
    checks: dict[str, str] = {}
    try:
        session.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:  # noqa: BLE001
        log.warning("readiness: database unreachable: %s", exc)
        checks["database"] = "unreachable"
    broker = _broker_ok(settings)
    checks["broker"] = {None: "unchecked", True: "ok", False: "unreachable"}[broker]
    ready = checks["database"] == "ok" and broker is not False
    return JSONResponse({"status": "ok" if ready else "unavailable", "checks": checks},
                        status_code=200 if ready else 503)


@router.get("/metrics", include_in_schema=False)
def metrics(request: Request) -> Response:
    """Prometheus exposition of this app's registry."""
    return Response(generate_latest(request.app.state.metrics_registry),
                    media_type=CONTENT_TYPE_LATEST)
