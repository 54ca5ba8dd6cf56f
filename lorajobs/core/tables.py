"""SQLAlchemy 2 models: the database is the single source of truth for every job.

Ids are prefixed strings (`job_`, `ds_`, `mdl_`, `art_`, `key_`, `ten_`) so a stray id in a log
says what it is. Timestamps are UTC and always timezone-aware in Python (`UTCDateTime`).
The schema is only changed by an Alembic migration (migrations/versions).
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from enum import StrEnum, nonmember
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = [
    "Base",
    "Tenant",
    "ApiKey",
    "Dataset",
    "RegisteredModel",
    "Job",
    "JobEvent",
    "JobMetric",
    "Checkpoint",
    "Artifact",
    "IdempotencyRecord",
    "TokenCount",
    "WebhookEndpoint",
    "WebhookDelivery",
    "WebhookAttempt",
    "ServingTarget",
    "Deployment",
    "new_id",
    "utcnow",
    "JobStatus",
]


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id(prefix: str) -> str:
    """`<prefix>_<24 hex>`: unguessable (ids are not a secret, but enumeration stays useless)."""
    return f"{prefix}_{secrets.token_hex(12)}"


class UTCDateTime(TypeDecorator[datetime]):
    """Stores UTC; returns aware UTC datetimes on every backend and driver: SQLite drops the
    tzinfo, psycopg answers in the session's TimeZone (`+01:00` on a Paris server) where
    asyncpg (the polled GET /v1/jobs/{id}) answers in UTC; every route writes `Z`."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class JobStatus(StrEnum):
    """queued -> running -> succeeded | failed | cancelled; running -> queued for a retry;
    queued -> cancelled | failed; queued | running -> paused -> queued (resume) | cancelled."""

    # Legal moves: jobs.ALLOWED_TRANSITIONS. A member is a `str` (JobStatus.QUEUED ==
    # "queued"): columns, JSON and what the database returns hold plain strings.

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    PAUSED = "paused"  # checkpointed and stopped on request; no worker held; resumable
    # Helpers, not members: the finished statuses, and every status in lifecycle order.
    TERMINAL = nonmember(frozenset({"succeeded", "failed", "cancelled"}))
    ALL = nonmember(("queued", "running", "paused", "succeeded", "failed", "cancelled"))


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSON, list[Any]: JSON}


class Tenant(Base):
    __tablename__ = "tenants"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # When a worker last claimed one of this tenant's jobs: the fair claim order serves the
    # tenant served longest ago first (jobs.fair_queue).
    last_claimed_at: Mapped[datetime | None] = mapped_column(default=None)


class ApiKey(Base):
    """Keys are stored as sha256 hashes; `prefix` (first chars) identifies one in listings."""

    __tablename__ = "api_keys"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    name: Mapped[str] = mapped_column(String(200), default="")
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    # May mint keys for its own tenant and revoke its tenant's non-admin keys (keys.py).
    manage_keys: Mapped[bool] = mapped_column(Boolean, default=False)
    # The key that minted this one (None: made by the server itself, e.g. the local admin
    # key). Revoking a non-admin key revokes every key minted under it (keys.revoke_key).
    created_by: Mapped[str | None] = mapped_column(ForeignKey("api_keys.id"), index=True,
                                                   default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(default=None)


class Dataset(Base):
    __tablename__ = "datasets"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    filename: Mapped[str] = mapped_column(String(255))
    purpose: Mapped[str] = mapped_column(String(40), default="fine-tune")
    format: Mapped[str] = mapped_column(String(20))
    num_examples: Mapped[int] = mapped_column(Integer)
    num_tokens: Mapped[int | None] = mapped_column(BigInteger, default=None)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    stats: Mapped[dict[str, Any]] = mapped_column(default=dict)
    storage_key: Mapped[str] = mapped_column(String(500))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class RegisteredModel(Base):
    """A base model the admin registered; jobs name it, never a path."""

    __tablename__ = "models"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    architecture: Mapped[str] = mapped_column(String(200))
    num_parameters: Mapped[int] = mapped_column(BigInteger)
    dtype: Mapped[str] = mapped_column(String(20))
    linear_modules: Mapped[list[Any]] = mapped_column(default=list)
    # Source "path" (legacy, the embedded default): relative to settings.model_root, never
    # supplied by a client. Otherwise None: the model lives in the store (below).
    path: Mapped[str | None] = mapped_column(String(500), default=None)
    weights_sha256: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Where it came from: "path" | "upload" | "s3" | "hf" (lorajobs/core/model_import.py).
    source: Mapped[str] = mapped_column(String(10), default="path", server_default="path")
    # A stored model: its files under `<storage_prefix>/` (models/<content_sha256>), their
    # manifest [{path, size, sha256}], the hash over it (the worker cache's key), the source's
    # revision (a Hugging Face commit, an s3:// URL) and the header facts (ModelInfo) the API
    # checks specs against without the files.
    storage_prefix: Mapped[str | None] = mapped_column(String(200), default=None)
    content_sha256: Mapped[str | None] = mapped_column(String(64), default=None, index=True)
    files: Mapped[list[Any] | None] = mapped_column(default=None)
    revision: Mapped[str | None] = mapped_column(String(200), default=None)
    info: Mapped[dict[str, Any] | None] = mapped_column(default=None)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_tenant_created", "tenant_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    status: Mapped[str] = mapped_column(String(20), index=True, default=JobStatus.QUEUED)
    stage: Mapped[str | None] = mapped_column(String(20), default=None)
    base_model: Mapped[str] = mapped_column(String(200))
    training_file: Mapped[str] = mapped_column(String(40))
    validation_file: Mapped[str | None] = mapped_column(String(40), default=None)
    spec: Mapped[dict[str, Any]] = mapped_column()  # resolved: every default filled in
    suffix: Mapped[str | None] = mapped_column(String(64), default=None)
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", default=dict)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    lease_owner: Mapped[str | None] = mapped_column(String(200), default=None)
    lease_expires_at: Mapped[datetime | None] = mapped_column(default=None)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    # Set on a running job by `jobs.request_pause`; cleared when the attempt ends paused.
    pause_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    # The serving target to deploy to once succeeded (spec `deploy.target`; migration 0012);
    # cleared by the serving reconciler once it has deployed (or could not: a job event says).
    deploy_target: Mapped[str | None] = mapped_column(String(100), default=None, index=True)
    progress: Mapped[dict[str, Any]] = mapped_column(default=dict)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    estimate: Mapped[dict[str, Any]] = mapped_column(default=dict)
    compatibility: Mapped[dict[str, Any]] = mapped_column(default=dict)
    resumed_from_step: Mapped[int | None] = mapped_column(Integer, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    enqueued_at: Mapped[datetime | None] = mapped_column(default=None)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)


class JobEvent(Base):
    """Ordered by `id` (a global sequence): the cursor for paging and for SSE Last-Event-ID."""

    __tablename__ = "job_events"
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"),
                                    primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    type: Mapped[str] = mapped_column(String(40))
    level: Mapped[str] = mapped_column(String(10), default="info")
    message: Mapped[str] = mapped_column(Text, default="")
    data: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class JobMetric(Base):
    """One row per (job, step): a resumed run overwrites the steps it redoes."""

    __tablename__ = "job_metrics"
    __table_args__ = (UniqueConstraint("job_id", "step", name="uq_job_metrics_step"),)
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"),
                                    primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    step: Mapped[int] = mapped_column(Integer)
    epoch: Mapped[float | None] = mapped_column(Float, default=None)
    train_loss: Mapped[float | None] = mapped_column(Float, default=None)
    eval_loss: Mapped[float | None] = mapped_column(Float, default=None)
    learning_rate: Mapped[float | None] = mapped_column(Float, default=None)
    grad_norm: Mapped[float | None] = mapped_column(Float, default=None)
    tokens_per_second: Mapped[float | None] = mapped_column(Float, default=None)
    # DPO only (migration 0011): implicit rewards of the chosen / rejected answers, their
    # margin, and the fraction of pairs ranked right, means over the step's pairs.
    rewards_chosen: Mapped[float | None] = mapped_column(Float, default=None)
    rewards_rejected: Mapped[float | None] = mapped_column(Float, default=None)
    reward_margin: Mapped[float | None] = mapped_column(Float, default=None)
    reward_accuracy: Mapped[float | None] = mapped_column(Float, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Checkpoint(Base):
    __tablename__ = "checkpoints"
    __table_args__ = (UniqueConstraint("job_id", "step", name="uq_checkpoints_step"),)
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"),
                                    primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    step: Mapped[int] = mapped_column(Integer)
    resumable: Mapped[bool] = mapped_column(Boolean, default=True)
    path: Mapped[str] = mapped_column(String(500))  # storage key of the resumable checkpoint
    adapter_key: Mapped[str | None] = mapped_column(String(500), default=None)
    merged_key: Mapped[str | None] = mapped_column(String(500), default=None)
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # {"files": [{path, size, sha256}]} of what was uploaded under `path` (the store prefix),
    # and the attempt that wrote it; set when the upload completed (migration 0006).
    manifest: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    attempt: Mapped[int | None] = mapped_column(Integer, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class JobEvaluation(Base):
    """Graded generations of one step (0: the base model): `scores` {grader: mean} (+
    valid_loss), `samples` [{index, prompt, reference, base_output, output, scores}]
    (lorajobs/core/evaluations.py writes them; migration 0009)."""

    __tablename__ = "job_evaluations"
    __table_args__ = (UniqueConstraint("job_id", "step", name="uq_job_evaluations_step"),)
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"),
                                    primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    step: Mapped[int] = mapped_column(Integer)
    scores: Mapped[dict[str, Any]] = mapped_column(default=dict)
    samples: Mapped[list[Any]] = mapped_column(default=list)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Artifact(Base):
    """One downloadable file with its size and sha256. `kind`: adapter | merged | manifest | ..."""

    __tablename__ = "artifacts"
    __table_args__ = (Index("ix_artifacts_job_kind", "job_id", "kind", "step"),)
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    kind: Mapped[str] = mapped_column(String(20))
    step: Mapped[int | None] = mapped_column(Integer, default=None)
    name: Mapped[str] = mapped_column(String(500))  # path inside the artifact, e.g. "config.json"
    storage_key: Mapped[str] = mapped_column(String(500))
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class IdempotencyRecord(Base):
    """(tenant, key) -> the job it made and a hash of the request body that made it."""

    __tablename__ = "idempotency_records"
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), primary_key=True)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    request_hash: Mapped[str] = mapped_column(String(64))
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class TokenCount(Base):
    """Tokens of a dataset's content as one registered model's tokenizer sees it at one
    max_seq_length, counted by the first trainer that tokenised it (service/tokencounts.py).
    No foreign keys: keyed by content, a row outlives the datasets that share those bytes."""

    __tablename__ = "token_counts"
    dataset_sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    format: Mapped[str] = mapped_column(String(20), primary_key=True)
    model_id: Mapped[str] = mapped_column(String(40), primary_key=True)
    max_seq_length: Mapped[int] = mapped_column(Integer, primary_key=True)
    num_tokens: Mapped[int] = mapped_column(BigInteger)  # after truncation, dropped excluded
    num_truncated: Mapped[int | None] = mapped_column(Integer, default=None)
    num_dropped: Mapped[int | None] = mapped_column(Integer, default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class WebhookEndpoint(Base):
    """A tenant's registered receiver (lorajobs/core/webhooks.py). `secret` is `whsec_` +
    base64 of 32 random bytes: kept in the clear because every delivery is signed with it
    (Standard Webhooks HMAC); shown to the tenant once, at creation and rotation.
    `previous_secret` also signs until `previous_secret_expires_at` (a rotation that keeps the
    old secret valid for a while, so receivers can switch without dropping deliveries)."""

    __tablename__ = "webhook_endpoints"
    __table_args__ = (Index("ix_webhook_endpoints_tenant_created", "tenant_id", "created_at"),)
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"))
    name: Mapped[str] = mapped_column(String(200), default="")
    url: Mapped[str] = mapped_column(String(2048))
    event_types: Mapped[list[Any]] = mapped_column(default=list)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    secret: Mapped[str] = mapped_column(String(100))
    previous_secret: Mapped[str | None] = mapped_column(String(100), default=None)
    previous_secret_expires_at: Mapped[datetime | None] = mapped_column(default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class WebhookDelivery(Base):
    """The outbox: one event for one endpoint, written in the transaction of the state change
    that caused it. `event_id` is the `webhook-id` header, the same on every attempt (and on
    a replay) so receivers can dedupe; `payload` is the exact body, serialised once.
    status: pending (due at `next_attempt_at`, which a sender's claim pushes forward) ->
    delivered | failed (retries exhausted)."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        Index("ix_webhook_deliveries_due", "status", "next_attempt_at"),
        Index("ix_webhook_deliveries_endpoint_created", "endpoint_id", "created_at"),
    )
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    endpoint_id: Mapped[str] = mapped_column(ForeignKey("webhook_endpoints.id"))
    event_id: Mapped[str] = mapped_column(String(40))
    event_type: Mapped[str] = mapped_column(String(60))
    job_id: Mapped[str | None] = mapped_column(String(40), default=None)
    payload: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(20), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(default=None)
    claim_token: Mapped[str | None] = mapped_column(String(40), default=None)
    last_status_code: Mapped[int | None] = mapped_column(Integer, default=None)
    last_error: Mapped[str | None] = mapped_column(Text, default=None)
    replay_of: Mapped[str | None] = mapped_column(String(40), default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    first_attempt_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)


class WebhookAttempt(Base):
    """One HTTP try of a delivery: what the receiver answered, or why there was no answer."""

    __tablename__ = "webhook_attempts"
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"),
                                    primary_key=True, autoincrement=True)
    delivery_id: Mapped[str] = mapped_column(ForeignKey("webhook_deliveries.id"), index=True)
    attempt: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column()
    duration_ms: Mapped[float] = mapped_column(Float)
    status_code: Mapped[int | None] = mapped_column(Integer, default=None)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    response_excerpt: Mapped[str | None] = mapped_column(Text, default=None)


class ServingTarget(Base):
    """A group of vLLM servers an admin registered (lorajobs/core/serving.py; migration 0010).

    `adapter_dir`: where lorajobs writes adapters, a filesystem the servers also mount;
    `server_adapter_dir`: the same directory as the servers see it (None: the same path).
    `api_key` is sent to the servers as a bearer token, so it is stored as given (admin-only).
    """

    __tablename__ = "serving_targets"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    urls: Mapped[list[Any]] = mapped_column(default=list)
    base_models: Mapped[list[Any]] = mapped_column(default=list)
    api_key: Mapped[str | None] = mapped_column(String(500), default=None)
    adapter_dir: Mapped[str] = mapped_column(String(1000))
    server_adapter_dir: Mapped[str | None] = mapped_column(String(1000), default=None)
    max_lora_rank: Mapped[int] = mapped_column(Integer, default=16)
    supported_modules: Mapped[list[Any]] = mapped_column(default=list)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Deployment(Base):
    """A job's adapter (final, or one checkpoint's) published on a target under `model_name`.

    `servers`: {url: {"loaded": bool, "error": str | None, "at": iso time}} as last seen by a
    deploy or by the reconciler, which loads it again on a server that forgot it."""

    __tablename__ = "deployments"
    __table_args__ = (UniqueConstraint("target", "model_name", name="uq_deployments_model"),)
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id"), index=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    target: Mapped[str] = mapped_column(String(100))
    step: Mapped[int | None] = mapped_column(Integer, default=None)
    model_name: Mapped[str] = mapped_column(String(300), index=True)
    adapter_path: Mapped[str] = mapped_column(String(1000))
    servers: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
