"""Graceful worker shutdown, repeated: requeued (not failed), attempt refunded, resumed from the
checkpoint the stop saved, and every trainer event recorded once although the resumed run
appends to the refunded attempt's events file. The single case in depth (solo and prefork,
both backends) is tests/worker/test_faults.py::test_worker_sigterm_requeues_...
"""

from __future__ import annotations

import pytest

from tests.reliability.scenarios import graceful_sigterm
from tests.servicefixtures import LiveService

pytestmark = pytest.mark.timeout(120)


def test_sigterm_twice(service: LiveService) -> None:
    figures = graceful_sigterm(service, 2)
    print(figures)
    assert figures == {"jobs": 2, "sigterms": 2, "requeued_not_failed": 2,
                       "attempt_refunded": 2, "resumed_from_stop_checkpoint": 2,
                       "events_once": 2, "completed": 2, "lost": 0}
