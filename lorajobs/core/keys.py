"""Tenants and API keys. Keys are shown once, stored as sha256, compared in constant time.

A key looks like `lj_<43 url-safe chars>` (256 bits); sha256 of a high-entropy secret needs no
salt or slow KDF. Revocation takes effect on the next request (every request re-reads the row).

What a key may do with keys (`mint_key`, `revoke_key`; the README has the table):

    admin          any tenant: mint (admin keys too), revoke any key
    manage_keys    its own tenant: mint non-admin keys, revoke its non-admin keys
    other keys     revoke themselves only

Every key records the key that minted it (`created_by`). Revoking a non-admin key also revokes
every key minted under it, transitively, so a leaked key cannot leave live keys behind. Keys
minted by an admin key survive its revocation: rotating the operator's key must not revoke
every tenant's keys (an admin key's leak is answered by listing `created_by`).

Mint against revoke: the `by` row a request carries was read before its body arrived
(api/auth.py), so it may have been revoked since. `mint_key` and `revoke_key` first lock `by`'s
row with a conditional no-op UPDATE (`_lock_live`, 401 if it is revoked by now), and a revoke's
UPDATE of a key takes that same row lock before it looks for the key's children: of a mint by X
and a revoke of X (or of an ancestor of X), whichever comes second sees the other - the revoke
finds the minted key and revokes it, or the mint finds X revoked and is refused.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from typing import Any, cast

from sqlalchemy import CursorResult, select, update
from sqlalchemy.orm import Session

from lorajobs.core.errors import Forbidden, NotFound, Unauthorized
from lorajobs.core.tables import ApiKey, Tenant, new_id, utcnow

__all__ = [
    "hash_key",
    "create_tenant",
    "get_or_create_tenant",
    "create_key",
    "mint_key",
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


def create_key(session: Session, *, tenant_id: str, name: str = "", is_admin: bool = False,
               manage_keys: bool = False, created_by: str | None = None
               ) -> tuple[ApiKey, str]:
    """Create a key, no questions asked (callers check rights: `mint_key`); returns
    (row, plaintext). The plaintext is never stored."""
    plaintext = KEY_PREFIX + secrets.token_urlsafe(32)
    row = ApiKey(id=new_id("key"), tenant_id=tenant_id, key_hash=hash_key(plaintext),
                 prefix=plaintext[:10], name=name, is_admin=is_admin, manage_keys=manage_keys,
                 created_by=created_by)
    session.add(row)
    session.flush()
    return row, plaintext


def mint_key(session: Session, *, by: ApiKey, name: str = "", tenant: str | None = None,
             is_admin: bool = False, manage_keys: bool = False) -> tuple[ApiKey, str]:
    """A key minted by the key `by`, for `by`'s tenant (admins: for `tenant`, created if new).

    Forbidden unless `by` is an admin key or has manage_keys; only an admin names a tenant or
    mints an admin key."""
    if not (by.is_admin or by.manage_keys):
        raise Forbidden("minting keys needs an admin key or a key with manage_keys",
                        param="Authorization")
    if (tenant is not None or is_admin) and not by.is_admin:
        raise Forbidden("only an admin key may name a tenant or create admin keys",
                        param="tenant" if tenant is not None else "is_admin")
    _lock_live(session, by.id)
    tenant_id = by.tenant_id if tenant is None else get_or_create_tenant(session, name=tenant).id
    return create_key(session, tenant_id=tenant_id, name=name, is_admin=is_admin,
                      manage_keys=manage_keys or is_admin, created_by=by.id)


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


def revoke_key(session: Session, *, key_id: str, by: ApiKey) -> ApiKey:
    """Revoke `key_id` on behalf of the key `by`, and every key minted under it (module doc).

    NotFound for a key `by` cannot see (another tenant's, unless `by` is an admin); Forbidden
    for an admin key unless `by` is one, and for another key unless `by` is an admin or has
    manage_keys. A key may always revoke itself. Unauthorized if `by` was revoked since it was
    read (module doc)."""
    _lock_live(session, by.id)
    row = session.get(ApiKey, key_id)
    if row is None or (row.tenant_id != by.tenant_id and not by.is_admin):
        raise NotFound(f"no API key {key_id!r}", param="key_id")
    if row.id != by.id:
        if row.is_admin and not by.is_admin:
            raise Forbidden("only an admin key may revoke an admin key", param="key_id")
        if not (by.is_admin or by.manage_keys):
            raise Forbidden("revoking another key needs an admin key or a key with "
                            "manage_keys", param="key_id")
    now = utcnow()
    if row.revoked_at is None:
        row.revoked_at = now
        session.flush()  # the row lock before the children are read (module doc)
    if not row.is_admin:
        _revoke_minted_under(session, row.id, now)
    session.flush()
    return row


def _lock_live(session: Session, key_id: str) -> None:
    """Write-lock the key's row until our commit, or Unauthorized if it is revoked by now.

    The no-op UPDATE waits for a revoke of the key in flight and then reads the row as that
    revoke left it (PostgreSQL re-checks the WHERE on the newest row; SQLite begins its one
    write transaction here), so the caller decides on the key as it is, not as it was read."""
    locked = session.execute(
        update(ApiKey).where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None))
        .values(name=ApiKey.name).execution_options(synchronize_session=False))
    if cast(CursorResult[Any], locked).rowcount != 1:
        raise Unauthorized("API key revoked")


def _revoke_minted_under(session: Session, key_id: str, now: object) -> None:
    """Revoke the keys minted by `key_id`, their keys, and so on: one query per generation.
    Keys are minted by live keys only, so this tree has no cycles."""
    frontier = [key_id]
    while frontier:
        children = list(session.scalars(select(ApiKey.id).where(
            ApiKey.created_by.in_(frontier))))
        if children:
            session.execute(update(ApiKey).where(ApiKey.id.in_(children),
                                                 ApiKey.revoked_at.is_(None))
                            .values(revoked_at=now))
        frontier = children


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
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    # 0600 from its creation: a chmod after writing leaves a moment where others can read it
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(plaintext + "\n")
    tmp.replace(path)
    return plaintext
