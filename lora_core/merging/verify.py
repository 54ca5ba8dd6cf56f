"""Verify a merged model against base + adapter with one decoder layer in memory at a time.

    probe ids ─► embed ─► layer 0 ─► layer 1 ─► … ─► norm ─► head ─► logits (batch, seq, vocab)
                 └ each unit's weights are read from safetensors just before its forward and
                   dropped just after; the model skeleton lives on the meta device

The probe runs through transformers' own forward of the architecture (any model class
`AutoModelForCausalLM` builds from config.json) once, on a doubled batch:

- rows [:n], the merged model: each module's merged tensors. Where a merged tensor equals the
  base tensor byte for byte (all but the targeted ones) the two halves share it; a differing
  one is swapped in for this half of its module's forward.
- rows [n:], the reference: the base tensors, and the adapter added on the fly as
  `Wx + s·B(Ax)` (PEFT's unmerged forward) at the module found in the model's module tree, not
  through the merge's key mapping, so a delta merged into the wrong tensor shows in the logits.

Before a unit runs, each merged tensor is checked against `round_once(W + s·BA)` (or the
untouched base bytes): the first line, which names the tensor of a corrupted layer.

Peak memory: the runtime + the largest unit (a decoder layer, or the embedding/LM head) at the
verification dtype + its targeted tensors + one tensor being checked, whatever the number of
layers.
Checkpoints whose tensor names are not the model's parameter names (transformers renames some
legacy layouts on load) cannot be streamed this way: they fall back to the whole-model check
(`compare_whole`: one model in memory at a time), with a warning.
"""

from __future__ import annotations

import ctypes
import gc
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lora_core.errors import MergeError
from lora_core.merging.merge import (
    TORCH_DTYPES,
    _Adapter,
    _base_entries,
    _Entry,
    _read_adapter,
    _replacement,
    _unset_zero3,
    default_tolerance,
)
from lora_core.model_files import inspect_model_dir

__all__ = ["verify_merge", "check_merge", "compare_whole", "compare_layerwise", "default_tolerance"]

# Verify in fp32 up to this many parameters (as before streaming: keeps the figures comparable
# and fp32 rounding far below the tolerance); larger models are verified in their own dtype.
VERIFY_FP32_MAX_PARAMS = 1_000_000_000
PROBE_SHAPE = (2, 16)  # probe batch: 2 rows x 16 tokens, deterministic ids
PROBE_STRIDE = 7919  # a prime: spreads probe ids across the vocabulary
CHECK_CHUNK_BYTES = 64 * 2**20  # larger tensors are read and compared slice by slice


class _NotStreamable(Exception):
    """The checkpoint's layout does not map name for name onto the model's parameters."""


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


def _trim_heap() -> None:
    """Hand freed heap pages back to the OS (glibc keeps freed tensors of a few MB otherwise,
    and the next layer's tensors of a different size would be allocated beside them)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# ---------------------------------------------------------------- the model skeleton


@dataclass
class _Slot:
    """One parameter of a unit: where it sits in the module tree and which file keys hold it."""

    module: torch.nn.Module
    leaf: str
    keys: list[str]  # the parameter's own name first, then tied aliases
    meta: torch.nn.Parameter


def _skeleton(model_dir: Path, dtype: torch.dtype) -> torch.nn.Module:
    """The model with its parameters on the meta device (no memory), buffers (rotary
    frequencies, position ids) computed on the CPU as from_pretrained would."""
    from accelerate import init_empty_weights  # type: ignore[import-untyped]
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=False)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    model.tie_weights()  # a tied head has no tensor of its own: it must alias the embedding
    return model.eval()  # type: ignore[no-any-return]


def _decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The ModuleList that holds most parameters: the decoder layers (`layers`, `h`, ...)."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m)]
    if not lists:
        raise _NotStreamable("no list of decoder layers in the model")
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))


def _units(model: torch.nn.Module) -> list[tuple[torch.nn.Module, list[_Slot]]]:
    """Each decoder layer is one unit; every other module owning parameters (embedding, final
    norm, LM head) is one too. Tied parameters list every name they go by."""
    aliases: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)
    layers = _decoder_layers(model)
    in_layers = {id(m) for layer in layers for m in layer.modules()}
    owners: list[torch.nn.Module] = list(layers)
    for module in model.modules():
        if id(module) not in in_layers and module._parameters:
            owners.append(module)
    path = {id(m): n for n, m in model.named_modules(remove_duplicate=False)}
    units = []
    for i, owner in enumerate(owners):
        prefix = path[id(owner)]
        slots = []
        for sub_name, sub in owner.named_modules(remove_duplicate=False):
            if i >= len(layers) and sub is not owner:
                continue  # outside the layers a unit is one module's own parameters
            for leaf, p in sub._parameters.items():
                if p is None:
                    continue
                own = ".".join(x for x in (prefix, sub_name, leaf) if x)
                keys = [own] + [a for a in aliases[id(p)] if a != own]
                slots.append(_Slot(sub, leaf, keys, p))  # type: ignore[arg-type]
        units.append((owner, slots))
    return units


# ---------------------------------------------------------------- one pass


@dataclass
class _Files:
    """A model dir's tensors by name (from the safetensors headers: nothing loaded)."""

    root: Path
    entries: dict[str, _Entry]

    @classmethod
    def of(cls, model_dir: Path) -> _Files:
        files = inspect_model_dir(model_dir).weight_files
        return cls(model_dir, {e.name: e for e in _base_entries(model_dir, files)})

    def mismatch(self, name: str, want: torch.Tensor) -> float | None:
        """None if the stored tensor equals `want` bit for bit, else the max |difference|.
        Compared in slices of CHECK_CHUNK_BYTES read with plain reads (see `read`)."""
        e = self.entries[name]
        flat = want.reshape(-1)
        step = max(1, CHECK_CHUNK_BYTES // max(1, flat.element_size()))
        with open(self.root / e.file, "rb", buffering=0) as fh:
            fh.seek(e.offset)
            for i in range(0, flat.numel(), step):
                part = flat[i : i + step]
                have = torch.empty(part.numel(), dtype=TORCH_DTYPES[e.dtype])
                _read_into(fh, have)
                if have.dtype != part.dtype or not torch.equal(have, part):
                    return float((have.float() - part.float()).abs().max().item())
        return None

    def read(self, name: str) -> torch.Tensor:
        """One tensor, in memory of its own, by plain reads. Not safe_open: get_tensor and
        get_slice copy out of the file's mapping, and the touched mapping stays resident until
        the handle closes: 2x the tensor at once (+1.5 GB measured for a 752 MiB head)."""
        e = self.entries[name]
        out = torch.empty(e.shape, dtype=TORCH_DTYPES[e.dtype])
        with open(self.root / e.file, "rb", buffering=0) as fh:
            fh.seek(e.offset)
            _read_into(fh, out)
        return out


def _read_into(fh: Any, t: torch.Tensor) -> None:
    """Fill `t` (contiguous) with the next t.nbytes bytes of `fh` (little-endian, as stored)."""
    view = t.reshape(-1).view(torch.uint8).numpy().data  # writable, 1 byte per item
    done = 0
    while done < len(view):
        n = fh.readinto(view[done : done + CHECK_CHUNK_BYTES])
        if not n:
            raise MergeError(f"{Path(fh.name).name} is truncated")
        done += n


def _resolve(slots: list[_Slot], files: _Files) -> list[tuple[_Slot, str]]:
    found = []
    for slot in slots:
        key = next((k for k in slot.keys if k in files.entries), None)
        if key is None:
            raise _NotStreamable(f"no tensor named {slot.keys[0]!r} in {files.root.name}")
        found.append((slot, key))
    return found


class _Pass:
    """One forward over a doubled probe batch: rows [:n] are the merged model, rows [n:] base +
    adapter. Each unit's base tensors are installed (shared by both halves); a merged tensor
    that differs from its base tensor (the targeted ones) is kept aside and swapped in for the
    merged half of its module's forward. Every merged tensor is first checked against what the
    merge should have written (`tensor_check`)."""

    def __init__(self, base: _Files, merged: _Files, adapter: _Adapter, dtype: torch.dtype,
                 rows: int, tensor_check: bool) -> None:  # fmt: skip
        self.base, self.merged, self.adapter = base, merged, adapter
        self.dtype, self.rows, self.tensor_check = dtype, rows, tensor_check
        self.merged_only: dict[int, dict[str, torch.Tensor]] = {}  # id(module) -> leaf -> tensor

    def load(self, slot: _Slot, key: str) -> torch.Tensor:
        w = self.base.read(key)
        ref = w
        if key in self.adapter.replacements:
            ref = _replacement(self.base.entries[key], self.adapter.replacements[key])
        want = _expected(key, w, self.adapter, self.base) if self.tensor_check else ref
        diff = self.merged.mismatch(key, want)
        if diff is not None and self.tensor_check:
            raise MergeError(
                f"merged tensor {key} is not base + adapter (max |diff| {diff:.3g}): the file "
                "is corrupt or the merge mis-mapped it"
            )
        # The merged half needs its own copy only where the file differs from the reference
        # half's tensor: the targeted ones (equal to `want`, just checked) or, unchecked, any.
        have = self.merged.read(key) if diff is not None else want
        if have is not ref and not torch.equal(have, ref):
            value = have.to(self.dtype) if have.is_floating_point() else have
            self.merged_only.setdefault(id(slot.module), {})[slot.leaf] = value
        return ref

    def install(self, slots: list[tuple[_Slot, str]]) -> None:
        for slot, key in slots:
            t = self.load(slot, key)
            if list(t.shape) != list(slot.meta.shape):
                raise MergeError(f"{key}: shape {list(t.shape)} != model's {list(slot.meta.shape)}")
            value = t.to(self.dtype) if t.is_floating_point() else t
            slot.module._parameters[slot.leaf] = torch.nn.Parameter(value, requires_grad=False)

    def release(self, slots: list[tuple[_Slot, str]]) -> None:
        for slot, _ in slots:
            slot.module._parameters[slot.leaf] = slot.meta
            self.merged_only.pop(id(slot.module), None)
        _trim_heap()

    def merged_half(self, module: torch.nn.Module, args: Any, out: Any) -> Any:
        """Forward hook: recompute rows [:n] with the module's merged tensors swapped in."""
        swapped = self.merged_only.get(id(module))
        if not swapped:
            return None
        if not isinstance(out, torch.Tensor) or out.shape[0] != 2 * self.rows:
            raise _NotStreamable(f"{type(module).__name__} does not keep the batch first")
        kept = {leaf: module._parameters[leaf] for leaf in swapped}
        for leaf, t in swapped.items():
            module._parameters[leaf] = torch.nn.Parameter(t, requires_grad=False)
        try:
            top = module.forward(args[0][: self.rows], *args[1:])
        finally:
            module._parameters.update(kept)
        return torch.cat([top, out[self.rows :]])


@contextmanager
def _hooks(model: torch.nn.Module, run: _Pass) -> Iterator[None]:
    """Each unit's tensors installed right before its forward and put back to meta right after;
    the merged-half swap on every module that owns parameters; LoRA on the targeted modules."""
    units = [(owner, _resolve(slots, run.base)) for owner, slots in _units(model)]
    handles = []
    for _, slots in units:
        for module in {id(slot.module): slot.module for slot, _ in slots}.values():
            handles.append(module.register_forward_hook(run.merged_half))
    handles += _lora_hooks(model, run.adapter, run.rows)
    # Registered last so that they run last: where a unit is one module (the LM head), its
    # tensors must still be there for the merged-half and LoRA hooks above.
    for owner, slots in units:
        handles.append(owner.register_forward_pre_hook(
            lambda m, args, s=slots: run.install(s)))  # fmt: skip
        handles.append(owner.register_forward_hook(
            lambda m, args, out, s=slots: run.release(s)))  # fmt: skip
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for _, slots in units:
            run.release(slots)


def _forward(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits
    if logits.device.type == "meta":
        raise _NotStreamable("a weight was used outside the module that owns it")
    return logits.float()


def _lora_hooks(model: torch.nn.Module, adapter: _Adapter, rows: int) -> list[Any]:
    """PEFT's unmerged forward on rows [rows:] of each targeted module: out + s·B(A x), in fp32
    (PEFT casts x to the fp32 adapter's dtype), cast back to the module's output dtype. Conv1D
    (fan_in_fan_out) modules take x the same way: only their stored weight is transposed."""
    handles = []
    for module_name, (a, b) in adapter.pairs.items():
        try:
            module = model.get_submodule(module_name)
        except AttributeError as exc:
            raise MergeError(f"adapter module {module_name!r} is not in the model") from exc
        a32, b32 = a.float(), b.float()

        def add_lora(m: Any, args: Any, out: torch.Tensor, a32: Any = a32, b32: Any = b32) -> Any:
            lora = (args[0][rows:].float() @ a32.T) @ b32.T
            ref = (out[rows:].float() + lora * adapter.scaling).to(out.dtype)
            return torch.cat([out[:rows], ref])

        handles.append(module.register_forward_hook(add_lora))
    return handles


def _expected(name: str, base: torch.Tensor, adapter: _Adapter, files: _Files) -> torch.Tensor:
    """What the merge must have written for base tensor `name` (merge.py's own arithmetic)."""
    module = name[: -len(".weight")] if name.endswith(".weight") else None
    w = (
        _replacement(files.entries[name], adapter.replacements[name])
        if (name in adapter.replacements)
        else base
    )
    if module in adapter.pairs:  # merge._merged_tensor's arithmetic, without its NaN scan:
        a, b = adapter.pairs[module]  # a NaN here fails torch.equal against the file anyway
        delta = b.float() @ a.float()
        if adapter.fan_in_fan_out:
            delta = delta.T
        if delta.shape != w.shape:
            raise MergeError(f"{name}: adapter delta {tuple(delta.shape)} != base {tuple(w.shape)}")
        return delta.mul_(adapter.scaling).add_(w).to(w.dtype)
    return w


def _check_headers(base: _Files, merged: _Files) -> None:
    """Same tensor names, shapes and dtypes in both models: a misnamed tensor fails here."""
    missing = sorted(set(base.entries) - set(merged.entries))
    extra = sorted(set(merged.entries) - set(base.entries))
    if missing or extra:
        raise MergeError(
            f"merged model's tensors differ from the base's: missing {missing[:3]},"
            f" unexpected {extra[:3]}"
        )
    for name, e in base.entries.items():
        m = merged.entries[name]
        if (m.dtype, m.shape) != (e.dtype, e.shape):
            raise MergeError(f"merged {name}: {m.dtype}{m.shape} != base {e.dtype}{e.shape}")


def compare_layerwise(
    base_dir: Path,
    adapter_dir: Path,
    merged_dir: Path,
    dtype: torch.dtype,
    ids: torch.Tensor,
    *,
    tensor_check: bool = True,
) -> tuple[float, float]:
    """(max |merged - reference|, max |reference|) over the probe's logits, layer by layer.

    Raises MergeError naming the first merged tensor that is not the base (+ rounded delta)
    when `tensor_check`, _NotStreamable when the checkpoint does not map onto the model."""
    base, merged = _Files.of(base_dir), _Files.of(merged_dir)
    _check_headers(base, merged)
    run = _Pass(base, merged, _read_adapter(adapter_dir), dtype, ids.shape[0], tensor_check)
    model = _skeleton(base_dir, dtype)
    with _hooks(model, run):
        logits = _forward(model, torch.cat([ids, ids]))
    got, want = logits[: ids.shape[0]], logits[ids.shape[0] :]
    return (got - want).abs().max().item(), want.abs().max().item()


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
        except _NotStreamable as exc:
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
