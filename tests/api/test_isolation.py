"""Tenants never see each other (404, not 403); keys: create, revoke (refused at once), admin."""

from __future__ import annotations

from tests.api.conftest import Api
from tests.api.test_artifacts import add_artifacts


def test_other_tenant_gets_404_everywhere(api: Api) -> None:
    ds = api.dataset("alice")
    job_id = api.job("alice", ds)["id"]
    art_id = add_artifacts(api, job_id, "adapter", None)[0]
    add_artifacts(api, job_id, "merged", None, {"config.json": b"{}"})
    for path in (f"/v1/jobs/{job_id}", f"/v1/jobs/{job_id}/events",
                 f"/v1/jobs/{job_id}/events/stream", f"/v1/jobs/{job_id}/metrics",
                 f"/v1/jobs/{job_id}/checkpoints", f"/v1/jobs/{job_id}/artifacts",
                 f"/v1/jobs/{job_id}/artifacts/{art_id}", f"/v1/jobs/{job_id}/adapter",
                 f"/v1/jobs/{job_id}/merged", f"/v1/datasets/{ds}"):
        if not path.endswith("/stream"):  # a queued job's stream would not end
            assert api.client.get(path, headers=api.h("alice")).status_code == 200, path
        resp = api.client.get(path, headers=api.h("bob"))
        assert resp.status_code == 404, path
        assert resp.json()["error"]["code"] == "not_found"
    assert api.client.post(f"/v1/jobs/{job_id}/cancel", headers=api.h("bob")).status_code == 404
    assert api.client.get("/v1/jobs", headers=api.h("bob")).json()["data"] == []
    assert api.client.get("/v1/datasets", headers=api.h("bob")).json()["data"] == []
    # Admins are tenants too: admin rights do not widen what they can read.
    assert api.client.get(f"/v1/jobs/{job_id}", headers=api.h("admin")).status_code == 404


def test_keys_create_revoke_and_admin(api: Api) -> None:
    made = api.client.post("/v1/keys", headers=api.h("alice"), json={"name": "ci"})
    assert made.status_code == 201
    new = made.json()
    assert new["key"].startswith("lj_") and not new["is_admin"]
    auth = {"Authorization": f"Bearer {new['key']}"}
    ds = api.dataset("alice")
    assert api.client.get(f"/v1/datasets/{ds}", headers=auth).status_code == 200  # same tenant
    listed = api.client.get("/v1/keys", headers=api.h("alice")).json()
    assert new["id"] in {k["id"] for k in listed} and "key" not in listed[0]
    assert api.client.delete(f"/v1/keys/{new['id']}", headers=api.h("bob")).status_code == 404
    revoked = api.client.delete(f"/v1/keys/{new['id']}", headers=api.h("alice"))
    assert revoked.status_code == 200 and revoked.json()["revoked_at"]
    refused = api.client.get("/v1/jobs", headers=auth)
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "unauthorized"
    assert refused.headers["www-authenticate"] == "Bearer"

    for body in ({"tenant": "mallory"}, {"is_admin": True}):
        assert api.client.post("/v1/keys", headers=api.h("alice"), json=body).status_code == 403
    carol = api.client.post("/v1/keys", headers=api.h("admin"), json={"tenant": "carol"}).json()
    carol_auth = {"Authorization": f"Bearer {carol['key']}"}
    assert api.client.get("/v1/jobs", headers=carol_auth).json()["data"] == []
    assert api.client.get(f"/v1/datasets/{ds}", headers=carol_auth).status_code == 404
    assert api.client.delete(f"/v1/keys/{carol['id']}", headers=api.h("admin")).status_code == 200
    assert api.client.get("/v1/jobs", headers=carol_auth).status_code == 401


def test_missing_or_malformed_auth(api: Api) -> None:
    for headers in ({}, {"Authorization": "Basic abc"}, {"Authorization": "Bearer nope"}):
        resp = api.client.get("/v1/jobs", headers=headers)
        assert resp.status_code == 401 and resp.json()["error"]["code"] == "unauthorized"
