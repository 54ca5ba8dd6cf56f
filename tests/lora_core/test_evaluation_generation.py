"""Generation's speed-ups change no token: the reserved KV cache and the single decode thread
give bit-identical logits, and generate() equals plain transformers generate() (the code before
them) token for token on a seeded tiny model set up as the trainer sets it up (LoRA with a
non-zero B, frozen weights in bf16, padding-free attention, bits dropout, train mode)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

PROMPTS = ["Is it a colour or an animal: fox", "red", "a much longer prompt " * 6,
           "Name a colour", "Write three words about the sea and the sky", "b", "hello there",
           "Is it a colour or an animal: teal", "one two three four five six seven"]


def _model(model_dir: Path, *, bf16: bool) -> Any:
    from lora_core.spec import LoraSpec
    from lora_core.training.attention import use_varlen_attention
    from lora_core.training.dropout import use_bits_dropout
    from lora_core.training.peft_setup import apply_lora, load_base_model
    from lora_core.training.trainer import freeze_linear_weights_in_bf16

    torch.manual_seed(0)
    model = apply_lora(load_base_model(model_dir, dtype="float32"),
                       LoraSpec(r=4, dropout=0.1, target_modules=["q_proj", "v_proj", "o_proj"]),
                       model_dir)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B = 0 at init: give the adapter something to say
            p.data.normal_(0, 0.5)
    model.config.use_cache = False
    assert use_varlen_attention(model) is not None
    if bf16:
        assert freeze_linear_weights_in_bf16(model) > 0
    use_bits_dropout(model)
    model.train()
    return model


def _reference(model: Any, tok: Any, prompts: list[str], *, max_new_tokens: int,
               batch_size: int, precision: str) -> list[list[int]]:
    """The generation of lora_core before its speed-ups: transformers' own cache, torch's
    threads; new token ids per prompt."""
    from lora_core.evaluation.generation import (
        _autocast,
        _generation_mode,
        prompt_ids,
    )

    ids = prompt_ids(tok, prompts, 0)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out: list[list[int]] = [[] for _ in ids]
    with torch.no_grad(), _generation_mode(model, True), \
            _autocast(torch.device("cpu"), precision):
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            width = max(len(ids[i]) for i in batch)
            input_ids = torch.full((len(batch), width), tok.pad_token_id)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                input_ids[row, width - len(ids[i]):] = torch.tensor(ids[i])
                mask[row, width - len(ids[i]):] = 1
            gen = model.generate(input_ids=input_ids, attention_mask=mask, do_sample=False,
                                 max_new_tokens=max_new_tokens, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id)
            for row, i in enumerate(batch):
                out[i] = gen[row, width:].tolist()
    return out


def _texts(tok: Any, ids: list[list[int]]) -> list[str]:
    return [tok.decode(t, skip_special_tokens=True).strip() for t in ids]


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_generate_equals_transformers_generate(tiny_model_dir: Path, precision: str) -> None:
    from transformers import AutoTokenizer

    from lora_core.evaluation.generation import generate, generate_ids, prompt_ids

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = _model(tiny_model_dir, bf16=precision == "bf16")
    threads = torch.get_num_threads()
    ref = _reference(model, tok, PROMPTS, max_new_tokens=12, batch_size=4,
                     precision=precision)
    assert len({tuple(r) for r in ref}) > 3  # the model says different things to each
    got = generate(model, tok, PROMPTS, max_new_tokens=12, batch_size=4, precision=precision)
    assert got == _texts(tok, ref)
    assert generate_ids(model, tok, prompt_ids(tok, PROMPTS, 0), max_new_tokens=12,
                        batch_size=4, precision=precision) == got
    assert model.training and torch.get_num_threads() == threads  # both restored


def _decode_logits(model: Any, ids: torch.Tensor, mask: torch.Tensor, steps: int,
                   cache: Any) -> list[torch.Tensor]:
    """Greedy decoding by hand, every step's logits: (batch, vocab) each."""
    logits = []
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True)
        for _ in range(steps):
            step = out.logits[:, -1]
            logits.append(step)
            nxt = step.argmax(-1, keepdim=True)
            mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
            out = model(input_ids=nxt, attention_mask=mask, cache=out.cache, use_cache=True)
    return logits


@pytest.mark.slow
def test_reserved_cache_and_one_thread_give_bit_identical_logits(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer
    from transformers.cache_utils import DynamicCache

    from lora_core.evaluation.generation import _autocast, _generation_mode
    from lora_core.evaluation.kv_cache import ReservedLayer, reserved_cache

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = _model(tiny_model_dir, bf16=True)
    rows = [tok(p)["input_ids"] for p in PROMPTS[:4]]
    width = max(map(len, rows))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    threads = torch.get_num_threads()
    with _generation_mode(model, True), _autocast(torch.device("cpu"), "bf16"):
        plain = _decode_logits(model, ids, mask, 10, DynamicCache())
        small = reserved_cache(model, width + 3)  # grows past its reservation
        assert small is not None and all(isinstance(x, ReservedLayer) for x in small.layers)
        reserved = _decode_logits(model, ids, mask, 10, small)
        torch.set_num_threads(1)
        try:
            one_thread = _decode_logits(model, ids, mask, 10, reserved_cache(model, width + 10))
        finally:
            torch.set_num_threads(threads)
    for a, b, c in zip(plain, reserved, one_thread, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert small.get_seq_length() == width + 10  # the prefill + 10 decode steps


def test_reserved_layer_appends_grows_and_falls_back() -> None:
    from lora_core.evaluation.kv_cache import ReservedLayer

    torch.manual_seed(0)
    layer = ReservedLayer(capacity=4)
    chunks = [torch.randn(2, 3, n, 5) for n in (3, 1, 1, 2)]  # 7 > 4: one growth
    for i, chunk in enumerate(chunks):
        keys, values = layer.update(chunk, -chunk)
        whole = torch.cat(chunks[:i + 1], dim=-2)
        assert torch.equal(keys, whole) and torch.equal(values, -whole)
    assert layer.get_seq_length() == 7
    layer.crop(-2)  # rewriting the cache: a plain DynamicLayer from here on
    keys, _ = layer.update(chunks[0].to(torch.float64), chunks[0].to(torch.float64))
    assert keys.dtype == torch.float64 and keys.shape[-2] == 8  # cat promotes, as before


def test_callback_tokenises_prompts_once() -> None:
    from lora_core.evaluation import callback as cb_module
    from lora_core.evaluation import generation
    from lora_core.evaluation.spec import EvaluationSpec

    calls: list[int] = []

    class Tok:
        pad_token_id = eos_token_id = 0

        def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
            calls.append(1)
            return {"input_ids": [1] * len(text)}

    seen: list[list[list[int]]] = []
    orig = generation.generate_ids
    generation.generate_ids = lambda model, tok, ids, **kw: seen.append(ids) or [""] * len(ids)
    try:
        cb = cb_module.EvaluationCallback(
            EvaluationSpec(), [{"prompt": "abcdef", "reference": "x"}, {"prompt": "ab",
                                                                      "reference": "y"}],
            Tok(), lambda *a, **k: None, precision="fp32", seed=0, root=Path("."),
            max_prompt_tokens=4)
        cb._generate(None, adapter=False)
        cb._generate(None, adapter=True)
    finally:
        generation.generate_ids = orig
    assert len(calls) == 2 and seen[0] is seen[1] and seen[0] == [[1] * 4, [1] * 2]
