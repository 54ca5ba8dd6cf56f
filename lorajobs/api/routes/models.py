"""`/v1/models`: registered base models (shared by every tenant; registration is admin-only).

`POST /v1/models` takes three bodies (lorajobs/core/model_import.py has the pipeline):
- multipart `files` (+ `name`): the model's files or one tar, streamed to staging (an upload:
  upload slot, pacing and max_model_bytes, api/limits.py), validated, put in the store;
- JSON `{"name", "source": {"s3": ...} | {"hf_repo", "revision"}}`: fetched on a worker
  thread (the event loop never waits on it), at most max_concurrent_model_fetches at once
  (else 429), answered 503 after model_fetch_timeout_seconds (the fetch is then abandoned:
  it stores nothing and registers nothing); a source that cannot be read is a 422 naming it;
- JSON `{"name", "path"}`: a directory under the model root (the embedded default).
Synchronous in every case: 201 means the model is in the store and jobs may name it.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from lorajobs.api.deps import AdminDep, PrincipalDep, SessionDep, SettingsDep, StoreDep
from lorajobs.api.errors import ErrorResponse
from lorajobs.api.model_uploads import receive_model_upload
from lorajobs.api.schemas import ModelCreate, ModelPublic, ModelsPublic
from lorajobs.core import model_import, registry
from lorajobs.core.errors import InvalidRequest, LimitExceeded, StorageUnavailable
from lorajobs.core.settings import Settings
from lorajobs.core.storage import ArtifactStore
from lorajobs.core.tables import RegisteredModel

router = APIRouter(prefix="/v1/models", tags=["models"])

_REGISTER_BODY: dict[str, Any] = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"$ref": "#/components/schemas/ModelCreate"}},
    "multipart/form-data": {"schema": {"type": "object", "required": ["name", "files"],
                                       "properties": {
        "name": {"type": "string"},
        "files": {"type": "array", "items": {"type": "string", "format": "binary"},
                  "description": "safetensors weights + config.json + tokenizer files, "
                                 "or one .tar / .tar.gz of them"}}}}}}}


@router.get("", response_model=ModelsPublic)
def list_models(session: SessionDep, _: PrincipalDep) -> ModelsPublic:
    """Every registered base model."""
    return ModelsPublic(data=[ModelPublic.from_row(m) for m in registry.list_models(session)])


@router.get("/{name}", response_model=ModelPublic)
def get_model(name: str, session: SessionDep, _: PrincipalDep) -> ModelPublic:
    """One registered model by name."""
    return ModelPublic.from_row(registry.get_model(session, name=name))


@router.post("", status_code=201, response_model=ModelPublic, openapi_extra=_REGISTER_BODY,
             responses={429: {"model": ErrorResponse, "description": "max_concurrent_model_"
                              "fetches registrations are fetching (model_fetches_busy)"}})
async def register_model(request: Request, settings: SettingsDep, store: StoreDep,
                         _: AdminDep) -> ModelPublic:
    """Register a base model: upload its files, or copy them from s3:// or a hub (admin)."""
    if request.headers.get("content-type", "").lower().startswith("multipart/"):
        row = await _from_upload(request, settings, store)
        return ModelPublic.from_row(row)
    try:
        body = ModelCreate.model_validate_json(await request.body())
    except ValidationError as exc:
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])}
                                      for e in exc.errors()]) from exc
    if body.path is not None:
        row = await run_in_threadpool(_with_session, request, _register_path, body.name,
                                      body.path, settings)
    else:
        row = await _from_source(request, body, settings, store)
    return ModelPublic.from_row(row)


def _with_session(request: Request, fn: Any, *args: Any) -> Any:
    """One short session around a registry call (none is held while bytes move)."""
    with request.app.state.sessionmaker(expire_on_commit=False) as session:
        return fn(session, *args)


def _register_path(session: Any, name: str, path: str, settings: Settings) -> RegisteredModel:
    return registry.register_model(session, name=name, path_under_model_root=path,
                                   settings=settings)


async def _from_upload(request: Request, settings: Settings, store: ArtifactStore
                       ) -> RegisteredModel:
    with model_import.staging(settings) as staging:
        (staging / "in").mkdir(mode=0o700)
        received = await receive_model_upload(request, staging / "in",
                                              max_bytes=settings.max_model_bytes)
        name = received.fields.get("name")
        if not name:
            raise InvalidRequest("form field 'name' is required", param="name")
        model_dir = staging / "in"
        if received.tar is not None:
            model_dir = staging / "model"
            model_dir.mkdir(mode=0o700)
            await run_in_threadpool(model_import.extract_tar, staging / "in" / received.tar,
                                    model_dir, max_bytes=settings.max_model_bytes)
        await run_in_threadpool(_with_session, request, _check_name, name)
        return await run_in_threadpool(_store, request, name, model_dir, "upload", None, store)


def _store(request: Request, name: str, staged: Path, source: str, revision: str | None,
           store: ArtifactStore, cancelled: threading.Event | None = None) -> RegisteredModel:
    """Validate and store the files (no session held), then insert the row (one short one).
    An abandoned fetch (`cancelled`) stops before each of the two."""
    def check() -> None:
        if cancelled is not None and cancelled.is_set():
            raise StorageUnavailable("the model fetch ran past its time limit",
                                     code="model_fetch_timeout")

    check()
    row = registry.store_model_files(staged, store=store,
                                     param="files" if source == "upload" else "source")
    check()
    return _with_session(request, lambda session: registry.insert_stored_model(
        session, row, name=name, source=source, revision=revision))


def _fetch_slots(request: Request, settings: Settings) -> asyncio.Semaphore:
    slots = getattr(request.app.state, "model_fetch_slots", None)
    if slots is None:
        slots = request.app.state.model_fetch_slots = asyncio.Semaphore(
            settings.max_concurrent_model_fetches)
    return slots


async def _from_source(request: Request, body: ModelCreate, settings: Settings,
                       store: ArtifactStore) -> RegisteredModel:
    source = body.source
    assert source is not None
    await run_in_threadpool(_with_session, request, _check_name, body.name)
    slots = _fetch_slots(request, settings)
    if slots.locked():
        raise LimitExceeded(f"{settings.max_concurrent_model_fetches} model registrations are "
                            "already fetching; retry later", code="model_fetches_busy")
    await slots.acquire()
    cancelled = threading.Event()

    def fetch_and_store() -> RegisteredModel:
        with model_import.staging(settings) as staging:
            if source.s3 is not None:
                revision = model_import.fetch_s3(settings, source.s3, staging)
                kind = "s3"
            else:
                assert source.hf_repo is not None
                revision = model_import.fetch_hf(settings, source.hf_repo, source.revision,
                                                 staging)
                kind = "hf"
            return _store(request, body.name, staging, kind, revision, store, cancelled)

    # A thread of our own, not the shared pool: a fetch may last minutes, and an abandoned
    # one (timeout) keeps its thread until it ends; the semaphore is released only then.
    loop = asyncio.get_running_loop()
    future: asyncio.Future[RegisteredModel] = loop.create_future()
    # An abandoned fetch's outcome is read here, so asyncio does not log it as unretrieved.
    future.add_done_callback(lambda f: None if f.cancelled() else f.exception())

    def to_loop(*call: Any) -> None:
        try:
            loop.call_soon_threadsafe(*call)
        except RuntimeError:  # the app shut down while the fetch ran: nobody is waiting
            pass

    def run() -> None:
        try:
            result: Any = fetch_and_store()
            to_loop(_settle, future, result, None)
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting request
            to_loop(_settle, future, None, exc)
        finally:
            to_loop(slots.release)

    threading.Thread(target=run, name=f"model-fetch-{body.name}", daemon=True).start()
    try:
        async with asyncio.timeout(settings.model_fetch_timeout_seconds):
            return await asyncio.shield(future)
    except TimeoutError:
        cancelled.set()
        raise StorageUnavailable(f"fetching model {body.name!r} took longer than "
                                 f"{settings.model_fetch_timeout_seconds:g} s; nothing was "
                                 "registered", param="source", code="model_fetch_timeout") \
            from None


def _settle(future: asyncio.Future[RegisteredModel], result: Any,
            exc: BaseException | None) -> None:
    if future.done():
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)


def _check_name(session: Any, name: str) -> None:
    registry.check_name_free(session, name)
