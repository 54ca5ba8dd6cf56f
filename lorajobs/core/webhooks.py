"""Webhooks: tenants' endpoints, the transactional outbox, signatures, the retry schedule.

    jobs.transition / request_cancel ──(same transaction)──▶ webhook_deliveries (pending)
    jobs.add_event("checkpoint")     ──(same transaction)──▶          │
                                                                      ▼
    beat (worker/webhook_sender.py): claim due rows ─▶ POST, signed ─▶ receiver
                                       ▲                     │
                                       └─ next_attempt_at ◀──┘ (failed: exponential backoff)

An event is a row per subscribed, enabled endpoint, written by the same transaction as the
state change it reports, so a committed change always has its events and a rolled-back one
never does (the outbox pattern). Its body is serialised once: OpenAI's webhook event shape
(`{"id": "evt_...", "object": "event", "created_at": <unix s>, "type", "data": {"id": job}}`,
openai.types.webhooks.FineTuningJob*WebhookEvent) for OpenAI's three fine-tuning events; our
own (`job.running`, `job.checkpoint`, `job.paused`) add fields to `data`.

Signatures follow Standard Webhooks (standardwebhooks.com), which the official client's
`client.webhooks.unwrap(body, headers, secret=...)` verifies: headers `webhook-id` (the event
id, the same on every attempt: receivers dedupe on it), `webhook-timestamp` (unix seconds of
the attempt) and `webhook-signature` = `v1,` + base64(HMAC-SHA256(key, f"{id}.{ts}." + body)),
the key being the base64-decoded part of the `whsec_` secret; during a rotation that keeps
the old secret, one signature per live secret, space-separated. (~10 lines here, so no
dependency: the `standardwebhooks` package pulls in an HTTP client stack for its API types.)

Who may do what: every key of a tenant reads its endpoints and deliveries; creating, changing,
rotating, deleting and replaying need a key that manages the tenant (admin or manage_keys, as
for keys: core/keys.py). Another tenant's endpoint is a 404.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import random
import secrets
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, delete, func, or_, select
from sqlalchemy.orm import Session

from lorajobs.core.errors import Forbidden, InvalidRequest, LimitExceeded, NotFound
from lorajobs.core.settings import Settings
from lorajobs.core.tables import (
    ApiKey,
    Job,
    WebhookAttempt,
    WebhookDelivery,
    WebhookEndpoint,
    new_id,
    utcnow,
)
from lorajobs.core.webhook_guard import resolve_target

__all__ = [
    "EVENT_TYPES",
    "OPENAI_EVENT_TYPES",
    "STATUS_EVENTS",
    "new_secret",
    "secret_hint",
    "sign",
    "signature_header",
    "create_endpoint",
    "get_endpoint",
    "list_endpoints",
    "update_endpoint",
    "rotate_secret",
    "delete_endpoint",
    "emit",
    "event_body",
    "on_status_change",
    "on_job_event",
    "list_deliveries",
    "attempts_of",
    "replay",
    "purge_finished",
    "retry_delay",
    "PENDING",
    "DELIVERED",
    "FAILED",
]

OPENAI_EVENT_TYPES = ("fine_tuning.job.succeeded", "fine_tuning.job.failed",
                      "fine_tuning.job.cancelled")
EVENT_TYPES = (*OPENAI_EVENT_TYPES, "job.running", "job.checkpoint", "job.paused")
# Job status -> event type. "paused" is the status JobStatus.PAUSED names (pause/resume):
# a job entering it emits job.paused through the same hook as every other status.
STATUS_EVENTS = {"running": "job.running", "succeeded": "fine_tuning.job.succeeded",
                 "failed": "fine_tuning.job.failed", "cancelled": "fine_tuning.job.cancelled",
                 "paused": "job.paused"}
PENDING, DELIVERED, FAILED = "pending", "delivered", "failed"
DELIVERY_STATUSES = (PENDING, DELIVERED, FAILED)
SECRET_PREFIX = "whsec_"
SECRET_BYTES = 32  # 256-bit HMAC key, as Standard Webhooks recommends (24-64 bytes)
# keep_old_secret on rotation: the old secret keeps signing this long (OpenAI's rotate_secret
# option, keep_old_secret_active_for_24_hours).
KEEP_OLD_SECRET_SECONDS = 24 * 3600
RETRY_JITTER = 0.1  # each delay is scaled by a uniform factor in [0.9, 1.1]


# --- secrets and signatures --------------------------------------------------------------

def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def secret_hint(secret: str) -> str:
    """What listings show of a secret: enough to tell two apart, not to sign."""
    return f"{SECRET_PREFIX}...{secret[-4:]}"


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """One Standard Webhooks signature: `v1,<base64 HMAC-SHA256>` (module doc)."""
    key = base64.b64decode(secret.removeprefix(SECRET_PREFIX))
    mac = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256)
    return "v1," + base64.b64encode(mac.digest()).decode()


def signature_header(endpoint: WebhookEndpoint, msg_id: str, timestamp: int, body: bytes,
                     *, now: datetime) -> str:
    """The `webhook-signature` value: the current secret's, and the previous one's while a
    rotation keeps it live."""
    sigs = [sign(endpoint.secret, msg_id, timestamp, body)]
    if (endpoint.previous_secret and endpoint.previous_secret_expires_at is not None
            and endpoint.previous_secret_expires_at > now):
        sigs.append(sign(endpoint.previous_secret, msg_id, timestamp, body))
    return " ".join(sigs)


# --- endpoints ---------------------------------------------------------------------------

def _check_manage(by: ApiKey) -> None:
    if not (by.is_admin or by.manage_keys):
        raise Forbidden("changing webhooks needs an admin key or a key with manage_keys",
                        param="Authorization")


def _check_event_types(event_types: list[str]) -> list[str]:
    if not event_types:
        raise InvalidRequest("event_types must name at least one event type",
                             param="event_types")
    unknown = [t for t in event_types if t not in EVENT_TYPES]
    if unknown:
        raise InvalidRequest(f"unknown event types {unknown}; one of {list(EVENT_TYPES)}",
                             param="event_types")
    return list(dict.fromkeys(event_types))


def create_endpoint(session: Session, *, by: ApiKey, url: str, event_types: list[str],
                    settings: Settings, name: str = "", enabled: bool = True
                    ) -> tuple[WebhookEndpoint, str]:
    """Register an endpoint for `by`'s tenant; returns (row, secret). Does not commit.

    The URL is checked now (UnsafeURL, 422) and again before every attempt."""
    _check_manage(by)
    types = _check_event_types(event_types)
    resolve_target(url, settings)
    count = session.scalar(select(func.count()).select_from(WebhookEndpoint)
                           .where(WebhookEndpoint.tenant_id == by.tenant_id)) or 0
    if count >= settings.webhook_max_endpoints_per_tenant:
        raise LimitExceeded(f"a tenant may register at most "
                            f"{settings.webhook_max_endpoints_per_tenant} webhook endpoints",
                            param="url", code="webhook_endpoint_limit")
    secret = new_secret()
    now = utcnow()
    row = WebhookEndpoint(id=new_id("wh"), tenant_id=by.tenant_id, name=name, url=url,
                          event_types=types, enabled=enabled, secret=secret, created_at=now,
                          updated_at=now)
    session.add(row)
    session.flush()
    return row, secret


def get_endpoint(session: Session, *, tenant_id: str, endpoint_id: str) -> WebhookEndpoint:
    row = session.get(WebhookEndpoint, endpoint_id)
    if row is None or row.tenant_id != tenant_id:
        raise NotFound(f"no webhook endpoint {endpoint_id!r}", param="webhook_id")
    return row


def list_endpoints(session: Session, *, tenant_id: str, limit: int,
                   after: str | None = None) -> tuple[list[WebhookEndpoint], bool]:
    """Oldest first, keyset-paged on (created_at, id): `after` is the previous page's last id."""
    stmt = select(WebhookEndpoint).where(WebhookEndpoint.tenant_id == tenant_id)
    if after:
        anchor = session.get(WebhookEndpoint, after)
        if anchor is None or anchor.tenant_id != tenant_id:
            raise InvalidRequest(f"unknown cursor {after!r}", param="after")
        stmt = stmt.where(or_(WebhookEndpoint.created_at > anchor.created_at,
                              and_(WebhookEndpoint.created_at == anchor.created_at,
                                   WebhookEndpoint.id > anchor.id)))
    rows = list(session.scalars(stmt.order_by(WebhookEndpoint.created_at, WebhookEndpoint.id)
                                .limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def update_endpoint(session: Session, *, by: ApiKey, endpoint_id: str, settings: Settings,
                    url: str | None = None, event_types: list[str] | None = None,
                    enabled: bool | None = None, name: str | None = None) -> WebhookEndpoint:
    """Change what is given; an unchanged update does not advance `updated_at`. Does not
    commit. Deliveries already pending keep their URL-independent body and are sent to the
    endpoint's URL as it is at each attempt; while disabled they wait (see webhook_sender)."""
    _check_manage(by)
    row = get_endpoint(session, tenant_id=by.tenant_id, endpoint_id=endpoint_id)
    changes: dict[str, Any] = {}
    if url is not None and url != row.url:
        resolve_target(url, settings)
        changes["url"] = url
    if event_types is not None:
        types = _check_event_types(event_types)
        if types != row.event_types:
            changes["event_types"] = types
    if enabled is not None and enabled != row.enabled:
        changes["enabled"] = enabled
    if name is not None and name != row.name:
        changes["name"] = name
    for field, value in changes.items():
        setattr(row, field, value)
    if changes:
        row.updated_at = utcnow()
    session.flush()
    return row


def rotate_secret(session: Session, *, by: ApiKey, endpoint_id: str,
                  keep_old_secret: bool = False) -> tuple[WebhookEndpoint, str]:
    """A new secret, shown once; the old one stops signing at once, or after
    KEEP_OLD_SECRET_SECONDS if `keep_old_secret` (both signatures are sent meanwhile)."""
    _check_manage(by)
    row = get_endpoint(session, tenant_id=by.tenant_id, endpoint_id=endpoint_id)
    now = utcnow()
    if keep_old_secret:
        row.previous_secret = row.secret
        row.previous_secret_expires_at = now + timedelta(seconds=KEEP_OLD_SECRET_SECONDS)
    else:
        row.previous_secret = None
        row.previous_secret_expires_at = None
    row.secret = new_secret()
    row.updated_at = now
    session.flush()
    return row, row.secret


def delete_endpoint(session: Session, *, by: ApiKey, endpoint_id: str) -> WebhookEndpoint:
    """Delete an endpoint with its deliveries and their attempts. Does not commit."""
    _check_manage(by)
    row = get_endpoint(session, tenant_id=by.tenant_id, endpoint_id=endpoint_id)
    ids = select(WebhookDelivery.id).where(WebhookDelivery.endpoint_id == row.id)
    session.execute(delete(WebhookAttempt).where(WebhookAttempt.delivery_id.in_(ids)))
    session.execute(delete(WebhookDelivery).where(WebhookDelivery.endpoint_id == row.id))
    session.delete(row)
    session.flush()
    return row


# --- the outbox --------------------------------------------------------------------------

def event_body(event_id: str, event_type: str, created_at: datetime,
               data: dict[str, Any]) -> str:
    """The JSON body, serialised once: what is signed and sent on every attempt."""
    return json.dumps({"id": event_id, "object": "event",
                       "created_at": int(created_at.timestamp()), "type": event_type,
                       "data": data}, separators=(",", ":"), sort_keys=True)


def emit(session: Session, *, tenant_id: str, job_id: str | None, event_type: str,
         data: dict[str, Any], at: datetime | None = None) -> int:
    """Write one pending delivery per enabled endpoint of the tenant subscribed to
    `event_type`, in the caller's transaction. Returns how many. Does not commit."""
    endpoints = list(session.scalars(
        select(WebhookEndpoint).where(WebhookEndpoint.tenant_id == tenant_id,
                                      WebhookEndpoint.enabled.is_(True))))
    endpoints = [e for e in endpoints if event_type in (e.event_types or [])]
    if not endpoints:
        return 0
    at = at or utcnow()
    event_id = new_id("evt")
    body = event_body(event_id, event_type, at, data)
    session.add_all(WebhookDelivery(
        id=new_id("whd"), endpoint_id=e.id, event_id=event_id, event_type=event_type,
        job_id=job_id, payload=body, status=PENDING, attempts=0, next_attempt_at=at,
        created_at=at) for e in endpoints)
    return len(endpoints)


def on_status_change(session: Session, job: Job, to: str, *, attempt: int) -> None:
    """Called by jobs for every status change, in its transaction (the outbox hook)."""
    event_type = STATUS_EVENTS.get(str(to))
    if event_type is None:
        return
    data: dict[str, Any] = {"id": job.id}
    if event_type not in OPENAI_EVENT_TYPES:  # OpenAI's events carry exactly {"id"}
        data |= {"status": str(to), "attempt": attempt}
    emit(session, tenant_id=job.tenant_id, job_id=job.id, event_type=event_type, data=data)


def on_job_event(session: Session, job_id: str, type_: str, data: dict[str, Any]) -> None:
    """Called by jobs.add_event, in its transaction: a recorded checkpoint -> job.checkpoint.

    (The trainer's `checkpoint` event is logged by worker/event_recorder.py in the same
    transaction that writes the Checkpoint row.)"""
    if type_ != "checkpoint":
        return
    job = session.execute(select(Job.tenant_id, Job.base_model, Job.suffix)
                          .where(Job.id == job_id)).first()
    if job is None:
        return
    step = data.get("step")
    # The name a new job may train on from (api/openai_objects.py, core/lineage.py).
    name = f"ft:{job.base_model}:{job.suffix or 'lorajobs'}:{job_id}:ckpt-step-{step}"
    emit(session, tenant_id=job.tenant_id, job_id=job_id, event_type="job.checkpoint",
         data={"id": job_id, "step": step, "resumable": data.get("resumable"),
               "fine_tuned_model_checkpoint": name})


# --- reads and replay --------------------------------------------------------------------

def list_deliveries(session: Session, *, endpoint: WebhookEndpoint, limit: int,
                    after: str | None = None, status: str | None = None
                    ) -> tuple[list[WebhookDelivery], bool]:
    """Newest first, keyset-paged on (created_at, id) in SQL."""
    stmt = select(WebhookDelivery).where(WebhookDelivery.endpoint_id == endpoint.id)
    if status is not None:
        if status not in DELIVERY_STATUSES:
            raise InvalidRequest(f"unknown status {status!r}; one of {list(DELIVERY_STATUSES)}",
                                 param="status")
        stmt = stmt.where(WebhookDelivery.status == status)
    if after:
        anchor = session.get(WebhookDelivery, after)
        if anchor is None or anchor.endpoint_id != endpoint.id:
            raise InvalidRequest(f"unknown cursor {after!r}", param="after")
        stmt = stmt.where(or_(WebhookDelivery.created_at < anchor.created_at,
                              and_(WebhookDelivery.created_at == anchor.created_at,
                                   WebhookDelivery.id < anchor.id)))
    rows = list(session.scalars(stmt.order_by(WebhookDelivery.created_at.desc(),
                                              WebhookDelivery.id.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def attempts_of(session: Session, delivery_ids: list[str]) -> dict[str, list[WebhookAttempt]]:
    """The attempts of one page of deliveries, in one query, by delivery id."""
    out: dict[str, list[WebhookAttempt]] = {d: [] for d in delivery_ids}
    if delivery_ids:
        for row in session.scalars(select(WebhookAttempt)
                                   .where(WebhookAttempt.delivery_id.in_(delivery_ids))
                                   .order_by(WebhookAttempt.id)):
            out[row.delivery_id].append(row)
    return out


def replay(session: Session, *, by: ApiKey, endpoint_id: str,
           delivery_id: str) -> WebhookDelivery:
    """Send a delivery again, whatever became of it: a new pending delivery with the same
    event (same `webhook-id` and body, so a receiver that processed it already can tell),
    due now, with its own attempts and retry window. Does not commit."""
    _check_manage(by)
    endpoint = get_endpoint(session, tenant_id=by.tenant_id, endpoint_id=endpoint_id)
    original = session.get(WebhookDelivery, delivery_id)
    if original is None or original.endpoint_id != endpoint.id:
        raise NotFound(f"no delivery {delivery_id!r}", param="delivery_id")
    now = utcnow()
    row = WebhookDelivery(id=new_id("whd"), endpoint_id=endpoint.id, event_id=original.event_id,
                          event_type=original.event_type, job_id=original.job_id,
                          payload=original.payload, status=PENDING, attempts=0,
                          next_attempt_at=now, replay_of=original.id, created_at=now)
    session.add(row)
    session.flush()
    return row


def purge_finished(session: Session, *, before: datetime) -> int:
    """Delete delivered and failed deliveries that finished before `before`, with their
    attempts (retention; pending ones are kept whatever their age). Commits. Returns how many."""
    done = select(WebhookDelivery.id).where(WebhookDelivery.status.in_((DELIVERED, FAILED)),
                                            WebhookDelivery.finished_at < before)
    ids = list(session.scalars(done))
    if ids:
        session.execute(delete(WebhookAttempt).where(WebhookAttempt.delivery_id.in_(ids)))
        session.execute(delete(WebhookDelivery).where(WebhookDelivery.id.in_(ids)))
    session.commit()
    return len(ids)


# --- the retry schedule ------------------------------------------------------------------

def retry_delay(attempts: int, settings: Settings,
                rand: Callable[[], float] = random.random) -> float:
    """Seconds until the next try after `attempts` failed ones (tenacity's wait_exponential,
    with jitter so the backlog of a receiver that comes back does not arrive at once):
    min(base * 2**(attempts-1), max_delay) * U(0.9, 1.1)."""
    exponent = min(max(attempts - 1, 0), 62)
    delay = min(settings.webhook_retry_base_seconds * 2.0 ** exponent,
                settings.webhook_retry_max_delay_seconds)
    return delay * (1 - RETRY_JITTER + 2 * RETRY_JITTER * rand())
