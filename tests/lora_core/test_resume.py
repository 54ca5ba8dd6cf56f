"""Resume: 20 steps straight == 10 steps, stop, resume, 10 more (same final adapter)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

STEPS = 20
HALF = 10


def _spec(model_dir: Path, train_file: Path, out: Path):
    from lora_core.spec import RunSpec

    return RunSpec(
        model_dir=model_dir, train_file=train_file, output_dir=out,
        lora={"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]},
        training={"max_steps": STEPS, "batch_size": 4, "gradient_accumulation_steps": 1,
                  "learning_rate": 3e-3, "lr_scheduler": "linear", "save_steps": HALF,
                  "max_seq_length": 128, "seed": 7},
        merge="none",
    )


@pytest.fixture(scope="module")
def train_file(tmp_path_factory) -> Path:
    from lora_core.data.synthetic import make_examples

    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    # 24 examples / batch 4 = 6 steps per epoch: the resume point falls mid-epoch (step 10)
    path.write_text("".join(json.dumps(r) + "\n" for r in make_examples(24, seed=1)))
    return path


def _stop_after(n: int):
    calls = {"n": 0}

    def should_stop() -> bool:
        calls["n"] += 1
        return calls["n"] >= n

    return should_stop


def test_stop_then_resume_matches_straight_run(tiny_model_dir, train_file, tmp_path):
    from lora_core.training.trainer import train

    straight = train(_spec(tiny_model_dir, train_file, tmp_path / "a"))
    assert straight.status == "completed" and straight.global_step == STEPS

    events: list[tuple[str, dict]] = []
    first = train(_spec(tiny_model_dir, train_file, tmp_path / "b"), should_stop=_stop_after(HALF),
                  on_event=lambda t, **f: events.append((t, f)))
    assert first.status == "stopped" and first.global_step == HALF
    assert [c["step"] for c in first.checkpoints] == [HALF]
    assert ("checkpoint", HALF) in [(t, f.get("step")) for t, f in events]

    # a save killed half-way leaves a dir without COMPLETE: it must be ignored and removed
    broken = tmp_path / "b" / "checkpoints" / "checkpoint-15"
    shutil.copytree(first.checkpoints[0]["path"], broken)
    (broken / "COMPLETE").unlink()
    (broken / "optimizer.pt").write_bytes(b"truncated")

    events.clear()
    second = train(_spec(tiny_model_dir, train_file, tmp_path / "b"),
                   on_event=lambda t, **f: events.append((t, f)))
    assert second.status == "completed" and second.resumed_from_step == HALF
    started = next(f for t, f in events if t == "started")
    assert started["resumed_from_step"] == HALF
    assert [f["step"] for t, f in events if t == "progress"][0] == HALF + 1

    a = load_file(straight.adapter_path / "adapter_model.safetensors")
    b = load_file(second.adapter_path / "adapter_model.safetensors")
    assert a.keys() == b.keys() and a
    for k in a:
        assert a[k].abs().sum() > 0 or "lora_B" not in k
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
