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
own "flash_attention_2" consumes the same batch format and is used instead.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["VARLEN_ATTENTION", "varlen_attention_forward", "register", "use_varlen_attention",
           "flash_attn_available"]

VARLEN_ATTENTION = "lora_varlen"
CPU_ATTENTION_FP32 = True  # see the module docstring; bench/README.md has the figures


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
            # split, not slices: a slice's backward writes its gradient into a zero tensor of
            # the whole row (one per example, then summed); split's backward is one cat
            lengths = torch.diff(cu).tolist()
            out = torch.cat([
                _sdpa_causal(q, k, v, scale=scaling, dropout=dropout, gqa=gqa).transpose(1, 2)
                for q, k, v in zip(query.split(lengths, dim=2), key.split(lengths, dim=2),
                                   value.split(lengths, dim=2), strict=True)
                if q.shape[2]
            ], dim=1)  # (1, S, H, D) contiguous: cat writes the layout the caller reshapes
    return out.to(out_dtype).contiguous(), None


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
