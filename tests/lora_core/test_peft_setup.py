"""lora_core.training.peft_setup: validation before loading, safetensors-only, documented init."""

from __future__ import annotations

import shutil

import pytest
import torch

from lora_core.errors import ModelError, SpecError
from lora_core.spec import LoraSpec
from lora_core.training.peft_setup import apply_lora, build_lora_config, load_base_model


def test_default_targets_are_q_and_v(tiny_model_dir):
    config = build_lora_config(LoraSpec(r=4, alpha=8, dropout=0.0), tiny_model_dir)
    assert sorted(config.target_modules) == ["q_proj", "v_proj"]
    assert config.r == 4 and config.lora_alpha == 8 and config.task_type == "CAUSAL_LM"


def test_all_linear_resolves_to_every_linear_but_lm_head(tiny_model_dir):
    config = build_lora_config(LoraSpec(target_modules="all-linear"), tiny_model_dir)
    assert sorted(config.target_modules) == [
        "down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj",
    ]  # fmt: skip


def test_unknown_target_names_it_and_lists_available(tiny_model_dir):
    with pytest.raises(SpecError) as exc:
        build_lora_config(LoraSpec(target_modules=["q_proj", "query"]), tiny_model_dir)
    assert exc.value.param == "lora.target_modules"
    assert "'query'" in exc.value.message and "k_proj" in exc.value.message


def test_pickle_only_dir_is_refused(tmp_path, tiny_model_dir):
    d = tmp_path / "pickle-only"
    d.mkdir()
    shutil.copy(tiny_model_dir / "config.json", d)
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(ModelError, match="refusing to load pickle weights"):
        load_base_model(d)
    with pytest.raises(ModelError, match="refusing to load pickle weights"):
        build_lora_config(LoraSpec(), d)


def test_apply_lora_trainable_params_and_gaussian_init(tiny_model_dir):
    torch.manual_seed(0)
    model = load_base_model(tiny_model_dir, "float32")
    ids = torch.tensor([[1, 2, 3, 4]])
    base_logits = model(ids).logits
    peft_model = apply_lora(model, LoraSpec(r=8, alpha=16, dropout=0.0), tiny_model_dir)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    # 2 layers x (q: 64->64, v: 64->32): r * (d_in + d_out) each
    assert trainable == 2 * 8 * ((64 + 64) + (64 + 32))
    a = torch.cat([p.flatten() for n, p in peft_model.named_parameters() if "lora_A" in n])
    assert a.std().item() == pytest.approx(0.02, rel=0.15)  # ours, not PEFT's 1/r = 0.125
    torch.testing.assert_close(peft_model(ids).logits, base_logits, rtol=0, atol=0)


def test_load_base_model_dtype(tiny_model_dir):
    assert load_base_model(tiny_model_dir, "bf16").dtype == torch.bfloat16
    assert load_base_model(tiny_model_dir).dtype == torch.float32
