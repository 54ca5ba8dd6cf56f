"""`/openai/v1`: the subset of OpenAI's fine-tuning API that the official `openai` client drives.

    files                     POST (purpose=fine-tune), GET list, GET one, DELETE, GET content
    fine_tuning/jobs          POST create, GET list (after, limit, metadata), GET one,
                              POST {id}/cancel, {id}/pause, {id}/resume
    fine_tuning/jobs/{id}/events        newest first, like OpenAI
    fine_tuning/jobs/{id}/checkpoints

A translation layer only: every call goes through the same service functions as `/v1`
(validation, idempotency, tenant scoping, state machine). Mapping decisions:
- `model` is a registered base model name, or a fine-tuned model / checkpoint to build on
  (core/lineage.py); `hyperparameters.n_epochs` -> training.epochs, `batch_size` ->
  training.batch_size, `learning_rate_multiplier` x BASE_LEARNING_RATE; "auto" (or absent)
  keeps our default, and the job reports the resolved value.
- `method`: supervised -> our method "sft", dpo -> "dpo" + dpo.beta; its hyperparameters win
  over the legacy top-level ones. reinforcement and checkpoint permissions: 400.
- `suffix` is normalised to our `[a-z0-9-]{1,40}` (OpenAI allows 64 free characters).
- status: queued -> "queued" (files were validated at upload, so there is no separate
  "validating_files" phase), running, pausing (running, pause requested), paused,
  succeeded, failed, cancelled: the values OpenAI's API reference lists.
- `fine_tuned_model`: the merged model's name, `ft:<base>:<suffix>:<job id>`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Coroutine, Iterator
from typing import Annotated, Any, BinaryIO, Literal

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from lora_core.errors import validation_problems
from lorajobs.api import queries
from lorajobs.api.deps import EnqueueDep, PrincipalDep, SessionDep, SettingsDep, StoreDep
from lorajobs.api.openai_objects import (
    BASE_LEARNING_RATE,
    RESULT_FILE_PREFIX,
    checkpoint_object,
    file_object,
    job_object,
    result_csv,
    result_file_object,
    ts,
)
from lorajobs.api.schemas import MAX_EVENT_ID, MAX_STEP
from lorajobs.api.uploads import receive_upload
from lorajobs.core import datasets, jobs, submit
from lorajobs.core.errors import InvalidRequest, NotFound
from lorajobs.core.evaluations import scores_by_step
from lorajobs.core.tables import Job, JobEvent, JobMetric, JobStatus
from lorajobs.jobspec import MAX_METADATA_KEYS


class OpenAIRoute(APIRoute):
    """Bad requests answer 400 here, as OpenAI's API does (the `openai` package raises
    `BadRequestError` for 400 and a different class for our /v1's 422), with OpenAI's
    `error.type`. The body is rendered by the app's own handlers (api.errors), unchanged."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except (RequestValidationError, InvalidRequest) as exc:
                render = next(request.app.exception_handlers[cls] for cls in type(exc).__mro__
                              if cls in request.app.exception_handlers)
                rendered = render(request, exc)
                body = json.loads(bytes(rendered.body))
                body["error"]["type"] = "invalid_request_error"
                param = body["error"].get("param")
                body["error"]["param"] = OPENAI_PARAM.get(param, param)  # OpenAI's name
                body["error"]["message"] = _with_details(body)
                return JSONResponse(body, status_code=400)

        return route


def _with_details(body: dict[str, Any]) -> str:
    """The message plus the first bad lines: OpenAI clients show only `error.message`."""
    message = str(body["error"].get("message") or "invalid request")
    param = body["error"].get("param")
    if isinstance(param, str) and param and param not in message:
        message = f"{param}: {message}"  # `error.param` is not in the client's str(exc)
    lines = [e for e in body.get("errors") or [] if isinstance(e, dict) and e.get("line")]
    if not lines:
        return message
    shown = "; ".join(f"line {e['line']}: " + (f"{e['field']}: " if e.get("field") else "")
                      + str(e.get("message", "")) for e in lines[:DETAIL_LINES])
    return f"{message} ({shown}{'; ...' if len(lines) > DETAIL_LINES else ''})"


DETAIL_LINES = 3  # bad lines quoted in an OpenAI error message; all are in `errors`
router = APIRouter(prefix="/openai/v1", tags=["openai-compatible"], route_class=OpenAIRoute)

SUFFIX_CHARS = 40
Auto = Literal["auto"]
OPENAI_UPLOAD_SCHEMA = {"requestBody": {"required": True, "content": {"multipart/form-data": {
    "schema": {"type": "object", "required": ["file", "purpose"], "properties": {
        "file": {"type": "string", "format": "binary"},
        "purpose": {"type": "string", "enum": ["fine-tune"]}}}}}}}


class Hyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n_epochs: int | Auto | None = Field(None, description="1-1000 or 'auto'")
    batch_size: int | Auto | None = None
    learning_rate_multiplier: float | Auto | None = None


class Supervised(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hyperparameters: Hyperparameters | None = None


class DpoHyperparameters(Hyperparameters):
    beta: float | Auto | None = None


class Dpo(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hyperparameters: DpoHyperparameters | None = None


class Method(BaseModel):
    """OpenAI's `method`; `reinforcement` is parsed only to be refused by name."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["supervised", "dpo", "reinforcement"] = "supervised"
    supervised: Supervised | None = None
    dpo: Dpo | None = None
    reinforcement: dict[str, Any] | None = None


class FineTuningJobCreate(BaseModel):
    """OpenAI's create body; unknown fields are refused, as OpenAI does."""

    model_config = ConfigDict(extra="forbid")
    model: str
    training_file: str
    validation_file: str | None = None
    hyperparameters: Hyperparameters | None = None
    method: Method | None = None
    suffix: str | None = Field(None, max_length=64)
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    metadata: dict[str, str] | None = None
    integrations: list[dict[str, Any]] | None = None


def _hyper(body: FineTuningJobCreate) -> Hyperparameters:
    """The method's hyperparameters, else the legacy top-level ones (OpenAI's precedence)."""
    method = body.method
    if method and method.type == "dpo" and method.dpo and method.dpo.hyperparameters:
        return method.dpo.hyperparameters
    if method and method.supervised and method.supervised.hyperparameters:
        return method.supervised.hyperparameters
    return body.hyperparameters or Hyperparameters()


def _method(body: FineTuningJobCreate) -> dict[str, Any]:
    """JobRequest's `method` (+ `dpo`); reinforcement is not supported yet (a clear 400)."""
    method = body.method
    if method is None or method.type == "supervised":
        if method is not None and (method.dpo or method.reinforcement):
            raise InvalidRequest("method.type is 'supervised': set method.supervised only",
                                 param="method")
        return {}
    if method.type == "reinforcement":
        raise InvalidRequest("method 'reinforcement' (reinforcement fine-tuning with graders) "
                             "is not supported yet; use 'supervised' or 'dpo'",
                             param="method.type", code="unsupported_method")
    if method.supervised or method.reinforcement:
        raise InvalidRequest("method.type is 'dpo': set method.dpo only", param="method")
    hp = method.dpo.hyperparameters if method.dpo else None
    beta = hp.beta if hp is not None else None
    if isinstance(beta, float | int):
        return {"method": "dpo", "dpo": {"beta": beta}}
    return {"method": "dpo", "dpo": {}}  # "auto": DpoSpec's default, reported on the job


def to_job_request(body: FineTuningJobCreate) -> submit.JobRequest:
    """Translate OpenAI's body into our JobRequest (validation errors name OpenAI's fields)."""
    if body.integrations:
        raise InvalidRequest("integrations are not supported", param="integrations")
    hp = _hyper(body)
    training: dict[str, Any] = {}
    if isinstance(hp.n_epochs, int):
        training["epochs"] = hp.n_epochs
    if isinstance(hp.batch_size, int):
        training["batch_size"] = hp.batch_size
    if isinstance(hp.learning_rate_multiplier, float | int):
        if hp.learning_rate_multiplier <= 0:
            raise InvalidRequest("must be > 0", param="hyperparameters.learning_rate_multiplier")
        training["learning_rate"] = BASE_LEARNING_RATE * hp.learning_rate_multiplier
    if body.seed is not None:
        training["seed"] = body.seed
    suffix = None
    if body.suffix:
        suffix = re.sub(r"[^a-z0-9-]+", "-", body.suffix.lower()).strip("-")[:SUFFIX_CHARS]
    try:
        return submit.JobRequest(base_model=body.model, training_file=body.training_file,
                                 validation_file=body.validation_file, training=training,
                                 suffix=suffix or None, metadata=body.metadata or {},
                                 **_method(body))
    except ValidationError as exc:
        param, problems = validation_problems(exc.errors(), OPENAI_PARAM)
        raise InvalidRequest(problems, param=param) from exc


# Our spec's field -> the OpenAI parameter it came from, so errors name what the user sent.
OPENAI_PARAM = {"training.epochs": "hyperparameters.n_epochs",
                "training.batch_size": "hyperparameters.batch_size",
                "training.learning_rate": "hyperparameters.learning_rate_multiplier",
                "training.seed": "seed", "base_model": "model",
                "dpo.beta": "method.dpo.hyperparameters.beta"}


@router.post("/files", openapi_extra=OPENAI_UPLOAD_SCHEMA)
async def create_file(request: Request, session: SessionDep, settings: SettingsDep,
                      store: StoreDep, principal: PrincipalDep) -> dict[str, Any]:
    """Upload a training file (purpose `fine-tune`); every line validated as it streams.

    The body is read after authentication (see api/uploads.py).
    """
    def make_upload(fields: dict[str, str]) -> datasets.Upload:
        if "purpose" in fields:  # sent before the file: refuse before storing a byte
            _check_purpose(fields["purpose"])
        return datasets.Upload(settings)

    form = await receive_upload(request, make_upload)
    with form.upload:
        _check_purpose(form.fields.get("purpose"))
        row = await run_in_threadpool(
            datasets.store_upload, session, form.upload, tenant_id=principal.tenant_id,
            filename=form.filename, store=store)
    return file_object(row)


def _check_purpose(purpose: str | None) -> None:
    if purpose != "fine-tune":
        raise InvalidRequest(f"purpose {purpose!r} is not supported; use 'fine-tune'",
                             param="purpose")


@router.get("/files")
def list_files(session: SessionDep, principal: PrincipalDep,
               limit: Annotated[int, Query(ge=1, le=100)] = 100,
               after: str | None = None) -> dict[str, Any]:
    """The tenant's files."""
    rows, has_more = datasets.list_datasets(session, tenant_id=principal.tenant_id,
                                            limit=limit, after=after)
    return {"object": "list", "data": [file_object(r) for r in rows], "has_more": has_more}


@router.get("/files/{file_id}")
def get_file(file_id: str, session: SessionDep, principal: PrincipalDep) -> dict[str, Any]:
    """One file: an upload, or a succeeded job's result file."""
    if file_id.startswith(RESULT_FILE_PREFIX):
        job, data = _result_file(session, principal.tenant_id, file_id)
        return result_file_object(job, len(data))
    return file_object(datasets.get_dataset(session, tenant_id=principal.tenant_id,
                                            dataset_id=file_id))


@router.delete("/files/{file_id}")
def delete_file(file_id: str, session: SessionDep, principal: PrincipalDep,
                store: StoreDep) -> dict[str, Any]:
    """Delete an upload; 409 while a queued, running or paused job uses it."""
    row = datasets.delete_dataset(session, tenant_id=principal.tenant_id, dataset_id=file_id,
                                  store=store)
    return {"id": row.id, "object": "file", "deleted": True}


@router.get("/files/{file_id}/content")
def get_file_content(file_id: str, session: SessionDep, principal: PrincipalDep,
                     store: StoreDep) -> Response:
    """The file's bytes: an upload as stored, a result file as CSV."""
    if file_id.startswith(RESULT_FILE_PREFIX):
        _, data = _result_file(session, principal.tenant_id, file_id)
        return Response(data, media_type="text/csv")
    row = datasets.get_dataset(session, tenant_id=principal.tenant_id, dataset_id=file_id)
    fh = store.open(row.storage_key)
    return StreamingResponse(_chunks(fh), media_type="application/octet-stream",
                             headers={"Content-Length": str(row.size_bytes)})


FILE_CHUNK = 1 << 20  # bytes per read when streaming an upload back


def _chunks(fh: BinaryIO) -> Iterator[bytes]:
    with fh:
        while chunk := fh.read(FILE_CHUNK):
            yield chunk


def _result_file(session: Session, tenant_id: str, file_id: str) -> tuple[Job, bytes]:
    """A succeeded job's per-step metrics as OpenAI's result CSV; 404 for any other job."""
    job_id = file_id.removeprefix(RESULT_FILE_PREFIX)
    try:
        job = queries.get_job(session, tenant_id=tenant_id, job_id=job_id)
    except NotFound as exc:
        raise NotFound(f"no file {file_id!r}", param="file_id") from exc
    if job.status != JobStatus.SUCCEEDED:
        raise NotFound(f"no file {file_id!r}: job {job_id} has not succeeded", param="file_id")
    rows = session.scalars(select(JobMetric).where(JobMetric.job_id == job.id)
                           .order_by(JobMetric.step))
    return job, result_csv(rows)


@router.post("/fine_tuning/jobs")
def create_fine_tuning_job(body: FineTuningJobCreate, response: Response, session: SessionDep,
                           settings: SettingsDep, store: StoreDep, enqueue: EnqueueDep,
                           principal: PrincipalDep,
                           idempotency_key: Annotated[str | None, Header(max_length=255)] = None
                           ) -> dict[str, Any]:
    """Create a fine-tuning job (200, as OpenAI answers)."""
    job, _ = submit.create_job(session, tenant_id=principal.tenant_id,
                               request=to_job_request(body), settings=settings, store=store,
                               idempotency_key=idempotency_key, enqueue=enqueue)
    return job_object(job)


@router.get("/fine_tuning/jobs")
def list_fine_tuning_jobs(request: Request, session: SessionDep, principal: PrincipalDep,
                          limit: Annotated[int, Query(ge=1, le=100)] = 20,
                          after: str | None = None) -> dict[str, Any]:
    """The tenant's jobs, newest first; `after` is the last id of the previous page;
    `metadata[k]=v` keeps jobs whose metadata has k = v (all pairs), `metadata=null` those
    with none."""
    rows, has_more = queries.list_jobs(session, tenant_id=principal.tenant_id, status=None,
                                       limit=limit, after=after,
                                       metadata=_metadata_filter(request))
    return {"object": "list", "data": [job_object(j) for j in rows], "has_more": has_more}


def _metadata_filter(request: Request) -> dict[str, str] | None:
    """OpenAI's deep-object query (`metadata[team]=nlp`) as a dict; {} for `metadata=null`."""
    pairs: dict[str, str] = {}
    null = False
    for key, value in request.query_params.multi_items():
        if key == "metadata":
            if value != "null":
                raise InvalidRequest("use metadata[key]=value, or metadata=null",
                                     param="metadata")
            null = True
        elif key.startswith("metadata[") and key.endswith("]"):
            pairs[key[len("metadata["):-1]] = value
    if null and pairs:
        raise InvalidRequest("metadata=null cannot be combined with metadata[key]=value",
                             param="metadata")
    if len(pairs) > MAX_METADATA_KEYS:
        raise InvalidRequest(f"at most {MAX_METADATA_KEYS} metadata filters", param="metadata")
    return {} if null else (pairs or None)


@router.get("/fine_tuning/jobs/{job_id}")
def retrieve_fine_tuning_job(job_id: str, session: SessionDep,
                             principal: PrincipalDep) -> dict[str, Any]:
    """One job."""
    return job_object(queries.get_job(session, tenant_id=principal.tenant_id, job_id=job_id))


@router.post("/fine_tuning/jobs/{job_id}/cancel")
def cancel_fine_tuning_job(job_id: str, session: SessionDep,
                           principal: PrincipalDep) -> dict[str, Any]:
    """Cancel; a finished job answers 409."""
    job = queries.get_job(session, tenant_id=principal.tenant_id, job_id=job_id)
    return job_object(jobs.request_cancel(session, job))


@router.post("/fine_tuning/jobs/{job_id}/pause")
def pause_fine_tuning_job(job_id: str, session: SessionDep,
                          principal: PrincipalDep) -> dict[str, Any]:
    """Pause: a queued job at once, a running one after its checkpoint (`pausing`)."""
    job = queries.get_job(session, tenant_id=principal.tenant_id, job_id=job_id)
    return job_object(jobs.request_pause(session, job))


@router.post("/fine_tuning/jobs/{job_id}/resume")
def resume_fine_tuning_job(job_id: str, session: SessionDep, enqueue: EnqueueDep,
                           principal: PrincipalDep) -> dict[str, Any]:
    """Resume a paused job: queued again, training continues from its last checkpoint."""
    job = jobs.request_resume(session, queries.get_job(session, tenant_id=principal.tenant_id,
                                                       job_id=job_id))
    enqueue(job.id)
    return job_object(job)


NOT_YET = "is not supported yet by this server (docs/OPENAI_COMPAT.md)"


@router.api_route("/fine_tuning/checkpoints/{checkpoint}/permissions",
                  methods=["GET", "POST"])
@router.delete("/fine_tuning/checkpoints/{checkpoint}/permissions/{permission_id}")
def checkpoint_permissions(checkpoint: str, principal: PrincipalDep,
                           permission_id: str | None = None) -> None:
    """Sharing checkpoints across projects: not supported yet (400, named)."""
    raise InvalidRequest(f"checkpoint permissions {NOT_YET}; a tenant's checkpoints are "
                         "usable by its own keys", param="fine_tuned_model_checkpoint",
                         code="unsupported")


EVENT_PREFIX = "ftevent-"
CHECKPOINT_PREFIX = "ftckpt-"  # + "<job id>-<step>"


def _events_newest_first(session: Session, *, job_id: str, before: int | None,
                         limit: int) -> tuple[list[JobEvent], bool]:
    stmt = select(JobEvent).where(JobEvent.job_id == job_id)
    if before is not None:
        stmt = stmt.where(JobEvent.id < before)
    rows = list(session.scalars(stmt.order_by(JobEvent.id.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


@router.get("/fine_tuning/jobs/{job_id}/events")
def list_fine_tuning_events(job_id: str, session: SessionDep, principal: PrincipalDep,
                            limit: Annotated[int, Query(ge=1, le=1000)] = 20,
                            after: str | None = None) -> dict[str, Any]:
    """Newest first (OpenAI's order); `after` is an event id from a previous page."""
    queries.get_job(session, tenant_id=principal.tenant_id, job_id=job_id)
    before = None
    if after:
        digits = after.removeprefix(EVENT_PREFIX)
        # ASCII digits only ("²".isdigit() is true, int("²") raises), and few enough that
        # int() accepts them (CPython refuses over 4300 digits).
        if not (digits.isascii() and digits.isdigit() and len(digits) <= 19) \
                or int(digits) > MAX_EVENT_ID:
            raise InvalidRequest(f"invalid event id {after!r}", param="after")
        before = int(digits)
    rows, has_more = _events_newest_first(session, job_id=job_id, before=before, limit=limit)
    data = [{"object": "fine_tuning.job.event", "id": f"{EVENT_PREFIX}{e.id}",
             "created_at": ts(e.created_at), "level": "warn" if e.level == "warning"
             else e.level, "message": e.message, "data": e.data or {},
             "type": "metrics" if e.type == "metrics" else "message"} for e in rows]
    return {"object": "list", "data": data, "has_more": has_more}


@router.get("/fine_tuning/jobs/{job_id}/checkpoints")
def list_fine_tuning_checkpoints(job_id: str, session: SessionDep, principal: PrincipalDep,
                                 limit: Annotated[int, Query(ge=1, le=100)] = 10,
                                 after: Annotated[str | None, Query(max_length=100)] = None,
                                 ) -> dict[str, Any]:
    """Checkpoints, newest first; `after` is the last checkpoint id of the previous page."""
    job = queries.get_job(session, tenant_id=principal.tenant_id, job_id=job_id)
    before = None
    if after:
        step = after.removeprefix(f"{CHECKPOINT_PREFIX}{job.id}-")
        if step == after or not (step.isascii() and step.isdigit()) or int(step) > MAX_STEP:
            raise InvalidRequest(f"invalid checkpoint id {after!r}", param="after")
        before = int(step)
    rows, has_more = queries.list_checkpoints(session, job_id=job_id, after=before,
                                              limit=limit, newest_first=True)
    scores = scores_by_step(session, job.id)  # graders' scores in `metrics` (issue 14)
    data = [checkpoint_object(job, c, f"{CHECKPOINT_PREFIX}{job.id}-{c.step}",
                              scores=scores.get(c.step)) for c in rows]
    return {"object": "list", "data": data, "has_more": has_more,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None}
