"""Server commands: embedded all-in-one, or the production processes one by one."""

from __future__ import annotations

import typer

from lorajobs.cli.output import console

db_app = typer.Typer(help="database schema (Alembic migrations)", no_args_is_help=True)


def serve(
    host: str = typer.Option(None, help="bind address (default: settings.api_host)"),
    port: int = typer.Option(None, help="port (default: settings.api_port)"),
) -> None:
    """API + worker + reaper in one command: SQLite, embedded broker, local artifacts."""
    from lorajobs.core.settings import get_settings
    from lorajobs.core.storage import private_dir, use_private_umask
    from lorajobs.worker.embedded import serve as run

    settings = get_settings()
    host, port = host or settings.api_host, port or settings.api_port
    # The CLI and SDK on this machine find the server here (lorajobs.client.config), as they
    # find its admin key in data_dir/admin_key: no flags needed on any port.
    url_file = settings.data_dir / "server_url"
    use_private_umask()  # the data dir holds every tenant's data: 0700, files 0600
    private_dir(settings.data_dir)
    url_file.write_text(f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}\n")
    try:
        run(settings, host, port)
    finally:
        url_file.unlink(missing_ok=True)


def api(host: str = typer.Option(None), port: int = typer.Option(None),
        workers: int = typer.Option(1, help="uvicorn worker processes")) -> None:
    """The HTTP API alone (production: behind a load balancer, several replicas)."""
    import uvicorn

    from lorajobs.core.settings import get_settings
    from lorajobs.core.storage import use_private_umask

    settings = get_settings()
    use_private_umask()  # uploads and anything else it writes: the service user's alone
    uvicorn.run("lorajobs.api.app:create_app", factory=True, host=host or settings.api_host,
                port=port or settings.api_port, workers=workers, loop="uvloop",
                http="httptools", log_level="info")


def worker() -> None:
    """One Celery worker: one job at a time (one per GPU node)."""
    from lorajobs.core.settings import get_settings
    from lorajobs.worker.main import run_worker

    run_worker(get_settings())


def beat() -> None:
    """The maintenance process for production: the reaper sweeps and webhooks are sent in this
    process, so neither waits for a busy GPU worker."""
    from lorajobs.core.settings import get_settings
    from lorajobs.worker.main import run_beat

    run_beat(get_settings())


def reaper() -> None:
    """The reaper loop alone (requeue lost jobs, re-send stale ones; no webhooks: use beat)."""
    from lorajobs.core.settings import get_settings
    from lorajobs.worker.main import run_reaper

    run_reaper(get_settings())


@db_app.command("upgrade")
def db_upgrade(revision: str = typer.Argument("head")) -> None:
    """Apply migrations up to REVISION (default: the newest)."""
    from lorajobs.core.migrate import current_revision, upgrade
    from lorajobs.core.settings import get_settings

    settings = get_settings()
    upgrade(settings, revision)
    console.print(f"database at revision {current_revision(settings)}")


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
    app.command("api")(api)
    app.command("worker")(worker)
    app.command("beat")(beat)
    app.command("reaper")(reaper)
    app.add_typer(db_app, name="db")
