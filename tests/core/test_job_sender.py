"""queue.JobSender: the API's committed job ids reach the broker from a thread of its own, in
batches, and nothing queued is dropped at close (issue 10 item 3: no broker send per POST)."""

from __future__ import annotations

import threading
from collections.abc import Sequence

from lorajobs.core.queue import SEND_BATCH_MAX, JobSender
from lorajobs.core.settings import Settings


def test_ids_queued_while_a_send_runs_go_out_together_and_close_flushes(tmp_path) -> None:
    sending, release = threading.Event(), threading.Event()
    batches: list[list[str]] = []

    def send(ids: Sequence[str], _settings: Settings) -> bool:
        batches.append(list(ids))
        sending.set()
        release.wait(10)
        return True

    sender = JobSender(Settings(data_dir=tmp_path), send=send)
    sender("job_0")
    assert sending.wait(10)  # the first send holds the thread: the next ids wait for it
    for i in range(1, SEND_BATCH_MAX + 3):
        sender(f"job_{i}")
    release.set()
    sender.close()
    assert batches[0] == ["job_0"]
    assert [len(b) for b in batches[1:]] == [SEND_BATCH_MAX, 2]
    assert [i for b in batches for i in b] == [f"job_{i}" for i in range(SEND_BATCH_MAX + 3)]


def test_a_failing_send_does_not_end_the_thread(tmp_path) -> None:
    seen: list[str] = []

    def send(ids: Sequence[str], _settings: Settings) -> bool:
        seen.extend(ids)
        if ids[0] == "job_bad":
            raise RuntimeError("broker exploded")
        return True

    sender = JobSender(Settings(data_dir=tmp_path), send=send)
    sender("job_bad")
    sender.close()
    sender("job_after")
    sender.close()
    assert seen == ["job_bad", "job_after"]
