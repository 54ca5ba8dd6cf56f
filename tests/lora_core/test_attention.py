"""Padding-free attention: a flattened batch is exactly its examples run alone (tiny, seeded)."""

from __future__ import annotations

import pytest
import torch

IGNORE = -100


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _features(tokenizer, n=6):
    from lora_core.data.formats import normalize_record
    from lora_core.data.synthetic import make_examples
    from lora_core.data.tokenize import tokenize_examples

    records = [normalize_record(r, "alpaca") for r in make_examples(n, seed=5)]
    records.append({"text": "the quick brown fox"})
    return tokenize_examples(records, tokenizer, 128)[0]


def _lora_model(model_dir):
    from lora_core.spec import LoraSpec
    from lora_core.training.peft_setup import apply_lora, load_base_model

    torch.manual_seed(0)
    model = load_base_model(model_dir, dtype="float32")
    model = apply_lora(model, LoraSpec(r=4, dropout=0.0, target_modules=["q_proj", "v_proj"]),
                       model_dir)
    for name, p in model.named_parameters():  # B != 0, so the adapter changes the output
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    return model


def _per_example_losses(logits, labels, bounds):
    token = torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:],
                                              ignore_index=IGNORE, reduction="none")
    token = torch.cat([token, token.new_zeros(1)])  # position t predicts t+1
    return torch.stack([token[s:e].sum() for s, e in zip(bounds, bounds[1:], strict=False)])


def _alone(model, feats):
    from lora_core.data.collate import PaddingCollator

    pad = PaddingCollator(0)
    out = []
    for f in feats:
        b = pad([f])
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        out.append(torch.nn.functional.cross_entropy(
            logits[0, :-1], b["labels"][0, 1:], ignore_index=IGNORE, reduction="sum"))
    return torch.stack(out)


def test_flattened_batch_equals_examples_alone_loss_and_gradients(tiny_model_dir, tokenizer):
    """Per-example loss and LoRA gradients of one flattened row == each example alone (fp32),
    with GQA (the tiny model has 4 query and 2 key/value heads)."""
    from lora_core.data.collate import FlatteningCollator
    from lora_core.training.attention import VARLEN_ATTENTION, use_varlen_attention

    feats = _features(tokenizer)
    model = _lora_model(tiny_model_dir)
    alone = _alone(model, feats)
    alone.sum().backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()

    assert use_varlen_attention(model) == VARLEN_ATTENTION
    batch = FlatteningCollator()(feats)
    bounds = batch["cu_seq_lens_q"].tolist()
    assert batch["input_ids"].shape == (1, sum(len(f["input_ids"]) for f in feats))
    assert bounds[-1] == batch["input_ids"].shape[1] and len(bounds) == len(feats) + 1
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    got = _per_example_losses(logits, batch["labels"], bounds)
    torch.testing.assert_close(got, alone, rtol=1e-5, atol=1e-4)
    got.sum().backward()
    for name, grad in want.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad,
                                   rtol=1e-4, atol=1e-6, msg=name)


def test_without_boundaries_examples_would_see_each_other(tiny_model_dir, tokenizer):
    """The boundaries matter: the same row as one sequence gives other losses (so the test
    above can fail), while the first example, which sees nothing before it, is unchanged."""
    from lora_core.data.collate import FlatteningCollator
    from lora_core.training.attention import use_varlen_attention

    feats = _features(tokenizer)
    model = _lora_model(tiny_model_dir).eval()
    use_varlen_attention(model)
    batch = FlatteningCollator()(feats)
    bounds = batch["cu_seq_lens_q"].tolist()
    with torch.no_grad():
        right = _per_example_losses(model(input_ids=batch["input_ids"],
                                          position_ids=batch["position_ids"],
                                          cu_seq_lens_q=batch["cu_seq_lens_q"]).logits,
                                    batch["labels"], bounds)
        leaky = _per_example_losses(model(input_ids=batch["input_ids"],
                                          position_ids=batch["position_ids"]).logits,
                                    batch["labels"], bounds)
    torch.testing.assert_close(leaky[0], right[0])
    assert (leaky[1:] - right[1:]).abs().max() > 1e-3


def test_flattening_collator_masks_each_first_label_and_counts(tokenizer):
    from lora_core.data.collate import FlatteningCollator

    feats = _features(tokenizer)
    collate = FlatteningCollator()
    batch = collate(feats)
    starts = batch["cu_seq_lens_q"][:-1].long()
    assert (batch["labels"][0, starts] == IGNORE).all()
    assert (batch["position_ids"][0, starts] == 0).all()
    assert batch["max_length_q"] == max(len(f["input_ids"]) for f in feats)
    assert collate.label_tokens == int((batch["labels"] != IGNORE).sum())
    alone = sum(sum(x != IGNORE for x in f["labels"][1:]) for f in feats)
    assert collate.label_tokens == alone


def test_frozen_bf16_weights_are_bit_identical_under_autocast(tiny_model_dir, tokenizer):
    """Storing frozen Linear weights in bf16 changes nothing under bf16 autocast (the same cast,
    done once) and leaves LoRA weights, norms and embeddings in fp32."""
    from lora_core.data.collate import PaddingCollator
    from lora_core.training.trainer import freeze_linear_weights_in_bf16

    batch = PaddingCollator(0)(_features(tokenizer))
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    model = _lora_model(tiny_model_dir).eval()
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        before = model(**inputs).logits
        assert freeze_linear_weights_in_bf16(model) > 0
        after = model(**inputs).logits
    assert torch.equal(before, after)
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert all(d == torch.float32 for n, d in dtypes.items() if "lora_" in n or "norm" in n
               or "embed_tokens" in n)
    assert dtypes["base_model.model.model.layers.0.self_attn.k_proj.weight"] == torch.bfloat16


def test_tied_head_stays_fp32(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from lora_core.training.trainer import freeze_linear_weights_in_bf16

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2,
                                         num_key_value_heads=2, tie_word_embeddings=True))
    model.requires_grad_(False)
    freeze_linear_weights_in_bf16(model)
    assert model.lm_head.weight.dtype == torch.float32
    assert model.model.embed_tokens.weight.dtype == torch.float32
    assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16


def _reference_varlen_attn(calls):
    """torch.nn.attention.varlen.varlen_attn's documented contract, on CPU: (T, H, D) q/k/v,
    int32 boundaries, causal when window_size == (-1, 0); one SDPA per sequence."""
    def varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1),
                    enable_gqa=False, **_):
        calls.append(1)
        assert q.dim() == k.dim() == v.dim() == 3 and q.shape[0] == k.shape[0]
        assert cu_q.dtype == torch.int32 and cu_q.device == q.device and cu_k is cu_q
        assert window_size == (-1, 0) and max_q == max_k == int(torch.diff(cu_q).max())
        bounds = cu_q.tolist()
        return torch.cat([
            torch.nn.functional.scaled_dot_product_attention(
                q[s:e].transpose(0, 1), k[s:e].transpose(0, 1), v[s:e].transpose(0, 1),
                is_causal=True, scale=scale, enable_gqa=enable_gqa).transpose(0, 1)
            for s, e in zip(bounds, bounds[1:], strict=False)])
    return varlen_attn


def _attend(seed=0):
    from lora_core.training import attention

    g = torch.Generator().manual_seed(seed)
    lengths = [5, 1, 9, 3]
    q, k, v = (torch.randn(1, h, sum(lengths), 8, generator=g, requires_grad=True)
               for h in (4, 2, 2))  # GQA 2:1
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int64)
    out, _ = attention.varlen_attention_forward(None, q, k, v, None, scaling=0.3,
                                                cu_seq_lens_q=cu)
    out.pow(2).sum().backward()
    return out.detach(), [t.grad for t in (q, k, v)]


@pytest.fixture
def fake_cuda_kernel(monkeypatch):
    """The CUDA branch taken on CPU: the device check passes and varlen_attn is the reference."""
    import torch.nn.attention.varlen as varlen

    from lora_core.training import attention

    calls: list[int] = []
    monkeypatch.setattr(attention, "_can_use_varlen_kernel",
                        lambda q, d: attention._kernel_refused is None)
    monkeypatch.setattr(attention, "_kernel_refused", None)
    monkeypatch.setattr(varlen, "varlen_attn", _reference_varlen_attn(calls))
    return calls


def test_cuda_varlen_kernel_path_matches_per_example_calls(fake_cuda_kernel):
    expected, expected_grads = _attend()  # through the (reference) kernel
    assert fake_cuda_kernel == [1]  # one call for the whole row
    from lora_core.training import attention

    attention.CUDA_VARLEN = False
    try:
        per_example, grads = _attend()
    finally:
        attention.CUDA_VARLEN = True
    assert per_example.shape == expected.shape == (1, 18, 4, 8)
    torch.testing.assert_close(expected, per_example, rtol=0, atol=1e-6)
    for a, b in zip(expected_grads, grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_a_refusing_kernel_is_logged_once_and_attention_goes_per_example(
        fake_cuda_kernel, monkeypatch, caplog):
    import torch.nn.attention.varlen as varlen

    from lora_core.training import attention

    refusals: list[int] = []

    def refuse(*args, **kwargs):
        refusals.append(1)
        raise RuntimeError("FlashAttention only supports Ampere GPUs or newer")

    attention.CUDA_VARLEN = False
    try:
        reference, _ = _attend()
    finally:
        attention.CUDA_VARLEN = True
    monkeypatch.setattr(varlen, "varlen_attn", refuse)
    with caplog.at_level("WARNING", logger=attention.__name__):
        first, _ = _attend()
        second, _ = _attend()
    assert refusals == [1]  # tried once; the second call went straight to per-example SDPA
    assert "Ampere" in attention._kernel_refused
    assert sum("refused" in r.getMessage() for r in caplog.records) == 1
    torch.testing.assert_close(first, reference, rtol=0, atol=1e-6)  # CPU SDPA: run-to-run
    torch.testing.assert_close(second, reference, rtol=0, atol=1e-6)  # noise ~2e-7
