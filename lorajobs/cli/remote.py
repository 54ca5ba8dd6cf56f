"""Commands that drive a lorajobs server through the SDK."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import typer
import yaml

from lorajobs.cli.errors import UserError, dataset_problems, spec_problems
from lorajobs.cli.evaluations import print_scores, samples
from lorajobs.cli.output import console, print_json
from lorajobs.client import Client, Event, Job

jobs_app = typer.Typer(help="list and inspect jobs", no_args_is_help=True)
datasets_app = typer.Typer(help="training files", no_args_is_help=True)
models_app = typer.Typer(help="registered base models", no_args_is_help=True)
keys_app = typer.Typer(help="API keys", no_args_is_help=True)

URL = typer.Option(None, "--url", envvar="LORAJOBS_URL", help="server URL")
KEY = typer.Option(None, "--api-key", envvar="LORAJOBS_API_KEY", help="API key")
JSON = typer.Option(False, "--json", help="machine-readable output")
WATCH_POLL_S = 0.5  # `submit --wait` / progress refresh; a poll is one cheap GET


def _client(url: str | None, key: str | None) -> Client:
    return Client(url, key)


def _load_spec(path: Path) -> dict[str, Any]:
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0]
        raise UserError(f"{path}: not valid YAML/JSON ({first}) - fix the syntax") from exc
    if not isinstance(spec, dict):
        raise UserError(f"{path}: the spec must be a mapping of fields (base_model, "
                        "training_file, ...)")
    return spec


def _check_spec(spec: dict[str, Any], path: Path) -> None:
    """The server's own schema, checked before anything is uploaded: a typo costs nothing."""
    from lorajobs.jobspec import JobRequest

    placeholder = {f: "ds_local" for f in ("training_file", "validation_file")
                   if isinstance(spec.get(f), str)}
    problem = spec_problems({**spec, **placeholder}, JobRequest, path.name)
    if problem:
        raise UserError(problem)


def _upload_local_files(client: Client, spec: dict[str, Any], base: Path) -> None:
    """`training_file: ./train.jsonl` is uploaded first (validated locally, then sent)."""
    from lora_core.data.formats import validate_file

    for field in ("training_file", "validation_file"):
        value = spec.get(field)
        if not isinstance(value, str) or value.startswith("ds_"):
            continue
        path = (base / value) if not Path(value).is_absolute() else Path(value)
        if not path.is_file():
            raise UserError(f"{field}: {value!r} is neither a dataset id (ds_...) nor a file "
                            f"next to the spec")
        report = validate_file(path)
        if report.num_errors:
            raise UserError(dataset_problems(value, report.errors, report.num_errors))
        spec[field] = client.datasets.upload(path).id
        console.print(f"uploaded {path.name} as {spec[field]}")


def _progress_line(job: Job) -> str:
    p = job.progress
    loss = (job.metrics or {}).get("train_loss")
    parts = [f"{job.status}" + (f"/{job.stage}" if job.stage else "")]
    if p and p.total_steps:
        parts.append(f"step {p.step or 0}/{p.total_steps}")
    if loss is not None:
        parts.append(f"loss {loss:.4f}")
    if p and p.eta_seconds is not None:
        parts.append(f"eta {p.eta_seconds:.0f}s")
    return "  ".join(parts)


def watch(client: Client, job_id: str) -> Job:
    """Until the job is terminal: a live bar (step/total, loss, ETA) on a terminal; one plain
    line per change elsewhere (CI logs, pipes), where a redrawn bar would show nothing."""
    if not console.is_terminal:
        last: list[str] = []

        def log_line(job: Job) -> None:
            line = _progress_line(job)
            if not last or line != last[-1]:
                last.append(line)
                typer.echo(f"{job.id}  {line}")

        return client.jobs.wait(job_id, on_progress=log_line, poll_interval=WATCH_POLL_S)

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[info]}"), console=console, transient=False) as bar:
        task = bar.add_task(job_id, total=None, info="queued")

        def update(job: Job) -> None:
            p = job.progress
            total = p.total_steps if p and p.total_steps else None
            bar.update(task, total=total, completed=(p.step or 0) if p else 0,
                       info=_progress_line(job))

        return client.jobs.wait(job_id, on_progress=update, poll_interval=WATCH_POLL_S)


def submit(spec_file: Path = typer.Argument(..., exists=True, dir_okay=False),
           wait: bool = typer.Option(False, "--wait", help="watch until the job ends"),
           url: str | None = URL, api_key: str | None = KEY, json_out: bool = JSON) -> None:
    """Submit a job spec (YAML/JSON); local data files are validated and uploaded first."""
    spec = _load_spec(spec_file)
    _check_spec(spec, spec_file)
    with _client(url, api_key) as client:
        _upload_local_files(client, spec, spec_file.parent)
        job = client.jobs.create(spec)
        if not wait:
            print_json(job) if json_out else console.print(f"submitted [bold]{job.id}[/]")
            return
        if not json_out:
            console.print(f"submitted [bold]{job.id}[/]")
        job = watch(client, job.id) if not json_out else client.jobs.wait(job.id)
    _report_end(job, json_out)


def _report_end(job: Job, json_out: bool) -> None:
    if json_out:
        print_json(job)
    elif job.status == "succeeded":
        m = job.metrics or {}
        losses = "  ".join(f"{k}={m[k]:.4f}" for k in ("train_loss", "eval_loss")
                           if m.get(k) is not None)
        typer.echo(f"{job.id} succeeded  {losses}".rstrip())
        merged = " (merged model: add --merged)" if job.fine_tuned_model else ""
        typer.echo(f"download: lorajobs download {job.id} -o ./adapter{merged}")
    else:
        err = job.error or {}
        detail = f": {err.get('message')}" if err.get("message") else ""
        typer.echo(f"{job.id} {job.status}{detail}", err=True)
    if job.status != "succeeded":
        raise typer.Exit(1)


@jobs_app.command("list")
def jobs_list(status: str | None = typer.Option(None), limit: int = typer.Option(20),
              url: str | None = URL, api_key: str | None = KEY, json_out: bool = JSON) -> None:
    """Newest jobs first."""
    from rich.table import Column, Table

    with _client(url, api_key) as client:
        jobs = [j for _, j in zip(range(limit), client.jobs.list(status=status, limit=limit),
                                  strict=False)]
    if json_out:
        return print_json(jobs)
    # The id is what people copy: never cut or wrapped.
    table = Table(Column("id", no_wrap=True), "status", "stage", "progress", "loss", "created")
    for j in jobs:
        frac = j.progress.fraction if j.progress and j.progress.fraction is not None else None
        loss = (j.metrics or {}).get("train_loss")
        table.add_row(j.id, j.status, j.stage or "", f"{frac:.0%}" if frac is not None else "",
                      f"{loss:.4f}" if loss is not None else "",
                      j.created_at.strftime("%m-%d %H:%M:%S") if j.created_at else "")
    console.print(table)


@jobs_app.command("show")
def jobs_show(job_id: str, url: str | None = URL, api_key: str | None = KEY,
              json_out: bool = JSON) -> None:
    """One job in full."""
    with _client(url, api_key) as client:
        job = client.jobs.get(job_id)
    if json_out:
        return print_json(job)
    console.print(f"[bold]{job.id}[/]  {_progress_line(job)}  attempt {job.attempt}")
    console.print_json(data=job.model_dump(mode="json"))
    with _client(url, api_key) as client:  # graded generations, if the job has them
        print_scores(client, job.id, job.metrics or {})


def logs(job_id: str, follow: bool = typer.Option(False, "-f", "--follow"),
         url: str | None = URL, api_key: str | None = KEY, json_out: bool = JSON) -> None:
    """A job's events; `-f` follows the live stream until the job ends."""
    with _client(url, api_key) as client:
        events = client.jobs.stream_events(job_id) if follow else client.jobs.events(job_id)
        for e in events:
            if json_out:
                typer.echo(e.model_dump_json())  # one JSON object per line (JSON Lines)
            else:
                typer.echo(_event_line(e))


def _event_line(e: Event) -> str:
    """`12:00:01 info  checkpoint: step 4` - plain text (messages are not rich markup)."""
    ts = e.created_at.strftime("%H:%M:%S") if e.created_at else ""
    data = e.data or {}
    message = e.message if e.message and e.message != e.type else ""
    if not message and data.get("step") is not None:
        message = f"step {data['step']}"
    return f"{ts} {e.level:<7} {e.type}: {message}".rstrip().rstrip(":")


def _print_state(job: Job, json_out: bool, while_running: str = "") -> None:
    """`JOB: status` (+ what a running job is doing about the request), or the job as JSON."""
    if json_out:
        return print_json(job)
    doing = f" ({while_running})" if while_running and job.status == "running" else ""
    console.print(f"{job.id}: {job.status}{doing}")


def cancel(job_id: str, url: str | None = URL, api_key: str | None = KEY,
           json_out: bool = JSON) -> None:
    """Ask a job to stop (it keeps its last checkpoint)."""
    with _client(url, api_key) as client:
        _print_state(client.jobs.cancel(job_id), json_out, "stopping")


def pause(job_id: str, url: str | None = URL, api_key: str | None = KEY,
          json_out: bool = JSON) -> None:
    """Pause a job: it saves a checkpoint, stops and frees its worker (`resume` continues)."""
    with _client(url, api_key) as client:
        _print_state(client.jobs.pause(job_id), json_out, "pausing")


def resume(job_id: str, url: str | None = URL, api_key: str | None = KEY,
           json_out: bool = JSON) -> None:
    """Resume a paused job: queued again, training continues from its last checkpoint."""
    with _client(url, api_key) as client:
        _print_state(client.jobs.resume(job_id), json_out)


def deploy(job_id: str, target: str = typer.Option("default", "--target",
                                                  help="a serving target's name"),
           checkpoint: int | None = typer.Option(None, "--checkpoint",
                                                 help="a checkpoint's step (default: final)"),
           remove: bool = typer.Option(False, "--remove", help="unload it instead"),
           url: str | None = URL, api_key: str | None = KEY, json_out: bool = JSON) -> None:
    """Publish a finished job's adapter on a target's vLLM servers (chat with the printed
    model name through /openai/v1); --remove unloads it."""
    with _client(url, api_key) as client:
        if remove:
            client.jobs.undeploy(job_id, target, checkpoint=checkpoint)
            console.print(f"{job_id}: removed from {target}")
            return
        dep = client.jobs.deploy(job_id, target, checkpoint=checkpoint)
    if json_out:
        print_json(dep)
        return
    live = [s["url"] for s in dep["servers"] if s.get("loaded")]
    console.print(f"{dep['model']} on {target}: live on {len(live)}/{len(dep['servers'])} "
                  "server(s)")


def download(job_id: str, out: Path = typer.Option(..., "-o", "--out"),
             merged: bool = typer.Option(False, "--merged", help="the merged model"),
             step: int | None = typer.Option(None, "--step", help="a checkpoint's step"),
             tensorboard: bool = typer.Option(False, "--tensorboard",
                                              help="the TensorBoard event file instead"),
             url: str | None = URL, api_key: str | None = KEY) -> None:
    """Download the adapter (or merged model), resuming and verifying sha256."""
    with _client(url, api_key) as client:
        files = client.jobs.download(job_id, out, merged=merged, step=step,
                                     kind="tensorboard" if tensorboard else None)
    console.print(f"{len(files)} files in [bold]{out}[/] (sha256 verified)")


def plot(job_id: str, out: Path = typer.Option(Path("loss.png"), "-o", "--out"),
         url: str | None = URL, api_key: str | None = KEY) -> None:
    """Plot train and eval loss against step to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with _client(url, api_key) as client:
        rows = client.jobs.metrics(job_id)
    if not rows:
        raise UserError(f"job {job_id} has no metrics yet - wait until it has trained a step")
    fig, ax = plt.subplots(figsize=(7, 4))
    train = [(r.step, r.train_loss) for r in rows if r.train_loss is not None]
    evals = [(r.step, r.eval_loss) for r in rows if r.eval_loss is not None]
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss")
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(job_id)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    console.print(f"wrote {out}")


@datasets_app.command("upload")
def datasets_upload(file: Path = typer.Argument(..., exists=True, dir_okay=False),
                    format: str | None = typer.Option(None, "--format"),
                    url: str | None = URL, api_key: str | None = KEY,
                    json_out: bool = JSON) -> None:
    """Validate locally (line-numbered errors), then upload."""
    from lora_core.data.formats import validate_file

    report = validate_file(file, format)
    if report.num_errors:
        raise UserError(dataset_problems(file.name, report.errors, report.num_errors))
    with _client(url, api_key) as client:
        ds = client.datasets.upload(file, format=format)
    print_json(ds) if json_out else console.print(
        f"{ds.id}: {ds.num_examples} examples ({ds.format})")


@datasets_app.command("list")
def datasets_list(url: str | None = URL, api_key: str | None = KEY,
                  json_out: bool = JSON) -> None:
    with _client(url, api_key) as client:
        rows = list(client.datasets.list())
    if json_out:
        return print_json(rows)
    for d in rows:
        console.print(f"{d.id}  {d.format:10} {d.num_examples:>8} examples")


@models_app.command("list")
def models_list(url: str | None = URL, api_key: str | None = KEY, json_out: bool = JSON) -> None:
    with _client(url, api_key) as client:
        rows = client.models.list()
    if json_out:
        return print_json(rows)
    for m in rows:
        console.print(f"{m.name:24} {m.architecture or '':28} {m.num_parameters or 0:>12,} "
                      f"{m.dtype or ''}")


@models_app.command("register")
def models_register(name: str, model_dir: Path = typer.Argument(..., exists=True,
                                                                file_okay=False),
                    url: str | None = URL, api_key: str | None = KEY,
                    json_out: bool = JSON) -> None:
    """Copy a local safetensors model dir into the (same machine's) server model root and
    register it (the embedded default; from another machine: `models upload`)."""
    from lorajobs.client.config import local_model_root

    dest = local_model_root() / name
    if model_dir.resolve() != dest.resolve():
        if dest.exists():
            raise UserError(f"{dest} already exists in the model root - pick another name")
        shutil.copytree(model_dir, dest)
    with _client(url, api_key) as client:
        model = client.models.register(name, name)
    print_json(model) if json_out else console.print(f"registered {model.name}")


@models_app.command("upload")
def models_upload(name: str, model_dir: Path = typer.Argument(..., exists=True,
                                                              file_okay=False),
                  url: str | None = URL, api_key: str | None = KEY,
                  json_out: bool = JSON) -> None:
    """Upload a local safetensors model dir (weights + config + tokenizer files) into the
    server's store, from any machine (admin key). README, pickle files etc. are not sent."""
    with _client(url, api_key) as client:
        try:
            model = client.models.upload(name, model_dir)
        except ValueError as exc:
            raise UserError(str(exc)) from exc
    print_json(model) if json_out else console.print(
        f"registered {model.name} ({model.content_sha256})")


@models_app.command("add")
def models_add(name: str,
               s3: str | None = typer.Option(None, "--s3", help="s3://bucket/prefix"),
               hf_repo: str | None = typer.Option(None, "--hf-repo", help="org/name"),
               revision: str | None = typer.Option(None, "--revision",
                                                   help="branch, tag or commit (--hf-repo)"),
               url: str | None = URL, api_key: str | None = KEY,
               json_out: bool = JSON) -> None:
    """Have the server copy a model from an S3 prefix or a Hugging Face repo into its store
    (admin key); returns once it is there."""
    if (s3 is None) == (hf_repo is None):
        raise UserError("give exactly one of --s3 and --hf-repo")
    with _client(url, api_key) as client:
        model = client.models.register_from(name, s3=s3, hf_repo=hf_repo, revision=revision)
    print_json(model) if json_out else console.print(
        f"registered {model.name} ({model.source} {model.revision})")


@keys_app.command("create")
def keys_create(name: str = typer.Option(""), tenant: str | None = typer.Option(None),
                manage_keys: bool = typer.Option(False, "--manage-keys",
                                                 help="the new key may mint and revoke keys"),
                url: str | None = URL, api_key: str | None = KEY, json_out: bool = JSON) -> None:
    """Create an API key (admin or --manage-keys keys; admins may name a new tenant). Shown
    once."""
    with _client(url, api_key) as client:
        body = client.keys.create(name=name, tenant=tenant, manage_keys=manage_keys)
    print_json(body) if json_out else console.print(f"{body.get('id')}: {body.get('key')}")


def register(app: typer.Typer) -> None:
    app.command("submit")(submit)
    app.command("logs")(logs)
    app.command("cancel")(cancel)
    app.command("pause")(pause)
    app.command("resume")(resume)
    app.command("download")(download)
    app.command("deploy")(deploy)
    app.command("plot")(plot)
    app.command("samples")(samples)
    app.add_typer(jobs_app, name="jobs")
    app.add_typer(datasets_app, name="datasets")
    app.add_typer(models_app, name="models")
    app.add_typer(keys_app, name="keys")
