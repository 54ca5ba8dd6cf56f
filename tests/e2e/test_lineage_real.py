"""A job built on another job's adapter starts from its weights, through the whole service: the
worker fetches the parent's adapter files from the store into `RunSpec.init_adapter` and the
real trainer loads them (tests/lora_core/test_init_adapter.py covers the loading itself).

The child trains with a learning rate of 1e-9: its final adapter must equal the parent's (to
~1e-9 per step), which a fresh init (B = 0) could never give."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load

from tests.client.live import Live, alpaca_records, start_live

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]

TRAINING = {"batch_size": 4, "gradient_accumulation_steps": 1, "max_seq_length": 128,
            "seed": 3}


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Live]:
    yield from start_live(tmp_path_factory.mktemp("lineage"), tiny_model_dir, trainer=None)


def _adapter(live: Live, job_id: str) -> dict[str, torch.Tensor]:
    r = live.http.get(f"/v1/jobs/{job_id}/adapter")
    assert r.status_code == 200, r.text
    with tarfile.open(fileobj=io.BytesIO(r.content)) as tar:
        member = next(m for m in tar.getmembers()
                      if m.name.endswith("adapter_model.safetensors"))
        data = tar.extractfile(member)
        assert data is not None
        return load(data.read())


def test_a_child_job_starts_from_its_parents_adapter(live: Live) -> None:
    dataset_id = live.upload(alpaca_records(32))
    r = live.http.post("/v1/jobs", json={
        "base_model": "tiny", "training_file": dataset_id, "merge": "none",
        "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "training": {**TRAINING, "max_steps": 6, "learning_rate": 1e-2}})
    assert r.status_code == 201, r.text
    parent_id = r.json()["id"]
    assert live.wait_end(parent_id, timeout=240)["status"] == "succeeded"

    r = live.http.post("/v1/jobs", json={
        "base_model": parent_id, "training_file": dataset_id, "merge": "none",
        "training": {**TRAINING, "max_steps": 2, "learning_rate": 1e-9}})
    assert r.status_code == 201, r.text
    child = r.json()
    assert child["spec"]["lora"]["r"] == 4 and child["spec"]["base_model"] == "tiny"
    done = live.wait_end(child["id"], timeout=240)
    assert done["status"] == "succeeded", done

    parent, grown = _adapter(live, parent_id), _adapter(live, child["id"])
    assert parent.keys() == grown.keys() and parent
    assert any(t.abs().max() > 1e-3 for k, t in parent.items() if "lora_B" in k)  # trained
    for key in parent:
        torch.testing.assert_close(grown[key], parent[key], rtol=0, atol=1e-6)
