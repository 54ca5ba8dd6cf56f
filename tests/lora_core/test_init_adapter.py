"""`RunSpec.init_adapter`: a run starts from an earlier run's adapter weights (jobs built on a
fine-tuned model or checkpoint), and refuses an adapter whose config does not fit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}


def _spec(model_dir: Path, train_file: Path, out: Path, **extra):
    from lora_core.spec import RunSpec

    return RunSpec(model_dir=model_dir, train_file=train_file, output_dir=out, lora=LORA,
                   training={"max_steps": 6, "batch_size": 4, "gradient_accumulation_steps": 1,
                             "learning_rate": 1e-2, "max_seq_length": 128, "seed": 7},
                   merge="none", **extra)


@pytest.fixture(scope="module")
def train_file(tmp_path_factory) -> Path:
    from lora_core.data.synthetic import make_examples

    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in make_examples(24, seed=2)))
    return path


@pytest.fixture(scope="module")
def first(tiny_model_dir, train_file, tmp_path_factory):
    from lora_core.training.trainer import train

    losses: list[float] = []
    result = train(_spec(tiny_model_dir, train_file, tmp_path_factory.mktemp("first")),
                   on_event=lambda t, **f: losses.append(f["loss"])
                   if t == "progress" and f.get("loss") is not None else None)
    assert result.status == "completed"
    return result.adapter_path, losses


def test_the_adapter_starts_from_the_given_weights(tiny_model_dir, first) -> None:
    from peft import get_peft_model_state_dict

    from lora_core.spec import LoraSpec
    from lora_core.training.peft_setup import apply_lora, load_base_model

    adapter, _ = first
    model = apply_lora(load_base_model(tiny_model_dir, "float32"), LoraSpec(**LORA),
                       tiny_model_dir, init_adapter=adapter)
    loaded = get_peft_model_state_dict(model)
    saved = load_file(adapter / "adapter_model.safetensors")
    assert loaded.keys() == saved.keys() and saved
    for key, tensor in saved.items():
        torch.testing.assert_close(loaded[key], tensor, rtol=0, atol=0)
    assert any(t.abs().sum() > 0 for k, t in saved.items() if "lora_B" in k)  # trained


def test_training_continues_from_the_adapter(tiny_model_dir, train_file, first,
                                             tmp_path) -> None:
    from lora_core.training.trainer import train

    adapter, first_losses = first
    losses: list[float] = []
    result = train(_spec(tiny_model_dir, train_file, tmp_path / "next", init_adapter=adapter),
                   on_event=lambda t, **f: losses.append(f["loss"])
                   if t == "progress" and f.get("loss") is not None else None)
    assert result.status == "completed"
    # the same first batch (same seed, same order): lower loss than the fresh start had
    assert losses[0] < first_losses[0] - 0.05, (losses[:3], first_losses[:3])


def test_an_adapter_of_another_shape_is_refused(tiny_model_dir, first) -> None:
    from lora_core.errors import SpecError
    from lora_core.spec import LoraSpec
    from lora_core.training.peft_setup import apply_lora, load_base_model

    adapter, _ = first
    with pytest.raises(SpecError) as info:
        apply_lora(load_base_model(tiny_model_dir, "float32"), LoraSpec(**{**LORA, "r": 8}),
                   tiny_model_dir, init_adapter=adapter)
    assert info.value.param == "lora.r" and "init adapter has 4" in info.value.message
