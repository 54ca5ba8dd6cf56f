"""A final upload that fails (worker/settle.py), on the local store and a real S3 server: what
it stored is deleted again and nothing of it is registered; the job is requeued."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from lorajobs.core import jobs
from lorajobs.core.db import get_sessionmaker
from lorajobs.core.settings import Settings
from lorajobs.core.storage import get_store
from lorajobs.core.tables import Artifact
from lorajobs.worker.checkpoint_sync import run_prefix
from lorajobs.worker.supervisor import Supervisor
from tests.worker.jobfactory import events, get_job, make_job, node_settings

pytestmark = pytest.mark.timeout(120)


def test_a_failed_final_upload_leaves_nothing_of_it_in_the_store(
        settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The store takes the adapter and the merged model's config, then refuses its weights
    past store_retry_seconds: the adapter and the merged files stored are deleted, no final
    artifact is registered, the logs and checkpoints stay, the job is queued again."""
    job_id = make_job(settings, max_steps=4, save_steps=2)
    node = node_settings(settings, tmp_path, "a").model_copy(update={"store_retry_seconds": 0.5})
    store = get_store(node)
    real_put = store.put_file

    def put_file(key: str, src: Path, *, immutable: bool = False) -> None:
        if key.endswith("/merged/final/model.safetensors"):  # after config.json
            raise OSError("store down (test)")
        real_put(key, src, immutable=immutable)

    monkeypatch.setattr(store, "put_file", put_file)
    with get_sessionmaker(settings)() as session:
        assert jobs.claim(session, job_id, owner="w1", lease_seconds=60) is not None
    assert Supervisor(node, job_id, "w1", shutdown_requested=lambda: False,
                      store=store).run() == "requeued"

    assert get_job(settings, job_id).status == "queued"
    assert "refused the job's final upload" in events(settings, job_id, "status")[-1].message
    run = run_prefix(job_id, 1, "w1")
    stored = {o.key[len(run) + 1:].split("/", 1)[0] for o in store.list(run)}
    assert stored == {"logs", "checkpoints", "tensorboard"}  # no adapter/, merged/, manifest
    with get_sessionmaker(settings)() as session:
        kinds = set(session.execute(select(Artifact.kind, Artifact.step)
                                    .where(Artifact.job_id == job_id)).all())
    assert kinds == {("log", None), ("tensorboard", None), ("adapter", 2)}
