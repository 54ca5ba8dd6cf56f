"""The webhook sender against a real HTTP receiver (tests/webhook_receiver.py), which verifies
every request with the official `openai` client and dedupes on `webhook-id`.

In-process sweeps (`deliver_once`) with an injected clock drive the retry schedule: a
receiver down for hours gets everything when it comes back, a delivery fails only after the
retry window (>= 24 h) of tries. A real `lorajobs beat` process is SIGKILLed in the middle
of an attempt of a retried delivery and restarted: every event reaches the receiver's dedupe
level exactly once. Both backends.
"""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from lorajobs.core import jobs, keys, webhooks
from lorajobs.core.db import get_sessionmaker
from lorajobs.core.settings import Settings
from lorajobs.core.tables import Job, JobStatus, WebhookAttempt, WebhookDelivery, utcnow
from lorajobs.worker.webhook_sender import MAX_RESPONSE_BYTES, deliver_once
from tests.dbfixtures import db_settings  # noqa: F401 - the parametrized fixture
from tests.servicefixtures import LiveService, wait_for
from tests.webhook_receiver import Received, Receiver, self_signed
from tests.worker.jobfactory import make_job

pytestmark = [pytest.mark.timeout(300)]

# The read timeout is a hang bound: the receiver's first answer (the official client verifying
# it) took over 1 s once on a loaded CI box, and the delivery stayed pending. The slow-receiver
# test sets its own.
LAB = {"webhook_allow_private_addresses": True, "webhook_allow_http": True,
       "webhook_connect_timeout_seconds": 1.0, "webhook_read_timeout_seconds": 10.0,
       "webhook_claim_margin_seconds": 1.0}
ALL_EVENTS = list(webhooks.EVENT_TYPES)


class Clock:
    def __init__(self) -> None:
        self.now = utcnow()

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def lab(db_settings: Settings) -> Settings:  # noqa: F811
    return db_settings.model_copy(update=LAB)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    recv = Receiver().start()
    try:
        yield recv
    finally:
        recv.stop()


def register(settings: Settings, url: str, event_types: list[str] | None = None
             ) -> tuple[str, str, str]:
    """(endpoint_id, secret, job_id): an endpoint of tenant "local" and one queued job."""
    job_id = make_job(settings)
    with get_sessionmaker(settings)() as session:
        tenant_id = session.get(Job, job_id).tenant_id
        key, _ = keys.create_key(session, tenant_id=tenant_id, manage_keys=True)
        row, secret = webhooks.create_endpoint(session, by=key, url=url, settings=settings,
                                               event_types=event_types or ALL_EVENTS)
        session.commit()
        return row.id, secret, job_id


def finish(settings: Settings, job_id: str, to: str = JobStatus.SUCCEEDED) -> None:
    """Claim the job (job.running) and end it (the fine_tuning.job.* event)."""
    with get_sessionmaker(settings)() as session:
        job = jobs.claim(session, job_id, owner="w", lease_seconds=60)
        assert job is not None
        jobs.transition(session, job, to=to, expect_owner="w")
        session.commit()


def deliveries(settings: Settings) -> list[WebhookDelivery]:
    with get_sessionmaker(settings)() as session:
        return list(session.scalars(select(WebhookDelivery)
                                    .order_by(WebhookDelivery.created_at, WebhookDelivery.id)))


def attempts(settings: Settings, delivery_id: str) -> list[WebhookAttempt]:
    with get_sessionmaker(settings)() as session:
        return list(session.scalars(select(WebhookAttempt).where(
            WebhookAttempt.delivery_id == delivery_id).order_by(WebhookAttempt.id)))


def test_delivered_events_verify_with_the_official_client(lab: Settings,
                                                          receiver: Receiver) -> None:
    _, receiver.secret, job_id = register(lab, receiver.url)
    finish(lab, job_id)
    assert deliver_once(lab) == 2
    assert [r.verified for r in receiver.received] == [True, True]
    events = {type(r.event).__name__: r.event for r in receiver.received}
    ok = events["FineTuningJobSucceededWebhookEvent"]
    assert ok.data.id == job_id and ok.object == "event"
    running = next(json.loads(r.body) for r in receiver.received if b"job.running" in r.body)
    assert running["data"] == {"id": job_id, "status": "running", "attempt": 1}
    assert {d.status for d in deliveries(lab)} == {"delivered"}
    assert deliver_once(lab) == 0  # nothing is sent twice
    # The body on the wire is exactly the stored one: a byte changed fails verification.
    tampered = receiver.received[1].body.replace(job_id.encode(), b"job_forged")
    assert not receiver._verify(receiver.received[1].headers, tampered, "/").verified


def test_receiver_down_for_hours_gets_everything_when_back(lab: Settings,
                                                           receiver: Receiver) -> None:
    _, receiver.secret, job_id = register(lab, receiver.url)
    other = make_job(lab)
    receiver.stop()  # connection refused from now on
    finish(lab, job_id)
    finish(lab, other, JobStatus.FAILED)
    clock = Clock()
    tries = 0
    while clock.now - deliveries(lab)[0].created_at < timedelta(hours=6):
        tries += deliver_once(lab, now=clock)
        due = min(d.next_attempt_at for d in deliveries(lab))
        clock.now = max(clock.now, due)
    rows = deliveries(lab)
    assert {d.status for d in rows} == {"pending"} and min(d.attempts for d in rows) >= 8
    gaps = [(b.started_at - a.started_at).total_seconds()
            for a, b in zip(attempts(lab, rows[0].id), attempts(lab, rows[0].id)[1:],
                            strict=False)]
    assert all(b > a for a, b in zip(gaps, gaps[1:], strict=False))  # backing off
    assert rows[0].last_error and rows[0].last_status_code is None  # connection refused
    receiver.start()  # back, same port
    clock.now = max(d.next_attempt_at for d in rows)
    for _ in range(20):  # an attempt may still fail on a loaded box: it is retried, later
        deliver_once(lab, now=clock)
        pending = [d for d in deliveries(lab) if d.status != "delivered"]
        if not pending:
            break
        clock.now = max(clock.now, min(d.next_attempt_at for d in pending))
    assert {d.status for d in deliveries(lab)} == {"delivered"}
    assert all(r.verified for r in receiver.received)
    ids = [r.headers["webhook-id"] for r in receiver.received]
    # at least once: a receiver dedupes by webhook-id, and every event is there
    assert sorted(set(ids)) == sorted(d.event_id for d in rows) and len(set(ids)) == 4


def test_gives_up_only_after_the_retry_window(lab: Settings) -> None:
    dead = Receiver().start()
    url = dead.url
    dead.stop()
    register(lab, url, ["fine_tuning.job.cancelled"])
    with get_sessionmaker(lab)() as session:
        job_id = make_job(lab)
        jobs.request_cancel(session, session.get(Job, job_id))
    clock = Clock()
    while (row := deliveries(lab)[0]).status == "pending":
        deliver_once(lab, now=clock)
        row = deliveries(lab)[0]
        if row.next_attempt_at is not None:
            clock.now = max(clock.now, row.next_attempt_at)
    assert row.status == "failed"
    tries = attempts(lab, row.id)
    span = (tries[-1].started_at - tries[0].started_at).total_seconds()
    assert span >= lab.webhook_retry_window_seconds >= 24 * 3600
    assert len(tries) == row.attempts < 40


def test_slow_receiver_times_out_and_big_answers_are_cut(lab: Settings,
                                                         receiver: Receiver) -> None:
    lab = lab.model_copy(update={"webhook_read_timeout_seconds": 1.0})
    _, receiver.secret, job_id = register(lab, receiver.url, ["job.running"])
    receiver.behaviour = lambda r: (200, 10.0, b"late")
    finish(lab, job_id)
    deliver_once(lab)
    (row,) = deliveries(lab)
    (tried,) = attempts(lab, row.id)
    assert row.status == "pending" and "timeout" in (tried.error or "")
    assert tried.duration_ms < 8000  # the 1 s read timeout, not the receiver's 10 s
    receiver.behaviour = lambda r: (200, 0.0, b"x" * (1 << 20))
    deliver_once(lab, now=lambda: utcnow() + timedelta(hours=1))
    (row,) = deliveries(lab)
    assert row.status == "delivered"
    assert len(attempts(lab, row.id)[-1].response_excerpt or "") <= MAX_RESPONSE_BYTES


def test_redirects_are_not_followed(lab: Settings, receiver: Receiver) -> None:
    _, receiver.secret, job_id = register(lab, receiver.url, ["job.running"])
    receiver.behaviour = lambda r: (302, 0.0, b"")
    finish(lab, job_id)
    deliver_once(lab)
    (row,) = deliveries(lab)
    assert row.status == "pending" and "redirect not followed" in (row.last_error or "")
    assert [r.path for r in receiver.received] == ["/hook"]  # /other never requested


def test_an_address_refused_at_delivery_time_is_not_called(lab: Settings,
                                                           receiver: Receiver) -> None:
    """Registered while loopback was allowed (think: DNS pointed elsewhere then); the check
    before each attempt refuses it now."""
    _, receiver.secret, job_id = register(lab, receiver.url, ["job.running"])
    finish(lab, job_id)
    strict = lab.model_copy(update={"webhook_allow_private_addresses": False})
    deliver_once(strict)
    (row,) = deliveries(strict)
    assert receiver.received == [] and row.status == "pending"
    assert "loopback" in (row.last_error or "") and row.last_status_code is None


# --- a real beat process, killed in the middle of an attempt ---------------------------------

@pytest.fixture(params=["sqlite", "postgresql"])
def beat_service(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LiveService]:
    service = LiveService(tmp_path, request.param, **{
        **LAB, "webhook_read_timeout_seconds": 3.0, "webhook_retry_base_seconds": 0.2,
        "webhook_retry_max_delay_seconds": 0.5, "webhook_poll_seconds": 0.05,
        "reaper_interval_seconds": 30})
    try:
        service.migrate()
        yield service
    finally:
        service.close()


def test_beat_killed_mid_retry_every_event_arrives_once(beat_service: LiveService,
                                                        receiver: Receiver) -> None:
    settings = beat_service.settings
    phase = {"name": "failing"}
    killed = threading.Event()

    def behaviour(item: Received) -> tuple[int, float, bytes]:
        if phase["name"] == "failing" or not item.verified:
            return 500, 0.0, b"not now"
        receiver.process(item)  # processed, then answered...
        if phase["name"] == "holding":
            killed.wait(10)  # ...too late: the sender is killed before this answer
        return 200, 0.0, b"ok"

    receiver.behaviour = behaviour
    _, receiver.secret, first = register(settings, receiver.url)
    job_ids = [first] + [make_job(settings) for _ in range(2)]
    for job_id in job_ids:
        finish(settings, job_id)  # job.running + fine_tuning.job.succeeded each
    expected = {d.event_id for d in deliveries(settings)}
    assert len(expected) == 6

    beat = beat_service.start_beat()
    # Mid-retry: every delivery has failed at least twice and is waiting for its next try.
    wait_for(lambda: min(d.attempts for d in deliveries(settings)) >= 2, timeout=60,
             what="two failed attempts of every delivery")
    phase["name"] = "holding"
    wait_for(lambda: receiver.processed, timeout=30, what="an attempt in flight")
    beat.send_signal(signal.SIGKILL)
    beat.wait(timeout=10)
    in_flight = set(receiver.processed)
    killed.set()
    assert {d.status for d in deliveries(settings)} == {"pending"}  # none recorded as sent
    phase["name"] = "ok"

    beat_service.start_beat()  # restarted: claims run out, and it carries on
    wait_for(lambda: {d.status for d in deliveries(settings)} == {"delivered"}, timeout=90,
             what="every delivery delivered after the restart")
    assert set(receiver.processed) == expected
    assert all(n == 1 for n in receiver.processed.values())  # once each, after dedupe
    assert receiver.duplicates >= len(in_flight) >= 1  # the killed attempts were sent again
    assert all(r.verified for r in receiver.received)
    by_id: dict[str, set[Any]] = {}
    for r in receiver.received:
        by_id.setdefault(r.headers["webhook-id"], set()).add(r.body)
    assert all(len(bodies) == 1 for bodies in by_id.values())  # the same body on every try


def test_two_beats_never_send_the_same_delivery_twice(beat_service: LiveService,
                                                      receiver: Receiver) -> None:
    """Claims are exclusive (FOR UPDATE SKIP LOCKED on PostgreSQL; one writer on SQLite):
    with two senders sweeping at once, no request is a duplicate."""
    # A claim that cannot run out during this test, however loaded the machine: any
    # duplicate would then be two senders holding one row.
    beat_service.settings = beat_service.settings.model_copy(
        update={"webhook_claim_margin_seconds": 60})
    settings = beat_service.settings
    _, receiver.secret, first = register(settings, receiver.url, ["fine_tuning.job.succeeded"])
    job_ids = [first] + [make_job(settings) for _ in range(11)]
    beat_service.start_beat()
    beat_service.start_beat()
    for job_id in job_ids:
        finish(settings, job_id)
    wait_for(lambda: len(deliveries(settings)) == 12
             and {d.status for d in deliveries(settings)} == {"delivered"}, timeout=60,
             what="12 deliveries delivered")
    ids = [r.headers["webhook-id"] for r in receiver.received]
    assert len(ids) == len(set(ids)) == 12 and all(r.verified for r in receiver.received)


def test_https_connects_to_the_checked_address_and_verifies_the_name(lab: Settings,
                                                                     tmp_path: Path) -> None:
    """The request goes to the resolved address (no second lookup), with the name as Host and
    TLS SNI, so the receiver's certificate for "localhost" verifies; a certificate the sender
    does not trust is an error, not a delivery."""
    import ssl

    import httpx

    from lorajobs.core.webhook_http import make_client

    context, cert = self_signed(tmp_path)
    receiver = Receiver(tls=context).start()
    try:
        https_only = lab.model_copy(update={"webhook_allow_http": False})
        _, receiver.secret, job_id = register(https_only, receiver.url, ["job.running"])
        finish(https_only, job_id)
        deliver_once(https_only)  # the default trust store: this certificate is unknown
        (row,) = deliveries(lab)
        assert row.status == "pending" and "CERTIFICATE_VERIFY_FAILED" in (row.last_error or "")
        assert receiver.received == []
        default = make_client(https_only)
        trusting = httpx.Client(verify=ssl.create_default_context(cafile=str(cert)),
                                follow_redirects=False, trust_env=False, timeout=default.timeout)
        default.close()
        with trusting:
            deliver_once(https_only, client=trusting, now=lambda: utcnow() + timedelta(hours=1))
        (row,) = deliveries(lab)
        assert row.status == "delivered", row.last_error
        (got,) = receiver.received
        assert got.verified and got.headers["host"] == f"localhost:{receiver.port}"
    finally:
        receiver.stop()


def test_finished_deliveries_are_purged_after_retention(lab: Settings,
                                                        receiver: Receiver) -> None:
    _, receiver.secret, job_id = register(lab, receiver.url)
    finish(lab, job_id)
    deliver_once(lab)
    pending_job = make_job(lab)
    with get_sessionmaker(lab)() as session:
        assert jobs.claim(session, pending_job, owner="w", lease_seconds=60)  # job.running
        assert webhooks.purge_finished(session, before=utcnow() - timedelta(days=1)) == 0
        assert webhooks.purge_finished(session, before=utcnow() + timedelta(days=31)) == 2
    (left,) = deliveries(lab)
    assert left.status == "pending" and left.job_id == pending_job


def test_the_next_checked_address_is_tried_when_one_refuses(
        lab: Settings, receiver: Receiver, monkeypatch: pytest.MonkeyPatch) -> None:
    """A name with two records: the first refuses connections, the second is the receiver;
    the Host header keeps the name."""
    import socket

    real = socket.getaddrinfo

    def fake(host: str, port: int, *args: Any, **kwargs: Any) -> Any:
        if host == "hook.test":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port))
                    for ip in ("127.0.0.9", "127.0.0.1")]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr("lorajobs.core.webhook_guard.socket.getaddrinfo", fake)
    url = f"http://hook.test:{receiver.port}/hook"
    _, receiver.secret, job_id = register(lab, url, ["job.running"])
    finish(lab, job_id)
    deliver_once(lab)
    (row,) = deliveries(lab)
    assert row.status == "delivered", row.last_error
    (got,) = receiver.received
    assert got.verified and got.headers["host"] == f"hook.test:{receiver.port}"
