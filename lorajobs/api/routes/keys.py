"""`/v1/keys`: mint a key for your tenant (admins: for any tenant), list, revoke."""

from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import select

from lorajobs.api.deps import PrincipalDep, SessionDep
from lorajobs.api.schemas import KeyCreate, KeyCreated, KeyPublic
from lorajobs.service import keys
from lorajobs.service.errors import Forbidden, NotFound
from lorajobs.service.models import ApiKey

router = APIRouter(prefix="/v1/keys", tags=["keys"])


@router.post("", status_code=201, response_model=KeyCreated)
def create_key(body: KeyCreate, session: SessionDep, principal: PrincipalDep) -> KeyCreated:
    """A new key; the secret is in this response only."""
    if (body.tenant is not None or body.is_admin) and not principal.is_admin:
        raise Forbidden("only an admin key may name a tenant or create admin keys",
                        param="tenant" if body.tenant is not None else "is_admin")
    tenant_id = principal.tenant_id
    if body.tenant is not None:
        tenant_id = keys.get_or_create_tenant(session, name=body.tenant).id
    row, plaintext = keys.create_key(session, tenant_id=tenant_id, name=body.name,
                                     is_admin=body.is_admin)
    session.commit()
    return KeyCreated(**KeyPublic.from_row(row).model_dump(), key=plaintext)


@router.get("", response_model=list[KeyPublic])
def list_keys(session: SessionDep, principal: PrincipalDep) -> list[KeyPublic]:
    """The tenant's keys (prefixes only; secrets are never shown again)."""
    rows = session.scalars(select(ApiKey).where(ApiKey.tenant_id == principal.tenant_id)
                           .order_by(ApiKey.created_at))
    return [KeyPublic.from_row(r) for r in rows]


@router.delete("/{key_id}", response_model=KeyPublic)
def revoke_key(key_id: str, session: SessionDep, principal: PrincipalDep) -> KeyPublic:
    """Revoke a key of your tenant (admins: any key); it is refused from the next request."""
    tenant_id = principal.tenant_id
    if principal.is_admin:
        target = session.get(ApiKey, key_id)
        if target is None:
            raise NotFound(f"no API key {key_id!r}", param="key_id")
        tenant_id = target.tenant_id
    row = keys.revoke_key(session, key_id=key_id, tenant_id=tenant_id)
    session.commit()
    return KeyPublic.from_row(row)
