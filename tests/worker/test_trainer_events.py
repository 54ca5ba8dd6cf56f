"""The worker's side of the trainer's event protocol: lines are typed, anything else skipped."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from lora_core.events import FinishedEvent, ProgressEvent, read_events
from lorajobs.worker.supervisor import typed_events


def test_garbled_and_foreign_lines_are_logged_and_skipped(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "events.jsonl"
    path.write_bytes(
        b'{"type": "progress", "step": 1, "loss": 2.0}\n'
        b"\xff garbage, not JSON\n"
        b'["a", "list"]\n'
        b'{"type": "progress", "loss": 2.0}\n'          # no step
        b'{"type": "progress", "step": "two"}\n'        # not an int
        b'{"type": "restarted", "step": 1}\n'           # no such event
        b'{"step": 1}\n'                                # no type at all
        b'{"type": "finished", "status": "completed", "adapter_path": "/a"}\n'
        b'{"type": "progress", "st')                    # a line still being written
    raw, offset = read_events(path)
    assert len(raw) == 6 and offset < path.stat().st_size  # JSON objects; the tail waits
    with caplog.at_level(logging.WARNING, logger="lorajobs.worker.supervisor"):
        events = typed_events("job_x", raw)
    assert [type(e) for e in events] == [ProgressEvent, FinishedEvent]
    assert events[0].step == 1 and events[1].status == "completed"
    skipped = [r.getMessage() for r in caplog.records]
    assert len(skipped) == 4 and all("job_x: skipped a trainer event" in m for m in skipped)
    assert "step: Field required" in skipped[0]
