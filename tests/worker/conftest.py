"""Fixtures of the worker tests: the live service (tests/servicefixtures.py) and `settings`, a
migrated SQLite database with each artifact store in turn: the local directory and a real S3
server (moto)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorajobs.core.migrate import upgrade
from lorajobs.core.settings import Settings
from tests.servicefixtures import live_service  # noqa: F401 - a fixture, used by name


@pytest.fixture(params=["local", "s3"])
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    extra = request.getfixturevalue("s3_bucket").settings() if request.param == "s3" else {}
    settings = Settings(data_dir=tmp_path / "data", **extra)
    upgrade(settings)
    return settings
