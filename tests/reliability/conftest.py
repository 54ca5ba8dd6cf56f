"""Helpers of the reliability suite; the `service` fixture (a migrated service with no
processes yet) is tests/conftest.py's."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx

from tests.servicefixtures import LiveService


def start_api_with_tiny_model(svc: LiveService, tiny_model_dir: Path) -> httpx.Client:
    """Worker + API of a migrated service, the tiny model registered as "tiny"; an admin client.
    The caller closes the client and the service."""
    svc.migrate()
    svc.start_worker()
    svc.start_api()
    shutil.copytree(tiny_model_dir, svc.settings.resolved_model_root / "tiny")
    client = httpx.Client(base_url=svc.base_url or "", timeout=30,
                          headers={"Authorization": f"Bearer {svc.admin_key}"})
    assert client.post("/v1/models", json={"name": "tiny", "path": "tiny"}).status_code == 201
    return client


# The in-process API harness of tests/api (an app per backend, three tenants), for the attacks.
from tests.api.conftest import api, api_settings  # noqa: E402, F401 - fixtures, used by name
from tests.dbfixtures import db_settings  # noqa: E402, F401 - fixture
