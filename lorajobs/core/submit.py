"""Job creation: resolve the spec, check it against the model and the data, then commit + send.

    JobRequest ─▶ replay? (Idempotency-Key: same body -> same job; other body -> 422)
               ─▶ model registered? datasets the tenant's? targets exist, r <= dims?
               ─▶ estimate (examples, total steps; tokens once a trainer counted them)
               ─▶ compatibility report (vLLM ranks, modules_to_save)
               ─▶ tenant row lock + active-job count + replay + datasets still there
                  (one statement), quota
               ─▶ INSERT job + event + idempotency record ─▶ COMMIT
               ─▶ enqueue(job_id)   (after the commit: the worker re-reads the row)

Concurrent duplicates: the idempotency record's primary key (tenant, key) is inserted in the
same transaction as the job, so of two racing requests exactly one commits; the other gets
IntegrityError, rolls back and answers with the winner's job. This module is the only writer
of new `jobs` rows and of `idempotency_records`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

from sqlalchemy import BindParameter, and_, bindparam, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from lora_core.errors import SpecError
from lora_core.model_files import validate_lora_spec
from lora_core.spec import DPO_FORMATS, SFT_FORMATS, VLLM_LORA_RANKS, LoraSpec
from lorajobs.core import jobs, lineage, serving, tokencounts
from lorajobs.core.bounds import JobShape, check_job_bounds, spread_checkpoints
from lorajobs.core.datasets import get_dataset
from lorajobs.core.errors import InvalidRequest, LimitExceeded, NotFound
from lorajobs.core.evaluations import check_evaluation_bounds
from lorajobs.core.registry import get_model, inspect_registered
from lorajobs.core.settings import Settings
from lorajobs.core.storage import ArtifactStore
from lorajobs.core.tables import (
    Dataset,
    IdempotencyRecord,
    Job,
    JobStatus,
    RegisteredModel,
    Tenant,
    TokenCount,
    new_id,
    utcnow,
)
from lorajobs.core.usage import StorageUsage, check_room, usage_queries
from lorajobs.jobspec import JobRequest

__all__ = ["JobRequest", "Resolved", "Submitted", "request_hash", "resolve", "create_job",
           "submit_job", "default_enqueue"]

log = logging.getLogger(__name__)

MAX_IDEMPOTENCY_KEY_CHARS = 255  # the column width


@dataclass
class Resolved:
    """A request checked against model and data: what gets stored on the job row."""

    spec: dict[str, Any]
    estimate: dict[str, Any]
    compatibility: dict[str, Any]


def request_hash(request: JobRequest) -> str:
    """sha256 of the canonical request (defaults included: `{}` and the spelled-out defaults
    are the same request)."""
    canonical = json.dumps(request.model_dump(mode="json"), sort_keys=True,
                           separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def default_enqueue(job_id: str, settings: Settings | None = None) -> None:
    """Send the job id to the broker via `lorajobs.core.queue`, if that module exists.

    Never raises: a job that is not sent now stays queued and the reaper re-sends it.
    """
    try:
        from lorajobs.core.queue import enqueue_job
    except ImportError:
        log.warning("lorajobs.core.queue missing: job %s stays queued", job_id)
        return
    try:
        enqueue_job(job_id, settings)
    except Exception:  # noqa: BLE001 - the reaper re-sends; the client already has its job
        log.exception("enqueue of job %s failed; the reaper will re-send it", job_id)


def _check_replay_hash(recorded: str | None, digest: str) -> None:
    if recorded != digest:
        raise InvalidRequest(
            "this Idempotency-Key was already used with a different request body",
            param="Idempotency-Key", code="idempotency_key_reused",
        )


def _replay(session: Session, *, tenant_id: str, key: str, digest: str) -> Job | None:
    """The job an earlier request with this key made, or None; 422 if its body differed."""
    record = session.get(IdempotencyRecord, (tenant_id, key))
    if record is None:
        return None
    _check_replay_hash(record.request_hash, digest)
    return session.get(Job, record.job_id)


def _tenant_dataset(session: Session, tenant_id: str, dataset_id: str, param: str) -> Dataset:
    """422 (not 404: the URL exists, a field is wrong) naming the field, same text as a 404."""
    try:
        return get_dataset(session, tenant_id=tenant_id, dataset_id=dataset_id, param=param)
    except NotFound as exc:
        raise InvalidRequest(exc.message, param=param, code="dataset_not_found") from exc


def total_steps(num_examples: int, request: JobRequest) -> int:
    """Optimizer steps: ceil(examples / (batch * accum * processes)) per epoch, or max_steps.

    Packing does not change it: a packed micro-batch still holds `batch_size` examples (in one
    padding-free row), as in HF Trainer's step count.
    """
    t = request.training
    if t.max_steps is not None:
        return t.max_steps
    per_step = t.batch_size * t.gradient_accumulation_steps * request.distributed.num_processes
    return max(1, math.ceil(math.ceil(num_examples / per_step) * t.epochs))


def compatibility_report(lora: LoraSpec, truncated: int) -> dict[str, Any]:
    """What will bite at serving time: vLLM's fixed rank set, modules_to_save, truncation."""
    r = lora.r
    max_rank = next((rank for rank in VLLM_LORA_RANKS if rank >= r), None)
    warnings: list[str] = []
    if r not in VLLM_LORA_RANKS:
        warnings.append(
            f"lora.r={r} is not one of vLLM's ranks {list(VLLM_LORA_RANKS)}; serve it with "
            + (f"--max-lora-rank {max_rank}" if max_rank else "the merged model instead")
        )
    if lora.modules_to_save:
        warnings.append(
            f"lora.modules_to_save={lora.modules_to_save}: vLLM's LoRA serving does not load "
            "these full-weight copies; serve the merged model instead"
        )
    if truncated:
        warnings.append(tokencounts.truncation_warning(truncated))
    return {"warnings": warnings,
            "vllm": {"supported_rank": r in VLLM_LORA_RANKS, "max_lora_rank": max_rank}}


class _Inputs(NamedTuple):
    """What one read brings: model (None if not registered), the tenant's training dataset
    (None if not theirs), its stored token count, and an earlier request's (job id, hash) for
    our Idempotency-Key."""

    model: RegisteredModel | None
    train: Dataset | None
    token_count: TokenCount | None  # not `count`: that is tuple.count
    replay_id: str | None
    replay_hash: str | None


def _inputs_statement() -> Any:
    tenant: BindParameter[str] = bindparam("tenant_id")
    return (
        select(RegisteredModel, Dataset, TokenCount, IdempotencyRecord.job_id,
               IdempotencyRecord.request_hash).select_from(RegisteredModel)
        .outerjoin(Dataset, and_(Dataset.id == bindparam("dataset_id"),
                                 Dataset.tenant_id == tenant))
        .outerjoin(TokenCount, and_(TokenCount.dataset_sha256 == Dataset.sha256,
                                    TokenCount.format == Dataset.format,
                                    TokenCount.model_id == RegisteredModel.id,
                                    TokenCount.max_seq_length == bindparam("max_len")))
        .outerjoin(IdempotencyRecord, and_(IdempotencyRecord.tenant_id == tenant,
                                           IdempotencyRecord.key == bindparam("key")))
        .where(RegisteredModel.name == bindparam("model")))


# Built once: SQLAlchemy memoizes a statement object's cache key, so a submit neither builds
# the joins again nor hashes them (both were ~10% of a POST's CPU).
_INPUTS = _inputs_statement()


def _load_inputs(session: Session, tenant_id: str, request: JobRequest,
                 idempotency_key: str | None) -> _Inputs:
    """The model, the tenant's training dataset, its stored token count and the replay
    record, in one query; None where absent (the caller raises, after the replay check).

    Never tokenise here (a file may hold 2M examples): the trainer counts once per (content,
    model, max_seq_length) and every later submit reads that row (service/tokencounts.py).
    """
    row = session.execute(_INPUTS, {
        "tenant_id": tenant_id, "dataset_id": request.training_file,
        "max_len": request.training.max_seq_length, "key": idempotency_key or "",
        "model": request.base_model}).first()
    if row is None:  # the model is not registered: the replay record is read on its own
        record = (session.get(IdempotencyRecord, (tenant_id, idempotency_key))
                  if idempotency_key else None)
        return _Inputs(None, None, None, record.job_id if record else None,
                       record.request_hash if record else None)
    return _Inputs(*row)


def _require_inputs(session: Session, tenant_id: str, request: JobRequest, inputs: _Inputs
                    ) -> tuple[RegisteredModel, Dataset]:
    """The model and dataset, or 422 naming the field (the one-object lookups' messages)."""
    if inputs.model is None:
        try:
            get_model(session, name=request.base_model, param="base_model")
        except NotFound as exc:
            raise InvalidRequest(exc.message, param="base_model", code="model_not_found") \
                from exc
        raise AssertionError("the model exists but the join found no row")  # pragma: no cover
    train = inputs.train
    if train is None:
        train = _tenant_dataset(session, tenant_id, request.training_file, "training_file")
    return inputs.model, train


def resolve(session: Session, *, tenant_id: str, request: JobRequest, settings: Settings,
            store: ArtifactStore, inputs: _Inputs | None = None) -> Resolved:
    """Check the request against the registered model and the tenant's data; fill defaults.

    Cheap by construction: one read (`_load_inputs`, or the caller's `inputs`), the model's
    headers (cached by lora_core.model_files) and arithmetic. Nothing here reads the dataset file.
    """
    inputs = inputs or _load_inputs(session, tenant_id, request, None)
    model, train = _require_inputs(session, tenant_id, request, inputs)
    formats = DPO_FORMATS if request.method == "dpo" else SFT_FORMATS
    if train.format not in formats:  # the trainer would refuse it only after claiming
        fits = "dpo" if train.format in DPO_FORMATS else "sft (OpenAI's 'supervised')"
        raise InvalidRequest(f"training_file holds {train.format} data, which does not train "
                             f"with method {request.method!r} (it takes "
                             f"{', '.join(formats)}); use method {fits}",
                             param="training_file", code="invalid_spec")
    count = inputs.token_count
    if request.validation_file is not None:
        _tenant_dataset(session, tenant_id, request.validation_file, "validation_file")
    if request.evaluation is not None:
        if request.evaluation.file is not None:
            _tenant_dataset(session, tenant_id, request.evaluation.file, "evaluation.file")
        check_evaluation_bounds(request.evaluation, settings)
    info = inspect_registered(settings, model)
    try:
        targets = validate_lora_spec(request.lora, info)
    except SpecError as exc:
        raise InvalidRequest(exc.message, param=exc.param, code="invalid_spec") from exc
    steps = total_steps(train.num_examples, request)
    if steps > settings.max_total_steps:
        param = "training.max_steps" if request.training.max_steps else "training.epochs"
        raise InvalidRequest(f"{steps} total steps exceed the limit of "
                             f"{settings.max_total_steps}", param=param, code="too_many_steps")
    shape = JobShape(training=request.training, distributed=request.distributed,
                     merge=request.merge, num_examples=train.num_examples, total_steps=steps,
                     max_positions=info.max_positions)
    if request.training.save_steps is None:
        # "Once per epoch" is our default, not the client's choice: a 200-epoch run on a small
        # file (OpenAI clients cannot set save_steps) saves every few epochs instead of being
        # refused. A save_steps the client set stays theirs and is bounded as given.
        request = request.model_copy(deep=True)
        request.training.save_steps = spread_checkpoints(shape, settings)
        shape = replace(shape, training=request.training)
    check_job_bounds(shape, settings, model_name=request.base_model)
    num_tokens, truncated = (count.num_tokens, count.num_truncated or 0) if count else (None, 0)
    spec = request.model_copy(deep=True)
    spec.lora.target_modules = targets
    return Resolved(
        spec=spec.model_dump(mode="json"),
        estimate={"num_examples": train.num_examples, "num_tokens": num_tokens,
                  "total_steps": steps, "eta_seconds": None},
        compatibility=compatibility_report(request.lora, truncated),
    )


class _Locked(NamedTuple):
    active: int  # the tenant's queued + running + paused jobs
    replay_id: str | None
    replay_hash: str | None
    used: StorageUsage
    queued: int  # queued jobs of every tenant: the queue position of the job we insert next
    datasets_exist: bool  # the training (and validation) dataset is still the tenant's


def _lock_statements() -> tuple[Any, Any]:
    tenant: BindParameter[str] = bindparam("tenant_id")
    lock = (update(Tenant).where(Tenant.id == tenant).values(name=Tenant.name)
            .execution_options(synchronize_session=False))
    # A paused job counts: it may be resumed at any time without passing this check again,
    # so pausing jobs must not free room for more (pause N, submit N, resume all: 2N active).
    active = select(func.count()).select_from(Job).where(
        Job.tenant_id == tenant,
        Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.PAUSED]))
    queued = select(func.count()).select_from(Job).where(Job.status == JobStatus.QUEUED)
    record = select(IdempotencyRecord).where(IdempotencyRecord.tenant_id == tenant,
                                             IdempotencyRecord.key == bindparam("key"))
    datasets, artifacts = usage_queries(tenant)
    # Read before the lock (resolve), so re-checked here: a delete_dataset that committed in
    # between must not leave a queued job without its data (it takes this same lock).
    exists = select(func.count()).select_from(Dataset).where(
        Dataset.tenant_id == tenant,
        Dataset.id.in_([bindparam("training_file"), bindparam("validation_file")]))
    counts = select(active.scalar_subquery(),
                    record.with_only_columns(IdempotencyRecord.job_id).scalar_subquery(),
                    record.with_only_columns(IdempotencyRecord.request_hash).scalar_subquery(),
                    datasets.scalar_subquery(), artifacts.scalar_subquery(),
                    queued.scalar_subquery(), exists.scalar_subquery())
    return lock, counts


_LOCK_TENANT, _UNDER_LOCK = _lock_statements()  # built once, as _INPUTS


def _lock_tenant(session: Session, tenant_id: str, idempotency_key: str | None,
                 request: JobRequest) -> _Locked:
    """Write-lock the tenant's row until our commit, then read in one statement its active
    jobs, the (job id, request hash) an earlier request with our key left, its stored bytes
    (service/usage.py), the queued jobs of every tenant (our job's queue position) and
    whether the request's datasets still exist (`delete_dataset` takes this lock too).

    Why the lock: a count-then-insert lets racing submits all see "limit - 1" and all insert
    (40 at once against a limit of 5 made 14 jobs). The no-op UPDATE makes PostgreSQL queue the
    tenant's other submits on the row lock; SQLite begins its single write transaction there,
    before the count, instead of at the INSERT. Other tenants are not serialized (on
    PostgreSQL; SQLite has one writer anyway).

    Why two statements: READ COMMITTED gives each statement the snapshot of its start, and an
    UPDATE that waited on the row lock keeps it, so reads riding on the UPDATE (RETURNING
    subqueries) miss the job the lock holder just committed (40 at once against a limit of 5
    made 20 jobs). The SELECT after it starts once we hold the lock and sees that job.
    """
    params = {"tenant_id": tenant_id, "key": idempotency_key or ""}
    session.execute(_LOCK_TENANT, params)
    wanted = {request.training_file, request.validation_file or request.training_file}
    row = session.execute(_UNDER_LOCK, params | {
        "training_file": request.training_file,
        "validation_file": request.validation_file or request.training_file}).one()
    used = StorageUsage(datasets_bytes=int(row[3]), artifacts_bytes=int(row[4]))
    return _Locked(int(row[0]), row[1], row[2], used, int(row[5]), int(row[6]) == len(wanted))


def _dataset_deleted(session: Session, tenant_id: str, request: JobRequest) -> None:
    """422 naming the dataset deleted since `resolve` read it, as `resolve` would have.
    A query, not `get_dataset`: the session still holds the row `resolve` loaded."""
    for dataset_id, param in ((request.training_file, "training_file"),
                              (request.validation_file, "validation_file")):
        if dataset_id is not None and session.scalar(select(Dataset.id).where(
                Dataset.id == dataset_id, Dataset.tenant_id == tenant_id)) is None:
            raise InvalidRequest(f"no dataset {dataset_id!r}", param=param,
                                 code="dataset_not_found")
    raise AssertionError("the datasets exist but the count missed one")  # pragma: no cover


def _check_quota(active: int, settings: Settings) -> None:
    """Per-tenant cap on queued + running + paused jobs, exact under concurrent submits:
    `active` was counted under the tenant's row lock (`_lock_tenant`)."""
    if active >= settings.max_active_jobs_per_tenant:
        raise LimitExceeded(
            f"{active} active (queued, running or paused) jobs: the limit is "
            f"{settings.max_active_jobs_per_tenant}; wait for "
            "one to finish or cancel one", param=None, code="too_many_active_jobs")


class Submitted(NamedTuple):
    job: Job
    created: bool  # False: an idempotent replay
    queue_position: int | None  # for a created job (read under the lock); None for a replay


def create_job(
    session: Session,
    *,
    tenant_id: str,
    request: JobRequest,
    settings: Settings,
    store: ArtifactStore,
    idempotency_key: str | None = None,
    enqueue: Callable[[str], None] = default_enqueue,
) -> tuple[Job, bool]:
    """Create (and send) a job; returns (job, created). created=False: an idempotent replay."""
    job, created, _ = submit_job(session, tenant_id=tenant_id, request=request,
                                 settings=settings, store=store,
                                 idempotency_key=idempotency_key, enqueue=enqueue)
    return job, created


def submit_job(
    session: Session,
    *,
    tenant_id: str,
    request: JobRequest,
    settings: Settings,
    store: ArtifactStore,
    idempotency_key: str | None = None,
    enqueue: Callable[[str], None] = default_enqueue,
) -> Submitted:
    """`create_job`, also returning the created job's queue position (no query of its own).

    Statements: one read (model, dataset, token count, replay record), the tenant lock's
    UPDATE ... RETURNING, the INSERTs, COMMIT; a replay: the read and the job's row.
    """
    digest = request_hash(request)
    if idempotency_key is not None and \
            not 0 < len(idempotency_key) <= MAX_IDEMPOTENCY_KEY_CHARS:
        raise InvalidRequest(f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY_CHARS} "
                             "characters", param="Idempotency-Key")
    # base_model naming a fine-tuned model or checkpoint: its base, its LoRA config (lineage)
    request, init_from = lineage.resolve_parent(session, tenant_id=tenant_id, request=request)
    inputs = _load_inputs(session, tenant_id, request, idempotency_key)
    if inputs.replay_id is not None:  # answered before validation: the data may have changed
        _check_replay_hash(inputs.replay_hash, digest)
        if (job := session.get(Job, inputs.replay_id)) is not None:
            return Submitted(job, False, None)
    resolved = resolve(session, tenant_id=tenant_id, request=request, settings=settings,
                       store=store, inputs=inputs)
    if init_from is not None:
        resolved.spec["init_from"] = init_from
    locked = _lock_tenant(session, tenant_id, idempotency_key, request)
    if locked.replay_id is not None:
        # Again under the lock: a racing request with our key may have committed meanwhile.
        # Its job counts against the quota, so without this we would answer 429, not replay.
        _check_replay_hash(locked.replay_hash, digest)
        if (job := session.get(Job, locked.replay_id)) is not None:
            return Submitted(job, False, None)
    if not locked.datasets_exist:
        _dataset_deleted(session, tenant_id, request)
    _check_quota(locked.active, settings)
    check_room(locked.used, settings=settings)  # a job writes files: it needs room for one byte
    if request.deploy is not None:
        serving.check_deploy_request(session, settings, target_name=request.deploy.target,
                                     base_model=request.base_model,
                                     lora=resolved.spec.get("lora") or {})
    job = Job(
        id=new_id("job"), tenant_id=tenant_id, status=JobStatus.QUEUED,
        base_model=request.base_model, training_file=request.training_file,
        validation_file=request.validation_file, spec=resolved.spec, suffix=request.suffix,
        metadata_=dict(request.metadata), max_attempts=settings.max_attempts,
        estimate=resolved.estimate, compatibility=resolved.compatibility,
        deploy_target=request.deploy.target if request.deploy else None,
        # "Sent" from the INSERT on: `enqueue` runs right after the commit, and stamping here
        # spares it a transaction. If its send fails it clears the stamp (queue.send_jobs);
        # if the process dies first, the reaper re-sends after `requeue_after_seconds`.
        enqueued_at=utcnow(),
    )
    session.add(job)
    session.flush()  # no relationship() orders the INSERTs: the job's row goes first
    jobs.add_event(session, job.id, "created", "job created",
                   data={"estimate": resolved.estimate})
    for warning in resolved.compatibility["warnings"]:
        jobs.add_event(session, job.id, "warning", warning, level="warning")
    if idempotency_key is not None:
        session.add(IdempotencyRecord(tenant_id=tenant_id, key=idempotency_key,
                                      request_hash=digest, job_id=job.id))
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        if idempotency_key is None:
            raise
        winner = _replay(session, tenant_id=tenant_id, key=idempotency_key, digest=digest)
        if winner is None:
            raise
        return Submitted(winner, False, None)
    enqueue(job.id)  # after the commit: the worker re-reads the row
    return Submitted(job, True, locked.queued)
