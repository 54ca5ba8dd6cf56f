"""DPO's reward figures (issue 13) go from the trainer's progress events to job_metrics, the
job's metrics snapshot and the metrics list the API serves; supervised steps leave them null.
Every logged step is also a `metrics` event (OpenAI's list_events shows them)."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select

from lora_core.events import ProgressEvent
from lorajobs.api.schemas import MetricRow
from lorajobs.core import jobs
from lorajobs.core.db import get_sessionmaker
from lorajobs.core.migrate import upgrade
from lorajobs.core.settings import Settings
from lorajobs.core.tables import Job, JobEvent, JobMetric
from lorajobs.worker.event_recorder import EventRecorder
from tests.worker.jobfactory import make_job


def test_reward_metrics_are_recorded_per_step(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    upgrade(settings)
    sessions = get_sessionmaker(settings)
    job_id = make_job(settings)
    with sessions() as session:
        assert jobs.claim(session, job_id, owner="w", lease_seconds=60) is not None
    recorder = EventRecorder(sessions, job_id=job_id, owner="w", attempt=1)
    recorder.apply([
        ProgressEvent(step=1, loss=0.6931, rewards_chosen=0.0, rewards_rejected=0.0,
                      reward_margin=0.0, reward_accuracy=0.0),
        ProgressEvent(step=2, loss=0.52, rewards_chosen=0.31, rewards_rejected=-0.12,
                      reward_margin=0.43, reward_accuracy=0.75),
        ProgressEvent(step=3, loss=0.9),  # a supervised-shaped step: no rewards
    ])
    with sessions() as session:
        rows = {r.step: MetricRow.from_row(r) for r in session.scalars(
            select(JobMetric).where(JobMetric.job_id == job_id))}
        job = session.get(Job, job_id)
        assert job is not None
        snapshot = dict(job.metrics or {})
        logged = list(session.scalars(select(JobEvent).where(
            JobEvent.job_id == job_id, JobEvent.type == "metrics").order_by(JobEvent.id)))
    assert rows[2].rewards_chosen == 0.31 and rows[2].rewards_rejected == -0.12
    assert rows[2].reward_margin == 0.43 and rows[2].reward_accuracy == 0.75
    assert rows[1].reward_margin == 0.0 and rows[1].train_loss == 0.6931
    assert rows[3].reward_margin is None and rows[3].reward_accuracy is None
    assert snapshot["reward_accuracy"] == 0.75 and snapshot["reward_margin"] == 0.43
    # OpenAI's list_events shows a `metrics` event per logged step
    assert [e.data["step"] for e in logged] == [1, 2, 3]
    assert logged[1].message == "Step 2: training loss=0.5200"
    assert logged[1].data["reward_margin"] == 0.43 and "reward_margin" not in logged[2].data
