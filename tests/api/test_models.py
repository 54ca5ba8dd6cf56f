"""/v1/models: list/get for everyone, registration admin-only and confined to the model root."""

from __future__ import annotations

import io
import os
import shutil
import tarfile

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


# --- stored models: POST /v1/models with the files (multipart or a tar) --------------------

def _files(model_dir, names=None):  # type: ignore[no-untyped-def]
    paths = sorted(p for p in model_dir.iterdir() if p.is_file())
    return [("files", (p.name, p.read_bytes(), "application/octet-stream"))
            for p in paths if names is None or p.name in names]


def _stored(api: Api) -> list[str]:
    store = api.client.app.state.store  # type: ignore[attr-defined]
    return [obj.key for obj in store.list("models")]


def _staging_empty(api: Api) -> bool:
    staging = api.settings.resolved_model_staging_dir
    return not staging.exists() or not any(staging.iterdir())


def test_upload_files_registers_a_stored_model_jobs_can_name(api: Api, tiny_model_dir) -> None:
    resp = api.client.post("/v1/models", headers=api.h("admin"), data={"name": "up"},
                           files=_files(tiny_model_dir))
    assert resp.status_code == 201, resp.text
    model = resp.json()
    assert model["source"] == "upload" and len(model["content_sha256"]) == 64
    assert model["architecture"] == "LlamaForCausalLM" and model["num_parameters"] > 0
    names = sorted(p.name for p in tiny_model_dir.iterdir() if p.is_file())
    assert _stored(api) == [f"models/{model['content_sha256']}/{n}" for n in names]
    assert model["size_bytes"] == sum((tiny_model_dir / n).stat().st_size for n in names)
    assert _staging_empty(api)
    # The API checks a job against the stored model's recorded headers (no files on its disk).
    job = api.job("alice", api.dataset("alice"), base_model="up",
                  lora={"target_modules": ["q_proj", "v_proj"]})
    assert job["spec"]["base_model"] == "up"
    bad = api.submit("alice", {"base_model": "up", "training_file": api.dataset("alice"),
                               "lora": {"target_modules": ["nope"]}})
    assert bad.status_code == 422 and bad.json()["error"]["param"] == "lora.target_modules"

    # The same bytes again (a tar this time, under one directory): one copy in the store.
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(tiny_model_dir, arcname="tiny")
    again = api.client.post("/v1/models", headers=api.h("admin"), data={"name": "up-tar"},
                            files={"files": ("tiny.tar.gz", buf.getvalue())})
    assert again.status_code == 201, again.text
    assert again.json()["content_sha256"] == model["content_sha256"]
    assert len(_stored(api)) == len(names) and _staging_empty(api)
    dup = api.client.post("/v1/models", headers=api.h("admin"), data={"name": "up"},
                          files=_files(tiny_model_dir))
    assert dup.status_code == 409 and len(_stored(api)) == len(names)


def test_bad_uploads_leave_nothing_behind(api: Api, tiny_model_dir, tmp_path) -> None:
    def post(files, name="bad", who="admin"):  # type: ignore[no-untyped-def]
        return api.client.post("/v1/models", headers=api.h(who), data={"name": name},
                               files=files)

    denied = post(_files(tiny_model_dir), who="alice")
    assert denied.status_code == 403
    pickled = post([*_files(tiny_model_dir, {"config.json"}),
                    ("files", ("pytorch_model.bin", b"\x80\x04x", "application/octet-stream"))])
    assert pickled.status_code == 422
    assert pickled.json()["error"]["code"] == "pickle_refused"
    assert pickled.json()["error"]["param"] == "files"
    no_config = post(_files(tiny_model_dir, {"model.safetensors", "tokenizer.json"}))
    assert no_config.status_code == 422 and "config.json" in no_config.json()["error"]["message"]
    truncated = [(f, (n, data[:200] if n == "model.safetensors" else data, t))
                 for f, (n, data, t) in _files(tiny_model_dir)]
    corrupt = post(truncated)
    assert corrupt.status_code == 422 and "safetensors" in corrupt.json()["error"]["message"]
    assert str(api.settings.resolved_model_staging_dir) not in corrupt.json()["error"]["message"]
    for name in ("../x", "sub/../../y.json"):
        resp = post([("files", (name, b"{}", "application/json"))])
        assert resp.status_code == 422, name
    odd = post([("files", ("run.sh", b"#!", "text/plain"))])
    assert odd.status_code == 422 and odd.json()["error"]["param"] == "files"
    nameless = api.client.post("/v1/models", headers=api.h("admin"),
                               files=_files(tiny_model_dir))
    assert nameless.status_code == 422 and nameless.json()["error"]["param"] == "name"
    link = tmp_path / "evil.tar"
    with tarfile.open(link, "w") as tar:
        info = tarfile.TarInfo("config.json")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)
    evil = post({"files": ("evil.tar", link.read_bytes())})
    assert evil.status_code == 422 and "regular file" in evil.json()["error"]["message"]
    assert _stored(api) == [] and _staging_empty(api)
    assert [m["name"] for m in api.client.get("/v1/models", headers=api.h("admin"))
            .json()["data"]] == [MODEL_NAME]


def test_upload_over_max_model_bytes_is_413(api_settings, tiny_model_dir) -> None:
    from fastapi.testclient import TestClient

    from lorajobs.api.app import create_app
    from lorajobs.core import keys
    from lorajobs.core.db import get_sessionmaker

    total = sum(p.stat().st_size for p in tiny_model_dir.iterdir())
    with get_sessionmaker(api_settings)() as session:
        tenant = keys.create_tenant(session, name="root")
        _, key = keys.create_key(session, tenant_id=tenant.id, name="root", is_admin=True)
        session.commit()
    # 4096: the declared Content-Length is refused before a byte is read (BodyLimit);
    # total - 1000: the body fits the limit plus multipart framing, the files are counted
    # as they stream and refused the moment they pass it.
    for limit in (4096, total - 1000):
        settings = api_settings.model_copy(update={"max_model_bytes": limit})
        with TestClient(create_app(settings)) as client:
            resp = client.post("/v1/models", headers={"Authorization": f"Bearer {key}"},
                               data={"name": "big"}, files=_files(tiny_model_dir))
            assert resp.status_code == 413, resp.text
            assert resp.json()["error"]["code"] == "payload_too_large"
            assert list(client.app.state.store.list("models")) == []  # type: ignore[attr-defined]
        staging = settings.resolved_model_staging_dir
        assert not staging.exists() or not any(staging.iterdir())


def test_json_body_names_the_bad_field(api: Api) -> None:
    for body, field in [({"name": "x"}, "body"),
                        ({"name": "x", "path": "tiny", "source": {"s3": "s3://b/p"}}, "body"),
                        ({"name": "x", "source": {"s3": "s3://b/p", "hf_repo": "a/b"}},
                         "source"),
                        ({"name": "x", "source": {"s3": "s3://b/p", "revision": "main"}},
                         "source"),
                        ({"name": "x", "source": {"ftp": "x"}}, "source.ftp"),
                        ({"name": "x", "source": {"s3": "http://nope/x"}}, "source.s3"),
                        ({"name": "x", "source": {"hf_repo": "../etc"}}, "source.hf_repo")]:
        resp = api.client.post("/v1/models", headers=api.h("admin"), json=body)
        assert resp.status_code == 422, (body, resp.text)
        assert resp.json()["error"]["param"] == field, (body, resp.json())


def test_sharded_upload_and_a_missing_shard(api: Api, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from lora_core.model_files.tiny import make_tiny_model

    sharded = make_tiny_model(tmp_path / "sharded", seed=1, max_shard_size=300_000)
    shards = sorted(p.name for p in sharded.glob("model-*.safetensors"))
    assert len(shards) >= 2 and (sharded / "model.safetensors.index.json").is_file()
    missing = api.client.post("/v1/models", headers=api.h("admin"), data={"name": "half"},
                              files=[f for f in _files(sharded) if f[1][0] != shards[-1]])
    assert missing.status_code == 422 and shards[-1] in missing.json()["error"]["message"]
    assert _stored(api) == []
    made = api.client.post("/v1/models", headers=api.h("admin"), data={"name": "sharded"},
                           files=_files(sharded))
    assert made.status_code == 201, made.text
    assert sorted(made.json()["weights_sha256"]) == shards
