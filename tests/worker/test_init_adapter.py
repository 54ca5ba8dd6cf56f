"""The parent adapter a job built on another one starts from (worker/init_adapter.py), fetched
from each store (`settings`, tests/worker/conftest.py) and checked against the artifact rows:
a stored file that changed behind its recorded size or sha256 never seeds a run."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pytest

from lorajobs.core.db import get_sessionmaker
from lorajobs.core.settings import Settings
from lorajobs.core.storage import get_store
from lorajobs.core.tables import Artifact, Job, new_id
from lorajobs.worker.init_adapter import InitAdapterError, fetch_init_adapter
from tests.worker.jobfactory import make_job

FILES = {"adapter_config.json": b'{"r": 8}', "adapter_model.safetensors": bytes(range(256)) * 3}


def _parent_with_adapter(settings: Settings) -> str:
    """A job with a final adapter (two files) in the store and as artifact rows."""
    parent = make_job(settings)
    store = get_store(settings)
    with get_sessionmaker(settings)() as session:
        for name, data in FILES.items():
            key = f"jobs/{parent}/attempt-1/adapter/{name}"
            store.put_stream(key, io.BytesIO(data))
            session.add(Artifact(id=new_id("art"), job_id=parent, kind="adapter", step=None,
                                 name=name, storage_key=key, size=len(data),
                                 sha256=hashlib.sha256(data).hexdigest()))
        session.commit()
    return parent


def _child(parent: str) -> Job:
    return Job(id="job_child", spec={"init_from": {"job": parent, "step": None,
                                                   "model": f"ft:{parent}"}})


def test_fetched_and_verified(settings: Settings, tmp_path: Path) -> None:
    parent = _parent_with_adapter(settings)
    with get_sessionmaker(settings)() as session:
        dest = fetch_init_adapter(session, get_store(settings), _child(parent), tmp_path / "job")
    assert dest is not None
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == FILES


@pytest.mark.parametrize("swapped", [b"x" * len(FILES["adapter_model.safetensors"]), b"short"])
def test_a_stored_file_not_matching_its_row_is_refused(settings: Settings, tmp_path: Path,
                                                       swapped: bytes) -> None:
    parent = _parent_with_adapter(settings)
    store = get_store(settings)
    key = f"jobs/{parent}/attempt-1/adapter/adapter_model.safetensors"
    store.delete(key)
    store.put_stream(key, io.BytesIO(swapped))  # same size other bytes, or truncated
    with get_sessionmaker(settings)() as session, \
            pytest.raises(InitAdapterError, match="adapter_model.safetensors: (sha256|size)"):
        fetch_init_adapter(session, store, _child(parent), tmp_path / "job")
