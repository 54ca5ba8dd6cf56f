"""`/v1/webhooks`: register (secret once), list, get, update, rotate, delete; who may; the SSRF
refusals at registration; deliveries with their attempts, paged in SQL, and replay."""

from __future__ import annotations

from typing import Any

from lorajobs.core.webhooks import SECRET_PREFIX
from lorajobs.worker.webhook_sender import deliver_once
from tests.api.conftest import Api
from tests.dbfixtures import recorded_statements
from tests.webhook_receiver import Receiver

LAB = {"webhook_allow_private_addresses": True, "webhook_allow_http": True}
PUBLIC = "https://93.184.215.14/hooks/lorajobs"  # an address literal: no DNS in tests


def create(api: Api, who: str = "alice", **body: Any) -> Any:
    body = {"url": PUBLIC, "event_types": ["fine_tuning.job.succeeded"], **body}
    return api.client.post("/v1/webhooks", headers=api.h(who), json=body)


def test_register_shows_the_secret_once_then_manage(api: Api) -> None:
    resp = create(api, name="ci", event_types=["fine_tuning.job.succeeded", "job.checkpoint"])
    assert resp.status_code == 201, resp.text
    hook = resp.json()
    secret = hook["signing_secret"]
    assert secret.startswith(SECRET_PREFIX) and hook["signing_secret_hint"].endswith(secret[-4:])
    assert hook["enabled"] is True and hook["object"] == "webhook_endpoint"
    url = f"/v1/webhooks/{hook['id']}"
    got = api.client.get(url, headers=api.h("alice")).json()
    listed = api.client.get("/v1/webhooks", headers=api.h("alice")).json()
    assert "signing_secret" not in got and [h["id"] for h in listed["data"]] == [hook["id"]]
    assert "signing_secret" not in listed["data"][0]

    patched = api.client.patch(url, headers=api.h("alice"),
                               json={"enabled": False, "event_types": ["job.running"]}).json()
    assert patched["enabled"] is False and patched["event_types"] == ["job.running"]
    rotated = api.client.post(f"{url}/rotate_secret", headers=api.h("alice"),
                              json={"keep_old_secret_active_for_24_hours": True})
    assert rotated.status_code == 200
    assert rotated.json()["signing_secret"] not in (secret, None)
    assert api.client.delete(url, headers=api.h("alice")).json() == {
        "id": hook["id"], "object": "webhook_endpoint.deleted", "deleted": True}
    assert api.client.get(url, headers=api.h("alice")).status_code == 404


def test_other_tenants_see_nothing_and_plain_keys_only_read(api: Api) -> None:
    hook = create(api).json()
    url = f"/v1/webhooks/{hook['id']}"
    for method, path in (("get", url), ("patch", url), ("delete", url),
                         ("get", f"{url}/deliveries"), ("post", f"{url}/rotate_secret")):
        kwargs: dict[str, Any] = {"json": {}} if method in ("patch", "post") else {}
        resp = getattr(api.client, method)(path, headers=api.h("bob"), **kwargs)
        assert resp.status_code == 404, (method, path, resp.text)
    assert api.client.get("/v1/webhooks", headers=api.h("bob")).json()["data"] == []
    plain = api.client.post("/v1/keys", headers=api.h("alice"), json={"name": "ci"}).json()
    headers = {"Authorization": f"Bearer {plain['key']}"}
    assert api.client.get(url, headers=headers).status_code == 200
    refused = api.client.post("/v1/webhooks", headers=headers,
                              json={"url": PUBLIC, "event_types": ["job.running"]})
    assert refused.status_code == 403 and "manage_keys" in refused.json()["error"]["message"]


def test_bad_registrations_are_422_naming_the_field(api: Api) -> None:
    cases = [
        ({"event_types": ["fine_tuning.job.exploded"]}, "event_types"),
        ({"event_types": []}, "event_types"),
        ({"url": "https://127.0.0.1:8080/hook"}, "url"),          # loopback
        ({"url": "https://169.254.169.254/latest"}, "url"),       # cloud metadata
        ({"url": "https://[fd00::1]/hook"}, "url"),               # private IPv6
        ({"url": "http://93.184.215.14/hook"}, "url"),            # http not allowed
        ({"colour": "red"}, "colour"),
    ]
    for body, field in cases:
        resp = create(api, **body)
        assert resp.status_code == 422, (body, resp.text)
        assert field in resp.text, (body, resp.text)
    assert api.client.get("/v1/webhooks", headers=api.h("alice")).json()["data"] == []


def test_deliveries_list_attempts_page_in_sql_and_replay(api: Api) -> None:
    api.client.app.state.settings = api.settings.model_copy(update=LAB)  # loopback receiver
    receiver = Receiver().start()
    try:
        hook = create(api, url=receiver.url, event_types=["fine_tuning.job.cancelled"]).json()
        receiver.secret = hook["signing_secret"]
        dataset = api.dataset("alice")
        for _ in range(3):
            job = api.job("alice", dataset)
            assert api.client.post(f"/v1/jobs/{job['id']}/cancel",
                                   headers=api.h("alice")).status_code == 200
        lab = api.settings.model_copy(update=LAB)
        assert deliver_once(lab) == 3
        url = f"/v1/webhooks/{hook['id']}/deliveries"
        with recorded_statements(api.settings) as seen:
            page = api.client.get(url, params={"limit": 2}, headers=api.h("alice")).json()
        assert any("LIMIT" in s and "webhook_deliveries" in s for s in seen)
        assert len(page["data"]) == 2 and page["has_more"] and page["next_cursor"]
        rest = api.client.get(url, params={"limit": 2, "after": page["next_cursor"]},
                              headers=api.h("alice")).json()
        first = page["data"][0]
        assert len(rest["data"]) == 1 and not rest["has_more"]
        assert first["status"] == "delivered" and first["attempts"] == 1
        assert first["attempt_log"][0]["status_code"] == 200
        assert first["payload"]["type"] == "fine_tuning.job.cancelled"

        replay = api.client.post(f"{url}/{first['id']}/replay", headers=api.h("alice"))
        assert replay.status_code == 201, replay.text
        assert replay.json()["event_id"] == first["event_id"]
        assert replay.json()["replay_of"] == first["id"]
        assert deliver_once(lab) == 1
        same = [r for r in receiver.received if r.headers["webhook-id"] == first["event_id"]]
        assert len(same) == 2 and all(r.verified for r in same)
        assert same[0].body == same[1].body
        delivered = api.client.get(url, params={"status": "delivered"},
                                   headers=api.h("alice")).json()["data"]
        assert len(delivered) == 4
        assert api.client.get(url, params={"status": "lost"},
                              headers=api.h("alice")).status_code == 422
        assert api.client.post(f"{url}/whd_nope/replay",
                               headers=api.h("alice")).status_code == 404
    finally:
        receiver.stop()
