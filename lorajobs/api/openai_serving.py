"""`/openai/v1` inference: chat/completions and completions proxied to vLLM, and models.

    client ─▶ AuthMiddleware (the tenant's key) ─▶ route(tenant, body.model)
           ─▶ a server of the target where the model is loaded ─▶ bytes relayed as they come

`ft:` names resolve to the tenant's own deployments only (another tenant's name is 404, as
OpenAI answers a model you cannot see); other names to a target's base models. The body is
forwarded as sent (vLLM validates it) and the answer relayed unbuffered, SSE streams included
(api/upstream_http.py: kept-alive connections, the body as it arrives). Routes are cached per
(tenant, model) for ROUTE_CACHE_SECONDS, and dropped by a deploy or undeploy in this process;
another API process sees a change within that time.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from lorajobs.api.deps import PrincipalDep, SettingsDep
from lorajobs.api.openai_compat import OpenAIRoute
from lorajobs.api.upstream_http import UpstreamConnectError, UpstreamPool, UpstreamResponse
from lorajobs.core import serving
from lorajobs.core.errors import InvalidRequest, NotFound, UpstreamUnavailable

__all__ = ["router", "forget_routes", "close_http"]

router = APIRouter(prefix="/openai/v1", tags=["openai-compatible"], route_class=OpenAIRoute)

ROUTE_CACHE_SECONDS = 2.0
CONNECT_TIMEOUT_S = 3.0
# Response headers worth relaying; hop-by-hop ones and content-length (we re-chunk) are not.
RELAYED_HEADERS = (b"content-type", b"content-encoding", b"x-request-id")
PROXY_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "the server's answer, relayed (JSON, or text/event-stream when "
                         "`stream` is true)"},
    502: {"description": "no server of the model's target answered (serving_unavailable)"}}


def _http(app: FastAPI) -> UpstreamPool:
    pool: UpstreamPool | None = getattr(app.state, "serving_http", None)
    if pool is None:
        pool = UpstreamPool(connect_timeout=CONNECT_TIMEOUT_S,
                            read_timeout=app.state.settings.serving_read_timeout_seconds)
        app.state.serving_http = pool
    return pool


async def close_http(app: FastAPI) -> None:
    pool: UpstreamPool | None = getattr(app.state, "serving_http", None)
    if pool is not None:
        pool.close()


def _routes(app: FastAPI) -> dict[tuple[str, str], tuple[float, list[str], str | None]]:
    cache = getattr(app.state, "serving_routes", None)
    if cache is None:
        cache = app.state.serving_routes = {}
    return cache


def forget_routes(app: FastAPI) -> None:
    _routes(app).clear()


async def _route(request: Request, tenant_id: str, model: str) -> tuple[list[str], str | None]:
    cache = _routes(request.app)
    hit = cache.get((tenant_id, model))
    now = time.monotonic()
    if hit is not None and hit[0] > now:
        return hit[1], hit[2]

    def lookup() -> tuple[list[str], str | None]:
        with request.app.state.sessionmaker() as session:
            return serving.route(session, request.app.state.settings, tenant_id=tenant_id,
                                 model=model)

    urls, key = await run_in_threadpool(lookup)
    cache[(tenant_id, model)] = (now + ROUTE_CACHE_SECONDS, urls, key)
    return urls, key


async def _proxy(request: Request, tenant_id: str, path: str) -> Response:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise InvalidRequest("the body is not JSON", param="body") from exc
    model = body.get("model") if isinstance(body, dict) else None
    if not isinstance(model, str) or not model:
        raise InvalidRequest("model is required", param="model")
    urls, api_key = await _route(request, tenant_id, model)
    headers = [(b"content-type", b"application/json")]
    if api_key:
        headers.append((b"authorization", f"Bearer {api_key}".encode("latin-1")))
    pool = _http(request.app)
    failures = []
    for url in urls:  # loaded servers first; the next one only if this one refuses connections
        try:
            resp = await pool.post(url, path, raw, headers)
        except UpstreamConnectError as exc:
            failures.append(f"{url}: {exc}")
            continue
        relayed = {k.decode("latin-1"): v.decode("latin-1") for k, v in resp.headers
                   if k in RELAYED_HEADERS}
        return StreamingResponse(_relay(resp), status_code=resp.status, headers=relayed,
                                 background=BackgroundTask(_close, resp))
    raise UpstreamUnavailable(f"no server of {model!r} answered: {'; '.join(failures)}",
                              param="model")


async def _relay(resp: UpstreamResponse) -> AsyncIterator[bytes]:
    """The server's bytes as they come; the upstream connection is closed however the relay
    ends (a client that goes away mid-stream stops the generation's reading at once), or
    kept for the next request when the answer was read to its end."""
    try:
        async for chunk in resp.chunks():
            yield chunk
    finally:
        resp.close()


async def _close(resp: UpstreamResponse) -> None:
    """After the response (async: a sync background task would cost a threadpool hop); the
    relay's own `finally` does it too, unless the response ended before the relay began."""
    resp.close()


@router.post("/chat/completions", responses=PROXY_RESPONSES)
async def chat_completions(request: Request, principal: PrincipalDep) -> Response:
    """Chat with a deployed `ft:` model (or a served base model); `stream` relayed as SSE."""
    return await _proxy(request, principal.tenant_id, "/v1/chat/completions")


@router.post("/completions", responses=PROXY_RESPONSES)
async def completions(request: Request, principal: PrincipalDep) -> Response:
    """Text completion with a deployed `ft:` model (or a served base model)."""
    return await _proxy(request, principal.tenant_id, "/v1/completions")


def _model_object(model_id: str, created: Any, owned_by: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model",
            "created": int(created.timestamp()) if created else 0, "owned_by": owned_by}


@router.get("/models")
def list_models(request: Request, settings: SettingsDep,
                principal: PrincipalDep) -> dict[str, Any]:
    """The served base models and this tenant's deployed fine-tuned models."""
    with request.app.state.sessionmaker() as session:
        data = [_model_object(*m) for m in
                serving.visible_models(session, settings, principal.tenant_id)]
    return {"object": "list", "data": data}


@router.get("/models/{model}")
def retrieve_model(model: str, request: Request, settings: SettingsDep,
                   principal: PrincipalDep) -> dict[str, Any]:
    """One model this tenant may call; 404 otherwise."""
    with request.app.state.sessionmaker() as session:
        for found in serving.visible_models(session, settings, principal.tenant_id):
            if found[0] == model:
                return _model_object(*found)
    raise NotFound(f"The model {model!r} does not exist or you do not have access to it.",
                   param="model", code="model_not_found")
