"""Which files of a local model directory `models upload` sends (client side, no torch).

The server accepts a flat set of safetensors weights, configs and tokenizer files
(lorajobs.core.model_import.ALLOWED_SUFFIXES; a test keeps the two lists equal): a directory
as `huggingface-cli download` leaves it also holds README.md, .gitattributes or pickle weights,
which are not sent. Files are streamed from disk, never read whole into memory.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["MODEL_FILE_SUFFIXES", "model_upload_files"]

MODEL_FILE_SUFFIXES = (".safetensors", ".json", ".txt", ".model", ".tiktoken", ".jinja")


def model_upload_files(directory: str | Path) -> list[Path]:
    """The top-level files of `directory` the server accepts, sorted; ValueError if none is a
    safetensors file."""
    root = Path(directory)
    if not root.is_dir():
        raise ValueError(f"{root} is not a directory")
    files = sorted(p for p in root.iterdir()
                   if p.is_file() and not p.name.startswith(".")
                   and p.name.endswith(MODEL_FILE_SUFFIXES))
    if not any(p.name.endswith(".safetensors") for p in files):
        raise ValueError(f"no safetensors weights in {root} (pickle weights are not accepted: "
                         "convert the model to safetensors)")
    return files
