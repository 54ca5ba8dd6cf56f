"""The embedded broker (kombu SQLAlchemy transport): the job queue declared up front."""

from __future__ import annotations


def test_declare_job_queue_creates_the_queue_row_once(tmp_path) -> None:
    """`lorajobs serve` declares the job queue before its worker and API start, so they never
    race kombu's select-then-insert of the queue row (UNIQUE kombu_queue.name)."""
    import sqlite3

    from lorajobs.core.queue import QUEUE_NAME, declare_job_queue
    from lorajobs.core.settings import Settings

    settings = Settings(data_dir=tmp_path / "data")
    (tmp_path / "data").mkdir()
    declare_job_queue(settings)
    declare_job_queue(settings)  # idempotent: a restarted serve declares it again
    db = settings.resolved_broker_url.removeprefix("sqla+sqlite:///")
    with sqlite3.connect(db) as conn:
        names = [n for (n,) in conn.execute("SELECT name FROM kombu_queue")]
    assert names == [QUEUE_NAME]
