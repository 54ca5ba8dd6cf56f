"""Fixtures shared by the whole suite: a tiny model built once per session, a private PostgreSQL
server, and a migrated service with no processes yet."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.s3fixtures import aws_env, private_s3, s3_bucket, s3_server  # noqa: F401 - fixtures

if TYPE_CHECKING:
    from tests.servicefixtures import LiveService

@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory):
    """A 2-layer, 64-wide Llama-style model with its tokenizer (fp32, safetensors)."""
    from lora_core.model_files.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-model"), seed=0)


@pytest.fixture
def private_pg():
    """A PostgreSQL server of this test's own on a free port (initdb + pg_ctl in a temp dir):
    fault tests stop and restart it, never the machine's shared one."""
    from tests.reliability.servers import PrivatePostgres

    server = PrivatePostgres()
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def service(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LiveService]:
    """Migrated, no processes yet: each test starts the ones it needs. SQLite + embedded broker
    unless parametrized indirectly with "postgresql" (+ the shared Redis)."""
    from tests.servicefixtures import LiveService

    svc = LiveService(tmp_path, getattr(request, "param", "sqlite"))
    try:
        svc.migrate()
        yield svc
    finally:
        svc.close()
