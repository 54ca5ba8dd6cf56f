"""Datasets on a node (worker/inputs.py), from the local store and a real S3 server: fetched
once into the node's cache under their sha256, verified, and refused when the stored bytes do
not match what the API recorded."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pytest

from lorajobs.core.settings import Settings
from lorajobs.core.storage import get_store
from lorajobs.core.tables import Dataset
from lorajobs.worker.inputs import DatasetUnavailable, dataset_cache_dir, fetch_dataset

DATA = b'{"instruction": "hi", "output": "hello"}\n' * 3


@pytest.fixture(params=["local", "s3"])
def settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    extra = request.getfixturevalue("s3_bucket").settings() if request.param == "s3" else {}
    return Settings(data_dir=tmp_path / "data", **extra)


def _dataset(key: str, data: bytes = DATA) -> Dataset:
    return Dataset(id="ds_x", tenant_id="t", filename="t.jsonl", format="alpaca",
                   num_examples=3, size_bytes=len(data), sha256=hashlib.sha256(data).hexdigest(),
                   storage_key=key)


def test_fetched_once_and_verified(settings: Settings) -> None:
    store = get_store(settings)
    store.put_stream("datasets/ds_x.jsonl", io.BytesIO(DATA))
    ds = _dataset("datasets/ds_x.jsonl")
    path = fetch_dataset(settings, store, ds)
    assert path.parent == dataset_cache_dir(settings) and path.read_bytes() == DATA
    assert path.name == f"{ds.sha256}.jsonl" and path.stat().st_mode & 0o777 == 0o600
    store.delete("datasets/ds_x.jsonl")  # a second job of this node needs no download
    assert fetch_dataset(settings, store, ds) == path


def test_bytes_not_matching_the_recorded_sha256_are_refused(settings: Settings) -> None:
    store = get_store(settings)
    store.put_stream("datasets/ds_x.jsonl", io.BytesIO(DATA + b"tampered\n"))
    with pytest.raises(DatasetUnavailable, match="sha256"):
        fetch_dataset(settings, store, _dataset("datasets/ds_x.jsonl"))
    assert [p.name for p in dataset_cache_dir(settings).iterdir()
            if not p.name.endswith(".lock")] == []  # nothing half-written is left


def test_a_missing_object_fails_at_once(settings: Settings) -> None:
    with pytest.raises(DatasetUnavailable):
        fetch_dataset(settings, get_store(settings), _dataset("datasets/gone.jsonl"))
