"""Local commands: the LoRA workflow without the service (lora_core only)."""

from __future__ import annotations

from pathlib import Path

import typer

from lorajobs.cli.output import console, print_json


def make_tiny_model(
    out_dir: Path = typer.Argument(..., help="directory to write the model and tokenizer to"),
    hidden: int = typer.Option(64, help="hidden size"),
    layers: int = typer.Option(2, help="number of decoder layers"),
    heads: int = typer.Option(4, help="attention heads"),
    kv_heads: int = typer.Option(2, help="key/value heads"),
    vocab: int = typer.Option(1024, help="BPE vocabulary size"),
    dtype: str = typer.Option("float32", help="float32 | bfloat16 | float16"),
    seed: int = typer.Option(0),
) -> None:
    """Build a random-init Llama-style model + BPE tokenizer locally (no hub)."""
    from lora_core.model_files.tiny import make_tiny_model as build

    path = build(out_dir, hidden_size=hidden, num_layers=layers, num_heads=heads,
                 num_kv_heads=kv_heads, vocab_size=vocab, dtype=dtype, seed=seed)
    console.print(f"model written to [bold]{path}[/]")


def validate_data(
    file: Path = typer.Argument(..., exists=True, dir_okay=False, help="JSONL or JSON list"),
    format: str | None = typer.Option(None, "--format",
                                      help="alpaca|completion|chat|text|preference"),
    json_out: bool = typer.Option(False, "--json", help="print the report as JSON"),
) -> None:
    """Validate every line of a training file and print a report."""
    from lora_core.data.formats import validate_file

    report = validate_file(file, format)
    if json_out:
        print_json(report.to_dict() if hasattr(report, "to_dict") else report.__dict__)
    else:
        console.print(f"format: {report.format}  examples: {report.num_examples}  "
                      f"errors: {report.num_errors}")
        for e in report.errors:
            console.print(f"  line {e['line']}: {e.get('field') or ''}: {e['message']}")
    if report.num_errors:
        raise typer.Exit(1)


def train(
    spec: Path = typer.Argument(..., exists=True, dir_okay=False, help="RunSpec as YAML or JSON"),
    method: str | None = typer.Option(
        None, "--method", help="sft | dpo (over the spec's `method`; dpo trains on preference "
        "data)"),
    beta: float | None = typer.Option(None, "--beta", help="DPO beta (over the spec's dpo.beta)"),
) -> None:
    """Run the whole workflow locally: validate, train, merge, verify."""
    from lora_core.child_process import train_from_file

    overrides: dict[str, object] = {}
    if method is not None:
        overrides["method"] = method
    if beta is not None:
        overrides["dpo"] = {"beta": beta}
    result = train_from_file(spec, lambda line: console.print(line, markup=False), overrides)
    console.print(f"{result.status} at step {result.global_step}: "
                  f"train_loss={result.metrics.get('train_loss')} "
                  f"eval_loss={result.metrics.get('eval_loss')}")
    console.print(f"adapter: {result.adapter_path}")
    for merged in result.merged:
        console.print(f"merged:  {merged['path']} (max |logits diff| {merged['max_abs_diff']:.2e})")
    if result.status != "completed":
        raise typer.Exit(1)


def merge(
    base: Path = typer.Option(..., "--base", exists=True, file_okay=False),
    adapter: Path = typer.Option(..., "--adapter", exists=True, file_okay=False),
    out: Path = typer.Option(..., "-o", "--out"),
    shard_size: str = typer.Option("2GB", "--shard-size"),
    verify: bool = typer.Option(True, "--verify/--no-verify"),
) -> None:
    """Merge a PEFT adapter into its base model (out of core), verify logits, write manifest."""
    from lora_core.merging.merge import merge_adapter

    result = merge_adapter(base, adapter, out, max_shard_size=shard_size, verify=verify)
    console.print(f"merged into [bold]{result.out_dir}[/] in {result.seconds:.1f}s; "
                  f"max |logits diff| vs base+adapter = {result.max_abs_diff}")


def register(app: typer.Typer) -> None:
    app.command("make-tiny-model")(make_tiny_model)
    app.command("validate-data")(validate_data)
    app.command("train")(train)
    app.command("merge")(merge)
