"""Webhooks in core: signatures the official `openai` client verifies, the SSRF guard, the retry
schedule, and the outbox written in the transaction of the state change (both backends)."""

from __future__ import annotations

import json
import time
from datetime import timedelta
from typing import Any

import openai
import pytest
from sqlalchemy import func, select

from lorajobs.core import jobs, keys, webhooks
from lorajobs.core.db import get_sessionmaker
from lorajobs.core.settings import Settings
from lorajobs.core.tables import ApiKey, Job, JobStatus, WebhookDelivery, WebhookEndpoint
from lorajobs.core.webhook_guard import UnsafeURL, resolve_target
from tests.dbfixtures import db_settings  # noqa: F401 - the parametrized fixture
from tests.worker.jobfactory import make_job

CLIENT = openai.OpenAI(api_key="unused", base_url="http://127.0.0.1:9/unused")
BODY = json.dumps({"id": "evt_1", "object": "event", "created_at": 1765000000,
                   "type": "fine_tuning.job.succeeded", "data": {"id": "job_1"}}).encode()


def headers_for(secret: str, body: bytes, *, msg_id: str = "evt_1") -> dict[str, str]:
    ts = int(time.time())
    return {"webhook-id": msg_id, "webhook-timestamp": str(ts),
            "webhook-signature": webhooks.sign(secret, msg_id, ts, body)}


def test_official_client_verifies_and_parses_our_signature() -> None:
    secret = webhooks.new_secret()
    event = CLIENT.webhooks.unwrap(BODY, headers_for(secret, BODY), secret=secret)
    assert type(event).__name__ == "FineTuningJobSucceededWebhookEvent"
    assert event.data.id == "job_1" and event.type == "fine_tuning.job.succeeded"


@pytest.mark.parametrize("tamper", ["body", "id", "secret"])
def test_tampering_fails_official_verification(tamper: str) -> None:
    secret = webhooks.new_secret()
    headers = headers_for(secret, BODY)
    body = BODY
    if tamper == "body":
        body = BODY.replace(b"job_1", b"job_2")
    elif tamper == "id":
        headers["webhook-id"] = "evt_2"
    else:
        secret = webhooks.new_secret()
    with pytest.raises(openai.InvalidWebhookSignatureError):
        CLIENT.webhooks.unwrap(body, headers, secret=secret)


def test_rotation_keeping_the_old_secret_signs_with_both() -> None:
    old, new = webhooks.new_secret(), webhooks.new_secret()
    now = webhooks.utcnow()
    endpoint = WebhookEndpoint(secret=new, previous_secret=old,
                               previous_secret_expires_at=now + timedelta(hours=1))
    ts = int(time.time())
    header = webhooks.signature_header(endpoint, "evt_1", ts, BODY, now=now)
    headers = {"webhook-id": "evt_1", "webhook-timestamp": str(ts), "webhook-signature": header}
    for secret in (old, new):  # a receiver still on the old secret, and one switched over
        CLIENT.webhooks.verify_signature(BODY, headers, secret=secret)
    expired = webhooks.signature_header(endpoint, "evt_1", ts, BODY,
                                        now=now + timedelta(hours=2))
    assert len(expired.split()) == 1


def test_retry_schedule_is_exponential_capped_and_retries_for_a_day() -> None:
    settings = Settings()
    delays = [webhooks.retry_delay(n, settings, rand=lambda: 0.5) for n in range(1, 30)]
    assert delays[:4] == [10, 20, 40, 80]
    assert max(delays) == settings.webhook_retry_max_delay_seconds
    assert settings.webhook_retry_window_seconds >= 24 * 3600
    low = webhooks.retry_delay(3, settings, rand=lambda: 0.0)
    high = webhooks.retry_delay(3, settings, rand=lambda: 1.0)
    assert (low, high) == pytest.approx((36, 44))
    with pytest.raises(ValueError):
        Settings(webhook_retry_window_seconds=3600)  # under 24 h is refused


@pytest.mark.parametrize("url,why", [
    ("https://127.0.0.1/hook", "loopback"),
    ("https://localhost:8443/hook", "loopback"),
    ("https://[::1]/hook", "loopback"),
    ("https://10.1.2.3/hook", "private"),
    ("https://192.168.0.10/hook", "private"),
    ("https://169.254.169.254/latest/meta-data", "link-local"),
    ("https://224.0.0.1/hook", "multicast"),
    ("https://0.0.0.0/hook", "unspecified"),
    ("https://[::ffff:10.0.0.1]/hook", "private"),
    ("https://100.64.0.1/hook", "routable"),
    ("http://93.184.215.14/hook", "must use https"),
    ("https://user:pw@93.184.215.14/hook", "credentials"),
    ("ftp://93.184.215.14/hook", "must use https"),
    ("https:///nohost", "no host"),
])
def test_guard_refuses_internal_and_malformed_urls(url: str, why: str) -> None:
    with pytest.raises(UnsafeURL, match=why):
        resolve_target(url, Settings())


def test_guard_allows_public_addresses_and_settings_open_loopback_and_http() -> None:
    assert resolve_target("https://93.184.215.14:8443/x", Settings()).address == "93.184.215.14"
    lab = Settings(webhook_allow_private_addresses=True, webhook_allow_http=True)
    target = resolve_target("http://localhost:9/x", lab)
    assert target.address in ("127.0.0.1", "::1") and target.port == 9


def _tenant_with_endpoint(settings: Settings, event_types: list[str],
                          **overrides: Any) -> tuple[str, ApiKey]:
    job_id = make_job(settings)  # tenant "local", a queued job
    lab = settings.model_copy(update={"webhook_allow_private_addresses": True,
                                      "webhook_allow_http": True})
    with get_sessionmaker(settings)() as session:
        tenant_id = session.get(Job, job_id).tenant_id
        key, _ = keys.create_key(session, tenant_id=tenant_id, manage_keys=True)
        webhooks.create_endpoint(session, by=key, url="http://127.0.0.1:9/hook",
                                 event_types=event_types, settings=lab, **overrides)
        session.commit()
        session.expunge(key)
    return job_id, key


def _deliveries(settings: Settings) -> list[WebhookDelivery]:
    with get_sessionmaker(settings)() as session:
        return list(session.scalars(select(WebhookDelivery).order_by(WebhookDelivery.created_at)))


def test_outbox_rows_commit_and_roll_back_with_the_state_change(db_settings: Settings  # noqa: F811
                                                                ) -> None:
    job_id, _ = _tenant_with_endpoint(db_settings, ["job.running",
                                                    "fine_tuning.job.cancelled"])
    sessions = get_sessionmaker(db_settings)
    with sessions() as session:  # a claim rolled back: no event either
        job = session.get(Job, job_id)
        jobs.transition(session, job, to=JobStatus.RUNNING, lease=("w1", 60))
        assert session.scalar(select(func.count()).select_from(WebhookDelivery)) == 1
        session.rollback()
    assert _deliveries(db_settings) == []
    with sessions() as session:
        assert jobs.claim(session, job_id, owner="w1", lease_seconds=60) is not None
        jobs.request_cancel(session, session.get(Job, job_id))  # running: flagged, no event
        job = session.get(Job, job_id)
        jobs.end_attempt(session, job, jobs.Outcome.CANCEL_STOP, owner="w1")
        session.commit()
    rows = _deliveries(db_settings)
    assert [r.event_type for r in rows] == ["job.running", "fine_tuning.job.cancelled"]
    assert {r.status for r in rows} == {"pending"} and len({r.event_id for r in rows}) == 2
    cancelled = json.loads(rows[1].payload)
    assert cancelled["data"] == {"id": job_id} and cancelled["object"] == "event"
    assert json.loads(rows[0].payload)["data"] == {"id": job_id, "status": "running",
                                                   "attempt": 1}


def test_only_subscribed_enabled_endpoints_get_rows(db_settings: Settings) -> None:  # noqa: F811
    job_id, key = _tenant_with_endpoint(db_settings, ["fine_tuning.job.succeeded"])
    _tenant_with_endpoint(db_settings, ["fine_tuning.job.cancelled"], enabled=False)
    with get_sessionmaker(db_settings)() as session:
        jobs.request_cancel(session, session.get(Job, job_id))  # queued -> cancelled
        jobs.add_event(session, job_id, "checkpoint", data={"step": 2, "resumable": True})
        session.commit()
    assert _deliveries(db_settings) == []  # neither subscribed+enabled endpoint matches


def test_checkpoint_event_emits_job_checkpoint(db_settings: Settings) -> None:  # noqa: F811
    job_id, _ = _tenant_with_endpoint(db_settings, ["job.checkpoint"])
    with get_sessionmaker(db_settings)() as session:
        jobs.add_event(session, job_id, "checkpoint", data={"step": 4, "resumable": True})
        session.commit()
    (row,) = _deliveries(db_settings)
    body = json.loads(row.payload)
    assert body["type"] == "job.checkpoint"
    assert body["data"] == {"id": job_id, "step": 4, "resumable": True,
                            "fine_tuned_model_checkpoint":
                                f"ft:fake-tiny:lorajobs:{job_id}:ckpt-step-4"}


def test_pausing_emits_job_paused(db_settings: Settings) -> None:  # noqa: F811
    """Both ways into `paused`: a queued job paused at once, a running one whose attempt ends
    paused (the worker's PAUSE_STOP)."""
    queued, _ = _tenant_with_endpoint(db_settings, ["job.paused"])
    running = make_job(db_settings)
    with get_sessionmaker(db_settings)() as session:
        jobs.request_pause(session, session.get(Job, queued))
        assert jobs.claim(session, running, owner="w1", lease_seconds=60) is not None
        jobs.request_pause(session, session.get(Job, running))  # flagged
        jobs.end_attempt(session, session.get(Job, running), jobs.Outcome.PAUSE_STOP,
                         owner="w1")
        session.commit()
        assert session.get(Job, running).status == JobStatus.PAUSED
    bodies = [json.loads(r.payload) for r in _deliveries(db_settings)]
    assert [(b["type"], b["data"]["id"], b["data"]["status"]) for b in bodies] == [
        ("job.paused", queued, "paused"), ("job.paused", running, "paused")]
