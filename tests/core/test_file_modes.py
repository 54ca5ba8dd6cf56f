"""What the service stores is private from its creation, whatever the umask of the process
(an API under a bare `uvicorn`, a test runner): files 0600, directories 0700. The umask 077 of
`lorajobs serve/api/worker/beat` covers what a trainer child writes (tests/cli/test_embedded.py)."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from lorajobs.core.db import get_sessionmaker
from lorajobs.core.keys import ensure_admin_key
from lorajobs.core.migrate import upgrade
from lorajobs.core.settings import Settings
from lorajobs.core.storage import LocalArtifactStore


@pytest.fixture
def loose_umask() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_store_writes_private_files(tmp_path: Path, loose_umask: None) -> None:
    store = LocalArtifactStore(tmp_path / "artifacts")
    store.put_stream("datasets/ten_a/ds_1.jsonl", io.BytesIO(b"{}\n"))
    src = tmp_path / "src.bin"
    src.write_bytes(b"x" * 10)
    store.put_file("jobs/job_1/adapter/adapter_model.safetensors", src)
    for directory in ("artifacts", "artifacts/datasets", "artifacts/jobs/job_1"):
        assert _mode(tmp_path / directory) == 0o700, directory
    for key in ("datasets/ten_a/ds_1.jsonl", "jobs/job_1/adapter/adapter_model.safetensors"):
        path = store.local_path(key)
        assert _mode(path) == 0o600 and _mode(path.parent) == 0o700
    assert store.local_path("jobs/job_1/adapter/adapter_model.safetensors").read_bytes() \
        == b"x" * 10


def test_sqlite_database_and_admin_key_are_private(tmp_path: Path, loose_umask: None) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    upgrade(settings)
    with get_sessionmaker(settings)() as session:
        ensure_admin_key(session, key_file=settings.admin_key_file)
    assert _mode(settings.data_dir) == 0o700
    db = settings.data_dir / "lorajobs.db"
    assert [p.name for p in settings.data_dir.iterdir() if _mode(p) != 0o600] == []
    assert _mode(db) == 0o600 and _mode(settings.admin_key_file) == 0o600
