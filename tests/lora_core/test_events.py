"""The trainer's event protocol (lora_core.events): written validated, read back typed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from lora_core.errors import DatasetError, SpecError
from lora_core.events import (
    CheckpointEvent,
    ErrorEvent,
    EventWriter,
    FinishedEvent,
    JobError,
    MergedEvent,
    ProgressEvent,
    Stage,
    StageEvent,
    StartedEvent,
    parse_event,
    read_events,
)

# One of each, with the fields lora_core's emitters pass (pipeline, callbacks, train, runner).
EMITTED = [
    ("started", {"total_steps": 8, "world_size": 1, "resumed_from_step": None,
                 "num_examples": 24, "num_tokens": 900, "num_truncated": 0, "num_dropped": 0}),
    ("stage", {"stage": Stage.TRAINING}),
    ("progress", {"step": 1, "total_steps": 8, "epoch": 0.12, "loss": 2.5, "learning_rate": 1e-3,
                  "grad_norm": 0.7, "tokens_per_second": 1234.5, "eta_seconds": 3.0,
                  "tokens_seen": 100, "rewards_chosen": None, "rewards_rejected": None,
                  "reward_margin": None, "reward_accuracy": None}),
    ("progress", {"step": 2, "total_steps": 8, "epoch": 0.25, "loss": 0.69, "learning_rate": 1e-3,
                  "grad_norm": 0.1, "tokens_per_second": 99.0, "eta_seconds": 2.0,
                  "tokens_seen": 200, "rewards_chosen": 0.01, "rewards_rejected": -0.02,
                  "reward_margin": 0.03, "reward_accuracy": 0.75}),  # method "dpo"
    ("eval", {"step": 2, "eval_loss": 2.1}),
    ("checkpoint", {"step": 2, "path": "/o/checkpoints/checkpoint-2",
                    "adapter_path": "/o/checkpoints/checkpoint-2/adapter", "resumable": True,
                    "save_seconds": 0.25}),
    ("evaluation", {"step": 2, "scores": {"exact_match": 0.5, "valid_loss": 2.1},
                    "samples": [{"index": 0, "prompt": "p", "reference": "r",
                                 "base_output": "x", "output": "r",
                                 "scores": {"exact_match": 1.0}}],
                    "best_step": 2, "best_metric": "exact_match", "best_value": 0.5,
                    "selection_reason": "step 2 ...", "stop": False, "stop_reason": None}),
    ("warning", {"message": "3 training example(s) dropped"}),
    ("merged", {"step": 8, "path": "/o/merged/final", "max_abs_diff": 1e-6,
                "files": [{"path": "model.safetensors", "size": 1, "sha256": "0" * 64}],
                "final": True}),
    ("finished", {"status": "completed", "adapter_path": "/o/adapter",
                  "metrics": {"train_loss": 2.0}, "merged": ["/o/merged/final"]}),
    ("error", DatasetError("line 3: empty output", line=3, field="output").to_dict()),
]


def test_every_event_round_trips_typed(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    writer = EventWriter(path)
    for type_, fields in EMITTED:
        writer.emit(type_, **fields)
    writer.close()
    raw, offset = read_events(path)
    assert offset == path.stat().st_size
    events = [parse_event(obj) for obj in raw]
    assert [e.type for e in events] == [t for t, _ in EMITTED]
    for event, (_, fields) in zip(events, EMITTED, strict=True):
        assert event.model_dump(exclude={"type", "time"}) == fields
        assert event.time > 0
    stage, error = events[1], events[-1]
    assert isinstance(stage, StageEvent) and stage.stage is Stage.TRAINING
    assert isinstance(error, ErrorEvent) and error.errors == [
        {"line": 3, "field": "output", "message": "line 3: empty output"}]
    assert error.job_error() == JobError(code="invalid_dataset", message="line 3: empty output",
                                         param="output", user_fault=True)


@pytest.mark.parametrize(("type_", "fields"), [
    ("progress", {"step": 1, "los": 2.0}),                 # misspelt field
    ("stage", {"stage": "compiling"}),                     # not a Stage
    ("checkpoint", {"step": 2}),                           # path missing
    ("finished", {"status": "done"}),                      # not completed | stopped
    ("restarted", {"step": 1}),                            # not a type of the protocol
])
def test_the_writer_refuses_what_the_protocol_does_not_have(tmp_path: Path, type_: str,
                                                            fields: dict) -> None:
    path = tmp_path / "events.jsonl"
    writer = EventWriter(path)
    with pytest.raises(ValidationError):
        writer.emit(type_, **fields)
    writer.close()
    assert path.read_text() == ""  # nothing half-written for the worker to trip on


def test_typed_events_keep_their_types() -> None:
    assert isinstance(parse_event({"type": "started", "total_steps": 3}), StartedEvent)
    assert isinstance(parse_event({"type": "progress", "step": 3}), ProgressEvent)
    assert isinstance(parse_event({"type": "checkpoint", "step": 3, "path": "p"}),
                      CheckpointEvent)
    assert isinstance(parse_event({"type": "merged", "path": "p"}), MergedEvent)
    finished = parse_event({"type": "finished", "status": "stopped", "adapter_path": None})
    assert isinstance(finished, FinishedEvent) and finished.metrics == {}
    assert [s.value for s in Stage] == ["preparing", "training", "saving", "merging",
                                        "verifying"]


def test_error_event_of_a_lora_core_error() -> None:
    error = SpecError("lora.r must be > 0", param="lora.r").job_error()
    assert error.model_dump() == {"code": "invalid_spec", "message": "lora.r must be > 0",
                                  "param": "lora.r", "user_fault": True}
    event = ErrorEvent.of(error)
    assert json.loads(event.model_dump_json())["code"] == "invalid_spec"
    assert event.job_error() == error


def test_the_protocol_module_is_torch_free() -> None:
    code = ("import sys, lora_core.events, lora_core.errors; "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
