"""Request and response schemas of `/v1/webhooks` (the webhooks family; see api/schemas.py for
the conventions: requests forbid unknown fields, responses are built by `from_row`)."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from lorajobs.core.tables import WebhookAttempt, WebhookDelivery, WebhookEndpoint
from lorajobs.core.webhook_guard import MAX_URL_LENGTH
from lorajobs.core.webhooks import EVENT_TYPES, secret_hint

__all__ = ["WebhookCreate", "WebhookUpdate", "WebhookRotate", "WebhookPublic",
           "WebhookWithSecret", "WebhooksPublic", "WebhookDeleted", "AttemptPublic",
           "DeliveryPublic", "DeliveriesPublic"]

_EVENT_TYPES_DOC = f"events to receive, any of {list(EVENT_TYPES)}"


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class WebhookCreate(_Request):
    url: str = Field(max_length=MAX_URL_LENGTH, description="https URL that receives events")
    event_types: list[str] = Field(min_length=1, max_length=len(EVENT_TYPES),
                                   description=_EVENT_TYPES_DOC)
    name: str = Field("", max_length=200)
    enabled: bool = True


class WebhookUpdate(_Request):
    url: str | None = Field(None, max_length=MAX_URL_LENGTH)
    event_types: list[str] | None = Field(None, min_length=1, max_length=len(EVENT_TYPES),
                                          description=_EVENT_TYPES_DOC)
    name: str | None = Field(None, max_length=200)
    enabled: bool | None = None


class WebhookRotate(_Request):
    keep_old_secret_active_for_24_hours: bool = Field(
        False, description="sign with the old secret too for 24 h (receivers switch over)")


class WebhookPublic(BaseModel):
    id: str
    object: str = "webhook_endpoint"
    url: str
    name: str
    event_types: list[str]
    enabled: bool
    signing_secret_hint: str
    created_at: datetime
    updated_at: datetime

    @classmethod
    def from_row(cls, row: WebhookEndpoint) -> WebhookPublic:
        return cls(id=row.id, url=row.url, name=row.name, event_types=list(row.event_types),
                   enabled=row.enabled, signing_secret_hint=secret_hint(row.secret),
                   created_at=row.created_at, updated_at=row.updated_at)


class WebhookWithSecret(WebhookPublic):
    signing_secret: str = Field(description="whsec_...: shown here only (creation, rotation)")


class WebhooksPublic(BaseModel):
    object: str = "list"
    data: list[WebhookPublic]
    has_more: bool = False
    next_cursor: str | None = Field(None, description="the last id of this page: `after`")


class WebhookDeleted(BaseModel):
    id: str
    object: str = "webhook_endpoint.deleted"
    deleted: bool = True


class AttemptPublic(BaseModel):
    attempt: int
    started_at: datetime
    duration_ms: float
    status_code: int | None
    error: str | None
    response_excerpt: str | None

    @classmethod
    def from_row(cls, row: WebhookAttempt) -> AttemptPublic:
        return cls(attempt=row.attempt, started_at=row.started_at, duration_ms=row.duration_ms,
                   status_code=row.status_code, error=row.error,
                   response_excerpt=row.response_excerpt)


class DeliveryPublic(BaseModel):
    id: str
    object: str = "webhook_delivery"
    webhook_id: str
    event_id: str = Field(description="the webhook-id header: the same on every attempt")
    event_type: str
    job_id: str | None
    status: str = Field(description="pending | delivered | failed (retries exhausted)")
    attempts: int
    next_attempt_at: datetime | None
    last_status_code: int | None
    last_error: str | None
    replay_of: str | None
    created_at: datetime
    finished_at: datetime | None
    payload: dict[str, Any]
    attempt_log: list[AttemptPublic]

    @classmethod
    def from_row(cls, row: WebhookDelivery, attempts: list[WebhookAttempt]) -> DeliveryPublic:
        return cls(id=row.id, webhook_id=row.endpoint_id, event_id=row.event_id,
                   event_type=row.event_type, job_id=row.job_id, status=row.status,
                   attempts=row.attempts,
                   next_attempt_at=row.next_attempt_at if row.status == "pending" else None,
                   last_status_code=row.last_status_code, last_error=row.last_error,
                   replay_of=row.replay_of, created_at=row.created_at,
                   finished_at=row.finished_at, payload=json.loads(row.payload),
                   attempt_log=[AttemptPublic.from_row(a) for a in attempts])


class DeliveriesPublic(BaseModel):
    object: str = "list"
    data: list[DeliveryPublic]
    has_more: bool = False
    next_cursor: str | None = Field(None, description="the last id of this page: `after`")
