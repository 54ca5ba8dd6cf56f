"""Printing helpers shared by the CLI commands: rich for people, `--json` for scripts."""

from __future__ import annotations

import json
from typing import Any

from rich.console import Console

console = Console()
err_console = Console(stderr=True)


def print_json(obj: Any) -> None:
    if hasattr(obj, "model_dump"):
        obj = obj.model_dump(mode="json")
    elif isinstance(obj, list):
        obj = [o.model_dump(mode="json") if hasattr(o, "model_dump") else o for o in obj]
    typer_echo(json.dumps(obj, indent=2, default=str))


def typer_echo(text: str) -> None:
    import typer

    typer.echo(text)
