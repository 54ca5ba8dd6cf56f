"""Fixtures of the reliability suite: a migrated service with no processes yet."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

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


# The in-process API harness of tests/api (an app per backend, three tenants), for the attacks.
from tests.api.conftest import api, api_settings  # noqa: E402, F401 - fixtures, used by name
from tests.dbfixtures import db_settings  # noqa: E402, F401 - fixture
