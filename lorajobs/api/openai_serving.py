"""`/openai/v1` inference: chat/completions and completions proxied to vLLM, and models.

    client ─▶ AuthMiddleware (the tenant's key) ─▶ route(tenant, body.model)
           ─▶ a server of the target where the model is loaded ─▶ bytes relayed as they come

`ft:` names resolve to the tenant's own deployments only (another tenant's name is 404, as
OpenAI answers a model you cannot see); other names to a target's base models. The body is
forwarded as sent (vLLM validates it) and the answer relayed unbuffered, SSE streams included
(aiohttp: kept-alive connections, the body as it arrives, never decompressed). Routes are
cached per (tenant, model) for ROUTE_CACHE_SECONDS, and dropped by a deploy or undeploy in this
process; another API process sees a change within that time.

What the client gets when the server fails it:
    no connection to a server (refused, connect timeout)   the next server; none left: 502
    the server closed the connection before an answer      502 (a kept-alive connection it
                                                            closed under the request: once
                                                            more on a new one first)
    an answer that is not HTTP                             502
    nothing for serving_read_timeout_seconds               504 serving_timeout
    a failure once the answer has begun                    the client's connection is cut
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import aiohttp
from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from lorajobs.api.deps import PrincipalDep, SettingsDep
from lorajobs.api.openai_compat import OpenAIRoute
from lorajobs.core import serving
from lorajobs.core.errors import InvalidRequest, NotFound, UpstreamTimeout, UpstreamUnavailable

__all__ = ["router", "forget_routes", "close_http"]

router = APIRouter(prefix="/openai/v1", tags=["openai-compatible"], route_class=OpenAIRoute)

ROUTE_CACHE_SECONDS = 2.0
CONNECT_TIMEOUT_S = 3.0
# Connections per API process, to all servers together and to one server: a stream holds one
# for its whole generation; vLLM batches up to 256 sequences by default (max_num_seqs).
MAX_CONNECTIONS = 512
MAX_CONNECTIONS_PER_SERVER = 256
# An idle connection is reused for this long: under the servers' own keep-alive timeout
# (uvicorn's default, vLLM's server: 5 s), so one is rarely closed under a request.
KEEPALIVE_S = 4.0
# Response headers worth relaying; hop-by-hop ones and content-length (we re-chunk) are not.
RELAYED_HEADERS = ("content-type", "content-encoding", "x-request-id")
PROXY_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "the server's answer, relayed (JSON, or text/event-stream when "
                         "`stream` is true)"},
    502: {"description": "no server of the model's target answered (serving_unavailable)"},
    504: {"description": "the server sent no answer in time (serving_timeout)"}}
# The server closed the connection (or reset it) before its answer's head.
CLOSED_ERRORS = (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError,
                 aiohttp.ClientConnectionResetError)


async def _reused(_: aiohttp.ClientSession, ctx: SimpleNamespace, __: object) -> None:
    ctx.trace_request_ctx["reused"] = True


def _new_session(read_timeout: float) -> aiohttp.ClientSession:
    trace = aiohttp.TraceConfig()
    trace.on_connection_reuseconn.append(_reused)
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=MAX_CONNECTIONS,
                                       limit_per_host=MAX_CONNECTIONS_PER_SERVER,
                                       keepalive_timeout=KEEPALIVE_S),
        # sock_read: the wait for the answer's next bytes; connect: for a connection, a free
        # one from the pool (at the limits) or a new one, whose TCP + TLS is sock_connect.
        timeout=aiohttp.ClientTimeout(total=None, connect=read_timeout,
                                      sock_connect=CONNECT_TIMEOUT_S, sock_read=read_timeout),
        auto_decompress=False,  # bytes relayed as sent, with their content-encoding
        skip_auto_headers=("Accept-Encoding",),  # so no encoding the client did not ask for
        cookie_jar=aiohttp.DummyCookieJar(),  # one session serves every tenant
        trace_configs=[trace])


async def _http(app: FastAPI) -> aiohttp.ClientSession:
    """The process's session, for the running event loop (its connections belong to it)."""
    loop = asyncio.get_running_loop()
    held: tuple[asyncio.AbstractEventLoop, aiohttp.ClientSession] | None = getattr(
        app.state, "serving_http", None)
    if held is not None and held[0] is loop:
        return held[1]
    if held is not None and held[0].is_closed():
        await held[1].close()  # nothing left to close on a closed loop: marks it closed
    session = _new_session(app.state.settings.serving_read_timeout_seconds)
    app.state.serving_http = (loop, session)
    return session


async def close_http(app: FastAPI) -> None:
    held = getattr(app.state, "serving_http", None)
    if held is not None and (held[0] is asyncio.get_running_loop() or held[0].is_closed()):
        app.state.serving_http = None
        await held[1].close()


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
    headers = {"content-type": "application/json"}
    if api_key:
        headers["authorization"] = f"Bearer {api_key}"
    session = await _http(request.app)
    failures = []
    for url in urls:  # loaded servers first; the next one only if this one refuses connections
        try:
            resp = await _post(session, url.rstrip("/") + path, raw, headers)
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            failures.append(f"{url}: {type(exc).__name__}: {exc}")
            continue
        except aiohttp.ServerTimeoutError as exc:  # took the request, then said nothing
            raise UpstreamTimeout(f"{url} sent no answer within "
                                  f"{request.app.state.settings.serving_read_timeout_seconds} s",
                                  param="model") from exc
        except aiohttp.ClientResponseError as exc:  # the parser's: not an HTTP answer
            raise UpstreamUnavailable(f"the answer of {url} is not HTTP: {exc.message}",
                                      param="model") from exc
        except CLOSED_ERRORS as exc:
            raise UpstreamUnavailable(f"{url} closed the connection before an answer: "
                                      f"{type(exc).__name__}: {exc}", param="model") from exc
        relayed = {k: v for k in RELAYED_HEADERS if (v := resp.headers.get(k)) is not None}
        return StreamingResponse(_relay(resp), status_code=resp.status, headers=relayed,
                                 background=BackgroundTask(_close, resp))
    raise UpstreamUnavailable(f"no server of {model!r} answered: {'; '.join(failures)}",
                              param="model")


async def _post(session: aiohttp.ClientSession, url: str, body: bytes,
                headers: dict[str, str]) -> aiohttp.ClientResponse:
    """The server's answer once its head arrived. A kept-alive connection the server closed
    as the request went out (it read none of it) is retried once on a new connection: aiohttp
    retries only idempotent methods, and a completion changes nothing on the server."""
    for attempt in (1, 2):
        state: dict[str, bool] = {}
        try:
            return await session.post(url, data=body, headers=headers, allow_redirects=False,
                                      trace_request_ctx=state)
        except CLOSED_ERRORS as exc:
            if attempt == 2 or not state.get("reused") \
                    or isinstance(exc, aiohttp.ClientConnectorError):
                raise
    raise AssertionError("unreachable")


async def _relay(resp: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    """The server's bytes as they come; the upstream connection is closed however the relay
    ends early (a client that goes away mid-stream stops the generation's reading at once),
    or kept for the next request when the answer was read to its end."""
    try:
        async for chunk in resp.content.iter_any():
            yield chunk
    except BaseException:
        resp.close()
        raise
    resp.release()


async def _close(resp: aiohttp.ClientResponse) -> None:
    """After the response (async: a sync background task would cost a threadpool hop); the
    relay does it too, unless the response ended before the relay began. `release` keeps a
    connection whose answer was read to its end, and closes any other."""
    resp.release()


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
