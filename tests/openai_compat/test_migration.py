"""The migration test (issue 13): a script written for OpenAI's fine-tuning API
(migration_script.py, unchanged but for base_url, api_key and model names) runs against a real
`lorajobs serve` process with the real trainer on the tiny model, and everything it does works:
chat and preference uploads, an SFT and a DPO job with "auto" hyperparameters, events streamed,
pause and resume, checkpoints, a job built on a checkpoint, a cancel, webhooks received on a real
HTTP server and verified by the official client's `webhooks.unwrap`, result files downloaded.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import OpenAI

from lora_core.data.synthetic import make_preference_pairs
from lorajobs.localserver import free_port, http_ok, start_server, stop_server
from tests.client.live import MODEL, alpaca_records
from tests.openai_compat.migration_script import openai_user_script
from tests.webhook_receiver import Receiver

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

# Our defaults behind "auto": 2 epochs of batch 8 x 2 accumulation = 16 examples a step, one
# checkpoint an epoch. The SFT job's second epoch is the window the script pauses in.
CHAT_EXAMPLES = 320
PAIRS = 32
EXAMPLES_PER_STEP = 16
SFT_STEPS = 2 * math.ceil(CHAT_EXAMPLES / EXAMPLES_PER_STEP)
DPO_STEPS = 2 * math.ceil(PAIRS / EXAMPLES_PER_STEP)
THIRD_STEPS = math.ceil(CHAT_EXAMPLES / EXAMPLES_PER_STEP)  # n_epochs 1
CSV_HEADER = ["step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy"]


@dataclass
class Served:
    url: str
    key: str
    data: Path


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Served]:
    """`lorajobs serve` on a fresh data dir (real trainer), the tiny model registered."""
    root = tmp_path_factory.mktemp("migration")
    data = root / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAJOBS_")}
    env.update({"LORAJOBS_DATA_DIR": str(data), "LORAJOBS_TRAINER_THREADS": "1",
                "LORAJOBS_WORKER_POLL_SECONDS": "0.1", "LORAJOBS_WEBHOOK_POLL_SECONDS": "0.2",
                "LORAJOBS_WEBHOOK_ALLOW_PRIVATE_ADDRESSES": "true",  # the receiver: loopback
                "LORAJOBS_WEBHOOK_ALLOW_HTTP": "true"})
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server([sys.executable, "-m", "lorajobs", "serve", "--port", str(port)],
                        ready=lambda: http_ok(f"{url}/readyz"), timeout=90, env=env,
                        log=root / "serve.log")
    try:
        key = (data / "admin_key").read_text().strip()
        shutil.copytree(tiny_model_dir, data / "models" / MODEL)
        r = httpx.post(f"{url}/v1/models", json={"name": MODEL, "path": MODEL}, timeout=30,
                       headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 201, r.text
        yield Served(url, key, data)
    finally:
        stop_server(proc)
    print((root / "serve.log").read_text()[-3000:])


def _write_data(directory: Path) -> None:
    chat = [{"messages": [{"role": "system", "content": "You reverse words."},
                          {"role": "user", "content": r["input"]},
                          {"role": "assistant", "content": r["output"]}]}
            for r in alpaca_records(CHAT_EXAMPLES, seed=4)]
    (directory / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in chat))
    (directory / "preferences.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in make_preference_pairs(PAIRS, seed=4)))


def _csv_steps(text: str) -> list[int]:
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0] == CSV_HEADER
    for row in rows[1:]:
        assert len(row) == len(CSV_HEADER) and math.isfinite(float(row[1])), row
    return [int(row[0]) for row in rows[1:]]


def test_an_openai_script_runs_unchanged(served: Served, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    _write_data(tmp_path)
    monkeypatch.chdir(tmp_path)
    receiver = Receiver().start()
    try:
        # The whole diff from OpenAI: base_url, api_key (and the model names below).
        with OpenAI(base_url=f"{served.url}/openai/v1", api_key=served.key) as client:
            out = openai_user_script(client, {"sft": MODEL, "dpo": MODEL}, receiver)
            # every event the script streamed, in order: the full list, oldest first
            full = {job_id: list(reversed(list(client.fine_tuning.jobs.list_events(
                job_id, limit=100)))) for job_id in out["events"]}
        _check(out, full, receiver, served)
    finally:
        receiver.stop()


def _check(out: dict[str, Any], full: dict[str, list[Any]], receiver: Receiver,
           served: Served) -> None:
    sft, dpo, third = out["created"]
    sft_done, dpo_done, third_done = out["done"]
    chat, prefs = out["files"]
    assert chat.status == prefs.status == "processed" and out["hook"].signing_secret

    # "auto" resolved and reported
    hp = sft.method.supervised.hyperparameters
    assert (sft.method.type, hp.n_epochs, hp.batch_size) == ("supervised", 2, 8)
    assert hp.learning_rate_multiplier == pytest.approx(1.0)
    dhp = dpo.method.dpo.hyperparameters
    assert dpo.method.type == "dpo" and dhp.beta == pytest.approx(0.1) and dhp.n_epochs == 2

    # pause, resume, cancel
    assert out["pausing"].status in ("pausing", "paused")
    assert out["paused"].status == "paused" and out["paused"].fine_tuned_model is None
    assert out["resumed"].status in ("queued", "running")
    assert out["cancelled"].status == "cancelled"

    for job, done, suffix in ((sft, sft_done, "support"), (dpo, dpo_done, "prefs"),
                              (third, third_done, "continued")):
        assert done.status == "succeeded", done.error
        assert done.fine_tuned_model == f"ft:{MODEL}:{suffix}:{job.id}"
        assert done.trained_tokens and done.trained_tokens > 0
        assert done.metadata == {"project": "migration"}
    assert sft_done.seed == 7

    # checkpoints: the pause's and one an epoch, named so a new job can build on them
    steps = sorted(c.step_number for c in out["checkpoints"])
    paused_at = [s for s in steps if s not in (SFT_STEPS // 2, SFT_STEPS)]
    assert SFT_STEPS // 2 in steps and len(paused_at) == 1, steps
    assert SFT_STEPS // 2 < paused_at[0] < SFT_STEPS, steps  # paused after the 1st checkpoint
    for c in out["checkpoints"]:
        assert c.fine_tuned_model_checkpoint == \
            f"ft:{MODEL}:support:{sft.id}:ckpt-step-{c.step_number}"
        assert c.metrics.step == c.step_number and math.isfinite(c.metrics.train_loss)
    earliest = f"ft:{MODEL}:support:{sft.id}:ckpt-step-{steps[0]}"
    assert third.model == third_done.model == earliest  # as created, like OpenAI
    native = httpx.get(f"{served.url}/v1/jobs/{third.id}", timeout=30,
                       headers={"Authorization": f"Bearer {served.key}"}).json()
    assert native["spec"]["init_from"] == {"job": sft.id, "step": steps[0], "model": earliest}
    assert native["spec"]["base_model"] == MODEL

    # events: what the script streamed is every event, in order, each once
    for job_id, streamed in out["events"].items():
        assert [e.id for e in streamed] == [e.id for e in full[job_id]], job_id
        assert [e.created_at for e in streamed] == sorted(e.created_at for e in streamed)
    statuses = [e.data["to"] for e in out["events"][sft.id] if "to" in (e.data or {})]
    assert statuses == ["running", "paused", "queued", "running", "succeeded"], statuses

    # result files: OpenAI's CSV, one row a step (the resumed run's steps once each)
    results = out["results"]
    assert _csv_steps(results[sft.id]) == list(range(1, SFT_STEPS + 1))
    assert _csv_steps(results[dpo.id]) == list(range(1, DPO_STEPS + 1))
    assert _csv_steps(results[third.id]) == list(range(1, THIRD_STEPS + 1))

    # webhooks: each verified by unwrap; one webhook-id per outcome, each processed once
    assert receiver.received and all(r.verified for r in receiver.received)
    for r in receiver.received:
        receiver.process(r)
    by_id = {r.headers.get("webhook-id") or r.headers.get("Webhook-Id"):
             (r.event.type, r.event.data.id) for r in receiver.received}
    assert sorted(by_id.values()) == sorted(
        [("fine_tuning.job.cancelled", out["cancelled"].id)]
        + [("fine_tuning.job.succeeded", j.id) for j in (sft, dpo, third)])
    assert set(receiver.processed.values()) == {1}

    listed = {j.id for j in out["listed"]}
    assert listed == {sft.id, dpo.id, third.id, out["cancelled"].id}
