"""The dashboard's graded-generation view (issue 14), in headless Chromium: the score curve per
grader beside the loss curve, the best step and why, and the side-by-side table of base and
checkpoint outputs for the step the URL picks (the best by default)."""

from __future__ import annotations

import pytest

from tests.client.live import Live
from tests.evalfixtures import BEST_REASON, record_evaluations
from tests.servicefixtures import wait_for
from tests.ui.test_dashboard import browser  # noqa: F401 - a fixture, used by name

pytestmark = pytest.mark.timeout(180)


def test_score_curve_and_samples_table(live: Live, browser) -> None:  # noqa: ANN001, F811
    job_id = live.submit(max_steps=4)
    wait_for(lambda: live.job(job_id)["status"] == "succeeded", timeout=60, what="the job")
    record_evaluations(live, job_id)
    page = browser.new_page(viewport={"width": 1200, "height": 1400})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(f"{live.url}/ui#key={live.key}")
    page.goto(f"{live.url}/ui#/jobs/{job_id}")
    page.wait_for_selector("#scorechart")
    assert page.locator("#scorechart circle").count() == 3  # steps 0, 2, 4 of one grader
    assert BEST_REASON in page.inner_text("#bestreason")
    rows = page.locator("#samples tbody tr")
    assert rows.count() == 2 and "fox" in rows.nth(0).inner_text()  # the best step
    assert "<b>x</b>" in rows.nth(1).inner_text()  # outputs are text, never markup
    page.goto(f"{live.url}/ui#/jobs/{job_id}/step/4")
    page.wait_for_function("document.querySelector('#samples thead').innerText"
                           ".includes('step 4')")
    assert "fix" in page.locator("#samples tbody tr").nth(0).inner_text()
    assert not errors
