"""The official client's `client.webhooks.*` against `/openai/v1` (a uvicorn in this process, each
backend): manage endpoints, `test` one, and receive a job's event that `unwrap` parses."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import openai
import pytest
from openai import OpenAI
from sqlalchemy import select

from lorajobs.core import jobs, keys
from lorajobs.core.db import get_sessionmaker
from lorajobs.core.settings import Settings
from lorajobs.core.tables import Job
from lorajobs.worker.webhook_sender import deliver_once
from tests.dbfixtures import db_settings  # noqa: F401 - the parametrized fixture
from tests.servicefixtures import api_in_thread
from tests.webhook_receiver import Receiver
from tests.worker.jobfactory import make_job

pytestmark = pytest.mark.timeout(120)
LAB = {"webhook_allow_private_addresses": True, "webhook_allow_http": True}


@dataclass
class Server:
    client: OpenAI
    settings: Settings


def _serve(settings: Settings) -> Iterator[Server]:
    job_id = make_job(settings)  # tenant "local" and a queued job to cancel later
    with get_sessionmaker(settings)() as session:
        tenant_id = session.get(Job, job_id).tenant_id
        _, key = keys.create_key(session, tenant_id=tenant_id, manage_keys=True)
        session.commit()
    with api_in_thread(settings) as base_url, \
            OpenAI(base_url=f"{base_url}/openai/v1", api_key=key, max_retries=0) as client:
        yield Server(client, settings)


@pytest.fixture
def lab_server(db_settings: Settings) -> Iterator[Server]:  # noqa: F811
    yield from _serve(db_settings.model_copy(update=LAB))


def test_client_manages_endpoints(lab_server: Server) -> None:
    client = lab_server.client
    made = client.webhooks.create(url="https://93.184.215.14/hook", name="ci",
                                  event_types=["fine_tuning.job.succeeded"])
    assert made.signing_secret.startswith("whsec_") and made.object == "webhook_endpoint"
    assert made.signing_secret_hint and made.signing_secret[-4:] in made.signing_secret_hint
    second = client.webhooks.create(url="https://93.184.215.14/other", name="b",
                                    event_types=["fine_tuning.job.failed"])
    got = client.webhooks.retrieve(made.id)
    assert got.url == made.url and got.created_at == made.created_at
    assert [e.id for e in client.webhooks.list(limit=1)] == [made.id, second.id]  # auto-paged
    updated = client.webhooks.update(made.id, name="ci-2",
                                     event_types=["fine_tuning.job.succeeded",
                                                  "fine_tuning.job.cancelled"])
    assert updated.name == "ci-2" and len(updated.event_types) == 2
    rotated = client.webhooks.rotate_secret(made.id, keep_old_secret_active_for_24_hours=True)
    assert rotated.signing_secret != made.signing_secret
    assert "fine_tuning.job.succeeded" in client.webhooks.event_types.list().data
    deleted = client.webhooks.delete(second.id)
    assert deleted.deleted and deleted.object == "webhook_endpoint.deleted"
    with pytest.raises(openai.NotFoundError):
        client.webhooks.retrieve(second.id)
    with pytest.raises(openai.BadRequestError, match="event_types"):
        client.webhooks.create(url="https://93.184.215.14/x", name="x",
                               event_types=["batch.completed"])  # OpenAI's, not ours


def test_test_event_and_a_real_event_verify_with_unwrap(lab_server: Server) -> None:
    receiver = Receiver().start()
    try:
        client = lab_server.client
        hook = client.webhooks.create(url=receiver.url, name="recv",
                                      event_types=["fine_tuning.job.cancelled"])
        receiver.secret = hook.signing_secret
        result = client.webhooks.test(hook.id, event_type="fine_tuning.job.cancelled")
        assert result.status_code == 200 and result.webhook_endpoint_id == hook.id
        with get_sessionmaker(lab_server.settings)() as session:
            job = session.scalars(select(Job)).one()
            jobs.request_cancel(session, job)
        assert deliver_once(lab_server.settings) == 1
        test_event, real = (r.event for r in receiver.received)
        assert all(r.verified for r in receiver.received)
        assert type(real).__name__ == "FineTuningJobCancelledWebhookEvent"
        assert real.data.id == job.id and test_event.type == "fine_tuning.job.cancelled"
    finally:
        receiver.stop()


def test_internal_urls_are_refused_with_bad_request(db_settings: Settings  # noqa: F811
                                                   ) -> None:
    for server in _serve(db_settings):  # default settings: https only, public addresses only
        for url in ("https://127.0.0.1/x", "https://169.254.169.254/", "http://93.184.215.14/"):
            with pytest.raises(openai.BadRequestError, match="url"):
                server.client.webhooks.create(url=url, name="x",
                                              event_types=["fine_tuning.job.failed"])
