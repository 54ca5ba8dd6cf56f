"""`Client.webhooks`: signed notifications of job events (`/v1/webhooks`).

    hook = c.webhooks.create("https://ci.example/hooks", ["fine_tuning.job.succeeded"])
    hook.signing_secret                    # whsec_...: shown here and at rotation only
    for d in c.webhooks.deliveries(hook.id, status="failed"):
        c.webhooks.replay(hook.id, d.id)   # the same event (same webhook-id) sent again

Event types: fine_tuning.job.succeeded | failed | cancelled, job.running, job.checkpoint,
job.paused. Requests are signed as Standard Webhooks (`webhook-id`, `webhook-timestamp`,
`webhook-signature`); the official `openai` client's `webhooks.unwrap` verifies them.
`AsyncClient` has the same calls as `create_webhook`, `list_webhooks`, ...
"""

from __future__ import annotations

import builtins
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from lorajobs.client.types import Webhook, WebhookDelivery

if TYPE_CHECKING:
    from lorajobs.client.sync import Client

__all__ = ["Webhooks", "WEBHOOKS_PAGE", "create_body", "update_body", "delivery_params"]

WEBHOOKS_PAGE = 100  # the server's maximum page for endpoints and deliveries


def create_body(url: str, event_types: list[str], *, name: str, enabled: bool
                ) -> dict[str, Any]:
    return {"url": url, "event_types": list(event_types), "name": name, "enabled": enabled}


def update_body(*, url: str | None, event_types: list[str] | None, name: str | None,
                enabled: bool | None) -> dict[str, Any]:
    """Only what is given changes: None fields are not sent."""
    given = {"url": url, "event_types": list(event_types) if event_types is not None else None,
             "name": name, "enabled": enabled}
    return {k: v for k, v in given.items() if v is not None}


def delivery_params(status: str | None) -> dict[str, Any]:
    return {"status": status} if status is not None else {}


class Webhooks:
    """Endpoints of the key's tenant (keys with manage_keys or admin may change them)."""

    def __init__(self, client: Client) -> None:
        self._c = client

    def create(self, url: str, event_types: builtins.list[str], *, name: str = "",
               enabled: bool = True) -> Webhook:
        """Register `url` for `event_types`; the answer's `signing_secret` is shown only now."""
        r = self._c.request("POST", "/v1/webhooks",
                            json=create_body(url, event_types, name=name, enabled=enabled))
        return Webhook.model_validate(r.json())

    def list(self) -> Iterator[Webhook]:
        """Every endpoint, oldest first."""
        for row in self._c.paginate("/v1/webhooks", limit=WEBHOOKS_PAGE):
            yield Webhook.model_validate(row)

    def get(self, webhook_id: str) -> Webhook:
        return Webhook.model_validate(self._c.get_json(f"/v1/webhooks/{webhook_id}"))

    def update(self, webhook_id: str, *, url: str | None = None,
               event_types: builtins.list[str] | None = None, name: str | None = None,
               enabled: bool | None = None) -> Webhook:
        """Change what is given (a disabled endpoint's deliveries wait until it is enabled)."""
        body = update_body(url=url, event_types=event_types, name=name, enabled=enabled)
        return Webhook.model_validate(
            self._c.request("PATCH", f"/v1/webhooks/{webhook_id}", json=body).json())

    def delete(self, webhook_id: str) -> None:
        """Delete the endpoint and its delivery history; nothing more is sent to it."""
        self._c.request("DELETE", f"/v1/webhooks/{webhook_id}")

    def rotate_secret(self, webhook_id: str, *, keep_old_secret: bool = False) -> Webhook:
        """A new signing secret (in the answer only); with `keep_old_secret` the old one also
        signs for 24 h, so receivers can switch over."""
        r = self._c.request("POST", f"/v1/webhooks/{webhook_id}/rotate_secret",
                            json={"keep_old_secret_active_for_24_hours": keep_old_secret})
        return Webhook.model_validate(r.json())

    def deliveries(self, webhook_id: str, *, status: str | None = None
                   ) -> Iterator[WebhookDelivery]:
        """Newest first, each with its attempts; `status`: pending | delivered | failed."""
        for row in self._c.paginate(f"/v1/webhooks/{webhook_id}/deliveries",
                                    limit=WEBHOOKS_PAGE, **delivery_params(status)):
            yield WebhookDelivery.model_validate(row)

    def replay(self, webhook_id: str, delivery_id: str) -> WebhookDelivery:
        """Send a delivery's event again (same webhook-id and body) as a new delivery, due now."""
        r = self._c.request("POST",
                            f"/v1/webhooks/{webhook_id}/deliveries/{delivery_id}/replay")
        return WebhookDelivery.model_validate(r.json())
