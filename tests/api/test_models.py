"""/v1/models: list/get for everyone, registration admin-only and confined to the model root."""

from __future__ import annotations

import os
import shutil

from tests.api.conftest import MODEL_NAME, Api


def test_list_and_get(api: Api) -> None:
    data = api.client.get("/v1/models", headers=api.h("bob")).json()["data"]
    assert [m["name"] for m in data] == [MODEL_NAME]
    model = api.client.get(f"/v1/models/{MODEL_NAME}", headers=api.h("alice")).json()
    assert model["architecture"] == "LlamaForCausalLM" and model["dtype"] == "float32"
    assert {"q_proj", "v_proj", "down_proj"} <= set(model["linear_modules"])
    assert list(model["weights_sha256"]) == ["model.safetensors"]
    assert "path" not in model
    assert api.client.get("/v1/models/nope", headers=api.h("alice")).status_code == 404


def test_register_admin_only_and_duplicate(api: Api) -> None:
    shutil.copytree(api.settings.resolved_model_root / "tiny",
                    api.settings.resolved_model_root / "other")
    body = {"name": "tiny-2", "path": "other"}
    denied = api.client.post("/v1/models", headers=api.h("alice"), json=body)
    assert denied.status_code == 403 and denied.json()["error"]["code"] == "forbidden"
    made = api.client.post("/v1/models", headers=api.h("admin"), json=body)
    assert made.status_code == 201, made.text
    assert made.json()["num_parameters"] > 0
    again = api.client.post("/v1/models", headers=api.h("admin"), json=body)
    assert again.status_code == 409 and again.json()["error"]["param"] == "name"


def test_path_traversal_refused(api: Api) -> None:
    for path in ["../tiny", "/etc", "tiny/../../x", "a\x00b", "~/m", ".", "C:/x",
                 "tiny\\..\\..", "nope"]:
        resp = api.client.post("/v1/models", headers=api.h("admin"),
                               json={"name": "x", "path": path})
        assert resp.status_code == 422 and resp.json()["error"]["param"] == "path", path


def test_symlink_out_of_root_and_pickle_only_refused(api: Api, tmp_path) -> None:
    outside = tmp_path / "outside"
    shutil.copytree(api.settings.resolved_model_root / "tiny", outside)
    os.symlink(outside, api.settings.resolved_model_root / "link")
    resp = api.client.post("/v1/models", headers=api.h("admin"),
                           json={"name": "linked", "path": "link"})
    assert resp.status_code == 422 and resp.json()["error"]["param"] == "path"

    pickled = api.settings.resolved_model_root / "pickled"
    pickled.mkdir()
    shutil.copy(outside / "config.json", pickled / "config.json")
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    resp = api.client.post("/v1/models", headers=api.h("admin"),
                           json={"name": "pickled", "path": "pickled"})
    assert resp.status_code == 422
    err = resp.json()["error"]
    assert err["param"] == "path" and "pickle" in err["message"]
    assert str(api.settings.resolved_model_root) not in err["message"]
