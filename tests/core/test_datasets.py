"""lorajobs.core.datasets: a dataset is stored with its row, or not at all."""

from __future__ import annotations

import io

import pytest
from sqlalchemy import func, select

from lorajobs.core import datasets, keys
from lorajobs.core.db import get_sessionmaker
from lorajobs.core.errors import InvalidRequest, NotFound, PayloadTooLarge
from lorajobs.core.settings import Settings
from lorajobs.core.storage import get_store
from lorajobs.core.tables import Dataset
from tests.api.conftest import alpaca_lines, jsonl
from tests.dbfixtures import db_settings  # noqa: F401


def _files(settings: Settings) -> list[str]:
    root = settings.resolved_artifact_root
    staging = settings.data_dir / "staging"
    return sorted(str(p) for base in (root, staging) if base.exists()
                  for p in base.rglob("*") if p.is_file())


def _create(session, settings: Settings, tenant_id: str, data: bytes, fmt=None):  # type: ignore[no-untyped-def]
    return datasets.create_dataset(session, tenant_id=tenant_id, filename="d.jsonl",
                                   stream=io.BytesIO(data), data_format=fmt, settings=settings,
                                   store=get_store(settings))


def test_atomic_store(db_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    store = get_store(db_settings)
    with get_sessionmaker(db_settings)() as session:
        tenant = keys.create_tenant(session, name="t")
        session.commit()
        row = _create(session, db_settings, tenant.id, jsonl(alpaca_lines(3)))
        assert store.exists(row.storage_key) and row.num_examples == 3
        assert row.storage_key == f"datasets/{tenant.id}/{row.id}.jsonl"
        before = _files(db_settings)

        with pytest.raises(InvalidRequest) as info:  # a bad line: nothing stored
            _create(session, db_settings, tenant.id, jsonl(alpaca_lines(3)) + b"[1]\n")
        assert info.value.code == "invalid_dataset"
        assert info.value.details["errors"][0]["line"] == 4
        with pytest.raises(PayloadTooLarge):  # over the cap while streaming
            _create(session, db_settings.model_copy(update={"max_upload_bytes": 100}),
                    tenant.id, jsonl(alpaca_lines(20)))

        def failing_commit() -> None:
            raise RuntimeError("database went away")

        monkeypatch.setattr(session, "commit", failing_commit)
        with pytest.raises(RuntimeError):  # the row failed: the file is removed again
            _create(session, db_settings, tenant.id, jsonl(alpaca_lines(2)))
        monkeypatch.undo()
        assert _files(db_settings) == before
        assert session.scalar(select(func.count()).select_from(Dataset)) == 1


def test_lookup_is_tenant_scoped(db_settings: Settings) -> None:  # noqa: F811
    with get_sessionmaker(db_settings)() as session:
        a, b = keys.create_tenant(session, name="a"), keys.create_tenant(session, name="b")
        session.commit()
        row = _create(session, db_settings, a.id, jsonl(alpaca_lines(2)))
        assert datasets.get_dataset(session, tenant_id=a.id, dataset_id=row.id) is row
        with pytest.raises(NotFound):
            datasets.get_dataset(session, tenant_id=b.id, dataset_id=row.id)
        assert datasets.list_datasets(session, tenant_id=b.id, limit=10) == ([], False)


def test_clean_filename() -> None:
    assert datasets.clean_filename("../../etc/passwd") == "passwd"
    assert datasets.clean_filename("C:\\x\\y.jsonl") == "y.jsonl"
    assert datasets.clean_filename("a\x00b\nc") == "a_b_c"
    assert datasets.clean_filename(None) == "upload.jsonl"


class _CountingStream(io.RawIOBase):
    """`lines` JSONL records made as they are read; `read_bytes` says how far a reader got."""

    def __init__(self, lines: int) -> None:
        self.line = jsonl(alpaca_lines(1))
        self.remaining = lines
        self.read_bytes = 0

    def read(self, size: int = -1) -> bytes:
        n = min(self.remaining, max(1, size // len(self.line)))
        self.remaining -= n
        self.read_bytes += n * len(self.line)
        return self.line * n


def test_example_cap_stops_reading_early(db_settings: Settings) -> None:  # noqa: F811
    settings = db_settings.model_copy(update={"max_examples_per_dataset": 10})
    with get_sessionmaker(settings)() as session:
        tenant = keys.create_tenant(session, name="t")
        session.commit()
        stream = _CountingStream(200_000)  # ~11 MB if read to the end
        with pytest.raises(InvalidRequest) as info:
            datasets.create_dataset(session, tenant_id=tenant.id, filename="d.jsonl",
                                    stream=stream, data_format=None, settings=settings,
                                    store=get_store(settings))
        assert info.value.details["errors"][-1]["line"] == 11
        assert stream.read_bytes <= 2 * datasets.COPY_CHUNK  # stopped within a chunk or two
        assert _files(settings) == []  # the staging file is gone too


def test_stale_staging_files_are_swept(db_settings: Settings) -> None:  # noqa: F811
    import os
    import time

    staging = datasets.staging_dir(db_settings)
    staging.mkdir(parents=True, exist_ok=True)
    dead, live = staging / "upload-dead.part", staging / "upload-live.part"
    dead.write_bytes(b"x")
    live.write_bytes(b"y")
    old = time.time() - datasets.STAGING_MAX_AGE_SECONDS - 60
    os.utime(dead, (old, old))
    with datasets.Upload(db_settings) as upload:
        assert upload.path is not None and upload.path.parent == staging
        assert not dead.exists() and live.exists()
    assert upload.path is None and sorted(p.name for p in staging.iterdir()) == [live.name]
