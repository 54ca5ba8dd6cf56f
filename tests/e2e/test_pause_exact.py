"""Pause and resume are exact: a job paused mid-run and resumed logs, at every step, the loss an
uninterrupted job of the same spec logs (same seed, same data order), with the real trainer.

The resumed attempt restores the adapter, optimizer, scheduler, RNG states and the sampler's
position from the checkpoint the pause wrote (lora_core/training/callbacks.py); dropout is on
and the run crosses an epoch boundary (a reshuffle), so a missed RNG or data-order state would
show as a different loss after the pause.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.client.live import Live, alpaca_records, start_live
from tests.servicefixtures import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]

STEPS = 40  # 48 examples / batch 4 = 12 steps an epoch: the run crosses 3 epoch boundaries
SPEC = {"base_model": "tiny", "lora": {"r": 4, "alpha": 8, "dropout": 0.1},
        "training": {"max_steps": STEPS, "batch_size": 4, "gradient_accumulation_steps": 1,
                     "max_seq_length": 128, "save_steps": 10, "learning_rate": 2e-3,
                     "lr_scheduler": "linear", "seed": 5},
        "merge": "none"}
TOLERANCE = 1e-5  # fp32 on CPU; resumed and straight runs do the same arithmetic


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Live]:
    yield from start_live(tmp_path_factory.mktemp("pause-exact"), tiny_model_dir, trainer=None)


def _losses(live: Live, job_id: str) -> dict[int, float]:
    rows = live.http.get(f"/v1/jobs/{job_id}/metrics", params={"limit": 1000}).json()["data"]
    return {m["step"]: m["train_loss"] for m in rows}


def _submit(live: Live, dataset_id: str) -> str:
    r = live.http.post("/v1/jobs", json={**SPEC, "training_file": dataset_id})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def test_paused_then_resumed_run_matches_an_uninterrupted_one(live: Live) -> None:
    dataset_id = live.upload(alpaca_records(48, seed=3))
    straight = _submit(live, dataset_id)
    assert live.wait_end(straight, timeout=240)["status"] == "succeeded"

    paused = _submit(live, dataset_id)
    wait_for(lambda: (live.job(paused)["progress"] or {}).get("step", 0) >= 3, timeout=120,
             interval=0.05, what="step 3")
    r = live.http.post(f"/v1/jobs/{paused}/pause")
    assert r.status_code == 200, r.text
    job = live.wait_status(paused, "paused", timeout=60)
    stopped_at = job["progress"]["step"]
    assert 3 <= stopped_at < STEPS, job
    assert live.http.post(f"/v1/jobs/{paused}/resume").status_code == 200
    done = live.wait_end(paused, timeout=240)
    assert done["status"] == "succeeded", done

    events = live.http.get(f"/v1/jobs/{paused}/events", params={"limit": 1000}).json()["data"]
    resumed = [e["data"].get("resumed_from_step") or 0 for e in events if e["type"] == "started"]
    assert resumed == [0, stopped_at]  # the pause checkpointed where it stopped
    a, b = _losses(live, straight), _losses(live, paused)
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    worst = max(abs(a[s] - b[s]) for s in a)
    print(f"pause at step {stopped_at}/{STEPS}: max |loss diff| over {STEPS} steps = {worst:.2e}")
    for step in a:
        assert b[step] == pytest.approx(a[step], abs=TOLERANCE), step
    assert a[STEPS] < a[1]  # it trained
