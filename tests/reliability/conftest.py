"""Fixtures of the reliability suite: a migrated service with no processes yet."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.servicefixtures import LiveService


@pytest.fixture
def service(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LiveService]:
    """SQLite + embedded broker unless parametrized indirectly with "postgresql"."""
    svc = LiveService(tmp_path, getattr(request, "param", "sqlite"))
    try:
        svc.migrate()
        yield svc
    finally:
        svc.close()


def start_api_with_tiny_model(svc: LiveService, tiny_model_dir: Path) -> httpx.Client:
    """Worker + API of a migrated service, the tiny model registered as "tiny"; an admin client.
    The caller closes the client and the service."""
    svc.migrate()
    svc.start_worker()
    assert svc.start_api() is not None
    shutil.copytree(tiny_model_dir, svc.settings.resolved_model_root / "tiny")
    client = httpx.Client(base_url=svc.base_url or "", timeout=30,
                          headers={"Authorization": f"Bearer {svc.admin_key}"})
    assert client.post("/v1/models", json={"name": "tiny", "path": "tiny"}).status_code == 201
    return client


# The in-process API harness of tests/api (an app per backend, three tenants), for the attacks.
from tests.api.conftest import api, api_settings  # noqa: E402, F401 - fixtures, used by name
from tests.dbfixtures import db_settings  # noqa: E402, F401 - fixture
