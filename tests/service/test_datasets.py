"""lorajobs.service.datasets: a dataset is stored with its row, or not at all."""

from __future__ import annotations

import io

import pytest
from sqlalchemy import func, select

from lorajobs.service import datasets, keys
from lorajobs.service.db import get_sessionmaker
from lorajobs.service.errors import InvalidRequest, NotFound, PayloadTooLarge
from lorajobs.service.models import Dataset
from lorajobs.service.settings import Settings
from lorajobs.service.storage import get_store
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
