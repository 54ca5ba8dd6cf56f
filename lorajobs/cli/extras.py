"""Which extra a command needs, so that a client-only install says what to install in one line.

`pip install lorajobs` is the SDK and the remote commands; the rest come with extras
(pyproject.toml). A command run without its extra fails on its first heavy import; `main`
turns that ModuleNotFoundError into `error: ... pip install 'lorajobs[worker]'`.
"""

from __future__ import annotations

__all__ = ["EXTRA_OF_COMMAND", "EXTRA_OF_MODULE", "missing_extra"]

# Commands -> the extra that carries everything they import.
EXTRA_OF_COMMAND = {
    "serve": "worker", "worker": "worker",
    "api": "server", "beat": "server", "reaper": "server", "db": "server",
    "train": "train", "merge": "train", "make-tiny-model": "train",
    "plot": "plot",
}
# Top-level modules -> the extra that installs them (for commands not listed above).
EXTRA_OF_MODULE = {
    **dict.fromkeys(("torch", "transformers", "peft", "accelerate", "deepspeed", "safetensors",
                     "numpy", "tensorboard"), "train"),
    **dict.fromkeys(("fastapi", "starlette", "uvicorn", "sqlalchemy", "alembic", "celery",
                     "kombu", "psycopg", "asyncpg", "redis", "multipart", "python_multipart",
                     "sse_starlette", "prometheus_client", "pydantic_settings", "tokenizers"),
                    "server"),
    "matplotlib": "plot",
}


def missing_extra(exc: ModuleNotFoundError, argv: list[str]) -> str | None:
    """The one-line fix for `exc` raised by the command in `argv`, or None when the missing
    module is not one an extra installs (a real bug: let it surface)."""
    module = (exc.name or "").split(".")[0]
    if module not in EXTRA_OF_MODULE:
        return None
    command = next((a for a in argv if not a.startswith("-")), "")
    extra = EXTRA_OF_COMMAND.get(command, EXTRA_OF_MODULE[module])
    return (f"`lorajobs {command}` needs the '{extra}' extra (no module named '{module}'): "
            f"pip install 'lorajobs[{extra}]'")
