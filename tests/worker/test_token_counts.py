"""Token counts: POST /v1/jobs never reads the dataset; the trainer's count, recorded by the
worker, serves every later submit of the same (content, model, max_seq_length)."""

from __future__ import annotations

import io

import pytest
from sqlalchemy import func, select

from lora_core.events import StartedEvent
from lorajobs.core import datasets, jobs, submit
from lorajobs.core.db import get_sessionmaker
from lorajobs.core.settings import Settings
from lorajobs.core.storage import get_store
from lorajobs.core.tables import Dataset, Job, JobEvent, TokenCount
from lorajobs.worker.event_recorder import EventRecorder
from tests.api.conftest import alpaca_lines, jsonl
from tests.dbfixtures import db_settings, tiny_tenant  # noqa: F401

WARNING = "3 training example(s) exceed max_seq_length and will be truncated"


@pytest.fixture
def env(db_settings: Settings, tmp_path, tiny_model_dir):  # type: ignore[no-untyped-def]  # noqa: F811
    t = tiny_tenant(db_settings, tmp_path, tiny_model_dir)
    settings, store, session, tenant_id = t.settings, t.store, t.session, t.tenant_id

    def upload() -> str:
        return datasets.create_dataset(session, tenant_id=tenant_id, filename="d.jsonl",
                                       stream=io.BytesIO(jsonl(alpaca_lines(10))),
                                       data_format=None, settings=settings, store=store).id

    def create(ds: str, max_len: int = 16):  # type: ignore[no-untyped-def]
        request = submit.JobRequest(base_model="tiny", training_file=ds,
                                    training={"max_seq_length": max_len})
        return submit.create_job(session, tenant_id=tenant_id, request=request,
                                 settings=settings, store=store, enqueue=lambda _id: None)[0]

    yield settings, session, upload, create
    session.close()


def test_submit_does_not_read_the_dataset(env) -> None:  # type: ignore[no-untyped-def]
    settings, session, upload, create = env
    ds = upload()
    path = get_store(settings).local_path(session.get(Dataset, ds).storage_key)
    path.write_bytes(b"\xff not json, not even UTF-8\n")  # a per-POST re-read would fail here
    job = create(ds)
    assert job.estimate["num_tokens"] is None and job.estimate["total_steps"] > 0


def test_trainer_count_is_recorded_once_and_reused(env) -> None:  # type: ignore[no-untyped-def]
    settings, session, upload, create = env
    ds = upload()
    first = create(ds)
    owner = "worker-1:1:x"
    assert jobs.claim(session, first.id, owner=owner, lease_seconds=60) is not None
    session.commit()
    started = StartedEvent(total_steps=2, world_size=1, resumed_from_step=0, num_examples=10,
                           num_tokens=150, num_truncated=3, num_dropped=0)
    recorder = EventRecorder(get_sessionmaker(settings), job_id=first.id, owner=owner)
    recorder.apply([started])
    recorder.apply([started])  # a resumed attempt reports it again: nothing doubles
    session.expire_all()
    assert session.scalar(select(func.count()).select_from(TokenCount)) == 1
    job = session.get(Job, first.id)
    assert job.estimate["num_tokens"] == 150 and job.compatibility["warnings"] == [WARNING]
    warnings = session.scalars(select(JobEvent.message).where(
        JobEvent.job_id == first.id, JobEvent.type == "warning")).all()
    assert warnings == [WARNING]

    again = create(ds)  # same content, model, length: the count at once
    assert again.estimate["num_tokens"] == 150 and WARNING in again.compatibility["warnings"]
    same_bytes = create(upload())  # another upload of the same bytes shares it
    assert same_bytes.estimate["num_tokens"] == 150
    longer = create(ds, max_len=64)  # another length: not counted yet
    assert longer.estimate["num_tokens"] is None and longer.compatibility["warnings"] == []
