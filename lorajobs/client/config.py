"""Where the SDK and CLI find the server and the key: flag > environment > embedded server."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["DEFAULT_URL", "resolve_url", "resolve_api_key", "local_model_root"]

DEFAULT_URL = "http://127.0.0.1:8000"


def _data_dir() -> Path:
    return Path(os.environ.get("LORAJOBS_DATA_DIR", Path.home() / ".lorajobs"))


def resolve_url(url: str | None = None) -> str:
    if url:
        return url.rstrip("/")
    if env := os.environ.get("LORAJOBS_URL"):
        return env.rstrip("/")
    server_file = _data_dir() / "server_url"
    if server_file.exists():
        return server_file.read_text().strip().rstrip("/")
    return DEFAULT_URL


def resolve_api_key(api_key: str | None = None) -> str | None:
    """The key from the flag, `LORAJOBS_API_KEY`, or the embedded server's admin key file."""
    if api_key:
        return api_key
    if env := os.environ.get("LORAJOBS_API_KEY"):
        return env
    key_file = _data_dir() / "admin_key"
    if key_file.exists():
        return key_file.read_text().strip()
    return None


def local_model_root() -> Path:
    """The embedded server's model root on this machine (`LORAJOBS_MODEL_ROOT`, else
    `<data dir>/models`), read the way the server reads it but without its settings (the
    client install has none of the server's packages)."""
    if env := os.environ.get("LORAJOBS_MODEL_ROOT"):
        return Path(env)
    return _data_dir() / "models"
