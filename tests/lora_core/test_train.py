"""train(): events, checkpoint layout, stop, precision and failures that leave nothing behind."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from lora_core.errors import DatasetError, ModelError, TrainingError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def train_file(tmp_path_factory) -> Path:
    from lora_core.data.synthetic import make_examples

    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in make_examples(40, seed=2)))
    return path


def _spec(model_dir, train_file, out, **training):
    from lora_core.spec import RunSpec

    base = {"max_steps": 4, "batch_size": 4, "gradient_accumulation_steps": 1,
            "learning_rate": 1e-3, "max_seq_length": 128}
    return RunSpec(model_dir=model_dir, train_file=train_file, output_dir=out,
                   lora={"r": 4, "target_modules": ["q_proj", "v_proj"]},
                   training={**base, **training}, merge="none")


def test_events_checkpoints_and_save_total_limit(tiny_model_dir, train_file, tmp_path):
    from lora_core.training.trainer import train

    events: list[tuple[str, dict]] = []
    spec = _spec(tiny_model_dir, train_file, tmp_path / "out", save_steps=1, save_total_limit=2,
                 validation_split=0.1, eval_steps=2)
    result = train(spec, on_event=lambda t, **f: events.append((t, f)))
    types = [t for t, _ in events]
    assert types[0] == "started" and types.count("progress") == 4 and types.count("eval") == 2
    started = events[0][1]
    assert started["total_steps"] == 4 and started["num_examples"] == 36
    progress = [f for t, f in events if t == "progress"]
    assert [p["step"] for p in progress] == [1, 2, 3, 4]
    for key in ("loss", "learning_rate", "grad_norm", "tokens_per_second", "eta_seconds", "epoch"):
        assert progress[-1][key] is not None, key
    assert progress[-1]["tokens_per_second"] > 0
    ckpt_events = [f for t, f in events if t == "checkpoint"]
    assert [c["step"] for c in ckpt_events] == [1, 2, 3, 4] and ckpt_events[0]["resumable"]

    assert result.status == "completed" and [c["step"] for c in result.checkpoints] == [3, 4]
    for c in result.checkpoints:
        for name in ("COMPLETE", "optimizer.pt", "scheduler.pt", "rng_state.pth",
                     "trainer_state.json", "adapter/adapter_config.json",
                     "adapter/adapter_model.safetensors"):
            assert (c["path"] / name).exists(), name
    assert (result.adapter_path / "adapter_model.safetensors").exists()
    assert result.metrics["eval_loss"] is not None and result.metrics["train_loss"] is not None


def test_cooperative_stop_saves_a_checkpoint(tiny_model_dir, train_file, tmp_path):
    from lora_core.training.trainer import train

    result = train(_spec(tiny_model_dir, train_file, tmp_path / "out", max_steps=50),
                   should_stop=lambda: True)
    assert result.status == "stopped" and result.global_step == 1
    assert [c["step"] for c in result.checkpoints] == [1]


def test_a_stop_mid_epoch_saves_once_with_epoch_checkpoints(tiny_model_dir, train_file,
                                                            tmp_path):
    """save_steps unset (once an epoch, every /openai/v1 job): the stop's save is the only one
    at that step; Trainer's end-of-epoch save used to write it again (two checkpoint events for
    one step, whose uploads clobbered each other in the worker)."""
    from lora_core.training.trainer import train

    events: list[tuple[str, dict]] = []
    steps = iter(range(1, 100))
    result = train(_spec(tiny_model_dir, train_file, tmp_path / "out", max_steps=None,
                         epochs=2), should_stop=lambda: next(steps) >= 3,
                   on_event=lambda t, **f: events.append((t, f)))
    assert result.status == "stopped" and result.global_step == 3
    assert [f["step"] for t, f in events if t == "checkpoint"] == [3]


def test_bf16_on_cpu_runs(tiny_model_dir, train_file, tmp_path):
    from lora_core.training.trainer import train

    result = train(_spec(tiny_model_dir, train_file, tmp_path / "out", max_steps=2,
                         precision="bf16"))
    assert result.status == "completed" and result.metrics["train_loss"] < 20


def test_bad_data_fails_before_anything_is_written(tiny_model_dir, tmp_path):
    from lora_core.training.trainer import train

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a"}\n')
    with pytest.raises(DatasetError) as exc:
        train(_spec(tiny_model_dir, bad, tmp_path / "out"))
    assert exc.value.errors[0]["line"] == 2
    assert not (tmp_path / "out").exists()


def test_missing_or_pickle_only_model_is_a_model_error(tiny_model_dir, train_file, tmp_path):
    from lora_core.training.trainer import train

    with pytest.raises(ModelError):
        train(_spec(tmp_path / "nope", train_file, tmp_path / "out"))
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(tiny_model_dir / "config.json", pickled)
    (pickled / "pytorch_model.bin").write_bytes(b"not really")
    with pytest.raises(ModelError):
        train(_spec(pickled, train_file, tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_nan_loss_is_a_training_error_and_leaves_no_output(tiny_model_dir, train_file, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    from lora_core.training.trainer import train

    nan_model = tmp_path / "nan-model"
    shutil.copytree(tiny_model_dir, nan_model)
    weights = load_file(nan_model / "model.safetensors")
    weights["lm_head.weight"][0, 0] = torch.nan
    save_file(weights, nan_model / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(TrainingError, match="loss became nan"):
        train(_spec(nan_model, train_file, tmp_path / "out"))
    assert not (tmp_path / "out").exists()
