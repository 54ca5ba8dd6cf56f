"""API test harness: an app per backend (SQLite, PostgreSQL), three tenants, a registered model.

`api` gives a TestClient plus keys: `admin` (admin tenant), `alice` and `bob` (two ordinary
tenants). The broker is replaced by a list on `app.state.enqueue`, so no worker is needed and
jobs stay queued; the real enqueue path is exercised by the no-torch subprocess test.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from fastapi.testclient import TestClient

from lorajobs.api.app import create_app
from lorajobs.core import keys, registry
from lorajobs.core.db import get_sessionmaker
from lorajobs.core.settings import Settings
from tests.dbfixtures import db_settings  # noqa: F401 - the parametrized fixture
from tests.s3fixtures import S3Target

MODEL_NAME = "tiny-llama"


def alpaca_lines(n: int = 12) -> list[dict[str, str]]:
    return [{"instruction": f"Add {i} and {i + 1}.", "input": "", "output": str(2 * i + 1)}
            for i in range(n)]


def jsonl(records: list[Any]) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


@dataclass
class Api:
    client: TestClient
    settings: Settings
    keys: dict[str, str]
    enqueued: list[str] = field(default_factory=list)

    def h(self, who: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[who]}"}

    def sessions(self):  # type: ignore[no-untyped-def]
        return get_sessionmaker(self.settings)()

    def upload(self, who: str, data: bytes, *, fmt: str | None = None,
               filename: str = "train.jsonl") -> Any:
        form = {"format": fmt} if fmt else None
        return self.client.post("/v1/datasets", headers=self.h(who), data=form,
                                files={"file": (filename, data, "application/jsonl")})

    def dataset(self, who: str, n: int = 12) -> str:
        resp = self.upload(who, jsonl(alpaca_lines(n)))
        assert resp.status_code == 201, resp.text
        return resp.json()["id"]

    def submit(self, who: str, body: dict[str, Any], **headers: str) -> Any:
        return self.client.post("/v1/jobs", headers={**self.h(who), **headers}, json=body)

    def job(self, who: str, dataset_id: str, **overrides: Any) -> dict[str, Any]:
        body = {"base_model": MODEL_NAME, "training_file": dataset_id, **overrides}
        resp = self.submit(who, body)
        assert resp.status_code == 201, resp.text
        return resp.json()


@pytest.fixture
def api_settings(db_settings: Settings, tmp_path, tiny_model_dir) -> Settings:  # noqa: F811
    """db_settings + a model root holding a copy of the tiny model (under `tiny/`)."""
    settings = db_settings.model_copy(update={"model_root": tmp_path / "models"})
    shutil.copytree(tiny_model_dir, settings.resolved_model_root / "tiny")
    return settings


@pytest.fixture
def api(api_settings: Settings) -> Iterator[Api]:
    yield from _serve(api_settings)


@pytest.fixture(params=["stream", "presign"])
def s3_api(request: pytest.FixtureRequest, s3_bucket: S3Target, tmp_path,
           tiny_model_dir) -> Iterator[Api]:
    """The `api` harness on SQLite with the artifact store in S3 (a bucket on the moto server),
    downloads streamed by the API or redirected to presigned URLs: for the tests where the
    store matters (downloads, uploads), not the whole suite."""
    from lorajobs.core.migrate import upgrade

    settings = Settings(data_dir=tmp_path / "data", model_root=tmp_path / "models",
                        **s3_bucket.settings(store_presign_downloads=request.param == "presign"))
    upgrade(settings)
    shutil.copytree(tiny_model_dir, settings.resolved_model_root / "tiny")
    yield from _serve(settings)


def _serve(api_settings: Settings) -> Iterator[Api]:
    app = create_app(api_settings)
    recorded: list[str] = []
    app.state.enqueue = recorded.append
    plaintext: dict[str, str] = {}
    with get_sessionmaker(api_settings)() as session:
        for who in ("admin", "alice", "bob"):
            tenant = keys.create_tenant(session, name=who)
            # Each tenant's root key, as an admin mints it: it manages its tenant's keys.
            _, plaintext[who] = keys.create_key(session, tenant_id=tenant.id, name=who,
                                                is_admin=who == "admin", manage_keys=True)
        session.commit()
        registry.register_model(session, name=MODEL_NAME, path_under_model_root="tiny",
                                settings=api_settings)
    with TestClient(app) as client:
        yield Api(client=client, settings=api_settings, keys=plaintext, enqueued=recorded)
