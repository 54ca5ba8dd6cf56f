"""A job with `evaluation` through the real service and trainer: graded generations stored per
step (base at 0), served by the checkpoints/samples routes and OpenAI's checkpoint objects; the
selected checkpoint is the job's result (its adapter downloaded byte for byte) and early
stopping ends the job `succeeded` with the reason.

The "later checkpoint is worse" is constructed: select the *highest* validation loss, which
training lowers, so the first evaluated checkpoint is the best and the next one is worse."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from lorajobs.client import Client
from tests.client.live import MODEL, Live, alpaca_records, start_live, write_jsonl

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]

SAVE_STEPS = 2
PATIENCE = 1


@pytest.fixture
def live(tmp_path: Path, tiny_model_dir: Path) -> Iterator[Live]:
    yield from start_live(tmp_path, tiny_model_dir, trainer=None)


def test_best_checkpoint_is_the_result_and_early_stopping_ends_it(live: Live,
                                                                  tmp_path: Path) -> None:
    with Client(live.url, live.key) as client:
        train = client.datasets.upload(write_jsonl(tmp_path / "t.jsonl", alpaca_records(32)))
        valid = client.datasets.upload(write_jsonl(tmp_path / "v.jsonl",
                                                   alpaca_records(6, seed=9)))
        job = client.jobs.create({
            "base_model": MODEL, "training_file": train.id, "validation_file": valid.id,
            "lora": {"r": 8, "alpha": 16},
            "training": {"max_steps": 12, "batch_size": 4, "max_seq_length": 128,
                         "learning_rate": 1e-3, "save_steps": SAVE_STEPS,
                         "eval_steps": SAVE_STEPS, "seed": 3},
            "evaluation": {"num_samples": 4, "max_new_tokens": 4, "batch_size": 4,
                           "graders": [{"type": "text_similarity", "name": "fuzzy",
                                        "evaluation_metric": "fuzzy_match",
                                        "input": "{{sample.output_text}}",
                                        "reference": "{{item.reference}}"}],
                           "select": {"metric": "valid_loss", "mode": "max"},
                           "early_stopping": {"patience": PATIENCE}},
            "merge": "none"})
        job = client.jobs.wait(job.id, poll_interval=0.3, timeout=360)
        assert job.status == "succeeded", (job.error, live.svc.log("worker")[-3000:])
        metrics = job.metrics or {}
        curve = client.jobs.evaluations(job.id)
        ckpts = {c["step"]: c for c in
                 live.http.get(f"/v1/jobs/{job.id}/checkpoints").json()["data"]}
        samples = client.jobs.samples(job.id, curve[-1]["step"])
        base = client.jobs.samples(job.id, 0)
        files = client.jobs.download(job.id, tmp_path / "adapter")
        openai_ckpts = live.http.get(
            f"/openai/v1/fine_tuning/jobs/{job.id}/checkpoints").json()["data"]

    steps = [row["step"] for row in curve]
    assert steps[0] == 0 and steps[1:] == list(range(SAVE_STEPS, steps[-1] + 1, SAVE_STEPS))
    losses = {row["step"]: row["scores"]["valid_loss"] for row in curve[1:]}
    best = max(losses, key=lambda s: losses[s])
    assert metrics["best_step"] == best and metrics["best_metric"] == "valid_loss"
    assert "highest valid_loss" in metrics["selection_reason"]
    # stopped within `patience` evaluations after the best one, well before max_steps
    assert metrics["stopped_early"] is True and "patience 1" in metrics["stop_reason"]
    assert steps[-1] == best + PATIENCE * SAVE_STEPS < 12
    # scores per checkpoint, in the native and the OpenAI objects
    for step in steps[1:]:
        assert set(ckpts[step]["metrics"]["scores"]) == {"fuzzy", "valid_loss"}
    assert {c["step_number"]: c["metrics"]["scores"]["fuzzy"] for c in openai_ckpts} == \
        {s: r["scores"]["fuzzy"] for s, r in ((r["step"], r) for r in curve[1:])}
    # samples: prompt, reference, the base's output beside this step's, graded
    assert len(samples["samples"]) == 4 and base["step"] == 0
    first = samples["samples"][0]
    assert first["reference"] and first["prompt"].endswith("### Response:\n")
    assert first["base_output"] == base["samples"][0]["output"]
    assert 0.0 <= first["scores"]["fuzzy"] <= 1.0
    # the downloaded adapter is the best checkpoint's, byte for byte
    got = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
    want = {f["name"]: f["sha256"] for f in ckpts[best]["adapter"]["files"]}
    assert got["adapter_model.safetensors"] == want["adapter_model.safetensors"]
