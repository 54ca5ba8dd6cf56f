"""Batched generation on the model the trainer holds in memory, adapter on or off.

    outputs = generate(model, tokenizer, prompts, max_new_tokens=32, batch_size=16,
                       precision="bf16", adapter=False)    # the base model's answers
    ids = prompt_ids(tokenizer, prompts, max_prompt_tokens)  # once per run: the callback
    outputs = generate_ids(model, tokenizer, ids, max_new_tokens=32)  # at every checkpoint

- Prompts are tokenised as training tokenised them (special tokens on), sorted by length and
  left-padded per batch (the newest token of every row sits at the last column, so one decode
  step serves the whole batch); outputs come back in the caller's order, decoded without special
  tokens and stripped of surrounding whitespace (a completion's leading space is formatting).
- The model is switched to eval mode (no dropout) and back, to SDPA attention with a KV cache
  and back (the trainer's padding-free attention is causal from position 0 and takes no mask:
  wrong for left-padded rows and for cached decoding), and runs under the training precision
  (bf16/fp16 autocast; on CPU the frozen weights are stored in bf16 and need it).
- `adapter=False` runs inside PEFT's `disable_adapter()`: the base model, without a copy.
- Greedy unless `temperature` > 0; sampling is seeded and runs under a forked RNG, so the
  training run's random stream is the same with and without evaluation.
- Under ZeRO-3 every rank must call this with the same prompts (`synced_gpus`): the partitioned
  weights are gathered layer by layer inside each forward, a collective.

What a decode step costs, and what is done about it (bench/eval_bench.py, bench/README.md):

- The KV cache is written into a buffer sized for the whole generation (kv_cache.py):
  transformers' DynamicCache concatenates, copying every layer's whole cache at every step
  (quadratic; 12-20% of a 32-token generation on the ~20M bench model). Same values, same
  attention calls: the outputs are bit for bit those of the concatenating cache.
- On CPU, generation runs on `CPU_DECODE_THREADS` intra-op threads. A decode step is hundreds
  of ops of microseconds each (a 16-row matmul against a 256-wide layer): splitting them across
  threads gains little, and on a shared CPU every op waits for its slowest thread to be
  scheduled again. 32 prompts x 32 tokens on the ~20M bench model, 2 cores at load 10-19:
  2 threads 57-185 s, 1 thread 8-30 s. The logits are bit for bit the same with 1 or 2 threads
  there and on the tests' tiny model (tested); a large model on a dedicated many-core CPU may
  want more threads (None keeps torch's setting). GPUs are unaffected.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

__all__ = ["generate", "generate_ids", "prompt_ids", "CPU_DECODE_THREADS"]

SDPA = "sdpa"
CPU_DECODE_THREADS = 1  # see the module docstring; None keeps torch's setting


def prompt_ids(tokenizer: Any, prompts: list[str], max_prompt_tokens: int) -> list[list[int]]:
    """Token ids per prompt, keeping the last `max_prompt_tokens` (the end holds the question)."""
    out = []
    for text in prompts:
        ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
        out.append(ids[-max_prompt_tokens:] if max_prompt_tokens > 0 else ids)
    return out


@contextmanager
def _generation_mode(model: Any, adapter: bool) -> Iterator[None]:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    was_training = model.training
    attn = getattr(inner.config, "_attn_implementation", None)
    use_cache = inner.config.use_cache
    switch = attn is not None and attn not in (SDPA, "eager")
    model.eval()
    if switch:
        inner.set_attn_implementation(SDPA)
    inner.config.use_cache = True
    try:
        if not adapter and hasattr(model, "disable_adapter"):
            with model.disable_adapter():
                yield
        else:
            yield
    finally:
        inner.config.use_cache = use_cache
        if switch:
            inner.set_attn_implementation(attn)
        model.train(was_training)


def _autocast(device: Any, precision: str) -> Any:
    import torch

    if precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(device.type, dtype=dtype)
    return nullcontext()


def generate(
    model: Any, tokenizer: Any, prompts: list[str], *, max_new_tokens: int,
    batch_size: int = 16, precision: str = "fp32", adapter: bool = True,
    temperature: float = 0.0, seed: int = 0, max_prompt_tokens: int = 0,
    synced_gpus: bool = False,
) -> list[str]:
    """One output text per prompt, in order; see the module docstring."""
    return generate_ids(model, tokenizer, prompt_ids(tokenizer, prompts, max_prompt_tokens),
                        max_new_tokens=max_new_tokens, batch_size=batch_size,
                        precision=precision, adapter=adapter, temperature=temperature,
                        seed=seed, synced_gpus=synced_gpus)


def generate_ids(
    model: Any, tokenizer: Any, ids: list[list[int]], *, max_new_tokens: int,
    batch_size: int = 16, precision: str = "fp32", adapter: bool = True,
    temperature: float = 0.0, seed: int = 0, synced_gpus: bool = False,
) -> list[str]:
    """`generate` on prompts tokenised once by `prompt_ids` (a run's evaluations reuse them)."""
    import torch

    from lora_core.evaluation.kv_cache import cache_kwargs

    device = next(model.parameters()).device
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    outputs: list[str] = [""] * len(ids)
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad(), \
            _generation_mode(model, adapter), _autocast(device, precision), \
            _cpu_threads(device, CPU_DECODE_THREADS):
        if temperature > 0:
            torch.manual_seed(seed)
        sampling: dict[str, Any] = ({"do_sample": True, "temperature": temperature}
                                    if temperature > 0 else {"do_sample": False})
        for start in range(0, len(order), batch_size):
            batch = order[start:start + batch_size]
            width = max(len(ids[i]) for i in batch)
            input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, i in enumerate(batch):
                input_ids[row, width - len(ids[i]):] = torch.tensor(ids[i])
                mask[row, width - len(ids[i]):] = 1
            out = model.generate(
                input_ids=input_ids.to(device), attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=pad, synced_gpus=synced_gpus,
                **cache_kwargs(model, width + max_new_tokens), **sampling,
            )
            for row, i in enumerate(batch):
                text = tokenizer.decode(out[row, width:], skip_special_tokens=True)
                outputs[i] = text.strip()
    return outputs


@contextmanager
def _cpu_threads(device: Any, threads: int | None) -> Iterator[None]:
    """torch's intra-op threads capped at `threads` on CPU, restored after."""
    import torch

    before = torch.get_num_threads()
    if device.type != "cpu" or threads is None or threads >= before:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
