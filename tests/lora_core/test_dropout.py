"""BitsDropout: nn.Dropout's semantics from 16-bit draws (tiny, seeded)."""

from __future__ import annotations

import pytest
import torch

from lora_core.training.dropout import BitsDropout, use_bits_dropout


def test_drop_rate_scale_and_expectation():
    torch.manual_seed(0)
    drop = BitsDropout(0.05).train()
    x = torch.ones(400, 1000)
    y = drop(x)
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - 0.05) < 0.002  # 400k draws: 3 sigma ~ 0.001
    survivors = y[y != 0]
    torch.testing.assert_close(survivors, torch.full_like(survivors, drop.scale))
    assert drop.scale == pytest.approx(1 / (1 - 3277 / 65536))
    assert abs(y.mean().item() - 1.0) < 0.003


def test_masks_are_seeded_independent_and_odd_sizes_work():
    drop = BitsDropout(0.5).train()
    x = torch.ones(3, 7)  # 21 elements: not a multiple of 4
    torch.manual_seed(1)
    a = drop(x)
    b = drop(x)
    torch.manual_seed(1)
    assert torch.equal(drop(x), a)
    assert not torch.equal(a, b)
    assert a.shape == x.shape


def test_gradient_flows_through_survivors_only():
    torch.manual_seed(2)
    drop = BitsDropout(0.3).train()
    x = torch.randn(64, 32, requires_grad=True)
    y = drop(x)
    y.sum().backward()
    kept = y != 0
    torch.testing.assert_close(x.grad[kept], torch.full_like(x.grad[kept], drop.scale))
    assert (x.grad[~kept] == 0).all()


def test_eval_and_p0_are_identity():
    x = torch.randn(5, 5)
    assert torch.equal(BitsDropout(0.2).eval()(x), x)
    assert torch.equal(BitsDropout(0.0).train()(x), x)
    with pytest.raises(ValueError):
        BitsDropout(1.0)


def test_swaps_only_lora_branch_dropouts(tiny_model_dir):
    from lora_core.spec import LoraSpec
    from lora_core.training.peft_setup import apply_lora, load_base_model

    model = apply_lora(load_base_model(tiny_model_dir, dtype="float32"),
                       LoraSpec(r=4, dropout=0.1, target_modules=["q_proj", "v_proj"]),
                       tiny_model_dir)
    assert use_bits_dropout(model) == 2 * model.config.num_hidden_layers
    kinds = {type(m).__name__ for m in model.modules() if "Dropout" in type(m).__name__}
    assert kinds == {"BitsDropout"}
