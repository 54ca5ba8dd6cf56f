"""kill -9 N times across N jobs (trainer or whole worker, at random steps): every job goes
back to queued, resumes from its newest sealed checkpoint, and succeeds with a complete loss
curve; at most `save_steps` steps are redone. Small N here; `bench/reliability.py` runs more.

tests/worker/test_faults.py covers the single cases in detail (self-crash of the trainer,
worker killed with the reaper's timing, max_attempts); this is the repeated, mixed figure.
"""

from __future__ import annotations

import pytest

from tests.reliability.scenarios import kill9
from tests.servicefixtures import LiveService

pytestmark = pytest.mark.timeout(180)

SAVE_STEPS = 5


@pytest.mark.parametrize("service,n_jobs", [("sqlite", 3), ("postgresql", 2)],
                         indirect=["service"])
def test_kill9_across_jobs(service: LiveService, n_jobs: int) -> None:
    figures = kill9(service, n_jobs, seed=n_jobs, save_steps=SAVE_STEPS)
    print(figures)
    assert figures["killed"] == n_jobs
    assert figures["completed"] == n_jobs and figures["lost"] == 0
    assert figures["resumed_from_checkpoint"] == n_jobs
    assert figures["max_steps_redone"] <= SAVE_STEPS
    assert figures["loss_curve_complete"] == n_jobs
