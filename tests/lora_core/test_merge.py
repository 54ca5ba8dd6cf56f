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


# ---------------------------------------------------------------- layer-by-layer verification


def _verify_both(base: Path, adapter: Path, merged: Path) -> tuple[float, float]:
    from lora_core.merging.verify import verify_merge

    return verify_merge(base, adapter, merged), verify_merge(base, adapter, merged, layerwise=False)


def test_layerwise_verification_equals_whole_model(tiny_model_dir, adapter_dir, merged, tmp_path):
    layerwise, whole = _verify_both(tiny_model_dir, adapter_dir, merged.out_dir)
    assert layerwise == pytest.approx(whole, abs=1e-6)
    assert merged.max_abs_diff == layerwise  # merge_adapter verifies layer by layer


def _tiny_arch(model_type: str, out: Path, **config) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **config))
    model.save_pretrained(out)
    return out


ARCHS = {  # model_type -> tiny config; targets are PEFT's defaults for the family
    "qwen2": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=128, vocab_size=128),
    # Conv1D weights stored (d_in, d_out) (fan_in_fan_out) and a head tied to the embedding
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, vocab_size=128),
    "falcon": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=128),
}  # fmt: skip


@pytest.mark.parametrize("model_type", sorted(ARCHS))
def test_layerwise_verification_other_architectures(model_type, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lora_core.model_files.headers import DEFAULT_TARGET_MODULES

    base = _tiny_arch(model_type, tmp_path / "base", **ARCHS[model_type])
    model = AutoModelForCausalLM.from_pretrained(base)
    targets = DEFAULT_TARGET_MODULES[model_type]
    peft_model = get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, target_modules=targets))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    peft_model.save_pretrained(tmp_path / "adapter")
    result = merge_adapter(base, tmp_path / "adapter", tmp_path / "merged")
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*whole model")  # no fallback
        layerwise, whole = _verify_both(base, tmp_path / "adapter", result.out_dir)
    assert layerwise == pytest.approx(whole, abs=1e-6) and layerwise < 1e-4
    assert result.max_abs_diff == layerwise


def test_checkpoint_names_unlike_the_model_fall_back_to_whole(tmp_path):
    """GPT-NeoX checkpoints name the head `embed_out`, which transformers renames on load."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    cfg = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
               vocab_size=128)  # fmt: skip
    base = _tiny_arch("gpt_neox", tmp_path / "base", **cfg)
    model = AutoModelForCausalLM.from_pretrained(base)
    config = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["query_key_value"])
    get_peft_model(model, config).save_pretrained(tmp_path / "adapter")
    with pytest.warns(UserWarning, match="whole model in memory: no tensor named 'lm_head"):
        result = merge_adapter(base, tmp_path / "adapter", tmp_path / "merged")
    assert result.max_abs_diff is not None and result.max_abs_diff < 1e-4


def test_wrong_key_mapping_caught(tiny_model_dir, adapter_dir, tmp_path, monkeypatch):
    """A merge that puts layer 0's q_proj delta into layer 1 (and back): the per-tensor check
    names the tensor; without it, the logits (adapter applied by module) still catch it."""
    import lora_core.merging.merge as merge_mod
    from lora_core.merging.verify import compare_layerwise, verify_merge

    real = merge_mod._read_adapter
    q0, q1 = (f"model.layers.{i}.self_attn.q_proj" for i in (0, 1))

    def swapped(path):
        adapter = real(path)
        adapter.pairs[q0], adapter.pairs[q1] = adapter.pairs[q1], adapter.pairs[q0]
        return adapter

    monkeypatch.setattr(merge_mod, "_read_adapter", swapped)
    bad = merge_adapter(tiny_model_dir, adapter_dir, tmp_path / "bad", verify=False).out_dir
    monkeypatch.setattr(merge_mod, "_read_adapter", real)
    with pytest.raises(MergeError, match=r"merged tensor model\.layers\.0\.self_attn\.q_proj"):
        verify_merge(tiny_model_dir, adapter_dir, bad)
    ids = torch.tensor([[1, 17, 42, 300, 5, 9, 77, 2]])
    diff, _ = compare_layerwise(tiny_model_dir, adapter_dir, bad, torch.float32, ids,
                                tensor_check=False)  # fmt: skip
    assert diff > 1e-2


def test_corrupted_layer_caught(tiny_model_dir, adapter_dir, merged, tmp_path):
    """Bytes flipped in a tensor the adapter does not touch (copied verbatim by the merge)."""
    import shutil

    from lora_core.merging.verify import verify_merge
    from lora_core.model_files import read_safetensors_header

    bad = tmp_path / "bad"
    shutil.copytree(merged.out_dir, bad)
    f = bad / "model.safetensors"
    header = read_safetensors_header(f)
    start = header["model.layers.1.mlp.down_proj.weight"]["data_offsets"][0]
    data_start = 8 + int.from_bytes(f.read_bytes()[:8], "little")
    raw = bytearray(f.read_bytes())
    raw[data_start + start + 100 : data_start + start + 104] = b"\x00\x00\x80\x7f"  # +inf
    f.write_bytes(bytes(raw))
    with pytest.raises(MergeError, match=r"model\.layers\.1\.mlp\.down_proj\.weight"):
        verify_merge(tiny_model_dir, adapter_dir, bad)


PEAK_SCRIPT = r"""
import json, sys, warnings
from pathlib import Path
from lora_core.merging.verify import verify_merge

def rss(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) * 1024

out = {}
runs = json.loads(sys.argv[1])
verify_merge(*runs[0][1:4])  # warm-up: imports, lazy initialisation
for name, base, adapter, merged, layerwise in runs:
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = rss("VmRSS:")
    verify_merge(base, adapter, merged, layerwise=layerwise)
    out[name] = rss("VmHWM:") - before
print(json.dumps(out))
"""


def test_layerwise_peak_memory_independent_of_layers(tmp_path):
    """Peak RSS of the verification, 2 vs 16 layers: the same within one layer's weights."""
    import subprocess
    import sys

    from lora_core.model_files.tiny import make_tiny_model

    runs = []
    dims = dict(hidden_size=384, num_heads=6, num_kv_heads=2, intermediate_size=1024,
                vocab_size=512)  # fmt: skip
    layer_bytes = 4 * (2 * 384 * 384 + 2 * 384 * 128 + 3 * 384 * 1024)  # fp32, ~6.5 MB
    for layers in (2, 16):
        base = make_tiny_model(tmp_path / f"b{layers}", num_layers=layers, seed=0, **dims)
        adapter = _make_adapter(base, tmp_path / f"a{layers}")
        out = merge_adapter(base, adapter, tmp_path / f"m{layers}", verify=False).out_dir
        runs.append((f"layers{layers}", str(base), str(adapter), str(out), True))
    proc = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, json.dumps(runs)],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    peak = json.loads(proc.stdout.strip().splitlines()[-1])
    assert peak["layers16"] - peak["layers2"] < layer_bytes, peak
    # 2 units + slack, where the whole-model check holds 16 layers twice (measured +112 MB)
    assert peak["layers16"] < 3 * layer_bytes + 8 * 2**20, peak
