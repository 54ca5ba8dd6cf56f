"""The layer-by-layer verification: one decoder layer's weights in memory at a time.

    probe ids ─► embed ─► layer 0 ─► layer 1 ─► … ─► norm ─► head ─► logits (batch, seq, vocab)
                 └ each unit's weights are prepared (compared, cast) on a worker thread while
                   the unit before it runs, installed just before its forward and dropped just
                   after; the model skeleton lives on the meta device

The probe runs through transformers' own forward of the architecture (any model class
`AutoModelForCausalLM` builds from config.json) once, on a doubled batch:

- rows [:n], the merged model: each module's merged tensors. Where a merged tensor equals the
  base tensor byte for byte (all but the targeted ones) the two halves share it; a differing
  one is swapped in for this half of its module's forward.
- rows [n:], the reference: the base tensors, and the adapter added on the fly as
  `Wx + s·B(Ax)` (PEFT's unmerged forward) at the module found in the model's module tree, not
  through the merge's key mapping, so a delta merged into the wrong tensor shows in the logits.

Before a unit runs, each merged tensor is compared byte for byte (memcmp) with
`round_once(W + s·BA)` or the untouched base bytes: the first line, which names the tensor of
a corrupted layer. Tensors are read through the files' mappings (tensor_files.py), never
copied: a base tensor already in the verification dtype is the weight itself; otherwise it is
cast slice by slice into a buffer the next layer reuses, and an embedding's rows are cast only
for the ids the probe looks up.

Peak memory: the runtime + the unit running + part of the next (PREFETCH_UNITS x the largest
unit's buffers) + slices in flight, whatever the number of layers.
Checkpoints whose tensor names are not the model's parameter names (transformers renames some
legacy layouts on load) cannot be streamed this way: they fall back to the whole-model check
(`compare_whole`: one model in memory at a time), with a warning.
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lora_core.errors import MergeError
from lora_core.merging.merge import TORCH_DTYPES, _Adapter, _read_adapter, _replacement
from lora_core.merging.tensor_files import CHUNK_BYTES, BufferPool, TensorFiles, same_bytes

__all__ = ["compare_layerwise", "NotStreamable"]

# Buffers (fp32 copies, expected tensors) held at once: the unit running and part of the next,
# prepared ahead while it runs; peak RSS stays within the runtime + 2 units.
PREFETCH_UNITS = 1.25


class NotStreamable(Exception):
    """The checkpoint's layout does not map name for name onto the model's parameters."""


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


@contextmanager
def _meta_parameters() -> Iterator[None]:
    """Parameters registered meanwhile move to the meta device as they are created, so their
    initialisation touches no memory; buffers stay on the CPU. accelerate's
    `init_empty_weights(include_buffers=False)`, without importing accelerate (~2 s here)."""
    register = torch.nn.Module.register_parameter

    def on_meta(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None:
            p = module._parameters[name]
            assert p is not None
            attrs = dict(p.__dict__)
            module._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)
            module._parameters[name].__dict__.update(attrs)

    torch.nn.Module.register_parameter = on_meta  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register  # type: ignore[method-assign]


def _skeleton(model_dir: Path, dtype: torch.dtype) -> torch.nn.Module:
    """The model with its parameters on the meta device (no memory), buffers (rotary
    frequencies, position ids) computed on the CPU as from_pretrained would."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=False)
    with _meta_parameters():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    model.tie_weights()  # a tied head has no tensor of its own: it must alias the embedding
    return model.eval()  # type: ignore[no-any-return]


def _decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The ModuleList that holds most parameters: the decoder layers (`layers`, `h`, ...)."""
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m)]
    if not lists:
        raise NotStreamable("no list of decoder layers in the model")
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


def _resolve(slots: list[_Slot], files: TensorFiles) -> list[tuple[_Slot, str]]:
    found = []
    for slot in slots:
        key = next((k for k in slot.keys if k in files.entries), None)
        if key is None:
            raise NotStreamable(f"no tensor named {slot.keys[0]!r} in {files.root.name}")
        found.append((slot, key))
    return found


def _is_lookup(owner: torch.nn.Module, slot: _Slot) -> bool:
    """A plain embedding's weight: its forward reads only the rows of the ids it is given."""
    return (
        slot.module is owner
        and type(owner).forward is torch.nn.Embedding.forward
        and slot.leaf == "weight"
    )


@dataclass
class _Ready:
    """One parameter of a unit, prepared ahead of the unit's forward. `ref` / `merged` are in
    the verification dtype (`merged` only where the file differs from `ref`); None where a
    lookup's rows are built at install from the stored-dtype `ref_src` / `merged_src`."""

    slot: _Slot
    key: str
    ref: torch.Tensor | None
    merged: torch.Tensor | None
    ref_src: torch.Tensor
    merged_src: torch.Tensor | None
    pooled: list[torch.Tensor] = field(default_factory=list)


_Shape = tuple[tuple[int, ...], torch.dtype]


class _Pass:
    """One forward over a doubled probe batch: rows [:n] are the merged model, rows [n:] base +
    adapter. Each unit's base tensors are installed (shared by both halves); a merged tensor
    that differs from its base tensor (the targeted ones) is kept aside and swapped in for the
    merged half of its module's forward. Every merged tensor is first checked, byte for byte,
    against what the merge should have written (`tensor_check`).

    A unit is prepared (compared, cast) on a worker thread while the previous unit computes;
    the order is predicted from the module tree (embedding, layers, norm, head), and a unit
    that comes unannounced is prepared on the spot."""

    def __init__(self, base: TensorFiles, merged: TensorFiles, adapter: _Adapter,
                 dtype: torch.dtype, rows: int, tensor_check: bool,
                 units: list[tuple[torch.nn.Module, list[tuple[_Slot, str]]]]) -> None:  # fmt: skip
        self.base, self.merged, self.adapter = base, merged, adapter
        self.dtype, self.rows, self.tensor_check = dtype, rows, tensor_check
        self.units = units  # in predicted execution order
        self.merged_only: dict[int, dict[str, torch.Tensor]] = {}  # id(module) -> leaf -> tensor
        self.checked: set[str] = set()  # keys already compared (a tied head: the embedding's)
        self.live: dict[int, list[_Ready]] = {}
        self.pending: dict[int, Future[list[_Ready]]] = {}
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="verify-prefetch")
        needs = [[n for slot, key in slots for n in self._needs(owner, slot, key)]
                 for owner, slots in units]  # fmt: skip
        largest = max(
            (sum(math.prod(s) * d.itemsize for s, d in unit) for unit in needs), default=0
        )
        self.pool = BufferPool((n for unit in needs for n in unit), int(PREFETCH_UNITS * largest))

    def _targeted(self, key: str) -> bool:
        return key in self.adapter.replacements or key.removesuffix(".weight") in self.adapter.pairs

    def _cast(self, key: str) -> bool:
        stored = TORCH_DTYPES[self.base.entries[key].dtype]
        return stored.is_floating_point and stored != self.dtype

    def _needs(self, owner: torch.nn.Module, slot: _Slot, key: str) -> list[_Shape]:
        """Pooled buffers the slot takes: the reference's and the merged tensor's casts, and
        the expected tensor's (an fp32 delta, then the stored dtype) if targeted."""
        e = self.base.entries[key]
        shape, stored = tuple(e.shape), TORCH_DTYPES[e.dtype]
        module = key.removesuffix(".weight")
        needs = []
        if self.tensor_check and module in self.adapter.pairs and key.endswith(".weight"):
            a, b = self.adapter.pairs[module]
            needs += [((b.shape[0], a.shape[1]), torch.float32), (shape, stored)]
        if self._cast(key) and not _is_lookup(owner, slot):
            needs += [(shape, self.dtype)] * (2 if self._targeted(key) else 1)
        return needs

    # -- preparing (worker thread)

    def prepare(self, i: int) -> list[_Ready]:
        owner, slots = self.units[i]
        return [self._prepare(owner, slot, key) for slot, key in slots]

    def _prepare(self, owner: torch.nn.Module, slot: _Slot, key: str) -> _Ready:
        e = self.base.entries[key]
        if list(e.shape) != list(slot.meta.shape):
            raise MergeError(f"{key}: shape {list(e.shape)} != model's {list(slot.meta.shape)}")
        base_view = self.base.view(key)
        replaced = key in self.adapter.replacements
        ref_src = _replacement(e, self.adapter.replacements[key]) if replaced else base_view
        ready = _Ready(slot, key, None, None, ref_src, None)
        want = ref_src
        if self.tensor_check and self._targeted(key):
            want = _expected(key, base_view, self.adapter, self.base, self.pool)
            if want is not ref_src:
                ready.pooled.append(want)
        lookup = _is_lookup(owner, slot)
        cast = self._cast(key) and not lookup
        out = self.pool.take(tuple(e.shape), self.dtype) if cast else None
        # The forward reads a mapped base tensor in place unless it is cast or looked up.
        equal = self._walk(key, want, ref_src, out, drop_base=cast or lookup or replaced)
        if not equal and self.tensor_check:
            diff = (self.merged.view(key).float() - want.float()).abs().max().item()
            raise MergeError(
                f"merged tensor {key} is not base + adapter (max |diff| {diff:.3g}): the file "
                "is corrupt or the merge mis-mapped it"
            )
        if out is not None:
            ready.pooled.append(out)
        ready.ref = out if out is not None else (None if lookup and self._cast(key) else ref_src)
        # The merged half needs its own tensor only where the file differs from the reference
        # half's: the targeted ones (equal to `want`, just checked) or, unchecked, any.
        merged_src = want if equal else self.merged.view(key)
        if merged_src is ref_src or same_bytes(merged_src.contiguous(), ref_src.contiguous()):
            return ready
        ready.merged_src = merged_src
        if lookup and self._cast(key):
            return ready
        if cast:
            ready.merged = self.pool.take(tuple(e.shape), self.dtype).copy_(merged_src)
            ready.pooled.append(ready.merged)
            if any(t is merged_src for t in ready.pooled):  # the expected tensor, now cast
                ready.pooled = [t for t in ready.pooled if t is not merged_src]
                self.pool.give(merged_src)
        else:
            ready.merged = merged_src
        return ready

    def _walk(self, key: str, want: torch.Tensor, ref_src: torch.Tensor,
              out: torch.Tensor | None, drop_base: bool) -> bool:  # fmt: skip
        """Compare the merged file's tensor with `want` and cast `ref_src` into `out`, slice by
        slice, handing each slice's mapped pages back once used. True if the bytes match."""
        compare = key not in self.checked
        equal = True
        have, want_flat = self.merged.view(key).reshape(-1), want.reshape(-1)
        src, dst = ref_src.reshape(-1), None if out is None else out.view(-1)
        step = max(1, CHUNK_BYTES // max(1, have.element_size()))
        for s in range(0, have.numel(), step):
            if compare and not same_bytes(have[s : s + step], want_flat[s : s + step]):
                equal = compare = False
            if dst is not None:
                dst[s : s + step].copy_(src[s : s + step])
            span = (s * have.element_size(), (s + step) * have.element_size())
            self.merged.drop(key, *span)
            if drop_base:
                self.base.drop(key, *span)
        if equal:
            self.checked.add(key)
        return equal

    # -- installing (main thread, forward hooks)

    def enter(self, i: int, args: Any) -> None:
        """Pre-hook of unit i: take its prepared tensors, start preparing the next unit."""
        future = self.pending.pop(i, None)
        ready = future.result() if future is not None else self.prepare(i)
        nxt = i + 1
        if nxt < len(self.units) and nxt not in self.pending and nxt not in self.live:
            self.pending[nxt] = self.worker.submit(self.prepare, nxt)
        self.live[i] = ready
        for r in ready:
            ref = r.ref if r.ref is not None else self._rows(r.ref_src, args)
            r.slot.module._parameters[r.slot.leaf] = torch.nn.Parameter(ref, requires_grad=False)
            merged = r.merged
            if merged is None and r.merged_src is not None:
                merged = self._rows(r.merged_src, args)
            if merged is not None:
                self.merged_only.setdefault(id(r.slot.module), {})[r.slot.leaf] = merged

    def _rows(self, src: torch.Tensor, args: Any) -> torch.Tensor:
        """A lookup table in the verification dtype with only the rows of the ids in `args`
        filled (the rest never touched: no memory, no time); all rows if no ids are given."""
        ids = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if ids is None or ids.is_floating_point():
            return src.to(self.dtype)
        out = torch.empty(src.shape, dtype=self.dtype)
        rows = ids.reshape(-1).unique()
        out[rows] = src[rows].to(self.dtype)
        return out

    def leave(self, i: int) -> None:
        """Forward hook of unit i: meta tensors back, buffers to the pool, pages dropped."""
        for r in self.live.pop(i, []):
            r.slot.module._parameters[r.slot.leaf] = r.slot.meta
            self.merged_only.pop(id(r.slot.module), None)
            for t in r.pooled:
                self.pool.give(t)
            self.base.drop(r.key)
            self.merged.drop(r.key)
        _trim_heap()  # activations and kernels' scratch of this unit: not kept for the next

    def close(self) -> None:
        self.worker.shutdown(wait=True, cancel_futures=True)
        self.pending.clear()
        for i in list(self.live):
            self.leave(i)
        self.pool.clear()
        self.base.close()
        self.merged.close()
        _trim_heap()

    def merged_half(self, module: torch.nn.Module, args: Any, out: Any) -> Any:
        """Forward hook: recompute rows [:n] with the module's merged tensors swapped in."""
        swapped = self.merged_only.get(id(module))
        if not swapped:
            return None
        if not isinstance(out, torch.Tensor) or out.shape[0] != 2 * self.rows:
            raise NotStreamable(f"{type(module).__name__} does not keep the batch first")
        kept = {leaf: module._parameters[leaf] for leaf in swapped}
        for leaf, t in swapped.items():
            module._parameters[leaf] = torch.nn.Parameter(t, requires_grad=False)
        try:
            top = module.forward(args[0][: self.rows], *args[1:])
        finally:
            module._parameters.update(kept)
        return torch.cat([top, out[self.rows :]])


def _execution_order(model: torch.nn.Module, units: list[Any]) -> list[Any]:
    """Units sorted as their modules are declared: what a forward runs, for every architecture
    we support (embeddings, decoder layers, final norm, head)."""
    position = {id(m): k for k, m in enumerate(model.modules())}
    return sorted(units, key=lambda unit: position[id(unit[0])])


@contextmanager
def _hooks(model: torch.nn.Module, base: TensorFiles, merged: TensorFiles, adapter: _Adapter,
           dtype: torch.dtype, rows: int, tensor_check: bool) -> Iterator[_Pass]:  # fmt: skip
    """Each unit's tensors installed right before its forward and put back to meta right after;
    the merged-half swap on every module that owns parameters; LoRA on the targeted modules."""
    units = [(owner, _resolve(slots, base)) for owner, slots in _units(model)]
    run = _Pass(base, merged, adapter, dtype, rows, tensor_check, _execution_order(model, units))
    handles = []
    for _, slots in run.units:
        for module in {id(slot.module): slot.module for slot, _ in slots}.values():
            handles.append(module.register_forward_hook(run.merged_half))
    handles += _lora_hooks(model, adapter, rows)
    # Registered last so that they run last: where a unit is one module (the LM head), its
    # tensors must still be there for the merged-half and LoRA hooks above.
    for i, (owner, _) in enumerate(run.units):
        handles.append(owner.register_forward_pre_hook(lambda m, args, i=i: run.enter(i, args)))
        handles.append(owner.register_forward_hook(lambda m, args, out, i=i: run.leave(i)))
    try:
        yield run
    finally:
        for h in handles:
            h.remove()
        run.close()


def _forward(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits
    if logits.device.type == "meta":
        raise NotStreamable("a weight was used outside the module that owns it")
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


def _expected(
    name: str, base: torch.Tensor, adapter: _Adapter, files: TensorFiles, pool: BufferPool
) -> torch.Tensor:
    """What the merge must have written for base tensor `name` (merge.py's own arithmetic),
    a pooled buffer where it is computed (the caller gives it back)."""
    module = name[: -len(".weight")] if name.endswith(".weight") else None
    w = (
        _replacement(files.entries[name], adapter.replacements[name])
        if (name in adapter.replacements)
        else base
    )
    if module not in adapter.pairs:
        return w
    # merge._merged_tensor's arithmetic, without its NaN scan (the merge refuses NaN, so a NaN
    # here differs from the file's bytes); into buffers, bit for bit the same operations.
    a, b = adapter.pairs[module]
    buffer = pool.take((b.shape[0], a.shape[1]), torch.float32)
    delta = torch.matmul(b.float(), a.float(), out=buffer)
    if adapter.fan_in_fan_out:
        delta = delta.T
    if delta.shape != w.shape:
        raise MergeError(f"{name}: adapter delta {tuple(delta.shape)} != base {tuple(w.shape)}")
    delta.mul_(adapter.scaling).add_(w)
    want = pool.take(tuple(w.shape), w.dtype).copy_(delta)
    pool.give(buffer)
    return want


def _check_headers(base: TensorFiles, merged: TensorFiles) -> None:
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
    when `tensor_check`, NotStreamable when the checkpoint does not map onto the model."""
    base, merged = TensorFiles.of(base_dir), TensorFiles.of(merged_dir)
    _check_headers(base, merged)
    adapter = _read_adapter(adapter_dir)
    model = _skeleton(base_dir, dtype)
    with _hooks(model, base, merged, adapter, dtype, ids.shape[0], tensor_check):
        logits = _forward(model, torch.cat([ids, ids]))
    got, want = logits[: ids.shape[0]], logits[ids.shape[0] :]
    return (got - want).abs().max().item(), want.abs().max().item()
