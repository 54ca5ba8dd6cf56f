"""`Client.webhooks` and AsyncClient's webhook calls against a live server that sends webhooks
(beat) to a real receiver (tests/webhook_receiver.py, which verifies every request with the
official `openai` client): register, list, read, change, deliveries with their attempts,
replay (the same webhook-id again), secret rotation, delete, and the errors."""

from __future__ import annotations

import asyncio

import pytest

from lorajobs.client import (
    AsyncClient,
    Client,
    InvalidRequestError,
    NotFoundError,
    Webhook,
    WebhookDelivery,
)
from tests.client.live import Live
from tests.servicefixtures import wait_for
from tests.webhook_receiver import Receiver

pytestmark = pytest.mark.timeout(180)

SUCCEEDED = "fine_tuning.job.succeeded"


def _delivered(client: Client, hook_id: str, job_id: str) -> WebhookDelivery:
    def found() -> WebhookDelivery | None:
        return next((d for d in client.webhooks.deliveries(hook_id, status="delivered")
                     if d.job_id == job_id), None)

    return wait_for(found, timeout=60, interval=0.2, what=f"the delivery of {job_id}")


def test_webhook_lifecycle(live_webhooks: Live) -> None:
    live = live_webhooks
    receiver = Receiver().start()
    try:
        with Client(live.url, live.key) as client:
            hook = client.webhooks.create(receiver.url, [SUCCEEDED, "job.running"], name="ci")
            assert hook.signing_secret and hook.signing_secret.startswith("whsec_")
            receiver.secret = hook.signing_secret
            got = client.webhooks.get(hook.id)
            assert got.signing_secret is None and got.signing_secret_hint
            assert hook.signing_secret.endswith(got.signing_secret_hint.split("...")[-1])
            assert hook.id in [h.id for h in client.webhooks.list()]
            only = client.webhooks.update(hook.id, event_types=[SUCCEEDED])
            assert only.event_types == [SUCCEEDED] and only.name == "ci" and only.enabled

            job_id = live.submit(max_steps=2)
            live.wait_end(job_id)
            first = _delivered(client, hook.id, job_id)
            assert first.event_type == SUCCEEDED and first.attempts == 1
            assert first.attempt_log[0]["status_code"] == 200
            assert receiver.wait_for(lambda: any(r.verified and r.headers.get("webhook-id")
                                                 == first.event_id for r in receiver.received))

            again = client.webhooks.replay(hook.id, first.id)
            assert again.replay_of == first.id and again.event_id == first.event_id
            assert receiver.wait_for(lambda: sum(r.headers.get("webhook-id") == first.event_id
                                                 for r in receiver.received) == 2)

            rotated = client.webhooks.rotate_secret(hook.id)
            assert rotated.signing_secret not in (None, hook.signing_secret)
            off = client.webhooks.update(hook.id, enabled=False, name="ci-off")
            assert not off.enabled and off.name == "ci-off"

            with pytest.raises(InvalidRequestError, match="unknown event types"):
                client.webhooks.create(receiver.url, ["job.exploded"])
            with pytest.raises(NotFoundError):
                client.webhooks.replay(hook.id, "whd_missing")
            client.webhooks.delete(hook.id)
            with pytest.raises(NotFoundError):
                client.webhooks.get(hook.id)
            assert hook.id not in [h.id for h in client.webhooks.list()]
    finally:
        receiver.stop()


def test_async_webhook_calls(live_webhooks: Live) -> None:
    live = live_webhooks
    receiver = Receiver().start()

    async def scenario() -> tuple[Webhook, list[str], WebhookDelivery, WebhookDelivery]:
        async with AsyncClient(live.url, live.key) as client:
            hook = await client.create_webhook(receiver.url, [SUCCEEDED], name="async")
            assert hook.signing_secret is not None
            receiver.secret = hook.signing_secret
            listed = [h.id async for h in client.list_webhooks()]
            job_id = live.submit(max_steps=2)
            while not [d async for d in client.list_webhook_deliveries(
                    hook.id, status="delivered") if d.job_id == job_id]:
                await asyncio.sleep(0.2)
            first = [d async for d in client.list_webhook_deliveries(hook.id)][0]
            again = await client.replay_webhook_delivery(hook.id, first.id)
            rotated = await client.rotate_webhook_secret(hook.id, keep_old_secret=True)
            assert rotated.signing_secret not in (None, hook.signing_secret)
            changed = await client.update_webhook(hook.id, enabled=False)
            assert not changed.enabled and (await client.get_webhook(hook.id)).enabled is False
            await client.delete_webhook(hook.id)
            with pytest.raises(NotFoundError):
                await client.get_webhook(hook.id)
            return hook, listed, first, again

    try:
        hook, listed, first, again = asyncio.run(asyncio.wait_for(scenario(), timeout=120))
    finally:
        receiver.stop()
    assert hook.id in listed
    assert first.status == "delivered" and first.event_type == SUCCEEDED
    assert again.replay_of == first.id and again.event_id == first.event_id
