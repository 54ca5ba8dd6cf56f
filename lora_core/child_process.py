"""Command-line entry points: the trainer child process, data validation, local training.

    python -m lora_core run --spec SPEC.json --events-file EVENTS.jsonl [--stop-file PATH]
    python -m lora_core validate-data FILE [--format F] [--model-dir DIR]
    python -m lora_core train SPEC.yaml

`run` is what the service's worker spawns (under `torchrun --nproc_per_node N -m lora_core run`
for several processes: every rank runs it, only rank 0 writes events). It stops cooperatively
when the stop file appears or on SIGTERM (a checkpoint is saved first), and on failure writes
one `error` event and exits:

    0  completed or stopped        2  user fault (bad spec, data, model)
    3  system fault (OOM, NaN loss, merge/storage failure, internal error)

Imports are lazy: `validate-data` never imports torch.
"""

from __future__ import annotations

import argparse
import atexit
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from lora_core.errors import LoraCoreError, SpecError, validation_problems

__all__ = ["main", "run_child", "train_from_file", "validate_data_cmd", "load_spec", "StopFlag"]

EXIT_OK, EXIT_USER, EXIT_SYSTEM = 0, 2, 3


def load_spec(
    path: str | os.PathLike[str], overrides: dict[str, Any] | None = None
) -> Any:  # -> RunSpec
    """A RunSpec from a JSON or YAML file, top-level `overrides` (the CLI's flags) applied
    over it (a dict value is merged into the file's); SpecError naming every bad field."""
    import json

    from pydantic import ValidationError

    from lora_core.spec import RunSpec

    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise SpecError(f"cannot read spec file {p}: {exc}", param="spec") from exc
    try:
        if p.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
        if overrides and isinstance(data, dict):
            for key, value in overrides.items():
                old = data.get(key)
                data[key] = {**old, **value} if isinstance(old, dict) and isinstance(value, dict) \
                    else value
        return RunSpec.model_validate(data)
    except ValidationError as exc:
        param, problems = validation_problems(exc.errors())
        raise SpecError(f"invalid spec {p.name}: {problems}", param=param) from exc
    except ValueError as exc:  # YAML and JSON syntax errors
        raise SpecError(f"invalid spec {p.name}: {exc}", param="spec") from exc


class StopFlag:
    """should_stop(): the stop file exists, or SIGTERM (and SIGINT if asked) was received.

    The handler only sets a flag: training notices it at the next step end, saves a
    checkpoint and returns, so a cancel never leaves a half-written checkpoint.
    """

    def __init__(self, stop_file: str | os.PathLike[str] | None = None, *, sigint: bool = False):
        self.stop_file = Path(stop_file) if stop_file else None
        self.signalled = False
        signal.signal(signal.SIGTERM, self._handler)
        if sigint:
            signal.signal(signal.SIGINT, self._handler)

    def _handler(self, signum: int, frame: Any) -> None:
        if self.signalled and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C means now
        self.signalled = True

    def __call__(self) -> bool:
        return self.signalled or (self.stop_file is not None and self.stop_file.exists())


def _is_oom(exc: BaseException) -> bool:
    return type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc).lower()


def run_child(spec_path: str, events_file: str | None, stop_file: str | None = None) -> int:
    """The trainer child: pipeline.run with events to `events_file` (rank 0); exit code."""
    from lora_core.events import ErrorEvent, EventWriter, NullEventWriter

    is_main = int(os.environ.get("RANK", "0")) == 0
    writer = EventWriter(events_file) if events_file and is_main else NullEventWriter()
    stop = StopFlag(stop_file)
    try:
        from lora_core.workflow import run

        run(load_spec(spec_path), writer.emit, stop)
        return EXIT_OK
    except LoraCoreError as exc:
        writer.emit("error", **exc.to_dict())
        return EXIT_USER if exc.user_fault else EXIT_SYSTEM
    except Exception as exc:  # noqa: BLE001 - the child's last word must be an error event
        traceback.print_exc()
        code = "out_of_memory" if _is_oom(exc) else "internal_error"
        writer.write(ErrorEvent(code=code, message=f"{type(exc).__name__}: {exc}"))
        return EXIT_SYSTEM
    finally:
        writer.close()


def format_event(type_: str, fields: dict[str, Any]) -> str | None:
    """One human line per event for the local CLI; None for events not worth a line."""
    f = fields
    if type_ == "progress":
        eta = f.get("eta_seconds")
        lr, tps = f.get("learning_rate") or 0, f.get("tokens_per_second") or 0
        dpo = (f"  margin {f['reward_margin']:.3f}  acc {f['reward_accuracy']:.2f}"
               if f.get("reward_margin") is not None and f.get("reward_accuracy") is not None
               else "")
        return (f"step {f['step']}/{f['total_steps']}  loss {f['loss']:.4f}  lr {lr:.2e}  "
                f"tok/s {tps:,.0f}" + dpo + (f"  eta {eta:.0f}s" if eta is not None else ""))
    if type_ == "eval":
        return f"step {f['step']}  eval_loss {f['eval_loss']:.4f}"
    if type_ == "stage":
        return f"== {f['stage']}"
    if type_ == "started":
        resumed = f.get("resumed_from_step")
        return (f"training {f['num_examples']} examples, {f['total_steps']} steps"
                + (f", resumed from step {resumed}" if resumed else ""))
    if type_ == "checkpoint":
        return f"checkpoint step {f['step']} -> {f['path']}"
    if type_ == "merged":
        return f"merged step {f['step']} -> {f['path']} (max |logit diff| {f['max_abs_diff']:.2e})"
    if type_ == "warning":
        return f"warning: {f['message']}"
    if type_ == "finished":
        return f"{f['status']}: adapter {f['adapter_path']}  metrics {f['metrics']}"
    return None


def train_from_file(
    spec_path: str | os.PathLike[str], console_printer: Callable[[str], Any] = print,
    overrides: dict[str, Any] | None = None,
) -> Any:  # -> PipelineResult
    """Local training from a YAML/JSON RunSpec, printing one line per event.

    Ctrl-C (or SIGTERM) stops cooperatively: a checkpoint is saved and status is "stopped";
    a second Ctrl-C aborts. Raises LoraCoreError on failure (the CLI maps it to an exit code).
    """
    from lora_core.workflow import run

    spec = load_spec(spec_path, overrides)

    def on_event(type_: str, **fields: Any) -> None:
        line = format_event(type_, fields)
        if line is not None:
            console_printer(line)

    return run(spec, on_event, StopFlag(sigint=True))


def validate_data_cmd(
    path: str | os.PathLike[str], fmt: str | None = None, *,
    model_dir: str | os.PathLike[str] | None = None,
    printer: Callable[[str], Any] = print,
) -> int:
    """Validate a data file, print the report; 0 if every line is good, 2 otherwise.

    With `model_dir`, token counts come from its tokenizer.json (no transformers import).
    """
    from lora_core.data.formats import validate_file

    tokenizer = None
    if model_dir is not None:
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
    try:
        report = validate_file(path, fmt, tokenizer=tokenizer)
    except LoraCoreError as exc:
        printer(f"error: {exc.message}")
        return EXIT_USER
    printer(f"format: {report.format}  examples: {report.num_examples}  "
            f"errors: {report.num_errors}  sha256: {report.sha256[:16]}")
    printer("lengths (" + ", ".join(f"{k} {v}" for k, v in report.stats.items()) + ")")
    if report.num_tokens is not None:
        printer(f"tokens: {report.num_tokens}")
    for e in report.errors:
        printer(f"line {e['line']}: {e['field'] or 'record'}: {e['message']}")
    if report.num_errors > len(report.errors):
        printer(f"... and {report.num_errors - len(report.errors)} more")
    return EXIT_OK if report.ok else EXIT_USER


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lora_core", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="trainer child process (the worker spawns this)")
    r.add_argument("--spec", required=True)
    r.add_argument("--events-file", default=None)
    r.add_argument("--stop-file", default=None)
    v = sub.add_parser("validate-data", help="validate a training data file")
    v.add_argument("file")
    v.add_argument("--format", default=None,
                   choices=["alpaca", "completion", "chat", "text", "preference"])
    v.add_argument("--model-dir", default=None, help="count tokens with this model's tokenizer")
    t = sub.add_parser("train", help="train locally from a YAML/JSON RunSpec")
    t.add_argument("spec")
    return p


def exit_now(code: int) -> NoReturn:
    """End a trainer process without the interpreter's teardown (cold or forked alike).

    Finalising an interpreter that holds torch, transformers, peft and a trained model frees
    every object one by one: ~4.5 s after the trainer's `finished` event on 2 loaded cores
    (bench/job_overhead_bench.py), and the worker waits for the exit before it uploads and
    settles the job. What that teardown does that anyone can observe is done first, in the
    same order: non-daemon threads joined, atexit handlers run (logging's flush among them),
    stdio flushed. Only memory is left for the kernel to reclaim.
    """
    current = threading.current_thread()
    for thread in threading.enumerate():
        if thread is not current and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed, or its pipe gone: nothing left to lose
            pass
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "run":
        return run_child(args.spec, args.events_file, args.stop_file)
    if args.command == "validate-data":
        return validate_data_cmd(args.file, args.format, model_dir=args.model_dir)
    try:
        result = train_from_file(args.spec)
    except LoraCoreError as exc:
        print(f"error [{exc.code}]: {exc.message}", file=sys.stderr)
        return EXIT_USER if exc.user_fault else EXIT_SYSTEM
    return EXIT_OK if result.status in ("completed", "stopped") else EXIT_SYSTEM
