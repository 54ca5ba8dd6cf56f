"""Tenants and API keys. Keys are shown once, stored as sha256, compared in constant time.

A key looks like `lj_<43 url-safe chars>` (256 bits); sha256 of a high-entropy secret needs no
salt or slow KDF. Revocation takes effect on the next request (every request re-reads the row).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from lorajobs.service.errors import NotFound, Unauthorized
from lorajobs.service.models import ApiKey, Tenant, new_id, utcnow

__all__ = [
    "hash_key",
    "create_tenant",
    "get_or_create_tenant",
    "create_key",
    "authenticate",
    "check_key",
    "check_presented",
    "revoke_key",
    "ensure_admin_key",
]

KEY_PREFIX = "lj_"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def create_tenant(session: Session, *, name: str) -> Tenant:
    tenant = Tenant(id=new_id("ten"), name=name)
    session.add(tenant)
    session.flush()
    return tenant


def get_or_create_tenant(session: Session, *, name: str) -> Tenant:
    tenant = session.scalar(select(Tenant).where(Tenant.name == name))
    return tenant or create_tenant(session, name=name)


def create_key(session: Session, *, tenant_id: str, name: str = "", is_admin: bool = False
               ) -> tuple[ApiKey, str]:
    """Create a key; returns (row, plaintext). The plaintext is never stored."""
    plaintext = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(id=new_id("key"), tenant_id=tenant_id, key_hash=hash_key(plaintext),
                 prefix=plaintext[:10], name=name, is_admin=is_admin)
    session.add(row)
    session.flush()
    return row, plaintext


def authenticate(session: Session, presented: str | None) -> ApiKey:
    """The live key row for a presented key, or Unauthorized."""
    digest = hash_key(check_presented(presented))
    row = session.scalar(select(ApiKey).where(ApiKey.key_hash == digest))
    check_key(row.key_hash if row else None, row.revoked_at if row else None, digest)
    return row  # type: ignore[return-value]  # check_key raised if None


def check_presented(presented: str | None) -> str:
    """The presented key, or Unauthorized if there is none (no query needed to know)."""
    if not presented:
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    return presented


def check_key(stored_hash: str | None, revoked_at: object, digest: str) -> None:
    """Unauthorized unless the row found for `digest` exists and is live.

    The lookup is by hash (an index probe); the compare here keeps the final check
    constant-time even if a backend's index comparison is not. Shared by `authenticate` and
    the one-query read paths that fetch the key's columns together with the resource."""
    if stored_hash is None or not hmac.compare_digest(stored_hash, digest):
        raise Unauthorized("invalid API key")
    if revoked_at is not None:
        raise Unauthorized("API key revoked")


def revoke_key(session: Session, *, key_id: str, tenant_id: str) -> ApiKey:
    row = session.get(ApiKey, key_id)
    if row is None or row.tenant_id != tenant_id:
        raise NotFound(f"no API key {key_id!r}", param="key_id")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
    session.flush()
    return row


def ensure_admin_key(session: Session, *, key_file) -> str:  # type: ignore[no-untyped-def]
    """Embedded first start: a `local` admin tenant + key written to `key_file` (mode 600).

    Later starts reuse the key in the file if it is still valid.
    """
    from pathlib import Path

    path = Path(key_file)
    if path.exists():
        existing = path.read_text().strip()
        try:
            authenticate(session, existing)
            return existing
        except Unauthorized:
            pass
    tenant = get_or_create_tenant(session, name="local")
    _, plaintext = create_key(session, tenant_id=tenant.id, name="local admin", is_admin=True)
    session.commit()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(plaintext + "\n")
    tmp.chmod(0o600)
    tmp.replace(path)
    return plaintext
