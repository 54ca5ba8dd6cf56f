"""`/openai/v1/webhook_endpoints` and `/webhook_event_types`: the official client's
`client.webhooks.*` (create, retrieve, update, list, delete, rotate_secret, test,
event_types.list) over the same service functions as `/v1/webhooks` (core/webhooks.py).

OpenAI's shapes: `webhook_endpoint` objects with unix-second `created_at`/`updated_at`, the
secret as `signing_secret` on create and rotate only, lists with `first_id`/`last_id`. Our
endpoints also carry `enabled` (OpenAI's update has no such field; `POST {id}` accepts it).
`test` sends one signed event of the given type (data: a made-up job id) to the endpoint now,
through the same URL checks as every delivery, and answers the receiver's status code; an
endpoint that cannot be reached is a 400 naming why.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field

from lorajobs.api.deps import PrincipalDep, SessionDep, SettingsDep
from lorajobs.api.openai_compat import OpenAIRoute
from lorajobs.core import webhooks
from lorajobs.core.errors import InvalidRequest
from lorajobs.core.tables import WebhookEndpoint, new_id, utcnow
from lorajobs.core.webhook_guard import MAX_URL_LENGTH
from lorajobs.core.webhook_http import make_client, post_event

__all__ = ["router"]

router = APIRouter(prefix="/openai/v1", tags=["openai-compatible"], route_class=OpenAIRoute)


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EndpointCreate(_Body):
    url: str = Field(max_length=MAX_URL_LENGTH)
    event_types: list[str] = Field(min_length=1, max_length=len(webhooks.EVENT_TYPES))
    name: str = Field("", max_length=200)


class EndpointUpdate(_Body):
    url: str | None = Field(None, max_length=MAX_URL_LENGTH)
    event_types: list[str] | None = Field(None, min_length=1,
                                          max_length=len(webhooks.EVENT_TYPES))
    name: str | None = Field(None, max_length=200)
    enabled: bool | None = None


class RotateBody(_Body):
    keep_old_secret_active_for_24_hours: bool = False


class TestBody(_Body):
    event_type: str


def endpoint_object(row: WebhookEndpoint, *, secret: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": row.id, "object": "webhook_endpoint", "created_at": int(row.created_at.timestamp()),
        "updated_at": int(row.updated_at.timestamp()), "name": row.name, "url": row.url,
        "event_types": list(row.event_types), "enabled": row.enabled,
        "signing_secret_hint": webhooks.secret_hint(row.secret)}
    if secret is not None:
        out["signing_secret"] = secret
    return out


@router.post("/webhook_endpoints")
def create_endpoint(body: EndpointCreate, session: SessionDep, settings: SettingsDep,
                    principal: PrincipalDep) -> dict[str, Any]:
    """client.webhooks.create: the secret is in this response only."""
    row, secret = webhooks.create_endpoint(session, by=principal, url=body.url,
                                           event_types=body.event_types, settings=settings,
                                           name=body.name)
    session.commit()
    return endpoint_object(row, secret=secret)


@router.get("/webhook_endpoints")
def list_endpoints(session: SessionDep, principal: PrincipalDep,
                   limit: Annotated[int, Query(ge=1, le=100)] = 20,
                   after: str | None = None) -> dict[str, Any]:
    """client.webhooks.list (auto-paging on `after`)."""
    rows, has_more = webhooks.list_endpoints(session, tenant_id=principal.tenant_id,
                                             limit=limit, after=after)
    data = [endpoint_object(r) for r in rows]
    return {"object": "list", "data": data, "has_more": has_more,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None}


@router.get("/webhook_endpoints/{webhook_endpoint_id}")
def retrieve_endpoint(webhook_endpoint_id: str, session: SessionDep,
                      principal: PrincipalDep) -> dict[str, Any]:
    """client.webhooks.retrieve."""
    return endpoint_object(webhooks.get_endpoint(session, tenant_id=principal.tenant_id,
                                                 endpoint_id=webhook_endpoint_id))


@router.post("/webhook_endpoints/{webhook_endpoint_id}")
def update_endpoint(webhook_endpoint_id: str, body: EndpointUpdate, session: SessionDep,
                    settings: SettingsDep, principal: PrincipalDep) -> dict[str, Any]:
    """client.webhooks.update."""
    row = webhooks.update_endpoint(session, by=principal, endpoint_id=webhook_endpoint_id,
                                   settings=settings, url=body.url,
                                   event_types=body.event_types, enabled=body.enabled,
                                   name=body.name)
    session.commit()
    return endpoint_object(row)


@router.delete("/webhook_endpoints/{webhook_endpoint_id}")
def delete_endpoint(webhook_endpoint_id: str, session: SessionDep,
                    principal: PrincipalDep) -> dict[str, Any]:
    """client.webhooks.delete."""
    row = webhooks.delete_endpoint(session, by=principal, endpoint_id=webhook_endpoint_id)
    session.commit()
    return {"id": row.id, "object": "webhook_endpoint.deleted", "deleted": True}


@router.post("/webhook_endpoints/{webhook_endpoint_id}/rotate_secret")
def rotate_secret(webhook_endpoint_id: str, session: SessionDep, principal: PrincipalDep,
                  body: RotateBody | None = None) -> dict[str, Any]:
    """client.webhooks.rotate_secret."""
    row, secret = webhooks.rotate_secret(
        session, by=principal, endpoint_id=webhook_endpoint_id,
        keep_old_secret=body.keep_old_secret_active_for_24_hours if body else False)
    session.commit()
    return endpoint_object(row, secret=secret)


@router.post("/webhook_endpoints/{webhook_endpoint_id}/test")
def test_endpoint(webhook_endpoint_id: str, body: TestBody, session: SessionDep,
                  settings: SettingsDep, principal: PrincipalDep) -> dict[str, Any]:
    """client.webhooks.test: one signed event of `event_type`, sent now, not recorded."""
    if body.event_type not in webhooks.EVENT_TYPES:
        raise InvalidRequest(f"unknown event type {body.event_type!r}; one of "
                             f"{list(webhooks.EVENT_TYPES)}", param="event_type")
    row = webhooks.get_endpoint(session, tenant_id=principal.tenant_id,
                                endpoint_id=webhook_endpoint_id)
    session.expunge(row)
    session.close()  # no connection held while the receiver answers
    event_id = new_id("evt")
    payload = webhooks.event_body(event_id, body.event_type, utcnow(),
                                  {"id": "ftjob-webhook-test"})
    with make_client(settings, max_connections=1) as client:
        result = post_event(client, row, event_id=event_id, payload=payload, settings=settings)
    if result.status_code is None:
        raise InvalidRequest(f"the test event could not be delivered: {result.error}",
                             param="url", code="webhook_test_failed")
    return {"object": "webhook_endpoint.test", "webhook_endpoint_id": row.id,
            "event_type": body.event_type, "status_code": result.status_code, "success": True}


@router.get("/webhook_event_types")
def event_types(principal: PrincipalDep) -> dict[str, Any]:
    """client.webhooks.event_types.list."""
    return {"object": "list", "data": list(webhooks.EVENT_TYPES)}
