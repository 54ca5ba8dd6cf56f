"""Bad input and attacks not already covered by tests/api (see RELIABILITY.md for the map):
mass assignment on every server-owned job field, keys never stored in the clear (the whole
database file is searched), artifact ids that look like paths, and no `trust_remote_code=True`
anywhere in the source tree. In-process app (TestClient) on SQLite and PostgreSQL.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from sqlalchemy import select

from lorajobs.core.tables import ApiKey
from tests.api.conftest import MODEL_NAME, Api

REPO = Path(__file__).resolve().parents[2]
SERVER_OWNED_FIELDS = {
    "id": "job_x", "status": "succeeded", "tenant_id": "tnt_other", "attempt": 0,
    "max_attempts": 99, "lease_owner": "me", "lease_expires_at": "2100-01-01T00:00:00Z",
    "cancel_requested": False, "error": None, "progress": {"step": 10},
    "created_at": "2000-01-01T00:00:00Z", "stage": "training", "resumed_from_step": 5,
}


@pytest.mark.parametrize("field", sorted(SERVER_OWNED_FIELDS))
def test_mass_assignment_refused(api: Api, field: str) -> None:
    """A server-owned field in the body is a 422 naming it, and no job is made."""
    ds = api.dataset("alice")
    body = {"base_model": MODEL_NAME, "training_file": ds, field: SERVER_OWNED_FIELDS[field]}
    resp = api.submit("alice", body)
    assert resp.status_code == 422, resp.text
    assert field in resp.text
    assert api.client.get("/v1/jobs", headers=api.h("alice")).json()["data"] == []


def test_nested_unknown_fields_refused(api: Api) -> None:
    ds = api.dataset("alice")
    for section, extra in (("training", {"output_dir": "/tmp/x"}),
                           ("lora", {"trust_remote_code": True}),
                           ("distributed", {"hostfile": "/etc/hosts"})):
        body = {"base_model": MODEL_NAME, "training_file": ds, section: extra}
        resp = api.submit("alice", body)
        assert resp.status_code == 422 and next(iter(extra)) in resp.text, (section, resp.text)


def test_keys_hashed_at_rest(api: Api) -> None:
    """No column of any key row, and no byte of the database file, holds a plaintext key."""
    made = api.client.post("/v1/keys", headers=api.h("alice"), json={"name": "ci"}).json()
    plaintexts = [made["key"], *api.keys.values()]
    with api.sessions() as session:
        rows = session.scalars(select(ApiKey)).all()
        for row in rows:
            values = " ".join(str(getattr(row, c.key)) for c in ApiKey.__table__.columns)
            assert not any(key in values for key in plaintexts)
            assert not any(key[len(row.prefix):] in values for key in plaintexts
                           if key.startswith(row.prefix))
    url = api.settings.resolved_database_url
    if url.startswith("sqlite"):
        db_file = Path(url.removeprefix("sqlite:///"))
        blob = b"".join(p.read_bytes() for p in db_file.parent.glob(db_file.name + "*"))
        assert not any(key.encode() in blob for key in plaintexts)


@pytest.mark.parametrize("artifact_id", ["../../../etc/passwd", "..%2F..%2Fetc%2Fpasswd",
                                         "%2Fetc%2Fpasswd", "art%00x", "%2e%2e"])
def test_artifact_ids_that_look_like_paths(api: Api, artifact_id: str) -> None:
    """An artifact is looked up by id in the tenant's rows: a path-like id is a 404 (or 422),
    never a file read. Archives (adapter/merged) are built by us from rows, so no client
    archive is ever extracted."""
    ds = api.dataset("alice")
    job_id = api.job("alice", ds)["id"]
    resp = api.client.get(f"/v1/jobs/{job_id}/artifacts/{artifact_id}", headers=api.h("alice"))
    assert resp.status_code in (404, 422), (artifact_id, resp.status_code)
    assert b"root:" not in resp.content


def test_trust_remote_code_never_enabled() -> None:
    """The design forbids it: every from_pretrained must load only local, known code."""
    pattern = re.compile(r"trust_remote_code\s*[=:]\s*True")
    offenders = [f"{p.relative_to(REPO)}:{n}"
                 for root in ("lora_core", "lorajobs", "bench", "migrations")
                 for p in (REPO / root).rglob("*.py")
                 for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1)
                 if pattern.search(line)]
    assert offenders == []
    assert pattern.search("AutoModel.from_pretrained(d, trust_remote_code=True)")  # it can fail


@pytest.mark.parametrize("path", [
    "/v1/jobs/{job}/events?after=205892172527491447702500490730274816",
    "/v1/jobs/{job}/adapter?step=99999999999",
    "/openai/v1/fine_tuning/jobs/{job}/events?after=ev_99999999999999999999999"])
def test_integers_beyond_the_columns_are_refused(api: Api, path: str) -> None:
    """Found by schemathesis: an `after` past BIGINT was an OverflowError (500) in the driver."""
    job_id = api.job("alice", api.dataset("alice"))["id"]
    resp = api.client.get(path.format(job=job_id), headers=api.h("alice"))
    assert resp.status_code in (400, 422), resp.text


@pytest.mark.parametrize("path,field", [("/v1/jobs", "base_model"),
                                        ("/v1/jobs", "training_file"),
                                        ("/openai/v1/fine_tuning/jobs", "model")])
def test_nul_in_a_body_string_is_refused(api: Api, path: str, field: str) -> None:
    """Found by schemathesis on PostgreSQL: text cannot hold NUL; psycopg's DataError was a
    500. Any such value is the client's error."""
    ds = api.dataset("alice")
    body = {"base_model": MODEL_NAME, "training_file": ds} if path == "/v1/jobs" \
        else {"model": MODEL_NAME, "training_file": ds}
    body[field] = "x\x00y"
    resp = api.client.post(path, headers=api.h("alice"), json=body)
    assert resp.status_code in (400, 404, 422), resp.text
