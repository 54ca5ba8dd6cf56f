"""`lorajobs samples JOB [--step N]` and the scores `lorajobs jobs show` prints (issue 14)."""

from __future__ import annotations

from typing import Any

import typer
from rich.table import Table

from lorajobs.cli.output import console, print_json
from lorajobs.client import Client

URL = typer.Option(None, "--url", envvar="LORAJOBS_URL", help="server URL")
KEY = typer.Option(None, "--api-key", envvar="LORAJOBS_API_KEY", help="API key")
MAX_CELL = 60  # characters of a prompt/output shown per table cell


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def print_scores(client: Client, job_id: str, metrics: dict[str, Any]) -> None:
    """The score curve (one row per evaluated step) and which step is the result, and why."""
    curve = client.jobs.evaluations(job_id)
    if not curve:
        return
    names = sorted({k for row in curve for k in row["scores"]})
    table = Table(title="evaluations (step 0 = base model)")
    table.add_column("step", justify="right")
    for name in names:
        table.add_column(name, justify="right")
    best = metrics.get("best_step")
    for row in curve:
        mark = " *" if row["step"] == best else ""
        table.add_row(f"{row['step']}{mark}", *(_fmt(row["scores"].get(n)) for n in names))
    console.print(table)
    if best is not None:
        console.print(f"result: step {best} (*): {metrics.get('selection_reason', '')}")
    if metrics.get("stopped_early"):
        console.print(f"stopped early: {metrics.get('stop_reason', '')}")


def _cell(text: str | None) -> str:
    text = "" if text is None else text.replace("\n", " ")
    return text if len(text) <= MAX_CELL else text[:MAX_CELL - 1] + "…"


def samples(job_id: str,
            step: int | None = typer.Option(None, "--step",
                                            help="evaluated step (default: the best, else "
                                                 "the last)"),
            url: str | None = URL, api_key: str | None = KEY,
            json_out: bool = typer.Option(False, "--json", help="machine-readable output"),
            ) -> None:
    """Graded samples of a step beside the base model's: prompt, reference, outputs, scores."""
    with Client(url, api_key) as client:
        found = client.jobs.samples(job_id, step)
    if json_out:
        return print_json(found)
    table = Table(title=f"{job_id} step {found['step']}: "
                  + ", ".join(f"{k} {_fmt(v)}" for k, v in found["scores"].items())
                  + (" (base: " + ", ".join(f"{k} {_fmt(v)}" for k, v in
                                            (found.get("base_scores") or {}).items()) + ")"
                     if found.get("base_scores") is not None else ""))
    for name in ("#", "prompt", "reference", "base", f"step {found['step']}", "scores"):
        table.add_column(name)
    for s in found["samples"]:
        table.add_row(str(s["index"]), _cell(s["prompt"]), _cell(s["reference"]),
                      _cell(s.get("base_output")), _cell(s["output"]),
                      " ".join(f"{k}={_fmt(v)}" for k, v in (s.get("scores") or {}).items()))
    console.print(table)
