"""`/v1/keys`: mint a key (admins, and keys with manage_keys), list, revoke.

Who may do what lives in `service/keys.py` (`mint_key`, `revoke_key`); the README has the table.
"""

from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import select

from lorajobs.api.deps import PrincipalDep, SessionDep
from lorajobs.api.schemas import KeyCreate, KeyCreated, KeyPublic
from lorajobs.core import keys
from lorajobs.core.tables import ApiKey

router = APIRouter(prefix="/v1/keys", tags=["keys"])


@router.post("", status_code=201, response_model=KeyCreated)
def create_key(body: KeyCreate, session: SessionDep, principal: PrincipalDep) -> KeyCreated:
    """A new key; the secret is in this response only."""
    row, plaintext = keys.mint_key(session, by=principal, name=body.name, tenant=body.tenant,
                                   is_admin=body.is_admin, manage_keys=body.manage_keys)
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
    """Revoke a key (and the keys minted under it); refused from their next request."""
    row = keys.revoke_key(session, key_id=key_id, by=principal)
    session.commit()
    return KeyPublic.from_row(row)
