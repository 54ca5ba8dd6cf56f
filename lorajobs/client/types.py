"""Typed results. `extra="allow"`: a newer server's extra fields never break an older client."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict

__all__ = ["Job", "Progress", "Dataset", "Model", "Event", "Checkpoint", "Artifact", "MetricRow",
           "Webhook", "WebhookDelivery"]

TERMINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})


class _Result(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())


class Progress(_Result):
    step: int | None = None
    total_steps: int | None = None
    epoch: float | None = None
    fraction: float | None = None
    eta_seconds: float | None = None


class Job(_Result):
    id: str
    status: str
    stage: str | None = None
    attempt: int = 0
    progress: Progress | None = None
    metrics: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    created_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    spec: dict[str, Any] | None = None
    estimate: dict[str, Any] | None = None
    fine_tuned_model: str | None = None

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES

    @property
    def is_settled(self) -> bool:
        """Terminal, or paused: nothing changes until someone acts (resume or cancel), so a
        wait returns here instead of polling forever."""
        return self.is_terminal or self.status == "paused"


class Dataset(_Result):
    id: str
    format: str
    num_examples: int
    num_tokens: int | None = None
    sha256: str
    stats: dict[str, Any] | None = None


class Model(_Result):
    name: str
    architecture: str | None = None
    num_parameters: int | None = None
    dtype: str | None = None
    source: str | None = None  # path | upload | s3 | hf
    revision: str | None = None
    content_sha256: str | None = None
    size_bytes: int | None = None


class Event(_Result):
    id: int
    type: str
    message: str = ""
    level: str = "info"
    data: dict[str, Any] | None = None
    created_at: datetime | None = None


class MetricRow(_Result):
    step: int
    train_loss: float | None = None
    eval_loss: float | None = None
    learning_rate: float | None = None
    grad_norm: float | None = None
    tokens_per_second: float | None = None


class Checkpoint(_Result):
    step: int
    resumable: bool = True


class Artifact(_Result):
    id: str
    kind: str
    name: str
    size: int
    sha256: str
    step: int | None = None


class Webhook(_Result):
    """A registered endpoint. `signing_secret` (whsec_...) only in the answer of a create or a
    rotation; otherwise the last characters as `signing_secret_hint`."""

    id: str
    url: str
    name: str = ""
    event_types: list[str]
    enabled: bool = True
    signing_secret_hint: str | None = None
    signing_secret: str | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None


class WebhookDelivery(_Result):
    """One event sent (or to be sent) to an endpoint; `event_id` is the `webhook-id` header,
    the same on every attempt and replay. `attempt_log`: [{attempt, started_at, duration_ms,
    status_code, error, response_excerpt}]."""

    id: str
    webhook_id: str
    event_id: str
    event_type: str
    job_id: str | None = None
    status: str  # pending | delivered | failed
    attempts: int = 0
    next_attempt_at: datetime | None = None
    last_status_code: int | None = None
    last_error: str | None = None
    replay_of: str | None = None
    created_at: datetime | None = None
    finished_at: datetime | None = None
    payload: dict[str, Any] | None = None
    attempt_log: list[dict[str, Any]] = []
