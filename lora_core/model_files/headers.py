"""What a base model directory holds, read from its safetensors headers alone.

TORCH-FREE: the API process imports this module to register models and to validate a job's
`lora` section at submit time, long before a worker loads a single weight. It only parses
`config.json` and the JSON header every safetensors file starts with:

    [ 8 bytes: header length N, little-endian u64 ][ N bytes: JSON header ][ raw tensor bytes ]
    header = {"model.layers.0.self_attn.q_proj.weight":
                  {"dtype": "BF16", "shape": [d_out, d_in], "data_offsets": [start, end]},
              "__metadata__": {...}}

A 2-D `*.weight` that is not an embedding is taken to be a linear layer (d_out, d_in). Pickle
weights (`*.bin`, `*.pt`, `*.pth`) are never read: a directory that has only those is refused.
"""

from __future__ import annotations

import json
import os
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_core.errors import ModelError

__all__ = [
    "ModelInfo",
    "read_safetensors_header",
    "inspect_model_dir",
    "DEFAULT_TARGET_MODULES",
    "SAFETENSORS_DTYPE_BYTES",
]

# Bytes per element of each safetensors dtype tag (safetensors' `Dtype` enum).
SAFETENSORS_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip
# safetensors tag -> the name torch / config.json use for it.
DTYPE_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}
# A header larger than this is not a real model header (safetensors itself caps it at 100 MB).
MAX_HEADER_BYTES = 100 * 1024 * 1024
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# PEFT's per-architecture defaults (peft.utils.constants.
# TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING, 0.21), keyed by config.json `model_type`;
# copied for the decoder-only families we serve so this module stays torch-free.
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    "llama": ["q_proj", "v_proj"],
    "llama4": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
    "stablelm": ["q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
    "gptj": ["q_proj", "v_proj"],
    "gpt_neo": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "gpt2": ["c_attn"],
    "gpt_bigcode": ["c_attn"],
    "gpt_neox": ["query_key_value"],
    "falcon": ["query_key_value"],
    "bloom": ["query_key_value"],
    "mpt": ["Wqkv"],
    "codegen": ["qkv_proj"],
}
# Leaf names of output heads: never a LoRA target under "all-linear" (PEFT excludes them too).
OUTPUT_HEADS = ("lm_head", "embed_out", "output")
# config.json keys that hold the longest sequence a model's positions cover, by family:
# most (max_position_embeddings), GPT-2/BigCode (n_positions), MPT (max_seq_len), Bloom-like
# (seq_length), GPT-J/CodeGen (n_ctx). Rope-scaled configs already state the extended length.
POSITION_LIMIT_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length",
                       "n_ctx")


@dataclass
class ModelInfo:
    """A base model as seen from its files. `linear_shapes[name] = (d_out, d_in)`."""

    model_dir: Path
    architecture: str | None
    model_type: str | None
    num_parameters: int
    dtype: str | None
    weight_modules: list[str]
    linear_names: list[str]
    weight_files: list[str]
    total_bytes: int
    linear_shapes: dict[str, tuple[int, int]] = field(default_factory=dict)
    module_names: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def max_positions(self) -> int | None:
        """The longest sequence the model's positions cover (config.json), None if unstated."""
        for key in POSITION_LIMIT_KEYS:
            value = self.config.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
        return None

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able summary the API stores for a registered model."""
        return {
            "architecture": self.architecture,
            "model_type": self.model_type,
            "num_parameters": self.num_parameters,
            "dtype": self.dtype,
            "linear_names": self.linear_names,
            "weight_files": self.weight_files,
            "total_bytes": self.total_bytes,
        }


def read_safetensors_header(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Parse one file's header without reading its tensors. Raises ModelError if corrupt."""
    p = Path(path)
    try:
        size = p.stat().st_size
        with open(p, "rb") as fh:
            raw_len = fh.read(8)
            if len(raw_len) != 8:
                raise ModelError(f"corrupt safetensors header in {p.name}: shorter than 8 bytes")
            (n,) = struct.unpack("<Q", raw_len)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise ModelError(f"corrupt safetensors header in {p.name}: header length {n}")
            header = json.loads(fh.read(n))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"corrupt safetensors header in {p.name}: {exc}") from exc
    if not isinstance(header, dict):
        raise ModelError(f"corrupt safetensors header in {p.name}: not a JSON object")
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict) or entry.get("dtype") not in SAFETENSORS_DTYPE_BYTES:
            raise ModelError(f"corrupt safetensors header in {p.name}: bad entry {name!r}")
        end = entry.get("data_offsets", [0, 0])[1]
        if 8 + n + end > size:
            raise ModelError(f"corrupt safetensors file {p.name}: tensor {name!r} is truncated")
    return header


def _weight_files(model_dir: Path) -> list[str]:
    """The safetensors files of a model dir (index shards or the single file), else ModelError."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text("utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelError(f"corrupt model.safetensors.index.json in {model_dir}: {exc}") from exc
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (model_dir / f).is_file()]
        if missing:
            raise ModelError(f"shard(s) listed in the index are missing: {missing}")
        return files
    if (model_dir / "model.safetensors").is_file():
        return ["model.safetensors"]
    pickles = sorted(p.name for p in model_dir.iterdir() if p.name.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise ModelError(
            f"refusing to load pickle weights {pickles} in {model_dir}: convert the model to "
            "safetensors (pickle files can run arbitrary code when loaded)"
        )
    raise ModelError(f"no safetensors weights (model.safetensors or its index) in {model_dir}")


def _is_embedding(module: str) -> bool:
    leaf = module.rsplit(".", 1)[-1]
    return "embed" in leaf or leaf in ("wte", "wpe")


# Directories inspected by this process, keyed by what their files look like now (name, size,
# mtime): a run asks for the base model's info in validation, PEFT setup, loading and every
# merge, and the headers of a large sharded model are worth reading once, not six times. A file
# replaced or touched changes the key, so a stale ModelInfo is never returned.
_INFO_CACHE: dict[tuple[str, tuple[tuple[str, int, int], ...]], ModelInfo] = {}
INFO_CACHE_ENTRIES = 8  # distinct model dirs remembered per process (a worker runs one job)


def _dir_signature(d: Path) -> tuple[tuple[str, int, int], ...]:
    try:
        entries = [(e.name, e.stat()) for e in os.scandir(d) if e.is_file()]
    except OSError:
        return ()
    return tuple(sorted((name, st.st_size, st.st_mtime_ns) for name, st in entries))


def inspect_model_dir(model_dir: str | os.PathLike[str]) -> ModelInfo:
    """Read config.json and every weight file's header: no tensor byte is loaded.

    Remembered per process while the directory's files are unchanged (_INFO_CACHE)."""
    d = Path(model_dir)
    if not d.is_dir():
        raise ModelError(f"model directory {d} does not exist")
    key = (str(d.resolve()), _dir_signature(d))
    if (cached := _INFO_CACHE.get(key)) is not None:
        return cached
    info = _read_model_dir(d)
    if len(_INFO_CACHE) >= INFO_CACHE_ENTRIES:
        _INFO_CACHE.pop(next(iter(_INFO_CACHE)))
    _INFO_CACHE[key] = info
    return info


def _read_model_dir(d: Path) -> ModelInfo:
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise ModelError(f"no config.json in {d}")
    try:
        config = json.loads(cfg_path.read_text("utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"config.json in {d} is not valid JSON: {exc}") from exc
    files = _weight_files(d)
    num_params, total_bytes = 0, 0
    dtypes: Counter[str] = Counter()
    weight_modules: list[str] = []
    modules: set[str] = set()
    shapes: dict[str, tuple[int, int]] = {}
    for fname in files:
        total_bytes += (d / fname).stat().st_size
        for name, entry in read_safetensors_header(d / fname).items():
            if name == "__metadata__":
                continue
            count = 1
            for dim in entry["shape"]:
                count *= int(dim)
            num_params += count
            dtypes[entry["dtype"]] += count
            module = name.rsplit(".", 1)[0] if "." in name else name
            modules.add(module)
            if name.endswith(".weight") and len(entry["shape"]) == 2:
                weight_modules.append(module)
                if not _is_embedding(module):
                    shapes[module] = (int(entry["shape"][0]), int(entry["shape"][1]))
    top = dtypes.most_common(1)[0][0] if dtypes else None
    archs = config.get("architectures") or [None]
    return ModelInfo(
        model_dir=d,
        architecture=archs[0],
        model_type=config.get("model_type"),
        num_parameters=num_params,
        dtype=DTYPE_NAMES.get(top, top) if top else None,
        weight_modules=sorted(weight_modules),
        linear_names=sorted({m.rsplit(".", 1)[-1] for m in shapes}),
        weight_files=files,
        total_bytes=total_bytes,
        linear_shapes=shapes,
        module_names=sorted(modules),
        config=config,
    )
