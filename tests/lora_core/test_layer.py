"""LoRALinear, inject_lora and the PEFT-format adapter files: seeded, tiny, against PEFT."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from lora_core.training.lora_layer import (
    GAUSSIAN_INIT_STD,
    LoRALinear,
    inject_lora,
    load_adapter,
    lora_state_dict,
    save_adapter,
)

D_IN, D_OUT, R, ALPHA = 12, 10, 4, 8.0


def _layer(seed: int = 0, **kw) -> LoRALinear:
    torch.manual_seed(seed)
    return LoRALinear(nn.Linear(D_IN, D_OUT), r=R, alpha=ALPHA, **kw)


def _randomise_b(layer: LoRALinear, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_b.weight.copy_(torch.randn(layer.lora_b.weight.shape, generator=g))


def _load_tiny(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def test_zero_init_output_equals_base_exactly():
    layer = _layer()
    x = torch.randn(2, 3, D_IN)
    assert torch.equal(layer(x), layer.base(x))
    assert layer.lora_a.weight.std().item() == pytest.approx(GAUSSIAN_INIT_STD, rel=0.3)
    assert torch.count_nonzero(layer.lora_b.weight) == 0


def test_forward_matches_peft_lora_linear():
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear as PeftLinear

    ours = _layer()
    _randomise_b(ours)
    base = nn.Linear(D_IN, D_OUT)
    base.load_state_dict(ours.base.state_dict())
    config = LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0)
    peft_layer = PeftLinear(base, "default", config=config, r=R, lora_alpha=ALPHA)
    with torch.no_grad():
        peft_layer.lora_A["default"].weight.copy_(ours.lora_a.weight)
        peft_layer.lora_B["default"].weight.copy_(ours.lora_b.weight)
    x = torch.randn(2, 5, D_IN)
    assert_close(ours(x), peft_layer(x))
    assert ours.scaling == peft_layer.scaling["default"] == ALPHA / R


def test_rslora_scaling():
    layer = _layer(use_rslora=True)
    assert layer.scaling == pytest.approx(ALPHA / math.sqrt(R))
    _randomise_b(layer)
    x = torch.randn(3, D_IN)
    lora = x @ layer.lora_a.weight.T @ layer.lora_b.weight.T
    expected = layer.base(x) + ALPHA / math.sqrt(R) * lora
    assert_close(layer(x), expected)


def test_merge_equals_unmerged_and_unmerge_restores():
    layer = _layer()
    _randomise_b(layer)
    original = layer.base.weight.detach().clone()
    x = torch.randn(4, D_IN)
    unmerged = layer(x)
    layer.merge()
    assert layer.merged
    assert_close(layer(x), unmerged, atol=1e-5, rtol=0)  # forward does not add the delta twice
    layer.unmerge()
    assert torch.equal(layer.base.weight, original)
    layer.merge(keep_original=False)
    layer.unmerge()
    assert_close(layer.base.weight, original, atol=1e-6, rtol=0)


def test_bf16_merge_rounds_once():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(D_IN, D_OUT, bias=False).to(torch.bfloat16), r=R, alpha=ALPHA)
    _randomise_b(layer)
    w = layer.base.weight.detach().clone()
    expected = (w.float() + layer.delta_weight()).to(torch.bfloat16)
    layer.merge()
    assert torch.equal(layer.base.weight, expected)


def test_kaiming_init_matches_peft_bounds():
    layer = _layer(init="kaiming")
    bound = 1 / math.sqrt(D_IN)  # kaiming_uniform(a=sqrt(5)) on (r, d_in)
    assert layer.lora_a.weight.abs().max() <= bound


def test_inject_counts_trainable_params_and_freezes(tiny_model_dir):
    model = _load_tiny(tiny_model_dir)
    names = inject_lora(model, ["q_proj", "v_proj"], r=R, alpha=ALPHA)
    assert len(names) == 4 and all(n.endswith(("q_proj", "v_proj")) for n in names)
    expected = 0
    for name in names:
        base = model.get_submodule(name).base
        expected += R * (base.in_features + base.out_features)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == expected


def test_inject_all_linear_skips_lm_head(tiny_model_dir):
    model = _load_tiny(tiny_model_dir)
    names = inject_lora(model, "all-linear", r=2, alpha=2)
    assert len(names) == 2 * 7 and not any(n.endswith("lm_head") for n in names)


def test_saved_adapter_loads_in_peft_with_same_logits(tiny_model_dir, tmp_path):
    from peft import PeftModel

    model = _load_tiny(tiny_model_dir)
    torch.manual_seed(0)
    inject_lora(model, ["q_proj", "v_proj"], r=R, alpha=ALPHA, dropout=0.05)
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            _randomise_b(module, seed=len(name))
    model.eval()
    ids = torch.tensor([[1, 5, 9, 200, 7, 3]])
    ours = model(ids).logits
    save_adapter(model, tmp_path / "adapter", str(tiny_model_dir))

    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == R and config["lora_alpha"] == ALPHA
    peft_model = PeftModel.from_pretrained(_load_tiny(tiny_model_dir), tmp_path / "adapter").eval()
    assert_close(peft_model(ids).logits, ours)
    assert not torch.allclose(ours, _load_tiny(tiny_model_dir)(ids).logits)  # B != 0 matters

    reloaded = _load_tiny(tiny_model_dir)
    load_adapter(reloaded, tmp_path / "adapter")
    assert_close(reloaded.eval()(ids).logits, ours)
    keys = lora_state_dict(reloaded).keys()
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
