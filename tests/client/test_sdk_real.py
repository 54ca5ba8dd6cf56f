"""The SDK through a whole job with the real trainer (`python -m lora_core run`, tiny model):
upload, create, wait with progress, metrics, and a downloaded adapter that PEFT's format
readers accept, byte-identical to what the server hashed."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from lorajobs.client import Client, Job
from tests.client.live import MODEL, REAL_TRAINING, Live, alpaca_records, write_jsonl

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def test_real_job_through_the_sdk(live_real: Live, tmp_path: Path) -> None:
    from safetensors.numpy import load_file

    seen: list[Job] = []
    with Client(live_real.url, live_real.key) as client:
        ds = client.datasets.upload(write_jsonl(tmp_path / "train.jsonl", alpaca_records(32)))
        assert ds.num_examples == 32 and ds.format == "alpaca"
        job = client.jobs.create({"base_model": MODEL, "training_file": ds.id,
                                  "lora": {"r": 8, "alpha": 16}, "training": REAL_TRAINING,
                                  "merge": "none"})
        job = client.jobs.wait(job.id, on_progress=seen.append, poll_interval=0.3,
                               timeout=180)
        assert job.status == "succeeded", (job.error, live_real.svc.log("worker")[-2000:])
        assert {"queued", "running"} & {j.status for j in seen[:-1]}
        rows = client.jobs.metrics(job.id)
        assert [r.step for r in rows] == [1, 2, 3, 4]
        assert all(r.train_loss is not None and math.isfinite(r.train_loss) for r in rows)
        files = client.jobs.download(job.id, tmp_path / "adapter")
    names = {p.name for p in files}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= names
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 16
    tensors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert any("lora_A" in k for k in tensors) and any("lora_B" in k for k in tensors)
    # B starts at zero in LoRA; after 4 steps at lr 1e-3 it has moved: the weights trained.
    assert any(abs(v).max() > 0 for k, v in tensors.items() if "lora_B" in k)
