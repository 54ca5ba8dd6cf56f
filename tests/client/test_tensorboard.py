"""Each finished job has a TensorBoard event file (artifact kind "tensorboard"), written by the
worker without torch; downloaded through the SDK it parses with TensorBoard's own reader and
holds the same loss curve as /v1/jobs/{id}/metrics."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorajobs.client import Client
from tests.client.live import Live
from tests.servicefixtures import wait_for

pytestmark = pytest.mark.timeout(60)


def _scalars(logdir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    assert tag in acc.Tags()["scalars"], acc.Tags()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


@pytest.mark.parametrize("outcome", ["succeeded", "cancelled"])
def test_tensorboard_file_per_job(live: Live, tmp_path: Path, outcome: str) -> None:
    job_id = live.submit(max_steps=8 if outcome == "succeeded" else 1000)
    if outcome == "cancelled":
        wait_for(lambda: live.job(job_id)["progress"]["step"] >= 3, timeout=30,
                 what="a few steps")  # a job cancelled before its first step has no curve
        live.http.post(f"/v1/jobs/{job_id}/cancel")
    assert live.wait_end(job_id)["status"] == outcome
    with Client(live.url, live.key) as client:
        (art,) = [a for a in client.jobs.artifacts(job_id) if a.kind == "tensorboard"]
        assert art.name.startswith("events.out.tfevents.")
        client.jobs.download_artifact(job_id, art, tmp_path / "tb" / art.name)
        rows = client.jobs.metrics(job_id)
    losses = _scalars(tmp_path / "tb", "train/loss")
    assert losses == [(r.step, pytest.approx(r.train_loss)) for r in rows]
    assert [s for s, _ in losses] == list(range(1, len(rows) + 1)) and len(rows) >= 1
    if outcome == "succeeded":
        assert losses[0] == (1, pytest.approx(2.0)) and losses[-1] == (8, pytest.approx(0.25))
    tps = _scalars(tmp_path / "tb", "train/tokens_per_second")
    assert tps and all(v == pytest.approx(100.0) for _, v in tps)  # the fake trainer's rate
