"""`/v1/webhooks`: register endpoints, list, get, update, rotate the secret, delete; each
endpoint's deliveries (every attempt) and replay. Rules and signatures: core/webhooks.py."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from lorajobs.api.deps import PrincipalDep, SessionDep, SettingsDep
from lorajobs.api.webhook_schemas import (
    DeliveriesPublic,
    DeliveryPublic,
    WebhookCreate,
    WebhookDeleted,
    WebhookPublic,
    WebhookRotate,
    WebhooksPublic,
    WebhookUpdate,
    WebhookWithSecret,
)
from lorajobs.core import webhooks

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])
Limit = Annotated[int, Query(ge=1, le=100)]


@router.post("", status_code=201, response_model=WebhookWithSecret)
def create_webhook(body: WebhookCreate, session: SessionDep, settings: SettingsDep,
                   principal: PrincipalDep) -> WebhookWithSecret:
    """Register an endpoint; its signing secret is in this response only."""
    row, secret = webhooks.create_endpoint(
        session, by=principal, url=body.url, event_types=body.event_types, settings=settings,
        name=body.name, enabled=body.enabled)
    session.commit()
    return WebhookWithSecret(**WebhookPublic.from_row(row).model_dump(), signing_secret=secret)


@router.get("", response_model=WebhooksPublic)
def list_webhooks(session: SessionDep, principal: PrincipalDep, limit: Limit = 20,
                  after: str | None = None) -> WebhooksPublic:
    """The tenant's endpoints, oldest first; `after` = the previous page's `next_cursor`."""
    rows, has_more = webhooks.list_endpoints(session, tenant_id=principal.tenant_id,
                                             limit=limit, after=after)
    return WebhooksPublic(data=[WebhookPublic.from_row(r) for r in rows], has_more=has_more,
                          next_cursor=rows[-1].id if has_more else None)


@router.get("/{webhook_id}", response_model=WebhookPublic)
def get_webhook(webhook_id: str, session: SessionDep, principal: PrincipalDep) -> WebhookPublic:
    """One endpoint (the secret only as a hint)."""
    return WebhookPublic.from_row(webhooks.get_endpoint(
        session, tenant_id=principal.tenant_id, endpoint_id=webhook_id))


@router.patch("/{webhook_id}", response_model=WebhookPublic)
def update_webhook(webhook_id: str, body: WebhookUpdate, session: SessionDep,
                   settings: SettingsDep, principal: PrincipalDep) -> WebhookPublic:
    """Enable/disable, change the event types, URL or name."""
    row = webhooks.update_endpoint(session, by=principal, endpoint_id=webhook_id,
                                   settings=settings, url=body.url,
                                   event_types=body.event_types, enabled=body.enabled,
                                   name=body.name)
    session.commit()
    return WebhookPublic.from_row(row)


@router.post("/{webhook_id}/rotate_secret", response_model=WebhookWithSecret)
def rotate_secret(webhook_id: str, session: SessionDep, principal: PrincipalDep,
                  body: WebhookRotate | None = None) -> WebhookWithSecret:
    """A new signing secret, shown once; the old one stops signing now or in 24 h."""
    keep = body.keep_old_secret_active_for_24_hours if body else False
    row, secret = webhooks.rotate_secret(session, by=principal, endpoint_id=webhook_id,
                                         keep_old_secret=keep)
    session.commit()
    return WebhookWithSecret(**WebhookPublic.from_row(row).model_dump(), signing_secret=secret)


@router.delete("/{webhook_id}", response_model=WebhookDeleted)
def delete_webhook(webhook_id: str, session: SessionDep,
                   principal: PrincipalDep) -> WebhookDeleted:
    """Delete an endpoint and its delivery history; nothing more is sent to it."""
    row = webhooks.delete_endpoint(session, by=principal, endpoint_id=webhook_id)
    session.commit()
    return WebhookDeleted(id=row.id)


@router.get("/{webhook_id}/deliveries", response_model=DeliveriesPublic)
def list_deliveries(webhook_id: str, session: SessionDep, principal: PrincipalDep,
                    limit: Limit = 20, after: str | None = None,
                    status: str | None = None) -> DeliveriesPublic:
    """Deliveries newest first, each with its attempts; filter by `status`."""
    endpoint = webhooks.get_endpoint(session, tenant_id=principal.tenant_id,
                                     endpoint_id=webhook_id)
    rows, has_more = webhooks.list_deliveries(session, endpoint=endpoint, limit=limit,
                                              after=after, status=status)
    attempts = webhooks.attempts_of(session, [r.id for r in rows])
    return DeliveriesPublic(data=[DeliveryPublic.from_row(r, attempts[r.id]) for r in rows],
                            has_more=has_more, next_cursor=rows[-1].id if has_more else None)


@router.post("/{webhook_id}/deliveries/{delivery_id}/replay", status_code=201,
             response_model=DeliveryPublic)
def replay_delivery(webhook_id: str, delivery_id: str, session: SessionDep,
                    principal: PrincipalDep) -> DeliveryPublic:
    """Send a delivery's event again (same webhook-id and body), as a new delivery due now."""
    row = webhooks.replay(session, by=principal, endpoint_id=webhook_id, delivery_id=delivery_id)
    session.commit()
    return DeliveryPublic.from_row(row, [])
