"""The FastAPI app factory: `create_app(settings)` wires settings, DB, store, errors, metrics.

    request ─▶ MetricsMiddleware (latency by route) ─▶ NulByteMiddleware (422)
            ─▶ BodyLimitMiddleware (413 early/streaming) ─▶ AuthMiddleware (401 from headers)
            ─▶ BodyTimeoutMiddleware (408; JSON read whole) ─▶ ConcurrencyLimitMiddleware
            ─▶ FastAPI router (/healthz /readyz /metrics, /v1/...) ─▶ error handlers (api.errors)

Everything a request needs hangs off `app.state` (settings, sessionmaker, store, enqueue,
metrics registry, the request slots /readyz reports; on PostgreSQL the asyncpg reader of the
polled `GET /v1/jobs/{id}`): no module globals, so tests can run a SQLite app and a PostgreSQL
app side by side. This module, like the whole API package, never imports torch or
transformers.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from lorajobs.api import openai_compat, openai_graders, openai_serving, openai_webhooks
from lorajobs.api.auth import LOOKUPS_IN_FLIGHT, AuthMiddleware
from lorajobs.api.errors import document_error_responses, install_error_handlers
from lorajobs.api.key_reader import make_key_reader
from lorajobs.api.limits import (
    BodyLimitMiddleware,
    BodyTimeoutMiddleware,
    ConcurrencyLimitMiddleware,
    NulByteMiddleware,
    RequestSlots,
)
from lorajobs.api.observability import (
    MetricsMiddleware,
    install_access_log_redaction,
    make_registry,
)
from lorajobs.api.pg_job_reader import make_pg_reader
from lorajobs.api.routes import (
    artifacts,
    checkpoints,
    datasets,
    evaluations,
    events,
    health,
    jobs,
    keys,
    metrics,
    models,
    serving,
    ui,
    usage,
    webhooks,
)
from lorajobs.core.db import get_sessionmaker
from lorajobs.core.queue import JobSender
from lorajobs.core.settings import Settings, get_settings
from lorajobs.core.storage import get_store

__all__ = ["create_app"]

# In matching order: FastAPI tries every route of each router in turn (~5 us a route), so the
# OpenAI proxy (chat/completions, completions: latency-bound) comes right after the probes.
# No two routers' paths overlap, so the order decides nothing else.
ROUTERS = (health, openai_serving, datasets, models, jobs, events, metrics, checkpoints,
           artifacts, keys, usage, webhooks, evaluations, serving, openai_compat,
           openai_graders, openai_webhooks, ui)


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the API for one settings object (default: from the environment)."""
    settings = settings or get_settings()
    app = FastAPI(title="lorajobs", version="1", summary="LoRA fine-tuning jobs over HTTP",
                  lifespan=_lifespan)
    app.state.settings = settings
    app.state.sessionmaker = get_sessionmaker(settings)
    # PostgreSQL: the hot GET /v1/jobs/{id} awaits asyncpg (opened on first use); SQLite: None.
    app.state.pg_reader = make_pg_reader(settings.resolved_database_url)
    app.state.store = get_store(settings)
    # Committed job ids go to the broker from a thread of its own, in batches (queue.JobSender).
    app.state.job_sender = JobSender(settings)
    app.state.enqueue = app.state.job_sender
    app.state.request_slots = RequestSlots(settings.api_max_concurrent_requests,
                                           settings.max_concurrent_uploads)
    # Key lookups and probe queries outside the slots (auth.LOOKUPS_IN_FLIGHT).
    app.state.lookups = asyncio.Semaphore(LOOKUPS_IN_FLIGHT)
    registry, latency = make_registry(app.state.sessionmaker, settings)
    app.state.metrics_registry = registry
    for module in ROUTERS:
        app.include_router(module.router)
    install_error_handlers(app)
    document_error_responses(app)
    # Added last = outermost: latency includes the limit checks and the error handlers. A
    # request takes its slot (ConcurrencyLimit) only once its key is valid (Auth) and its
    # JSON body has arrived (BodyTimeout): see api/limits.py.
    app.add_middleware(ConcurrencyLimitMiddleware, slots=app.state.request_slots,
                       send_timeout=settings.response_send_timeout_seconds)
    app.add_middleware(BodyTimeoutMiddleware, settings=settings)
    app.add_middleware(AuthMiddleware, sessions=app.state.sessionmaker,
                       lookups=app.state.lookups,
                       reader=make_key_reader(settings.resolved_database_url))
    app.add_middleware(BodyLimitMiddleware, settings=settings)
    app.add_middleware(NulByteMiddleware)
    app.add_middleware(MetricsMiddleware, latency=latency)
    install_access_log_redaction()
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Startup: freeze what is alive (see below). Shutdown: unfreeze, send the job ids still
    queued in memory, close the asyncpg pool.

    The objects alive once the app is built (modules, routes, schemas, the ORM: ~120,000 in
    a server) are never garbage, yet every full collection walked them: under load one took
    60-80 ms, stalling every request in flight, and set the p99 of `GET /v1/jobs/{id}`.
    `gc.freeze()` moves them to the permanent generation, which collections skip (Python's
    docs recommend it for long-running servers). No `gc.collect()` first: it cost ~0.1 s per
    app in the test suite, and what little startup garbage gets frozen with the rest is
    handed back by `unfreeze` at shutdown (tests start and stop many apps in one process)."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
        await asyncio.to_thread(app.state.job_sender.close)  # sends what it still holds
        await openai_serving.close_http(app)
        if app.state.pg_reader is not None:
            await app.state.pg_reader.close()
