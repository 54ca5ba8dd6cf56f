"""Helpers of the reliability suite; the `service` fixture (a migrated service with no
processes yet) is tests/conftest.py's."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.client.live import REAL_TRAINING, alpaca_records
from tests.servicefixtures import LiveService


@contextmanager
def api_with_tiny_model(svc: LiveService, tiny_model_dir: Path) -> Iterator[httpx.Client]:
    """Worker + API of a not yet migrated service, the tiny model registered as "tiny"; an
    admin client. Closes the client, then the service."""
    try:
        svc.migrate()
        svc.start_worker()
        base_url = svc.start_api()
        shutil.copytree(tiny_model_dir, svc.settings.resolved_model_root / "tiny")
        with httpx.Client(base_url=base_url, timeout=30,
                          headers={"Authorization": f"Bearer {svc.admin_key}"}) as client:
            r = client.post("/v1/models", json={"name": "tiny", "path": "tiny"})
            assert r.status_code == 201, r.text
            yield client
    finally:
        svc.close()


def submit_real_job(client: httpx.Client, *, max_steps: int, save_steps: int,
                    merge: str = "none", examples: int = 64) -> str:
    """Upload `examples` seeded records, submit a real-trainer job on "tiny"; its id."""
    data = "".join(json.dumps(r) + "\n" for r in alpaca_records(examples))
    r = client.post("/v1/datasets", files={"file": ("train.jsonl", data.encode())})
    assert r.status_code == 201, r.text
    r = client.post("/v1/jobs", json={
        "base_model": "tiny", "training_file": r.json()["id"], "lora": {"r": 8, "alpha": 16},
        "training": {**REAL_TRAINING, "gradient_accumulation_steps": 1, "max_steps": max_steps,
                     "save_steps": save_steps},
        "merge": merge})
    assert r.status_code == 201, r.text
    return r.json()["id"]


# The in-process API harness of tests/api (an app per backend, three tenants), for the attacks.
from tests.api.conftest import api, api_settings  # noqa: E402, F401 - fixtures, used by name
from tests.dbfixtures import db_settings  # noqa: E402, F401 - fixture
