"""POST /v1/models from an s3:// prefix (boto3 against the moto S3 server) and from a Hugging
Face repo (the real huggingface_hub client against tests/fakehub.py, HF_ENDPOINT pointed at
it, then offline from its cache); an upload into the S3 store fetched by a worker's cache."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from lora_core.model_files.manifest import list_files, verify_files
from lorajobs.api.app import create_app
from lorajobs.core import keys, model_import
from lorajobs.core.db import get_sessionmaker
from lorajobs.core.registry import get_model
from lorajobs.core.settings import Settings
from lorajobs.core.storage import get_store
from lorajobs.worker.model_cache import model_in_use
from tests.fakehub import FakeHub
from tests.s3fixtures import S3Target
from tests.servicefixtures import LiveService


@contextmanager
def admin_client(settings: Settings, tenant_name: str = "root"
                 ) -> Iterator[tuple[TestClient, dict[str, str]]]:
    with get_sessionmaker(settings)() as session:
        tenant = keys.create_tenant(session, name=tenant_name)
        _, key = keys.create_key(session, tenant_id=tenant.id, name="root", is_admin=True)
        session.commit()
    with TestClient(create_app(settings)) as client:
        yield client, {"Authorization": f"Bearer {key}"}


def model_keys(target: S3Target) -> list[str]:
    return [k for k in target.keys() if k.startswith(f"{target.prefix}/models/")]


def test_s3_source_and_upload_into_the_s3_store(api_settings: Settings, s3_bucket: S3Target,
                                                tiny_model_dir: Path) -> None:
    settings = api_settings.model_copy(update=s3_bucket.settings())
    s3 = s3_bucket.server.client()
    source = s3_bucket.server.create_bucket(f"{s3_bucket.bucket}-src")
    for p in tiny_model_dir.iterdir():
        s3.put_object(Bucket=source, Key=f"org/tiny/{p.name}", Body=p.read_bytes())
    s3.put_object(Bucket=source, Key="org/tiny/pytorch_model.bin", Body=b"\x80\x04")
    s3.put_object(Bucket=source, Key="org/tiny/nested/other.json", Body=b"{}")
    s3.put_object(Bucket=source, Key="org/pickled/config.json", Body=b"{}")
    s3.put_object(Bucket=source, Key="org/pickled/pytorch_model.bin", Body=b"\x80\x04")
    expected = model_import.content_sha256(list_files(tiny_model_dir))
    with admin_client(settings) as (client, admin):
        def register(name: str, **src: str) -> Any:
            return client.post("/v1/models", headers=admin,
                               json={"name": name, "source": src})

        made = register("from-s3", s3=f"s3://{source}/org/tiny/")
        assert made.status_code == 201, made.text
        body = made.json()
        assert body["source"] == "s3" and body["revision"] == f"s3://{source}/org/tiny/"
        assert body["content_sha256"] == expected
        names = sorted(p.name for p in tiny_model_dir.iterdir())
        assert model_keys(s3_bucket) == [f"{s3_bucket.prefix}/models/{expected}/{n}"
                                         for n in names]  # no pickle, nothing nested
        pickled = register("pickled", s3=f"s3://{source}/org/pickled")
        assert pickled.status_code == 422 and "pickle" in pickled.json()["error"]["message"]
        missing = register("missing", s3="s3://no-such-bucket-here/x")
        assert missing.status_code == 422
        assert missing.json()["error"]["param"] == "source.s3"
        empty = register("empty", s3=f"s3://{source}/nothing/here")
        assert empty.status_code == 422 and "safetensors" in empty.json()["error"]["message"]

        # An upload into the S3 store, stored once by content, then a worker node's cache.
        files = [("files", (p.name, p.read_bytes())) for p in sorted(tiny_model_dir.iterdir())]
        up = client.post("/v1/models", headers=admin, data={"name": "uploaded"}, files=files)
        assert up.status_code == 201 and up.json()["content_sha256"] == expected
    assert len(model_keys(s3_bucket)) == len(names)
    with get_sessionmaker(settings)() as session:
        row = get_model(session, name="uploaded")
    node = settings.model_copy(update={"data_dir": settings.data_dir / "node-b"})
    with model_in_use(node, get_store(node), row) as path:
        assert verify_files(path, row.files or []) == []
        assert path.is_relative_to(node.resolved_model_cache_dir)

    small = settings.model_copy(update={"max_model_bytes": 1000})
    with admin_client(small, "root-2") as (client, admin):
        big = client.post("/v1/models", headers=admin,
                          json={"name": "big", "source": {"s3": f"s3://{source}/org/tiny"}})
    assert big.status_code == 413
    assert len(model_keys(s3_bucket)) == len(names)


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    server = FakeHub().start()
    try:
        yield server
    finally:
        server.stop()


def test_hf_source_through_the_hub_client_then_offline(
        tmp_path: Path, hub: FakeHub, tiny_model_dir: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    commit = hub.add_dir("org/tiny", tiny_model_dir,
                         {"pytorch_model.bin": b"\x80\x04", "README.md": b"# tiny"})
    hub.add_repo("org/pickled", {"config.json": b"{}", "pytorch_model.bin": b"\x80\x04"})
    # The API process finds the hub as production does: HF_ENDPOINT and HF_HOME (its cache).
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    service = LiveService(tmp_path, trainer=None)
    try:
        service.migrate()
        base = service.start_api()
        admin = {"Authorization": f"Bearer {service.admin_key}"}

        def register(name: str, **src: str) -> httpx.Response:
            return httpx.post(f"{base}/v1/models", headers=admin, timeout=60,
                              json={"name": name, "source": src})

        made = register("hub-tiny", hf_repo="org/tiny")
        assert made.status_code == 201, made.text
        body = made.json()
        assert body["source"] == "hf" and body["revision"] == commit
        assert body["content_sha256"] == model_import.content_sha256(list_files(tiny_model_dir))
        fetched = hub.file_gets()
        assert sorted(p.rsplit("/", 1)[1] for p in fetched) == \
            sorted(p.name for p in tiny_model_dir.iterdir())  # allow_patterns: no .bin, .md
        pinned = register("hub-pinned", hf_repo="org/tiny", revision=commit)
        assert pinned.status_code == 201 and pinned.json()["revision"] == commit
        assert hub.file_gets() == fetched  # the hub client's cache: nothing fetched again
        for name, src, param in [("a", {"hf_repo": "org/nope"}, "source.hf_repo"),
                                 ("c", {"hf_repo": "org/ends-."}, "source.hf_repo"),
                                 ("d", {"hf_repo": "org/tiny", "revision": "../../x"},
                                  "source.revision"),
                                 ("b", {"hf_repo": "org/tiny", "revision": "v9"},
                                  "source.revision")]:
            resp = register(name, **src)
            assert resp.status_code == 422 and resp.json()["error"]["param"] == param, resp.text
        pickled = register("pickled", hf_repo="org/pickled")
        assert pickled.status_code == 422, pickled.text
        assert "safetensors" in pickled.json()["error"]["message"]

        # Offline (HF_HUB_OFFLINE=1, the hub gone): what the cache holds still registers.
        service.stop(service.procs.pop())
        hub.stop()
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        base = service.start_api()
        offline = register("hub-offline", hf_repo="org/tiny")
        assert offline.status_code == 201, offline.text
        assert offline.json()["content_sha256"] == body["content_sha256"]
        uncached = register("hub-uncached", hf_repo="org/other")
        assert uncached.status_code == 422
        assert uncached.json()["error"]["code"] == "model_source_unavailable"
        assert uncached.json()["error"]["param"] == "source.hf_repo"
        names = [m["name"] for m in httpx.get(f"{base}/v1/models", headers=admin).json()["data"]]
        assert sorted(names) == ["hub-offline", "hub-pinned", "hub-tiny"]
        staging = service.settings.resolved_model_staging_dir
        assert not staging.exists() or not any(staging.iterdir())
    finally:
        service.close()


def test_slow_source_bounded_in_count_and_time(api_settings: Settings, private_s3: S3Target,
                                               tiny_model_dir: Path) -> None:
    """A fetch hanging on a stalled S3 server: the next registration gets 429 at once, the
    first 503 after model_fetch_timeout_seconds, and once the server answers again the
    abandoned fetch stores and registers nothing."""
    import threading

    from tests.servicefixtures import wait_for

    settings = api_settings.model_copy(update={
        **private_s3.settings(), "max_concurrent_model_fetches": 1,
        "model_fetch_timeout_seconds": 2})
    s3 = private_s3.server.client()
    for p in tiny_model_dir.iterdir():
        s3.put_object(Bucket=private_s3.bucket, Key=f"src/{p.name}", Body=p.read_bytes())
    body = {"name": "slow", "source": {"s3": f"s3://{private_s3.bucket}/src"}}
    with admin_client(settings) as (client, admin):
        private_s3.server.pause()
        try:
            first: list[httpx.Response] = []
            thread = threading.Thread(target=lambda: first.append(
                client.post("/v1/models", headers=admin, json=body)))
            thread.start()
            wait_for(lambda: getattr(client.app.state, "model_fetch_slots", None) is not None
                     and client.app.state.model_fetch_slots.locked(), timeout=30)
            busy = client.post("/v1/models", headers=admin, json={**body, "name": "other"})
            assert busy.status_code == 429
            assert busy.json()["error"]["code"] == "model_fetches_busy"
            thread.join(30)
            assert first[0].status_code == 503, first[0].text
            assert first[0].json()["error"]["code"] == "model_fetch_timeout"
        finally:
            private_s3.server.resume()
        slots = client.app.state.model_fetch_slots
        wait_for(lambda: not slots.locked(), timeout=120)  # the abandoned fetch has ended
        names = [m["name"] for m in client.get("/v1/models", headers=admin).json()["data"]]
        assert "slow" not in names
    assert model_keys(private_s3) == []
    staging = settings.resolved_model_staging_dir
    assert not staging.exists() or not any(staging.iterdir())
