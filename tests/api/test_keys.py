"""Key management inside a tenant: who may mint keys, who may revoke which, and what a
revocation takes with it (service/keys.py; the README's table of what a key can do)."""

from __future__ import annotations

from typing import Any

from tests.api.conftest import Api


def _mint(api: Api, auth: dict[str, str], status: int = 201, **body: Any) -> dict[str, Any]:
    made = api.client.post("/v1/keys", headers=auth, json=body)
    assert made.status_code == status, made.text
    return made.json()


def _h(key: dict[str, Any]) -> dict[str, str]:
    return {"Authorization": f"Bearer {key['key']}"}


def _works(api: Api, auth: dict[str, str]) -> bool:
    status = api.client.get("/v1/jobs", headers=auth).status_code
    assert status in (200, 401)
    return status == 200


def test_a_plain_key_cannot_mint_or_revoke_others(api: Api) -> None:
    member = _mint(api, api.h("alice"), name="ci")
    assert member["manage_keys"] is False and member["created_by"] is not None
    for body in ({"name": "more"}, {"manage_keys": True}):
        refused = _mint(api, _h(member), status=403, **body)
        assert "manage_keys" in refused["error"]["message"]
    sibling = _mint(api, api.h("alice"), name="sibling")
    refused = api.client.delete(f"/v1/keys/{sibling['id']}", headers=_h(member))
    assert refused.status_code == 403 and refused.json()["error"]["param"] == "key_id"
    assert _works(api, _h(sibling))
    # A key may always revoke itself (its holder found it leaked).
    assert api.client.delete(f"/v1/keys/{member['id']}", headers=_h(member)).status_code == 200
    assert not _works(api, _h(member))


def test_only_admins_revoke_admin_keys(api: Api) -> None:
    """The embedded layout: the admin key's own tenant also holds ordinary keys."""
    manager = _mint(api, api.h("admin"), name="team lead", manage_keys=True)
    member = _mint(api, api.h("admin"), name="ci")
    admin_id = next(k["id"] for k in api.client.get("/v1/keys", headers=api.h("admin")).json()
                    if k["is_admin"])
    for auth in (_h(manager), _h(member)):
        refused = api.client.delete(f"/v1/keys/{admin_id}", headers=auth)
        assert refused.status_code == 403, refused.text
        assert refused.json()["error"]["message"] == "only an admin key may revoke an admin key"
    assert _works(api, api.h("admin"))
    # A manager may not mint admins or for other tenants, but manages its tenant's other keys.
    _mint(api, _h(manager), status=403, is_admin=True)
    _mint(api, _h(manager), status=403, tenant="mallory")
    assert api.client.delete(f"/v1/keys/{member['id']}", headers=_h(manager)).status_code == 200
    assert not _works(api, _h(member))


def test_revoking_a_key_revokes_every_key_minted_under_it(api: Api) -> None:
    manager = _mint(api, api.h("alice"), name="m", manage_keys=True)
    child = _mint(api, _h(manager), name="child")
    sub_manager = _mint(api, _h(manager), name="m2", manage_keys=True)
    grandchild = _mint(api, _h(sub_manager), name="grandchild")
    unrelated = _mint(api, api.h("alice"), name="unrelated")
    assert grandchild["created_by"] == sub_manager["id"]
    gone = api.client.delete(f"/v1/keys/{manager['id']}", headers=api.h("alice"))
    assert gone.status_code == 200 and gone.json()["revoked_at"]
    for key in (manager, child, sub_manager, grandchild):
        assert not _works(api, _h(key)), key["name"]
    assert _works(api, _h(unrelated)) and _works(api, api.h("alice"))
    listed = {k["id"]: k for k in api.client.get("/v1/keys", headers=api.h("alice")).json()}
    assert all(listed[k["id"]]["revoked_at"] for k in (child, sub_manager, grandchild))


def test_keys_minted_by_an_admin_survive_its_rotation(api: Api) -> None:
    """Revoking an operator's admin key must not revoke every tenant's keys."""
    second_admin = _mint(api, api.h("admin"), name="admin 2", is_admin=True)
    assert second_admin["manage_keys"] is True
    carol = _mint(api, _h(second_admin), tenant="carol", manage_keys=True)
    carol_ci = _mint(api, _h(carol), name="ci")
    assert api.client.delete(f"/v1/keys/{second_admin['id']}",
                             headers=api.h("admin")).status_code == 200
    assert not _works(api, _h(second_admin))
    assert _works(api, _h(carol)) and _works(api, _h(carol_ci))
