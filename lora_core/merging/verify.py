"""Verify a merged model: max |logits(merged) - logits(base + adapter)| on a fixed probe.

Layer by layer by default (layerwise.py: one decoder layer in memory at a time, whatever the
model's size); the whole-model check (both models loaded, one at a time) is the fallback for
checkpoints whose tensor names are not the model's parameters, and the benchmark's baseline.
fp32 up to VERIFY_FP32_MAX_PARAMS, the base dtype above.
"""

from __future__ import annotations

import gc
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from lora_core.errors import MergeError
from lora_core.merging.layerwise import NotStreamable, compare_layerwise
from lora_core.merging.merge import _unset_zero3, default_tolerance
from lora_core.model_files import inspect_model_dir

__all__ = ["verify_merge", "check_merge", "compare_whole", "compare_layerwise", "default_tolerance"]

# Verify in fp32 up to this many parameters (as before streaming: keeps the figures comparable
# and fp32 rounding far below the tolerance); larger models are verified in their own dtype.
VERIFY_FP32_MAX_PARAMS = 1_000_000_000
PROBE_SHAPE = (2, 16)  # probe batch: 2 rows x 16 tokens, deterministic ids
PROBE_STRIDE = 7919  # a prime: spreads probe ids across the vocabulary


def _probe_ids(vocab_size: int, probe_tokens: list[list[int]] | None) -> torch.Tensor:
    """(batch, seq) token ids: the caller's, or a fixed spread over the vocabulary."""
    if probe_tokens is not None:
        return torch.tensor(probe_tokens, dtype=torch.long)
    n = PROBE_SHAPE[0] * PROBE_SHAPE[1]
    return (torch.arange(1, n + 1) * PROBE_STRIDE % vocab_size).reshape(PROBE_SHAPE)


def _verify_dtype(base_dir: Path) -> torch.dtype:
    info = inspect_model_dir(base_dir)
    name = info.dtype if info.num_parameters > VERIFY_FP32_MAX_PARAMS else "float32"
    return getattr(torch, name or "float32")  # type: ignore[no-any-return]


# ---------------------------------------------------------------- whole-model (fallback, bench)


@torch.no_grad()
def _logits(
    model_dir: Path, dtype: torch.dtype, ids: torch.Tensor, adapter_dir: Path | None
) -> torch.Tensor:
    """Logits (batch, seq, vocab) in fp32 of a model (+ adapter) loaded on CPU, then freed."""
    from transformers import AutoModelForCausalLM

    model: torch.nn.Module = AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=dtype, use_safetensors=True, trust_remote_code=False
    )
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))
    logits = model.eval()(input_ids=ids).logits.float()
    del model
    gc.collect()
    return logits


def compare_whole(
    base_dir: Path, adapter_dir: Path, merged_dir: Path, dtype: torch.dtype, ids: torch.Tensor
) -> tuple[float, float]:
    """The whole-model check: merged, then base + adapter via PEFT, one model at a time."""
    merged = _logits(Path(merged_dir), dtype, ids, None)
    reference = _logits(Path(base_dir), dtype, ids, Path(adapter_dir))
    return (merged - reference).abs().max().item(), reference.abs().max().item()


def _compare(
    base: Path, adapter_dir: Path, merged_dir: Path, probe_tokens: Any, layerwise: bool
) -> tuple[float, float]:
    _unset_zero3()
    info = inspect_model_dir(base)
    dtype = _verify_dtype(base)
    ids = _probe_ids(int(info.config.get("vocab_size", 2)), probe_tokens)
    if layerwise:
        try:
            return compare_layerwise(base, adapter_dir, merged_dir, dtype, ids)
        except NotStreamable as exc:
            warnings.warn(
                f"verifying {merged_dir} with the whole model in memory: {exc}", stacklevel=2
            )
    return compare_whole(base, adapter_dir, merged_dir, dtype, ids)


# ---------------------------------------------------------------- public entry points


def verify_merge(
    base_dir: str | os.PathLike[str],
    adapter_dir: str | os.PathLike[str],
    merged_dir: str | os.PathLike[str],
    probe_tokens: list[list[int]] | None = None,
    *,
    layerwise: bool = True,
) -> float:
    """Max |logits(merged) - logits(base + adapter)| on a fixed probe batch.

    Layer by layer (bounded memory) unless `layerwise=False` (the whole-model check, kept for
    comparison); fp32 up to VERIFY_FP32_MAX_PARAMS, else the base dtype. Raises MergeError when
    a merged tensor is not what the merge should have written.
    """
    base, adapter, merged = Path(base_dir), Path(adapter_dir), Path(merged_dir)
    return _compare(base, adapter, merged, probe_tokens, layerwise)[0]


def check_merge(
    base: Path, adapter_dir: Path, merged_dir: Path, probe_tokens: Any, tolerance: float | None
) -> float:
    """verify_merge, and over `tolerance x max(1, max|logits|)` raise MergeError.

    Relative, because fp32 rounding of W + s·BA vs Wx + s·B(Ax) grows with the logits'
    magnitude: a confident fine-tuned model (|logits| ~ 30) differs by ~1e-3 in fp32 while a
    broken merge (wrong scaling or module) differs by O(|logits|).
    """
    diff, scale = _compare(Path(base), Path(adapter_dir), Path(merged_dir), probe_tokens, True)
    info = inspect_model_dir(base)
    limit = (tolerance if tolerance is not None else default_tolerance(info.dtype)) * max(
        1.0, scale
    )
    if not diff <= limit:  # also catches NaN
        raise MergeError(
            f"merged logits differ by {diff:.3g} > tolerance {limit:.3g} (max |logits| {scale:.3g})"
        )
    return diff
