"""Request and response schemas, one family per resource (`JobCreate`, `JobPublic`, `JobsPublic`).

Requests forbid unknown fields (a typo is an error, not a silently ignored setting). Responses
are built from rows by `from_row` class methods, so the shape lives here and nowhere else.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from lora_core.events import JobError, Stage
from lorajobs.core.evaluations import SUMMARY_FIELDS
from lorajobs.core.registry import MODEL_NAME_PATTERN
from lorajobs.core.submit import JobRequest
from lorajobs.core.tables import (
    ApiKey,
    Artifact,
    Dataset,
    Job,
    JobEvent,
    JobMetric,
    JobStatus,
    RegisteredModel,
)

# Largest values the columns behind integer query parameters hold; a bigger cursor or step
# is a 422 here, not an overflow in the driver (SQLite: OverflowError; PostgreSQL: out of range).
MAX_EVENT_ID = 2**63 - 1  # job_events.id: BIGINT
MAX_STEP = 2**31 - 1  # checkpoint/metric/artifact step: INTEGER

__all__ = [
    "MAX_EVENT_ID", "MAX_STEP",
    "JobCreate", "JobPublic", "JobsPublic", "Progress", "JobMetricsSummary",
    "DatasetPublic", "DatasetsPublic", "ModelCreate", "ModelPublic", "ModelsPublic",
    "EventPublic", "EventsPublic", "MetricRow", "MetricsPublic", "ArtifactPublic",
    "ArtifactsPublic", "ArtifactSet", "CheckpointPublic", "CheckpointsPublic",
    "KeyCreate", "KeyPublic", "KeyCreated", "DatasetDeleted", "ArtifactsDeleted",
    "StorageUsagePublic", "UsagePublic", "fine_tuned_model_name",
]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class JobCreate(JobRequest):
    """`POST /v1/jobs` body: the service's JobRequest (extra fields forbidden)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "base_model": "tiny-llama", "training_file": "ds_0123456789abcdef01234567",
        "lora": {"r": 16, "alpha": 16, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"]},
        "training": {"epochs": 2, "learning_rate": 1e-4}, "merge": "final",
    }]})


class Progress(BaseModel):
    step: int = 0
    total_steps: int | None = None
    epoch: float | None = None
    fraction: float | None = None
    eta_seconds: float | None = None


class JobMetricsSummary(BaseModel):
    """Losses; a job with `evaluation` adds, once known (lorajobs.core.evaluations
    .SUMMARY_FIELDS): `scores` and `base_scores` ({grader: mean}), `best_step`, `best_metric`,
    `best_value`, `selection_reason`, `stopped_early`, `stop_reason`."""

    model_config = ConfigDict(extra="allow")

    train_loss: float | None = None
    eval_loss: float | None = None


def fine_tuned_model_name(job: Job) -> str | None:
    """The merged model's name, once there is one: `ft:<base>:<suffix or 'lorajobs'>:<job id>`
    (OpenAI's shape, so the compat layer can pass it through unchanged)."""
    if job.status != JobStatus.SUCCEEDED or (job.spec or {}).get("merge", "final") == "none":
        return None
    return f"ft:{job.base_model}:{job.suffix or 'lorajobs'}:{job.id}"


class JobPublic(BaseModel):
    id: str
    object: str = "job"
    status: JobStatus
    stage: Stage | None
    attempt: int
    max_attempts: int
    cancel_requested: bool
    progress: Progress
    metrics: JobMetricsSummary
    error: JobError | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    base_model: str
    training_file: str
    validation_file: str | None
    suffix: str | None
    metadata: dict[str, str]
    spec: dict[str, Any]
    estimate: dict[str, Any]
    compatibility: dict[str, Any]
    queue_position: int | None = None
    fine_tuned_model: str | None = None

    @classmethod
    def from_row(cls, job: Job, *, queue_position: int | None = None) -> JobPublic:
        raw = job.progress or {}
        total = raw.get("total_steps") or (job.estimate or {}).get("total_steps")
        step = int(raw.get("step") or 0)
        fraction = raw.get("fraction")
        if fraction is None and total:
            fraction = 1.0 if job.status == JobStatus.SUCCEEDED else round(min(step / total, 1), 4)
        metrics = job.metrics or {}
        return cls(
            id=job.id, status=JobStatus(job.status), stage=Stage(job.stage) if job.stage else None,
            attempt=job.attempt,
            max_attempts=job.max_attempts, cancel_requested=job.cancel_requested,
            progress=Progress(step=step, total_steps=total, epoch=raw.get("epoch"),
                              fraction=fraction, eta_seconds=raw.get("eta_seconds")),
            metrics=JobMetricsSummary(
                train_loss=metrics.get("train_loss"), eval_loss=metrics.get("eval_loss"),
                **{k: metrics[k] for k in SUMMARY_FIELDS if metrics.get(k) is not None}),
            error=JobError.model_validate(job.error) if job.error else None,
            created_at=job.created_at, started_at=job.started_at,
            finished_at=job.finished_at, base_model=job.base_model,
            training_file=job.training_file, validation_file=job.validation_file,
            suffix=job.suffix, metadata=job.metadata_ or {}, spec=job.spec,
            estimate=job.estimate or {}, compatibility=job.compatibility or {},
            queue_position=queue_position if job.status == JobStatus.QUEUED else None,
            fine_tuned_model=fine_tuned_model_name(job),
        )


class JobsPublic(BaseModel):
    object: str = "list"
    data: list[JobPublic]
    has_more: bool
    next_cursor: str | None


class DatasetPublic(BaseModel):
    id: str
    object: str = "dataset"
    filename: str
    format: str
    num_examples: int
    num_tokens: int | None
    size_bytes: int
    sha256: str
    stats: dict[str, Any]
    created_at: datetime

    @classmethod
    def from_row(cls, row: Dataset) -> DatasetPublic:
        return cls(id=row.id, filename=row.filename, format=row.format,
                   num_examples=row.num_examples, num_tokens=row.num_tokens,
                   size_bytes=row.size_bytes, sha256=row.sha256, stats=row.stats or {},
                   created_at=row.created_at)


class DatasetsPublic(BaseModel):
    object: str = "list"
    data: list[DatasetPublic]
    has_more: bool
    next_cursor: str | None


class ModelSource(_Request):
    """Where a model's files come from: an S3 prefix, or a Hugging Face repo (+ revision)."""

    s3: str | None = Field(None, min_length=6, max_length=1024,
                           description="s3://bucket/prefix holding the model's files")
    hf_repo: str | None = Field(None, min_length=1, max_length=200,
                                description="a Hugging Face repo id, 'org/name'")
    revision: str | None = Field(None, min_length=1, max_length=200,
                                 description="a branch, tag or commit (hf_repo only)")

    @model_validator(mode="after")
    def _one_source(self) -> ModelSource:
        if (self.s3 is None) == (self.hf_repo is None):
            raise ValueError("give exactly one of 's3' and 'hf_repo'")
        if self.revision is not None and self.hf_repo is None:
            raise ValueError("'revision' goes with 'hf_repo'")
        return self


class ModelCreate(_Request):
    """JSON registration: `path` (relative to the server's model root; never an arbitrary
    filesystem path) or `source` (copied into the store). Uploads are multipart instead."""

    name: str = Field(pattern=MODEL_NAME_PATTERN)
    path: str | None = Field(None, min_length=1, max_length=500)
    source: ModelSource | None = None

    @model_validator(mode="after")
    def _path_or_source(self) -> ModelCreate:
        if (self.path is None) == (self.source is None):
            raise ValueError("give exactly one of 'path' and 'source'")
        return self


class ModelPublic(BaseModel):
    id: str
    object: str = "model"
    name: str
    architecture: str
    num_parameters: int
    dtype: str
    linear_modules: list[str]
    weights_sha256: dict[str, str]
    created_at: datetime
    source: str = Field(description="path | upload | s3 | hf")
    revision: str | None = Field(None, description="the hub commit, or the s3:// URL")
    content_sha256: str | None = Field(None, description="sha256 over the sorted manifest "
                                       "(path, size, sha256) of a stored model's files")
    size_bytes: int | None = None

    @classmethod
    def from_row(cls, row: RegisteredModel) -> ModelPublic:
        return cls(id=row.id, name=row.name, architecture=row.architecture,
                   num_parameters=row.num_parameters, dtype=row.dtype,
                   linear_modules=list(row.linear_modules or []),
                   weights_sha256=dict(row.weights_sha256 or {}), created_at=row.created_at,
                   source=row.source or "path", revision=row.revision,
                   content_sha256=row.content_sha256,
                   size_bytes=sum(int(f["size"]) for f in row.files) if row.files else None)


class ModelsPublic(BaseModel):
    object: str = "list"
    data: list[ModelPublic]


class EventPublic(BaseModel):
    id: int
    type: str
    level: str
    message: str
    data: dict[str, Any]
    created_at: datetime

    @classmethod
    def from_row(cls, row: JobEvent) -> EventPublic:
        return cls(id=row.id, type=row.type, level=row.level, message=row.message,
                   data=row.data or {}, created_at=row.created_at)


class EventsPublic(BaseModel):
    object: str = "list"
    data: list[EventPublic]
    has_more: bool
    next_cursor: int | None


class MetricRow(BaseModel):
    step: int
    epoch: float | None
    train_loss: float | None
    eval_loss: float | None
    learning_rate: float | None
    grad_norm: float | None
    tokens_per_second: float | None
    # DPO jobs only (null for supervised steps).
    rewards_chosen: float | None = None
    rewards_rejected: float | None = None
    reward_margin: float | None = None
    reward_accuracy: float | None = None

    @classmethod
    def from_row(cls, row: JobMetric) -> MetricRow:
        return cls(step=row.step, epoch=row.epoch, train_loss=row.train_loss,
                   eval_loss=row.eval_loss, learning_rate=row.learning_rate,
                   grad_norm=row.grad_norm, tokens_per_second=row.tokens_per_second,
                   rewards_chosen=row.rewards_chosen, rewards_rejected=row.rewards_rejected,
                   reward_margin=row.reward_margin, reward_accuracy=row.reward_accuracy)


class MetricsPublic(BaseModel):
    object: str = "list"
    data: list[MetricRow]
    has_more: bool = False
    next_cursor: int | None = Field(None, description="the last step of this page: `after`")


class ArtifactPublic(BaseModel):
    id: str
    kind: str
    step: int | None
    name: str
    size: int
    sha256: str
    created_at: datetime
    url: str

    @classmethod
    def from_row(cls, row: Artifact) -> ArtifactPublic:
        return cls(id=row.id, kind=row.kind, step=row.step, name=row.name, size=row.size,
                   sha256=row.sha256, created_at=row.created_at,
                   url=f"/v1/jobs/{row.job_id}/artifacts/{row.id}")


class ArtifactsPublic(BaseModel):
    object: str = "list"
    data: list[ArtifactPublic]
    has_more: bool = False
    next_cursor: str | None = Field(None, description="the last artifact id of this page")


class ArtifactSet(BaseModel):
    """The files of one adapter or merged model; `url` downloads them as one tar."""

    files: list[ArtifactPublic]
    url: str


class CheckpointPublic(BaseModel):
    step: int
    resumable: bool
    adapter: ArtifactSet | None
    merged: ArtifactSet | None
    metrics: dict[str, Any]
    created_at: datetime


class CheckpointsPublic(BaseModel):
    object: str = "list"
    data: list[CheckpointPublic]
    has_more: bool = False
    next_cursor: int | None = Field(None, description="the last step of this page: `after`")


class KeyCreate(_Request):
    """A key for your own tenant; an admin may name a tenant (created if new) and mint admins."""

    name: str = Field("", max_length=200)
    tenant: str | None = Field(None, min_length=1, max_length=200)
    is_admin: bool = False
    manage_keys: bool = Field(False, description="may mint and revoke its tenant's keys")


class KeyPublic(BaseModel):
    id: str
    object: str = "api_key"
    prefix: str
    name: str
    tenant_id: str
    is_admin: bool
    manage_keys: bool = False
    created_by: str | None = Field(None, description="the key that minted this one")
    created_at: datetime
    revoked_at: datetime | None

    @classmethod
    def from_row(cls, row: ApiKey) -> KeyPublic:
        return cls(id=row.id, prefix=row.prefix, name=row.name, tenant_id=row.tenant_id,
                   is_admin=row.is_admin, manage_keys=bool(row.manage_keys),
                   created_by=row.created_by, created_at=row.created_at,
                   revoked_at=row.revoked_at)


class KeyCreated(KeyPublic):
    key: str = Field(description="the secret: shown once, stored only as a hash")


class DatasetDeleted(BaseModel):
    id: str
    object: str = "dataset"
    deleted: bool = True
    freed_bytes: int


class ArtifactsDeleted(BaseModel):
    id: str = Field(description="the job id")
    object: str = "job.artifacts"
    deleted: bool = True
    files: int
    freed_bytes: int


class StorageUsagePublic(BaseModel):
    datasets_bytes: int
    artifacts_bytes: int
    used_bytes: int
    quota_bytes: int
    remaining_bytes: int


class UsagePublic(BaseModel):
    """What the caller's tenant uses, and the limits a job spec is checked against."""

    object: str = "usage"
    storage: StorageUsagePublic
    active_jobs: int
    max_active_jobs: int
    limits: dict[str, int | float]
