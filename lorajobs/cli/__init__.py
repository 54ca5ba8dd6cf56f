"""`lorajobs`: one command line for local runs, the server, and driving a server.

    lorajobs train spec.yaml            run the whole LoRA workflow locally (no service)
    lorajobs serve                      API + worker + reaper, embedded (SQLite, no Redis)
    lorajobs submit job.yaml --wait     submit to a server and watch it
    lorajobs jobs list | show | logs | cancel | download | plot
    lorajobs pause JOB | resume JOB     checkpoint and stop a job, free its worker; continue it
    lorajobs webhooks create | list | show | update | delete | rotate-secret | deliveries | replay

Every error is one line on stderr that says what to fix, and a non-zero exit code.
"""

from __future__ import annotations

import sys

import typer

from lorajobs.cli import local, remote, server, webhooks

__all__ = ["app", "main"]

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="lorajobs: LoRA fine-tuning jobs, locally or as a service.")
local.register(app)
server.register(app)
remote.register(app)
webhooks.register(app)

EXIT_USER_ERROR = 1


def main() -> None:
    """Console-script entry: run the app, turning our errors into one line + exit code."""
    from lora_core.errors import LoraCoreError
    from lorajobs.cli.errors import UserError, one_line
    from lorajobs.cli.extras import missing_extra
    from lorajobs.client.errors import LorajobsError

    try:
        app()
    except (LorajobsError, LoraCoreError, UserError) as exc:
        typer.echo(f"error: {one_line(exc)}", err=True)
        sys.exit(EXIT_USER_ERROR)
    except ModuleNotFoundError as exc:
        fix = missing_extra(exc, sys.argv[1:])
        if fix is None:
            raise
        typer.echo(f"error: {fix}", err=True)
        sys.exit(EXIT_USER_ERROR)
