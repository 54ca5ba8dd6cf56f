"""Padding-free ("varlen") causal attention for packed batches, on any device.

A micro-batch is flattened into one row of all its examples back to back
(`lora_core.data.collate.FlatteningCollator`): no padding token ever reaches a matmul, and
`cu_seq_lens_q` (int32, (n+1,): 0, len_0, len_0+len_1, ...) marks where each example starts.
This is the format transformers feeds flash-attention's varlen kernel; here the attention runs
one causal SDPA call per example instead, so that:

- no example attends to another (the block-diagonal mask, without ever building it: a dense
  (S, S) mask makes SDPA compute and read every square of the row);
- each example gets `is_causal=True`, which lets SDPA's flash kernel skip the upper triangle
  (a padded batch passes an explicit 4D mask and pays for the whole square);
- on CPU the call runs in fp32 (`CPU_ATTENTION_FP32`): torch's CPU flash kernel is no faster
  in bf16 at head_dim 64 and CPU autocast would cast q/k/v down (bench/README.md).

Measured on this 2-core CPU (fwd + bwd, 12 heads x 64, 8 examples of 120-250 tokens):
padded + 4D mask under bf16 autocast 72 ms, this path 35 ms.

Registered in transformers' AttentionInterface as VARLEN_ATTENTION and set on the model by
`use_varlen_attention`. Without `cu_seq_lens_q` the whole row is one causal sequence, which is
also exact for right-padded batches (a real token never sees a later pad); left padding would
not be, and no collator of ours produces it. On CUDA with flash-attn installed, transformers'
own "flash_attention_2" consumes the same batch format and is used instead. On CUDA without it
(PyPI has no flash-attn wheel), a bf16/fp16 batch goes through torch's own varlen flash kernel
(`torch.nn.attention.varlen.varlen_attn`, causal, GQA native): one call per layer instead of one
per example, which on a GPU is one kernel launch instead of dozens. Should that kernel refuse
(an old GPU, a head_dim it lacks), the first refusal is logged and every later call takes the
per-example path (`CUDA_VARLEN`). It has not run on a GPU in this project's CI: its plumbing
(layouts, boundaries, gradients) is tested on CPU against a reference kernel
(tests/lora_core/test_attention.py), the kernel itself by bench/gpu.sh.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["VARLEN_ATTENTION", "varlen_attention_forward", "register", "use_varlen_attention",
           "flash_attn_available"]

VARLEN_ATTENTION = "lora_varlen"
CPU_ATTENTION_FP32 = True  # see the module docstring; bench/README.md has the figures
CUDA_VARLEN = True  # torch's varlen flash kernel for flattened CUDA batches (module docstring)
FLASH_DTYPES = (torch.bfloat16, torch.float16)
FLASH_MAX_HEAD_DIM = 256
log = logging.getLogger(__name__)
_kernel_refused: str | None = None  # why torch's varlen kernel failed once in this process


def _can_use_varlen_kernel(query: torch.Tensor, dropout: float) -> bool:
    """CUDA, a flash dtype and head size, no attention dropout (the kernel has none)."""
    return (CUDA_VARLEN and _kernel_refused is None and query.is_cuda and dropout == 0.0
            and query.dtype in FLASH_DTYPES and query.shape[-1] <= FLASH_MAX_HEAD_DIM)


def _varlen_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor,
                   max_len: int, *, scale: float | None, gqa: bool) -> torch.Tensor:
    """(1, H, S, D) q/k/v of a flattened row -> (1, S, Hq, D), one causal varlen call."""
    from torch.nn.attention.varlen import varlen_attn

    def tokens_first(x: torch.Tensor) -> torch.Tensor:  # (1, H, S, D) -> (S, H, D)
        return x[0].transpose(0, 1).contiguous()

    cu = cu.to(device=q.device, dtype=torch.int32)
    out = varlen_attn(tokens_first(q), tokens_first(k), tokens_first(v), cu, cu, max_len,
                      max_len, scale=scale, window_size=(-1, 0), enable_gqa=gqa)
    assert isinstance(out, torch.Tensor)  # a tuple only when return_aux asks for the lse
    return out.unsqueeze(0)


def _per_example(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 lengths: list[int], *, scale: float | None, dropout: float,
                 gqa: bool) -> torch.Tensor:
    """One causal SDPA call per example of the flattened row -> (1, S, Hq, D)."""
    # split, not slices: a slice's backward writes its gradient into a zero tensor of the
    # whole row (one per example, then summed); split's backward is one cat
    return torch.cat([
        _sdpa_causal(q, k, v, scale=scale, dropout=dropout, gqa=gqa).transpose(1, 2)
        for q, k, v in zip(query.split(lengths, dim=2), key.split(lengths, dim=2),
                           value.split(lengths, dim=2), strict=True)
        if q.shape[2]
    ], dim=1)  # (1, S, H, D) contiguous: cat writes the layout the caller reshapes


def _sdpa_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None,
                 dropout: float, gqa: bool) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                          dropout_p=dropout, enable_gqa=gqa)


def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention interface: q (B, Hq, S, D), k/v (B, Hkv, S, D) -> (B, S, Hq, D)."""
    if attention_mask is not None:  # never built for this implementation; refuse, don't guess
        raise ValueError(f"{VARLEN_ATTENTION} attention takes no attention mask")
    gqa = query.shape[1] != key.shape[1]
    out_dtype = query.dtype  # what the output projection expects (bf16 weights under ZeRO)
    cpu = query.device.type == "cpu"
    dtype = torch.float32 if cpu and CPU_ATTENTION_FP32 else None
    with torch.autocast(query.device.type, enabled=False) if dtype is not None else nullcontext():
        if dtype is not None:
            query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
        elif value.dtype != query.dtype:  # under autocast v comes from a bf16 matmul
            value = value.to(query.dtype)
            key = key.to(query.dtype)
        cu = kwargs.get("cu_seq_lens_q")
        if cu is None:
            out = _sdpa_causal(query, key, value, scale=scaling, dropout=dropout,
                               gqa=gqa).transpose(1, 2)
        else:
            if query.shape[0] != 1:
                raise ValueError("cu_seq_lens_q needs a flattened batch of one row")
            lengths = torch.diff(cu).tolist()
            kernel_out = None
            if _can_use_varlen_kernel(query, dropout):
                kernel_out = _try_varlen_kernel(query, key, value, cu, max(lengths),
                                                scale=scaling, gqa=gqa)
            out = kernel_out if kernel_out is not None else _per_example(
                query, key, value, lengths, scale=scaling, dropout=dropout, gqa=gqa)
    return out.to(out_dtype).contiguous(), None


def _try_varlen_kernel(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       cu: torch.Tensor, max_len: int, *, scale: float | None,
                       gqa: bool) -> torch.Tensor | None:
    """The kernel's output, or None after logging why it refused (once per process: every
    later call goes per example)."""
    global _kernel_refused
    try:
        return _varlen_kernel(query, key, value, cu, max_len, scale=scale, gqa=gqa)
    except (ImportError, NotImplementedError, RuntimeError, ValueError) as exc:
        _kernel_refused = f"{type(exc).__name__}: {exc}"
        log.warning("torch's varlen attention kernel refused (%s); attention runs one SDPA "
                    "call per example from now on", _kernel_refused)
        return None


def register() -> None:
    """Make VARLEN_ATTENTION known to transformers (idempotent). No mask function is
    registered: transformers then builds no mask for it (it skips unknown implementations)."""
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN_ATTENTION, varlen_attention_forward)


def flash_attn_available() -> bool:
    """CUDA + the flash-attn package: transformers' varlen kernel takes the flattened batch."""
    import importlib.util

    return torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


def use_varlen_attention(model: Any) -> str | None:
    """Switch `model` (a PreTrainedModel or a PeftModel around one) to padding-free attention;
    returns the implementation's name, or None if the model cannot switch (an architecture
    outside transformers' AttentionInterface: the caller keeps padded batches)."""
    name = "flash_attention_2" if flash_attn_available() else VARLEN_ATTENTION
    if name == VARLEN_ATTENTION:
        register()
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        inner.set_attn_implementation(name)
    except (ValueError, ImportError):
        return None
    return name if inner.config._attn_implementation == name else None
