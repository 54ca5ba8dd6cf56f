"""The key check AuthMiddleware does on the event loop (SQLite: api/key_reader.py).

A revoked key is refused on its very next request through the middleware (every /v1 and
/openai/v1 route but GET /v1/jobs/{id}), on both backends; the SQLite reader answers what the
ORM read answers, never waits on a lock (it hands the request to the threadpool read, which
does), and leaves no read transaction open behind it.
"""

from __future__ import annotations

import sqlite3

import pytest

from lorajobs.api import auth
from lorajobs.api.key_reader import SqliteKeyReader, make_key_reader
from lorajobs.core import keys
from lorajobs.core.db import get_sessionmaker
from lorajobs.core.errors import Unauthorized
from lorajobs.core.migrate import upgrade
from lorajobs.core.settings import Settings
from tests.api.conftest import Api


@pytest.fixture
def sqlite_settings(tmp_path) -> Settings:  # type: ignore[no-untyped-def]
    """A migrated SQLite file database (the reader is SQLite's; PostgreSQL reads on the
    threadpool, which the API tests run on both backends)."""
    settings = Settings(data_dir=tmp_path / "data")
    upgrade(settings)
    return settings


def test_a_revoked_key_is_refused_on_its_next_request_through_the_middleware(
        api: Api) -> None:
    made = api.client.post("/v1/keys", headers=api.h("alice"), json={"name": "ci"}).json()
    auth_header = {"Authorization": f"Bearer {made['key']}"}
    chat = {"model": "ft:tiny-llama:x:job_none", "messages": [{"role": "user", "content": "hi"}]}
    # Authenticated: the proxy route looks the model up (404: no such deployment).
    assert api.client.post("/openai/v1/chat/completions", headers=auth_header,
                           json=chat).status_code == 404
    assert api.client.get("/v1/datasets", headers=auth_header).status_code == 200
    assert api.client.delete(f"/v1/keys/{made['id']}", headers=api.h("alice")).status_code == 200
    for method, path, body in (("POST", "/openai/v1/chat/completions", chat),
                               ("GET", "/v1/datasets", None), ("GET", "/openai/v1/models", None)):
        refused = api.client.request(method, path, headers=auth_header, json=body)
        assert refused.status_code == 401, (path, refused.text)
        assert refused.json()["error"]["message"] == "API key revoked"
    unknown = {"Authorization": "Bearer lj_not-a-key"}
    assert api.client.get("/v1/datasets", headers=unknown).json()["error"]["message"] == \
        "invalid API key"


def test_the_reader_answers_as_the_orm_read(sqlite_settings: Settings) -> None:
    sessions = get_sessionmaker(sqlite_settings)
    with sessions() as session:
        tenant = keys.create_tenant(session, name="t")
        admin, admin_plain = keys.create_key(session, tenant_id=tenant.id, is_admin=True,
                                             manage_keys=True)
        _, plain = keys.mint_key(session, by=admin, name="child")
        session.commit()
    reader = make_key_reader(sqlite_settings.resolved_database_url)
    assert isinstance(reader, SqliteKeyReader)
    assert reader.path == str(sqlite_settings.data_dir / "lorajobs.db")
    for presented in (admin_plain, plain):
        fast = reader.authenticate(presented)
        slow = auth.authenticate_presented(sessions, presented)
        assert fast is not None
        columns = ("id", "tenant_id", "key_hash", "prefix", "name", "is_admin", "manage_keys",
                   "created_by", "created_at", "revoked_at")
        assert {c: getattr(fast, c) for c in columns} == {c: getattr(slow, c) for c in columns}
    with pytest.raises(Unauthorized, match="invalid API key"):
        reader.authenticate("lj_unknown")
    with sessions() as session:
        keys.revoke_key(session, key_id=admin.id, by=admin)
        session.commit()
    with pytest.raises(Unauthorized, match="API key revoked"):
        reader.authenticate(admin_plain)
    reader.close()


def test_no_reader_for_databases_it_cannot_open_alone() -> None:
    assert make_key_reader("postgresql+psycopg://u@h/db") is None
    assert make_key_reader("sqlite://") is None
    assert make_key_reader("sqlite:///:memory:") is None


def test_a_locked_database_refuses_the_reader_at_once(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A writer's exclusive lock (here a rollback-journal database mid-commit; in WAL mode
    readers never meet one) makes the reader answer None at once, not wait for it."""
    path = str(tmp_path / "keys.db")
    digest = keys.hash_key("lj_k")
    with sqlite3.connect(path, isolation_level=None) as setup:
        setup.execute("CREATE TABLE api_keys (id, tenant_id, key_hash, prefix, name, is_admin, "
                      "manage_keys, created_by, created_at, revoked_at)")
        setup.execute("INSERT INTO api_keys VALUES ('key_1', 'ten_1', ?, 'lj_k', '', 0, 0, "
                      "NULL, '2026-12-06 14:00:00.000000', NULL)", (digest,))
    reader = SqliteKeyReader(path)
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        assert reader.authenticate("lj_k") is None
    finally:
        holder.execute("COMMIT")
        holder.close()
    found = reader.authenticate("lj_k")
    assert found is not None and (found.id, found.tenant_id) == ("key_1", "ten_1")
    assert found.created_at is not None and found.created_at.tzinfo is not None
    reader.close()


def test_a_request_the_reader_refuses_is_read_on_the_threadpool(
        api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    waited: list[str] = []
    real = auth.authenticate_presented

    def threadpool_read(sessions, presented):  # type: ignore[no-untyped-def]
        waited.append(presented)
        return real(sessions, presented)

    monkeypatch.setattr(SqliteKeyReader, "authenticate", lambda self, presented: None)
    monkeypatch.setattr(auth, "authenticate_presented", threadpool_read)
    assert api.client.get("/v1/datasets", headers=api.h("alice")).status_code == 200
    assert api.client.get("/v1/datasets", headers={"Authorization": "Bearer lj_x"}
                          ).status_code == 401
    assert waited == [api.keys["alice"], "lj_x"]


def test_the_reader_leaves_no_read_transaction_open(sqlite_settings: Settings) -> None:
    """A read transaction left open would pin the WAL: a checkpoint could not truncate it."""
    with get_sessionmaker(sqlite_settings)() as session:
        tenant = keys.create_tenant(session, name="t")
        _, plain = keys.create_key(session, tenant_id=tenant.id)
        session.commit()
    reader = make_key_reader(sqlite_settings.resolved_database_url)
    assert reader is not None
    assert reader.authenticate(plain) is not None
    with sqlite3.connect(reader.path, isolation_level=None) as other:
        other.execute("UPDATE api_keys SET name = name")  # something in the WAL
        busy, _, _ = other.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    assert busy == 0
    reader.close()
