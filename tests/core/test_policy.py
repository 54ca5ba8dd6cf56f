"""`policy.next_state` as a table: (status, cancel flag, attempt/max, outcome) -> next status.

Pure: no database. The worker's settle and the reaper apply it (tests/core/
test_jobs_state.py, tests/worker/test_faults.py and test_reaper.py run it against real rows).
"""

from __future__ import annotations

import pytest

from lorajobs.core.policy import Decision, Outcome, next_state
from lorajobs.core.tables import Job, JobStatus

S, Out = JobStatus, Outcome
QUEUED, CANCELLED, FAILED = Decision(S.QUEUED), Decision(S.CANCELLED), Decision(S.FAILED)
REFUNDED = Decision(S.QUEUED, refund_attempt=True)

# status, cancel requested, attempt, max_attempts, outcome -> decision (None: not ours to end)
TABLE = [
    # a finished run is kept, even with a late cancel or on its last attempt
    (S.RUNNING, False, 1, 3, Out.SUCCEEDED, Decision(S.SUCCEEDED)),
    (S.RUNNING, True, 3, 3, Out.SUCCEEDED, Decision(S.SUCCEEDED)),
    # named errors and the runtime limit are verdicts: failed, not retried, not hidden by cancel
    (S.RUNNING, False, 1, 3, Out.USER_ERROR, FAILED),
    (S.RUNNING, True, 1, 3, Out.USER_ERROR, FAILED),
    (S.RUNNING, False, 1, 3, Out.SYSTEM_ERROR, FAILED),
    (S.RUNNING, True, 1, 3, Out.SYSTEM_ERROR, FAILED),
    (S.RUNNING, False, 1, 3, Out.MAX_RUNTIME, FAILED),
    (S.RUNNING, True, 3, 3, Out.MAX_RUNTIME, FAILED),
    # stopped on a cancel request
    (S.RUNNING, True, 1, 3, Out.CANCEL_STOP, CANCELLED),
    (S.RUNNING, True, 3, 3, Out.CANCEL_STOP, CANCELLED),
    # graceful worker shutdown: refunded, so queued even on the last attempt; cancel wins
    (S.RUNNING, False, 1, 3, Out.SHUTDOWN, REFUNDED),
    (S.RUNNING, False, 3, 3, Out.SHUTDOWN, REFUNDED),
    (S.RUNNING, True, 1, 3, Out.SHUTDOWN, CANCELLED),
    # no verdict: cancel requested -> cancelled; attempts left -> queued; otherwise failed
    (S.RUNNING, False, 1, 3, Out.CRASHED, QUEUED),
    (S.RUNNING, False, 2, 3, Out.CRASHED, QUEUED),
    (S.RUNNING, False, 3, 3, Out.CRASHED, FAILED),
    (S.RUNNING, True, 1, 3, Out.CRASHED, CANCELLED),
    (S.RUNNING, True, 3, 3, Out.CRASHED, CANCELLED),
    (S.RUNNING, False, 1, 3, Out.WORKER_LOST, QUEUED),
    (S.RUNNING, False, 1, 1, Out.WORKER_LOST, FAILED),
    (S.RUNNING, False, 4, 3, Out.WORKER_LOST, FAILED),
    (S.RUNNING, True, 1, 3, Out.WORKER_LOST, CANCELLED),
    (S.RUNNING, True, 3, 3, Out.WORKER_LOST, CANCELLED),
    # no attempt running: someone else ended it first
    (S.QUEUED, False, 1, 3, Out.WORKER_LOST, None),
    (S.QUEUED, True, 1, 3, Out.CRASHED, None),
    (S.SUCCEEDED, False, 1, 3, Out.SUCCEEDED, None),
    (S.FAILED, False, 3, 3, Out.CRASHED, None),
    (S.CANCELLED, True, 1, 3, Out.CANCEL_STOP, None),
    (S.PAUSED, False, 1, 3, Out.PAUSE_STOP, None),
]
PAUSED = Decision(S.PAUSED)

# With a pause requested: status, cancel requested, attempt, max_attempts, outcome -> decision
PAUSE_TABLE = [
    # stopped for the pause: refunded (the user's request, not a failure), even on the last
    (S.RUNNING, False, 1, 3, Out.PAUSE_STOP, Decision(S.PAUSED, refund_attempt=True)),
    (S.RUNNING, False, 3, 3, Out.PAUSE_STOP, Decision(S.PAUSED, refund_attempt=True)),
    (S.RUNNING, True, 1, 3, Out.PAUSE_STOP, CANCELLED),  # a cancel wins
    # an interruption while a pause is pending ends paused, not requeued, not failed
    (S.RUNNING, False, 1, 3, Out.CRASHED, PAUSED),
    (S.RUNNING, False, 3, 3, Out.WORKER_LOST, PAUSED),
    (S.RUNNING, False, 1, 3, Out.SHUTDOWN, Decision(S.PAUSED, refund_attempt=True)),
    # verdicts stay verdicts
    (S.RUNNING, False, 1, 3, Out.SUCCEEDED, Decision(S.SUCCEEDED)),
    (S.RUNNING, False, 1, 3, Out.USER_ERROR, FAILED),
    (S.PAUSED, False, 1, 3, Out.WORKER_LOST, None),
]


@pytest.mark.parametrize(("status", "cancel", "attempt", "max_attempts", "outcome", "expected"),
                         PAUSE_TABLE)
def test_next_state_with_a_pause_requested(status: str, cancel: bool, attempt: int,
                                           max_attempts: int, outcome: Outcome,
                                           expected: Decision | None) -> None:
    job = Job(status=status, cancel_requested=cancel, pause_requested=True, attempt=attempt,
              max_attempts=max_attempts)
    assert next_state(job, outcome) == expected


@pytest.mark.parametrize(("status", "cancel", "attempt", "max_attempts", "outcome", "expected"),
                         TABLE)
def test_next_state(status: str, cancel: bool, attempt: int, max_attempts: int,
                    outcome: Outcome, expected: Decision | None) -> None:
    job = Job(status=status, cancel_requested=cancel, pause_requested=False, attempt=attempt,
              max_attempts=max_attempts)
    assert next_state(job, outcome) == expected


def test_table_covers_every_outcome() -> None:
    assert {row[4] for row in TABLE + PAUSE_TABLE} == set(Outcome)
    assert {row[0] for row in TABLE} == set(S)
