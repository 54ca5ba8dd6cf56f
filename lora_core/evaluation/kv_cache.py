"""A KV cache that writes into a buffer reserved for the whole generation, not by concatenation.

transformers' `DynamicLayer.update` does `keys = cat([keys, new], dim=-2)` at every decode step:
each step copies every layer's whole cache, (batch, heads, prompt + step, head_dim), so a
generation of n tokens copies O(n * (prompt + n)) elements per layer. `ReservedLayer` allocates
(batch, heads, prompt + max_new_tokens, head_dim) at the prefill, copies each step's new keys
and values into it, and hands attention a view of the filled part:

    buffer  [ k_0 ... k_{p-1} | k_p ... k_{t} | (unused) ]
    keys  = buffer[:, :, :t + 1]     same values, same shape as the concatenated cache

The attention reads the same numbers either way: the outputs are bit for bit those of the
DynamicCache (tests/lora_core/test_evaluation_generation.py). The buffer doubles if a call runs
past its reservation (ZeRO-3's synced ranks keep stepping until all are done). Anything that
rewrites the cache in place of appending (beam reordering, cropping) first turns the layer back
into a plain DynamicLayer.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

__all__ = ["ReservedLayer", "reserved_cache", "cache_kwargs"]


class ReservedLayer(DynamicLayer):
    """A DynamicLayer whose keys/values live in a buffer of `capacity` positions."""

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity
        self._key_buf: torch.Tensor | None = None
        self._value_buf: torch.Tensor | None = None
        self._length = 0

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """key_states/value_states: (batch, heads, new, head_dim) -> the whole cache so far."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self._key_buf = self._reserve(key_states, max(self.capacity, key_states.shape[-2]))
            self._value_buf = self._reserve(value_states,
                                            max(self.capacity, value_states.shape[-2]))
        kb, vb = self._key_buf, self._value_buf
        if kb is None or vb is None or not (_fits(kb, key_states) and _fits(vb, value_states)):
            self._release()  # a dtype or shape the buffer cannot take as is: concatenate
            return super().update(key_states, value_states, *args, **kwargs)
        start, end = self._length, self._length + key_states.shape[-2]
        if end > kb.shape[-2]:
            kb, vb = self._grow(kb, 2 * end), self._grow(vb, 2 * end)
            self._key_buf, self._value_buf = kb, vb
        kb[:, :, start:end] = key_states
        vb[:, :, start:end] = value_states
        self._length = end
        self.keys, self.values = kb[:, :, :end], vb[:, :, :end]
        return self.keys, self.values

    @staticmethod
    def _reserve(like: torch.Tensor, length: int) -> torch.Tensor:
        b, h, _, d = like.shape
        return like.new_empty((b, h, length, d))

    def _grow(self, buf: torch.Tensor, length: int) -> torch.Tensor:
        bigger = self._reserve(buf, length)
        bigger[:, :, :self._length] = buf[:, :, :self._length]
        return bigger

    def _release(self) -> None:
        """From here on a plain DynamicLayer: keys/values become ordinary tensors."""
        if self._key_buf is not None and self.keys is not None and self.values is not None:
            self.keys, self.values = self.keys.contiguous(), self.values.contiguous()
        self._key_buf = self._value_buf = None

    def reset(self) -> None:
        self._release()
        self._length = 0
        super().reset()

    def crop(self, tokens_to_remove: int) -> None:
        self._release()
        super().crop(tokens_to_remove)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._release()
        super().reorder_cache(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._release()
        super().batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._release()
        super().batch_select_indices(indices)


def _fits(buf: torch.Tensor, new: torch.Tensor) -> bool:
    """Copying `new` into `buf` keeps its values exactly (cat would promote a dtype)."""
    return (new.dim() == 4 and new.dtype == buf.dtype and new.device == buf.device
            and new.shape[:2] == buf.shape[:2] and new.shape[3] == buf.shape[3])


def reserved_cache(model: Any, capacity: int) -> DynamicCache | None:
    """A DynamicCache of ReservedLayers for `model` (a PreTrainedModel or a PeftModel), or None
    when its layers are not plain DynamicLayers (sliding windows, linear attention, ...): the
    caller then lets generate() build its own cache."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        cache = DynamicCache(config=inner.config.get_text_config(decoder=True))
    except (AttributeError, KeyError, TypeError, ValueError):
        return None
    if not cache.layers or any(type(layer) is not DynamicLayer for layer in cache.layers):
        return None
    cache.layers = [ReservedLayer(capacity) for _ in cache.layers]
    return cache


def cache_kwargs(model: Any, capacity: int) -> dict[str, Any]:
    """`{name: reserved cache}` for model.generate (transformers 5.x renamed `past_key_values`
    to `cache`), or {} when the model's cache cannot be reserved."""
    cache = reserved_cache(model, capacity)
    if cache is None:
        return {}
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    name = "cache" if "cache" in inspect.signature(inner.forward).parameters \
        else "past_key_values"
    return {name: cache}
