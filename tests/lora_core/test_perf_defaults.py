"""Speed defaults: precision "auto" on CPU follows native bf16; packing runs under bf16 on CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def test_auto_precision_follows_native_bf16(monkeypatch):
    import torch

    from lora_core.training import trainer as lc

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(lc, "cpu_has_native_bf16", lambda: True)
    assert lc.resolve_precision("auto") == "bf16"
    monkeypatch.setattr(lc, "cpu_has_native_bf16", lambda: False)
    assert lc.resolve_precision("auto") == "fp32"
    assert lc.resolve_precision("fp32") == "fp32"


def _bf16_spec(model_dir, tmp_path, monkeypatch, n: int, *, seed: int, max_steps: int,
               **training):
    """A bf16 run of `n` synthetic examples on the tiny model, LoRA r=4 on q/v."""
    from lora_core.data.cache import CACHE_ENV
    from lora_core.data.synthetic import make_examples
    from lora_core.spec import RunSpec

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_examples(n, seed=seed)))
    return RunSpec(model_dir=model_dir, train_file=data, output_dir=Path(tmp_path / "out"),
                   lora={"r": 4, "target_modules": ["q_proj", "v_proj"]},
                   training={"max_steps": max_steps, "batch_size": 4,
                             "gradient_accumulation_steps": 1, "max_seq_length": 256,
                             "precision": "bf16", **training},
                   merge="none")


@pytest.mark.slow
def test_packing_with_bf16_on_cpu_trains(tiny_model_dir, tmp_path, monkeypatch):
    """Padding-free batches + per-example attention train under bf16 autocast on CPU, with the
    frozen weights stored in bf16 (the speed defaults together)."""
    from lora_core.training.trainer import train

    result = train(_bf16_spec(tiny_model_dir, tmp_path, monkeypatch, 16, seed=3, max_steps=2,
                              packing=True))
    assert result.status == "completed" and result.metrics["train_loss"] < 20


@pytest.mark.slow
def test_labelled_only_loss_runs_under_trainer_autocast(tiny_model_dir, tmp_path, monkeypatch):
    """The fast loss bypasses model.forward, where Trainer's bf16 autocast lives: it must set
    autocast itself, or bf16 runs silently train in fp32 (3-4x slower on this CPU)."""
    import torch

    from lora_core.training import loss as loss_mod
    from lora_core.training.trainer import train

    seen: list[bool] = []
    real = loss_mod.labelled_only_loss

    def spy(*args, **kwargs):
        seen.append(torch.is_autocast_enabled("cpu"))
        return real(*args, **kwargs)

    monkeypatch.setattr(loss_mod, "labelled_only_loss", spy)
    train(_bf16_spec(tiny_model_dir, tmp_path, monkeypatch, 8, seed=4, max_steps=1))
    assert seen and all(seen)
