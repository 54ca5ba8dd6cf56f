"""lora_core.merging.merge: out-of-core merge vs PEFT, rounding once, shards, refusals, atomic
output."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lora_core.errors import MergeError, StorageError
from lora_core.merging.merge import merge_adapter, merge_with_peft
from lora_core.model_files.manifest import sha256_file, verify_manifest

R, ALPHA = 4, 8.0
IDS = torch.tensor([[1, 17, 42, 300, 5, 9, 77, 2]])


def _make_adapter(model_dir: Path, out: Path, seed: int = 0, targets=("q_proj", "v_proj")) -> Path:
    """A PEFT adapter with random A and B (B != 0, so the merge changes the weights)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(task_type="CAUSAL_LM", r=R, lora_alpha=ALPHA, target_modules=list(targets))
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    peft_model.save_pretrained(out)
    return out


def _weights(model_dir: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _reference(model_dir: Path, adapter_dir: Path) -> dict[str, torch.Tensor]:
    """Merged weights computed directly: W + s·BA in fp32, rounded once to W's dtype."""
    base, adapter = _weights(model_dir), load_file(adapter_dir / "adapter_model.safetensors")
    for key, a in adapter.items():
        if key.endswith(".lora_A.weight"):
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            b = adapter[key.replace("lora_A", "lora_B")]
            w = base[f"{module}.weight"]
            base[f"{module}.weight"] = (w.float() + ALPHA / R * (b.float() @ a.float())).to(w.dtype)
    return base


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory) -> Path:
    return _make_adapter(tiny_model_dir, tmp_path_factory.mktemp("adapter") / "a")


@pytest.fixture(scope="module")
def merged(tiny_model_dir, adapter_dir, tmp_path_factory):
    return merge_adapter(tiny_model_dir, adapter_dir, tmp_path_factory.mktemp("m") / "merged")


def test_matches_peft_merge_and_unload(tiny_model_dir, adapter_dir, merged, tmp_path):
    peft_dir = merge_with_peft(tiny_model_dir, adapter_dir, tmp_path / "peft")
    ours, theirs = _weights(merged.out_dir), _weights(peft_dir)
    assert ours.keys() == theirs.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], atol=1e-5, rtol=0)
    assert merged.num_merged_tensors == 4
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(ours[q], _weights(tiny_model_dir)[q])


def test_verification_recorded_and_manifest_correct(merged):
    assert merged.max_abs_diff is not None and merged.max_abs_diff < 1e-4
    assert verify_manifest(merged.out_dir) == []
    listed = {f["path"]: f["sha256"] for f in merged.files}
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= listed.keys()
    assert listed["model.safetensors"] == sha256_file(merged.out_dir / "model.safetensors")
    assert not list(merged.out_dir.parent.glob(".merged.*"))  # no temp dir left behind


def test_bf16_base_rounds_once(tmp_path):
    from lora_core.model_files.tiny import make_tiny_model

    base = make_tiny_model(tmp_path / "bf16", dtype="bfloat16", seed=1)
    adapter = _make_adapter(base, tmp_path / "adapter")
    result = merge_adapter(base, adapter, tmp_path / "merged")
    ours, reference = _weights(result.out_dir), _reference(base, adapter)
    assert all(t.dtype == torch.bfloat16 for t in ours.values())
    for name in reference:
        assert torch.equal(ours[name], reference[name]), name
    assert result.max_abs_diff < 5e-2


def test_sharded_output_loads(tiny_model_dir, adapter_dir, merged, tmp_path):
    from transformers import AutoModelForCausalLM

    result = merge_adapter(
        tiny_model_dir, adapter_dir, tmp_path / "sharded", max_shard_size="100KB", verify=False
    )
    index = json.loads((result.out_dir / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    sizes = 0
    for shard in shards:
        with safe_open(result.out_dir / shard, "pt") as f:
            assert all(index["weight_map"][k] == shard for k in f.keys())
            sizes += sum(f.get_tensor(k).numel() * 4 for k in f.keys())
    assert sizes == index["metadata"]["total_size"]
    assert _weights(result.out_dir).keys() == _weights(merged.out_dir).keys()
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(result.out_dir)(IDS).logits
        b = AutoModelForCausalLM.from_pretrained(merged.out_dir)(IDS).logits
    assert torch.equal(a, b)


def _corrupt_adapter(adapter_dir: Path, out: Path, edit) -> Path:
    out.mkdir()
    (out / "adapter_config.json").write_text((adapter_dir / "adapter_config.json").read_text())
    state = load_file(adapter_dir / "adapter_model.safetensors")
    save_file(edit(state), out / "adapter_model.safetensors")
    return out


def test_nan_adapter_refused_and_nothing_left(tiny_model_dir, adapter_dir, tmp_path):
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"

    def poison(state):
        state[key][0, 0] = float("nan")
        return state

    bad = _corrupt_adapter(adapter_dir, tmp_path / "nan", poison)
    with pytest.raises(MergeError, match=r"model\.layers\.1\.self_attn\.v_proj\.weight.*NaN"):
        merge_adapter(tiny_model_dir, bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nan"]


def test_mismatched_adapter_refused(tiny_model_dir, adapter_dir, tmp_path):
    def rename(state):
        return {k.replace("layers.1.", "layers.7."): v for k, v in state.items()}

    bad = _corrupt_adapter(adapter_dir, tmp_path / "renamed", rename)
    with pytest.raises(MergeError, match=r"does not match.*layers\.7\.self_attn"):
        merge_adapter(tiny_model_dir, bad, tmp_path / "out")

    def transpose(state):
        key = "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"
        state[key] = torch.zeros(64, R)  # v_proj is 64 -> 32: (32, r) expected
        return state

    bad = _corrupt_adapter(adapter_dir, tmp_path / "shape", transpose)
    with pytest.raises(MergeError, match=r"v_proj\.weight: adapter delta \(64, 64\) != base"):
        merge_adapter(tiny_model_dir, bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_verification_over_tolerance_removes_output(tiny_model_dir, adapter_dir, tmp_path):
    with pytest.raises(MergeError, match="tolerance"):
        merge_adapter(tiny_model_dir, adapter_dir, tmp_path / "out", tolerance=1e-12)
    assert list(tmp_path.iterdir()) == []


def test_disk_full_is_storage_error(tiny_model_dir, adapter_dir, tmp_path, monkeypatch):
    import lora_core.merging.merge as merge_mod

    def full(fh, t):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(merge_mod, "_write_tensor", full)
    with pytest.raises(StorageError, match="No space left"):
        merge_adapter(tiny_model_dir, adapter_dir, tmp_path / "out", verify=False)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "exists").mkdir()
    with pytest.raises(StorageError, match="already exists"):
        merge_adapter(tiny_model_dir, adapter_dir, tmp_path / "exists", verify=False)


def test_copy_fallback_without_copy_file_range(tiny_model_dir, adapter_dir, merged, tmp_path):
    import os

    def refuse(*args, **kwargs):
        raise OSError(errno.EXDEV, "cross-device")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "copy_file_range", refuse)
        result = merge_adapter(tiny_model_dir, adapter_dir, tmp_path / "out", verify=False)
    same = sha256_file(result.out_dir / "model.safetensors")
    assert same == sha256_file(merged.out_dir / "model.safetensors")


def test_lm_head_target_with_saved_base_layer(tiny_model_dir, tmp_path):
    """Targeting lm_head makes PEFT save `lm_head.base_layer.weight` too; it must merge."""
    adapter = _make_adapter(tiny_model_dir, tmp_path / "a", targets=("q_proj", "lm_head"))
    keys = load_file(adapter / "adapter_model.safetensors").keys()
    assert any(k.endswith("lm_head.base_layer.weight") for k in keys)
    ours = merge_adapter(tiny_model_dir, adapter, tmp_path / "ours")
    assert ours.max_abs_diff < 1e-4
    got = _weights(tmp_path / "ours")
    for name, want in _reference(tiny_model_dir, adapter).items():
        torch.testing.assert_close(got[name], want, atol=1e-5, rtol=0)
