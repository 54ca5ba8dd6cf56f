"""lora_core.merging.tensor_files (zero-copy tensor views, byte compares, the buffer pool) and
the layer-by-layer verification of a bf16 base: cast to fp32 through the pool (embedding rows
looked up), and in bf16 straight from the mapping."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_core.errors import MergeError
from lora_core.merging.merge import _base_entries, merge_adapter
from lora_core.merging.tensor_files import BufferPool, TensorFiles, same_bytes


def _files(path: Path) -> TensorFiles:
    return TensorFiles(path.parent, {e.name: e for e in _base_entries(path.parent, [path.name])})


def test_views_equal_the_stored_tensors_and_survive_drop(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a": torch.randn(33, 7, generator=g).to(torch.bfloat16),
        "b": torch.randn(5, generator=g),
        "c": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "d": torch.randn(300, 300, generator=g).to(torch.float16),
    }
    save_file(tensors, str(tmp_path / "m.safetensors"))
    files = _files(tmp_path / "m.safetensors")
    for name, want in load_file(tmp_path / "m.safetensors").items():
        got = files.view(name)
        assert got.dtype == want.dtype and torch.equal(got, want), name
        files.drop(name)  # pages handed back: the next touch reads the file again
        assert torch.equal(files.view(name), want), name
    files.drop("d", 1000, 50_000)
    assert torch.equal(files.view("d"), tensors["d"])
    files.close()


def _raw_file(path: Path, entries: list[tuple[str, str, list[int], bytes]]) -> None:
    """A safetensors file written by hand (tensors at whatever offsets the list gives)."""
    header, data = {}, b""
    for name, dtype, shape, raw in entries:
        header[name] = {
            "dtype": dtype,
            "shape": shape,
            "data_offsets": [len(data), len(data) + len(raw)],
        }
        data += raw
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)


def test_unaligned_tensor_is_copied_and_truncation_refused(tmp_path):
    x = torch.tensor([1.5, -2.0, 3.25], dtype=torch.bfloat16)
    raw = x.view(torch.uint8).numpy().tobytes()
    _raw_file(tmp_path / "u.safetensors", [("pad", "U8", [1], b"\x07"), ("x", "BF16", [3], raw)])
    files = _files(tmp_path / "u.safetensors")
    assert torch.equal(files.view("x"), x)  # at an odd offset: a copy, same values
    assert files.view("pad").tolist() == [7]
    files.close()
    path = tmp_path / "u.safetensors"
    files = _files(path)  # headers read; the file is cut before the tensors are mapped
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(MergeError, match="truncated"):
        files.view("x")


def test_same_bytes():
    a = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    b = a.clone()
    assert same_bytes(a, b)
    b.view(torch.uint8)[1234] ^= 1
    assert not same_bytes(a, b)
    assert not same_bytes(a, a[:-1])
    nan = torch.full((4,), float("nan"))
    assert same_bytes(nan, nan.clone())  # bit for bit, where torch.equal says False


def test_pool_reuses_buffers_while_takes_are_due():
    pool = BufferPool([((4, 4), torch.float32)] * 2, cap=1 << 20)
    first = pool.take((4, 4), torch.float32)
    assert pool.give(first)  # one take still due: kept
    again = pool.take((4, 4), torch.float32)
    assert again.data_ptr() == first.data_ptr()
    assert not pool.give(again)  # none due: the caller drops it


def test_pool_worker_waits_for_a_buffer_under_the_cap():
    """The prefetch thread waits at the cap until the forward's thread gives a buffer back;
    the forward's thread itself never waits."""
    shape, nbytes = (256,), 256 * 4
    pool = BufferPool([(shape, torch.float32)] * 3, cap=nbytes)
    held = pool.take(shape, torch.float32)
    over = pool.take(shape, torch.float32)  # the maker's thread: over the cap, no wait
    got: list[torch.Tensor] = []
    worker = threading.Thread(target=lambda: got.append(pool.take(shape, torch.float32)))
    worker.start()
    worker.join(0.3)
    assert worker.is_alive() and not got  # waiting: 2 buffers held, cap 1
    pool.give(over)  # kept (one take due): the worker takes this one
    worker.join(10)
    assert got and got[0].data_ptr() == over.data_ptr()
    del held


# ---------------------------------------------------------------- a bf16 base, end to end


@pytest.fixture(scope="module")
def bf16_merge(tmp_path_factory):
    from lora_core.model_files.tiny import make_tiny_model
    from tests.lora_core.test_merge import _make_adapter

    tmp = tmp_path_factory.mktemp("bf16")
    base = make_tiny_model(tmp / "base", dtype="bfloat16", seed=2, num_layers=3)
    adapter = _make_adapter(base, tmp / "adapter", targets=("q_proj", "v_proj", "down_proj"))
    merged = merge_adapter(base, adapter, tmp / "merged", verify=False).out_dir
    return base, adapter, merged


def test_bf16_base_verified_in_fp32_equals_whole_model(bf16_merge):
    """fp32 casts through the pool, embedding rows looked up: same logits as the whole model."""
    from lora_core.merging.verify import verify_merge

    base, adapter, merged = bf16_merge
    layerwise = verify_merge(base, adapter, merged)
    whole = verify_merge(base, adapter, merged, layerwise=False)
    assert layerwise == pytest.approx(whole, abs=1e-6)  # bf16 rounding of the merged weights
    assert 0 < layerwise < 5e-2


def test_bf16_base_verified_in_bf16_from_the_mapping(bf16_merge, monkeypatch):
    """Above VERIFY_FP32_MAX_PARAMS the mapped bf16 tensors are the weights, uncopied."""
    import lora_core.merging.verify as verify

    base, adapter, merged = bf16_merge
    monkeypatch.setattr(verify, "VERIFY_FP32_MAX_PARAMS", 0)
    layerwise = verify.verify_merge(base, adapter, merged)
    whole = verify.verify_merge(base, adapter, merged, layerwise=False)
    assert layerwise == pytest.approx(whole, abs=2e-2)
    assert layerwise < verify.default_tolerance("bfloat16")


def test_bf16_wrong_module_caught_by_the_logits(bf16_merge, tmp_path):
    """A merged file whose layer-0 down_proj carries layer 1's: the per-tensor check names it;
    without it the logits, in fp32 from bf16 casts, are far over the tolerance."""
    from lora_core.merging.verify import compare_layerwise, verify_merge

    base, adapter, merged = bf16_merge
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in merged.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    tensors = load_file(bad / "model.safetensors")
    d0, d1 = (f"model.layers.{i}.mlp.down_proj.weight" for i in (0, 1))
    tensors[d0] = tensors[d1].clone()
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(MergeError, match=r"merged tensor model\.layers\.0\.mlp\.down_proj"):
        verify_merge(base, adapter, bad)
    ids = torch.tensor([[1, 17, 42, 300, 5, 9, 77, 2]])
    diff, _ = compare_layerwise(base, adapter, bad, torch.float32, ids, tensor_check=False)
    assert diff > 1e-2
