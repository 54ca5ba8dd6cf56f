"""lora_core.model_files: headers only, torch-free, every refusal names its problem."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from lora_core.errors import ModelError, SpecError
from lora_core.model_files import (
    inspect_model_dir,
    read_safetensors_header,
    resolve_target_modules,
    validate_lora_spec,
)
from lora_core.model_files.manifest import sha256_file, verify_manifest, write_manifest
from lora_core.spec import LoraSpec

LLAMA_LINEARS = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def test_inspect_tiny_model(tiny_model_dir):
    info = inspect_model_dir(tiny_model_dir)
    assert info.architecture == "LlamaForCausalLM" and info.model_type == "llama"
    assert info.dtype == "float32"
    assert info.linear_names == sorted(LLAMA_LINEARS + ["lm_head"])
    assert info.weight_files == ["model.safetensors"]
    assert info.linear_shapes["model.layers.0.self_attn.k_proj"] == (32, 64)
    assert "model.embed_tokens" in info.weight_modules
    assert "model.embed_tokens" not in info.linear_shapes
    # every tensor counted: equals the header sizes / 4 bytes (all fp32) of the one file
    header = read_safetensors_header(tiny_model_dir / "model.safetensors")
    data_bytes = sum(e["data_offsets"][1] - e["data_offsets"][0] for k, e in header.items()
                     if k != "__metadata__")  # fmt: skip
    assert info.num_parameters * 4 == data_bytes


def test_inspect_is_torch_free(tiny_model_dir):
    code = (
        "import sys; from lora_core.model_files import inspect_model_dir; "
        f"inspect_model_dir({str(tiny_model_dir)!r}); "
        "bad = [m for m in ('torch', 'transformers', 'safetensors') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_resolve_default_all_linear_and_names(tiny_model_dir):
    assert resolve_target_modules(tiny_model_dir, None) == ["q_proj", "v_proj"]
    assert resolve_target_modules(tiny_model_dir, "all-linear") == LLAMA_LINEARS
    assert resolve_target_modules(tiny_model_dir, ["self_attn.o_proj"]) == ["self_attn.o_proj"]
    with pytest.raises(SpecError) as exc:
        resolve_target_modules(tiny_model_dir, ["q_proj", "qkv"])
    assert exc.value.param == "lora.target_modules" and exc.value.value == ["qkv"]
    assert "'qkv'" in exc.value.message and "v_proj" in exc.value.message


def test_validate_collects_every_problem(tiny_model_dir):
    spec = LoraSpec(r=48, target_modules=["k_proj", "nope"], modules_to_save=["lm_head", "x"])
    with pytest.raises(SpecError) as exc:
        validate_lora_spec(spec, tiny_model_dir)
    msg = exc.value.message
    assert "nope" in msg and "modules_to_save 'x'" in msg
    with pytest.raises(SpecError, match=r"lora.r: r=48 exceeds min\(d_in, d_out\)=32"):
        validate_lora_spec(LoraSpec(r=48, target_modules=["k_proj"]), tiny_model_dir)
    assert validate_lora_spec(LoraSpec(r=32, modules_to_save=["lm_head"]), tiny_model_dir) == [
        "q_proj",
        "v_proj",
    ]


def test_refusals_name_the_problem(tmp_path, tiny_model_dir):
    with pytest.raises(ModelError, match="does not exist"):
        inspect_model_dir(tmp_path / "missing")
    (tmp_path / "noconf").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        inspect_model_dir(tmp_path / "noconf")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(tiny_model_dir / "config.json", pickled)
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(ModelError, match="refusing to load pickle weights"):
        inspect_model_dir(pickled)
    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_model_dir, corrupt)
    (corrupt / "model.safetensors").write_bytes(struct.pack("<Q", 50) + b'{"a": ')
    with pytest.raises(ModelError, match="corrupt safetensors header"):
        inspect_model_dir(corrupt)


def test_sharded_index_is_read(tmp_path):
    from lora_core.model_files.tiny import make_tiny_model

    d = make_tiny_model(tmp_path / "sharded", max_shard_size="100KB")
    info = inspect_model_dir(d)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    assert len(info.weight_files) > 1
    assert info.weight_files == sorted(set(index["weight_map"].values()))
    assert info.num_parameters == index["metadata"]["total_parameters"]


def test_manifest_roundtrip(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("hello")
    (tmp_path / "sub" / "b.bin").write_bytes(b"\x00" * 10)
    manifest = write_manifest(tmp_path)
    assert [f["path"] for f in manifest["files"]] == ["a.txt", "sub/b.bin"]
    assert manifest["files"][0]["sha256"] == sha256_file(tmp_path / "a.txt")
    assert manifest["files"][0]["sha256"].startswith("2cf24dba")  # sha256("hello")
    assert verify_manifest(tmp_path) == []
    (tmp_path / "a.txt").write_text("hellO")
    (tmp_path / "c.txt").write_text("new")
    old, new = manifest["files"][0]["sha256"], sha256_file(tmp_path / "a.txt")
    assert verify_manifest(tmp_path) == [
        "c.txt: not in manifest",
        f"a.txt: sha256 {new} != manifest {old}",
    ]


def test_inspection_is_remembered_until_a_file_changes(tiny_model_dir, tmp_path, monkeypatch):
    import lora_core.model_files.headers as inspect_mod

    model = shutil.copytree(tiny_model_dir, tmp_path / "m")
    reads: list[Path] = []
    read = inspect_mod._read_model_dir
    monkeypatch.setattr(inspect_mod, "_read_model_dir", lambda d: reads.append(d) or read(d))
    first = inspect_mod.inspect_model_dir(model)
    assert inspect_mod.inspect_model_dir(model) is first and len(reads) == 1
    config = model / "config.json"
    config.write_text(config.read_text().replace('"model_type"', '"model_type" ', 1))
    assert inspect_mod.inspect_model_dir(model) is not first and len(reads) == 2
