"""The webhook sender: beat's loop that empties the outbox (lorajobs/core/webhooks.py).

    claim (one UPDATE ... RETURNING)  ─▶  POST, signed, to the checked address  ─▶  record
    pending, due, endpoint enabled        connect/read timeouts, no redirects,       2xx: delivered
    next_attempt_at := now + CLAIM        at most MAX_RESPONSE_BYTES read            else: retry at
    claim_token := ours                                                              now + backoff,
                                                                                     or failed

At least once: a row is claimed by pushing its `next_attempt_at` past the longest an attempt
can take, so a sender killed mid-attempt (or mid-sweep) leaves it to become due again, and any
sender, after any restart, picks it up; nothing lives in memory between sweeps. Two senders
never hold the same row: the claim is one UPDATE whose subquery takes the due rows with
`FOR UPDATE SKIP LOCKED` on PostgreSQL (SQLite has one writer: the UPDATE is atomic). A
result is recorded under the claim token; a sender whose claim ran out (and was re-claimed)
still records its attempt, and its success still counts. The `webhook-id` is the event's id,
the same on every attempt and replay: a receiver that dedupes on it processes each event
once. It runs in `lorajobs beat` (a thread beside the reaper) and in `lorajobs serve`.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta

import httpx
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from lorajobs.core import webhooks
from lorajobs.core.db import get_sessionmaker
from lorajobs.core.settings import Settings
from lorajobs.core.tables import WebhookAttempt, WebhookDelivery, WebhookEndpoint, utcnow
from lorajobs.core.webhook_http import MAX_RESPONSE_BYTES, Result, make_client, post_event

__all__ = ["deliver_once", "run_webhook_loop", "claim_due", "start_webhook_thread",
           "MAX_RESPONSE_BYTES"]

log = logging.getLogger(__name__)


Clock = Callable[[], datetime]
PURGE_SECONDS = 3600.0  # how often the loop deletes deliveries past webhook_retention_seconds


@dataclass(frozen=True)
class Claimed:
    id: str
    endpoint_id: str
    event_id: str
    payload: str
    attempts: int
    first_attempt_at: datetime | None
    token: str


def claim_seconds(settings: Settings) -> float:
    return (settings.webhook_connect_timeout_seconds + settings.webhook_read_timeout_seconds
            + settings.webhook_claim_margin_seconds)


def claim_due(session: Session, *, now: datetime, limit: int, settings: Settings
              ) -> list[Claimed]:
    """Claim up to `limit` due deliveries of enabled endpoints, oldest due first. Commits."""
    token = uuid.uuid4().hex
    due = (WebhookDelivery.status == webhooks.PENDING) & (WebhookDelivery.next_attempt_at <= now)
    candidates = (select(WebhookDelivery.id)
                  .join(WebhookEndpoint, WebhookEndpoint.id == WebhookDelivery.endpoint_id)
                  .where(due, WebhookEndpoint.enabled.is_(True))
                  .order_by(WebhookDelivery.next_attempt_at).limit(limit)
                  .with_for_update(skip_locked=True, of=WebhookDelivery))
    rows = session.execute(
        update(WebhookDelivery).where(WebhookDelivery.id.in_(candidates), due)
        .values(claim_token=token,
                next_attempt_at=now + timedelta(seconds=claim_seconds(settings)))
        .returning(WebhookDelivery.id, WebhookDelivery.endpoint_id, WebhookDelivery.event_id,
                   WebhookDelivery.payload, WebhookDelivery.attempts,
                   WebhookDelivery.first_attempt_at)
        .execution_options(synchronize_session=False)).all()
    session.commit()
    return [Claimed(r.id, r.endpoint_id, r.event_id, r.payload, r.attempts,
                    r.first_attempt_at, token) for r in rows]


def record(session: Session, claimed: Claimed, result: Result, settings: Settings,
           *, now: datetime) -> str:
    """Store the attempt and what follows from it; returns the delivery's status. Commits."""
    attempt = claimed.attempts + 1
    session.add(WebhookAttempt(delivery_id=claimed.id, attempt=attempt,
                               started_at=result.started_at, duration_ms=result.duration_ms,
                               status_code=result.status_code, error=result.error,
                               response_excerpt=result.excerpt))
    first = claimed.first_attempt_at or result.started_at
    values = {"attempts": WebhookDelivery.attempts + 1, "first_attempt_at": first,
              "last_status_code": result.status_code, "last_error": result.error}
    if result.ok:  # a success counts whoever holds the claim now
        status = webhooks.DELIVERED
        values |= {"status": status, "finished_at": now, "next_attempt_at": None,
                   "claim_token": None}
    elif (now - first).total_seconds() >= settings.webhook_retry_window_seconds:
        status = webhooks.FAILED
        values |= {"status": status, "finished_at": now, "next_attempt_at": None,
                   "claim_token": None}
    else:
        status = webhooks.PENDING
        delay = webhooks.retry_delay(attempt, settings)
        values |= {"next_attempt_at": now + timedelta(seconds=delay), "claim_token": None}
    stmt = update(WebhookDelivery).where(WebhookDelivery.id == claimed.id,
                                         WebhookDelivery.status == webhooks.PENDING)
    if not result.ok:  # a failure only reschedules a claim that is still ours
        stmt = stmt.where(WebhookDelivery.claim_token == claimed.token)
    session.execute(stmt.values(**values).execution_options(synchronize_session=False))
    session.commit()
    return status


def deliver_once(settings: Settings, *, now: Clock = utcnow,
                 client: httpx.Client | None = None,
                 sessions: sessionmaker[Session] | None = None) -> int:
    """One sweep: claim up to `webhook_concurrency` due deliveries, send them in parallel,
    record each as it ends. Returns how many were attempted. `now` drives the schedule
    (tests inject a clock); signatures always carry the real time."""
    sessions = sessions or get_sessionmaker(settings)
    with sessions() as session:
        claimed = claim_due(session, now=now(), limit=settings.webhook_concurrency,
                            settings=settings)
        if not claimed:
            return 0
        ids = {c.endpoint_id for c in claimed}
        endpoints = {e.id: e for e in session.scalars(
            select(WebhookEndpoint).where(WebhookEndpoint.id.in_(ids)))}
        session.expunge_all()
    own_client = client is None
    client = client or make_client(settings)

    def one(item: Claimed) -> None:
        endpoint = endpoints.get(item.endpoint_id)
        if endpoint is None:  # deleted since the claim: its rows went with it
            return
        result = post_event(client, endpoint, event_id=item.event_id, payload=item.payload,
                            settings=settings, now=now)
        try:
            with sessions() as session:
                status = record(session, item, result, settings, now=now())
        except Exception:  # noqa: BLE001 - e.g. the endpoint deleted meanwhile (FK): the
            # others' results are still recorded; an unrecorded one is due again
            log.exception("webhook %s: recording attempt %d failed", item.id, item.attempts + 1)
            return
        log.info("webhook %s (%s) to %s: attempt %d %s -> %s", item.id, item.event_id,
                 endpoint.id, item.attempts + 1, result.status_code or result.error, status)

    try:
        with ThreadPoolExecutor(max_workers=len(claimed),
                                thread_name_prefix="lorajobs-webhook") as pool:
            for future in [pool.submit(one, item) for item in claimed]:
                future.result()
    finally:
        if own_client:
            client.close()
    return len(claimed)


def run_webhook_loop(settings: Settings, stop_event: threading.Event) -> None:
    """Sweep until `stop_event`: at once again after a sweep that found work, else after
    `webhook_poll_seconds`; purge finished deliveries past retention every PURGE_SECONDS.
    Never dies on an error (a database outage: next interval)."""
    client = make_client(settings)
    purged_at = float("-inf")
    try:
        while not stop_event.is_set():
            try:
                if time.monotonic() - purged_at >= PURGE_SECONDS:
                    purged_at = time.monotonic()
                    with get_sessionmaker(settings)() as session:
                        webhooks.purge_finished(session, before=utcnow() - timedelta(
                            seconds=settings.webhook_retention_seconds))
                busy = deliver_once(settings, client=client)
            except Exception:  # noqa: BLE001 - the loop must outlive a DB outage
                log.exception("webhook sweep failed; retrying next interval")
                busy = 0
            if not busy:
                stop_event.wait(settings.webhook_poll_seconds)
    finally:
        client.close()


def start_webhook_thread(settings: Settings, stop_event: threading.Event) -> threading.Thread:
    thread = threading.Thread(target=run_webhook_loop, args=(settings, stop_event),
                              daemon=True, name="lorajobs-webhooks")
    thread.start()
    return thread
