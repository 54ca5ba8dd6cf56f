"""The trainer child's report channel: JSON lines appended to an events file.

Why a file and not stdout: torch, transformers and DeepSpeed print to stdout/stderr freely, and
under torchrun several ranks share them. Only rank 0 writes this file; the supervising worker
tails it. Each line is one object with a `type`:

    started     {total_steps, world_size, resumed_from_step, num_examples, num_tokens,
                 num_truncated, num_dropped}         (tokens of the training file: the service
                                                     stores them, lorajobs/service/tokencounts)
    progress    {step, total_steps, epoch, loss, learning_rate, grad_norm,
                 tokens_per_second, tokens_seen, eta_seconds}
    eval        {step, eval_loss}
    checkpoint  {step, path, adapter_path, resumable}
    stage       {stage}                      preparing | training | saving | merging | verifying
    merged      {step, path, max_abs_diff, files}
    warning     {message}
    finished    {status: completed | stopped, adapter_path, metrics}
    error       {code, message, param, user_fault}

Torch-free: the worker imports it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["EventWriter", "read_events", "NullEventWriter"]


class EventWriter:
    """Appends one JSON object per line and flushes, so a reader never sees half a line."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - lives with the writer

    def emit(self, type_: str, **fields: Any) -> None:
        record = {"type": type_, "time": time.time(), **fields}
        self._fh.write(json.dumps(record, default=str) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


class NullEventWriter:
    """Used on ranks other than 0 and when no events file is asked for."""

    def emit(self, type_: str, **fields: Any) -> None:  # noqa: D102 - same as EventWriter
        return None

    def close(self) -> None:
        return None


def read_events(path: str | os.PathLike[str], offset: int = 0) -> tuple[list[dict[str, Any]], int]:
    """Read complete lines from `offset`; return (events, new_offset). A partial tail is left."""
    p = Path(path)
    if not p.exists():
        return [], offset
    with open(p, "rb") as fh:
        fh.seek(offset)
        data = fh.read()
    end = data.rfind(b"\n")
    if end < 0:
        return [], offset
    events = []
    for raw in data[: end + 1].splitlines():
        if raw.strip():
            try:
                events.append(json.loads(raw))
            except json.JSONDecodeError:
                continue
    return events, offset + end + 1


def iter_events(path: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """All complete events in a file, in order."""
    events, _ = read_events(path, 0)
    yield from events
