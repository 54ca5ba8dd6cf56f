"""The reproducibility manifest a finished job ships with (`jobs/<id>/reproducibility.json`).

What a reader needs to re-run the job and expect the same adapter: the exact inputs (sha256 of
the base model's weight files and of the training data), the resolved spec and seed, the
library versions and the hardware. Library versions are read from package metadata, never by
importing torch & co: the worker process stays torch-free.

Tenants download it, so it names things and never says where they are on the server: the run
spec's paths become the file's name and sha256 (or go, where `base_model` and `dataset`
already identify them), and no interpreter path is written.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

from lora_core.model_files.manifest import sha256_file

__all__ = ["LIBRARIES", "library_versions", "hardware", "weights_digests", "public_run_spec",
           "write_manifest"]

# RunSpec fields that hold server paths: the run directory is ours, the model and the training
# data are identified by name + sha256 in the manifest's own `base_model` / `dataset`.
DROPPED_PATH_FIELDS = ("model_dir", "output_dir")
HASHED_PATH_FIELDS = ("train_file", "validation_file")
LIBRARIES = ("torch", "transformers", "peft", "accelerate", "deepspeed", "safetensors",
             "tokenizers", "lorajobs")
NVIDIA_SMI_TIMEOUT_SECONDS = 10
WEIGHT_SUFFIXES = (".safetensors",)


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def hardware() -> dict[str, Any]:
    gpus: list[str] = []
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=name", "--format=csv,noheader"],
                                 capture_output=True, text=True, check=False,
                                 timeout=NVIDIA_SMI_TIMEOUT_SECONDS).stdout
            gpus = [line.strip() for line in out.splitlines() if line.strip()]
        except (OSError, subprocess.SubprocessError):
            gpus = []
    return {"platform": platform.platform(), "machine": platform.machine(),
            "cpu_count": os.cpu_count(), "gpus": gpus}


def weights_digests(model_dir: Path, known: dict[str, Any] | None = None) -> dict[str, str]:
    """sha256 per weight file; reuses the digests recorded when the model was registered."""
    if known:
        return {str(k): str(v) for k, v in sorted(known.items())}
    return {p.relative_to(model_dir).as_posix(): sha256_file(p)
            for p in sorted(model_dir.rglob("*")) if p.is_file() and p.suffix in WEIGHT_SUFFIXES}


def public_run_spec(run_spec: dict[str, Any]) -> dict[str, Any]:
    """`run_spec` without a server path: data files as `{name, sha256}`, other paths dropped."""
    public = {k: v for k, v in run_spec.items() if k not in DROPPED_PATH_FIELDS}
    for field in HASHED_PATH_FIELDS:
        value = public.get(field)
        if value is not None:
            file = Path(value)
            public[field] = {"name": file.name,
                             "sha256": sha256_file(file) if file.is_file() else None}
    return public


def write_manifest(path: Path, *, job_id: str, spec: dict[str, Any], run_spec: dict[str, Any],
                   base_model: dict[str, Any], dataset: dict[str, Any],
                   world_size: int | None, attempt: int,
                   resumed_from_step: int | None) -> Path:
    """Write the manifest atomically; returns its path."""
    doc = {
        "job_id": job_id,
        "spec": spec,
        "run_spec": public_run_spec(run_spec),
        "seed": (spec.get("training") or {}).get("seed"),
        "base_model": base_model,
        "dataset": dataset,
        "libraries": library_versions(),
        "hardware": hardware(),
        "world_size": world_size,
        "attempt": attempt,
        "resumed_from_step": resumed_from_step,
    }
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return path
