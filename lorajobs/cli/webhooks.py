"""`lorajobs webhooks ...`: signed notifications of job events (`Client.webhooks`).

    lorajobs webhooks create https://ci.example/hooks -e fine_tuning.job.succeeded
    lorajobs webhooks list | show ID | update ID --disable | delete ID
    lorajobs webhooks rotate-secret ID [--keep-old-secret]
    lorajobs webhooks deliveries ID [--status failed] | replay ID DELIVERY_ID

The endpoint's URL is an argument (`--url` is the server's, as in every command); `update`
takes it as `--endpoint-url`.
"""

from __future__ import annotations

import typer
from rich.table import Column, Table

from lorajobs.cli.errors import UserError
from lorajobs.cli.output import console, print_json
from lorajobs.client import Client, Webhook

__all__ = ["webhooks_app", "register"]

webhooks_app = typer.Typer(help="webhook endpoints and their deliveries", no_args_is_help=True)

URL = typer.Option(None, "--url", envvar="LORAJOBS_URL", help="server URL")
KEY = typer.Option(None, "--api-key", envvar="LORAJOBS_API_KEY", help="API key")
JSON = typer.Option(False, "--json", help="machine-readable output")
EVENTS_HELP = ("an event type, repeatable: fine_tuning.job.succeeded | fine_tuning.job.failed | "
               "fine_tuning.job.cancelled | job.running | job.checkpoint | job.paused")


def _line(hook: Webhook) -> str:
    state = "enabled" if hook.enabled else "disabled"
    name = f" ({hook.name})" if hook.name else ""
    return f"{hook.id}{name}  {hook.url}  {state}  {', '.join(hook.event_types)}"


def _print_with_secret(hook: Webhook, json_out: bool) -> None:
    if json_out:
        return print_json(hook)
    console.print(_line(hook), markup=False, highlight=False)
    typer.echo(f"signing secret (shown once): {hook.signing_secret}")


@webhooks_app.command("create")
def create(endpoint_url: str = typer.Argument(..., help="the receiver's https URL"),
           event: list[str] = typer.Option(..., "-e", "--event", help=EVENTS_HELP),
           name: str = typer.Option("", "--name"),
           disabled: bool = typer.Option(False, "--disabled", help="register it disabled"),
           url: str | None = URL, api_key: str | None = KEY, json_out: bool = JSON) -> None:
    """Register an endpoint; prints its signing secret (whsec_...), shown only now."""
    with Client(url, api_key) as client:
        hook = client.webhooks.create(endpoint_url, event, name=name, enabled=not disabled)
    _print_with_secret(hook, json_out)


@webhooks_app.command("list")
def list_(url: str | None = URL, api_key: str | None = KEY, json_out: bool = JSON) -> None:
    """The tenant's endpoints, oldest first."""
    with Client(url, api_key) as client:
        hooks = list(client.webhooks.list())
    if json_out:
        return print_json(hooks)
    table = Table(Column("id", no_wrap=True), "name", "url", "enabled", "events")
    for h in hooks:
        table.add_row(h.id, h.name, h.url, "yes" if h.enabled else "no", ", ".join(h.event_types))
    console.print(table)


@webhooks_app.command("show")
def show(webhook_id: str, url: str | None = URL, api_key: str | None = KEY,
         json_out: bool = JSON) -> None:
    """One endpoint (its secret only as a hint)."""
    with Client(url, api_key) as client:
        hook = client.webhooks.get(webhook_id)
    if json_out:
        return print_json(hook)
    console.print(_line(hook), markup=False, highlight=False)
    typer.echo(f"secret hint: {hook.signing_secret_hint}")


@webhooks_app.command("update")
def update(webhook_id: str,
           endpoint_url: str | None = typer.Option(None, "--endpoint-url",
                                                   help="a new receiver URL"),
           event: list[str] | None = typer.Option(None, "-e", "--event",
                                                  help=EVENTS_HELP + " (replaces the list)"),
           name: str | None = typer.Option(None, "--name"),
           enabled: bool | None = typer.Option(None, "--enable/--disable",
                                               help="disabled: deliveries wait"),
           url: str | None = URL, api_key: str | None = KEY, json_out: bool = JSON) -> None:
    """Change the URL, event types, name, or enable/disable an endpoint."""
    if endpoint_url is None and not event and name is None and enabled is None:
        raise UserError("nothing to change: give --endpoint-url, --event, --name, --enable "
                        "or --disable")
    with Client(url, api_key) as client:
        hook = client.webhooks.update(webhook_id, url=endpoint_url, event_types=event or None,
                                      name=name, enabled=enabled)
    if json_out:
        return print_json(hook)
    console.print(_line(hook), markup=False, highlight=False)


@webhooks_app.command("delete")
def delete(webhook_id: str, url: str | None = URL, api_key: str | None = KEY) -> None:
    """Delete an endpoint and its delivery history."""
    with Client(url, api_key) as client:
        client.webhooks.delete(webhook_id)
    typer.echo(f"{webhook_id}: deleted")


@webhooks_app.command("rotate-secret")
def rotate_secret(webhook_id: str,
                  keep_old_secret: bool = typer.Option(
                      False, "--keep-old-secret",
                      help="the old secret also signs for 24 h (receivers switch over)"),
                  url: str | None = URL, api_key: str | None = KEY,
                  json_out: bool = JSON) -> None:
    """A new signing secret, shown once."""
    with Client(url, api_key) as client:
        hook = client.webhooks.rotate_secret(webhook_id, keep_old_secret=keep_old_secret)
    _print_with_secret(hook, json_out)


@webhooks_app.command("deliveries")
def deliveries(webhook_id: str,
               status: str | None = typer.Option(None, "--status",
                                                 help="pending | delivered | failed"),
               limit: int = typer.Option(20, "--limit", min=1, help="newest first"),
               url: str | None = URL, api_key: str | None = KEY, json_out: bool = JSON) -> None:
    """An endpoint's deliveries, newest first: status, attempts, the last answer."""
    with Client(url, api_key) as client:
        rows = [d for _, d in zip(range(limit), client.webhooks.deliveries(webhook_id,
                                                                           status=status),
                                  strict=False)]
    if json_out:
        return print_json(rows)
    for d in rows:  # one plain line each: ids are what people copy, never cut by a table
        last = (f"last {d.last_status_code}" if d.last_status_code is not None
                else f"last error: {d.last_error}" if d.last_error else "")
        replay = f"(replay of {d.replay_of})" if d.replay_of else ""
        typer.echo("  ".join(part for part in (d.id, d.event_type, d.job_id or "-", d.status,
                                               f"{d.attempts} attempt(s)", last, replay)
                             if part))


@webhooks_app.command("replay")
def replay(webhook_id: str, delivery_id: str, url: str | None = URL,
           api_key: str | None = KEY, json_out: bool = JSON) -> None:
    """Send a delivery's event again (same webhook-id and body), due now."""
    with Client(url, api_key) as client:
        d = client.webhooks.replay(webhook_id, delivery_id)
    print_json(d) if json_out else typer.echo(f"{d.id}: {d.event_type} queued again "
                                              f"(replay of {delivery_id})")


def register(app: typer.Typer) -> None:
    app.add_typer(webhooks_app, name="webhooks")
