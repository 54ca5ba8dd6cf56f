"""The reproducibility manifest a finished job ships with (`jobs/<id>/reproducibility.json`).

What a reader needs to re-run the job and expect the same adapter: the exact inputs (sha256 of
the base model's weight files and of the training data), the resolved spec and seed, the
library versions and the hardware. Library versions are read from package metadata, never by
importing torch & co: the worker process stays torch-free.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from lora_core.manifest import sha256_file

__all__ = ["LIBRARIES", "library_versions", "hardware", "weights_digests", "write_manifest"]

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


def write_manifest(path: Path, *, job_id: str, spec: dict[str, Any], run_spec: dict[str, Any],
                   base_model: dict[str, Any], dataset: dict[str, Any],
                   world_size: int | None, attempt: int,
                   resumed_from_step: int | None) -> Path:
    """Write the manifest atomically; returns its path."""
    doc = {
        "job_id": job_id,
        "spec": spec,
        "run_spec": run_spec,
        "seed": (spec.get("training") or {}).get("seed"),
        "base_model": base_model,
        "dataset": dataset,
        "libraries": library_versions(),
        "hardware": hardware(),
        "world_size": world_size,
        "attempt": attempt,
        "resumed_from_step": resumed_from_step,
        "python_executable": sys.executable,
    }
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return path
