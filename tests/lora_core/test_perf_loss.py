"""Labelled-only head + fused chunked cross-entropy == the model's own loss and gradients."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def peft_model(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8,
                                             lora_dropout=0.0, target_modules=["q_proj"]))
    for name, p in model.named_parameters():  # B != 0 so LoRA gradients are informative
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    return model


def _batch(vocab: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, vocab, (3, 40), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 30:] = 0  # a padded row
    labels = ids.clone()
    labels[:, :12] = -100  # the prompt
    labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _loss_and_grads(model, fn) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    loss = fn()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                           if p.requires_grad}


@pytest.mark.parametrize("num_items", [None, 50])
def test_labelled_only_loss_equals_full_loss_fp32(peft_model, num_items):
    from lora_core.loss import labelled_only_loss, supports_labelled_only

    assert supports_labelled_only(peft_model)
    batch = _batch(peft_model.config.vocab_size)
    kw = {} if num_items is None else {"num_items_in_batch": num_items}
    ref, ref_g = _loss_and_grads(peft_model, lambda: peft_model(**batch, **kw).loss)
    got, got_g = _loss_and_grads(peft_model, lambda: labelled_only_loss(peft_model, batch,
                                                                         num_items))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    for name in ref_g:
        torch.testing.assert_close(got_g[name], ref_g[name], rtol=1e-4, atol=1e-7)


def test_fused_head_matches_plain_cross_entropy_across_chunks(monkeypatch):
    from lora_core import loss as loss_mod

    monkeypatch.setattr(loss_mod, "HEAD_CHUNK", 7)  # several chunks and a ragged last one
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(30, 16, generator=g, requires_grad=True)
    weight = torch.randn(50, 16, generator=g)
    targets = torch.randint(0, 50, (30,), generator=g)
    got = loss_mod.FusedHeadCrossEntropy.apply(hidden, weight, targets, torch.float32)
    (grad,) = torch.autograd.grad(got * 0.5, hidden)
    h2 = hidden.detach().clone().requires_grad_()
    ref = torch.nn.functional.cross_entropy(h2 @ weight.T, targets, reduction="sum")
    (ref * 0.5).backward()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, h2.grad, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_close_to_model_loss(peft_model):
    from lora_core.loss import labelled_only_loss

    batch = _batch(peft_model.config.vocab_size)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref = peft_model(**batch).loss
        got = labelled_only_loss(peft_model, batch)
    torch.testing.assert_close(got, ref.float(), rtol=1e-2, atol=1e-2)


def test_unsupported_architecture_is_refused():
    from lora_core.loss import supports_labelled_only

    class Config:
        model_type = "gemma2"

    class Fake(torch.nn.Module):
        config = Config()

    assert not supports_labelled_only(Fake())


def test_trainable_head_uses_the_models_own_forward(tiny_model_dir):
    """LoRA on lm_head falls back to model(**batch).loss (see supports_labelled_only)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lora_core.loss import supports_labelled_only

    def peft(targets: list[str]):  # type: ignore[no-untyped-def]
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        return get_peft_model(base, LoraConfig(task_type="CAUSAL_LM", r=4,
                                               target_modules=targets))

    assert supports_labelled_only(peft(["q_proj", "v_proj"]))
    assert not supports_labelled_only(peft(["q_proj", "lm_head"]))
