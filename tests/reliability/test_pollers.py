"""Many clients polling GET /v1/jobs/{id} while the real trainer trains: no errors, and the
trainer's tokens/s with pollers vs. without, measured in the same run (steps before the pollers
start vs. steps after). The API does no work in the worker's path, so only CPU contention on
a small machine can lower the ratio; the bound here is loose for a shared 2-core CI box and
`bench/reliability.py` prints the figure.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.reliability.conftest import start_api_with_tiny_model
from tests.reliability.scenarios import pollers_vs_training
from tests.servicefixtures import LiveService

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

POLLERS = 8
POLL_INTERVAL_S = 0.05  # each client ~20 requests/s: 160/s in all at most
PHASE_SECONDS = 3.0
# Job polling vs. the same load on /healthz: ~1 when reads cost the trainer nothing beyond
# CPU. Noise on a shared 2-core box is +-15%; a lock or write shared with the worker's path
# shows as far lower.
MIN_RATIO_VS_CONTROL = 0.75
WORDS = ["red", "blue", "fish", "stone", "river", "wolf", "green", "book", "wind", "bird"]


@pytest.fixture
def api(tmp_path: Path, tiny_model_dir: Path) -> Iterator[tuple[LiveService, httpx.Client]]:
    svc = LiveService(tmp_path, "sqlite", trainer=None)
    try:
        client = start_api_with_tiny_model(svc, tiny_model_dir)
        yield svc, client
        client.close()
    finally:
        svc.close()


def submit_real_job(client: httpx.Client, *, max_steps: int) -> str:
    rng = random.Random(0)
    lines = [json.dumps({"instruction": "Reverse the words.", "input": " ".join(w),
                         "output": " ".join(reversed(w))})
             for w in (rng.sample(WORDS, 3) for _ in range(64))]
    r = client.post("/v1/datasets", files={"file": ("t.jsonl", "\n".join(lines).encode())})
    assert r.status_code == 201, r.text
    r = client.post("/v1/jobs", json={
        "base_model": "tiny", "training_file": r.json()["id"], "lora": {"r": 8, "alpha": 16},
        "training": {"max_steps": max_steps, "save_steps": max_steps, "batch_size": 4,
                     "gradient_accumulation_steps": 1, "max_seq_length": 128,
                     "learning_rate": 1e-3, "seed": 3},
        "merge": "none"})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def test_pollers_do_not_slow_training(api: tuple[LiveService, httpx.Client]) -> None:
    svc, client = api
    job_id = submit_real_job(client, max_steps=5000)  # cancelled after the three phases
    figures = pollers_vs_training(svc, dict(client.headers), job_id, pollers=POLLERS,
                                  poll_interval=POLL_INTERVAL_S, phase_seconds=PHASE_SECONDS)
    print(figures)
    assert figures["errors"] == 0 and figures["job_requests"] > 100
    assert all(last - first >= 10 for first, last in figures["steps"]), figures
    assert figures["ratio_vs_control"] >= MIN_RATIO_VS_CONTROL, figures
