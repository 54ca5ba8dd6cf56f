"""The dashboard in a real headless Chromium (Debian's package, driven by Playwright).

A job is submitted and watched on the page: the jobs table lists it, its page shows the step
moving, then "succeeded" with the loss curve, checkpoints, events and download links. Every
request the page makes stays on the server (no CDN: the service runs offline). Screenshots
are kept under test-artifacts/ui/ for a person to look at.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.client.live import Live
from tests.dbfixtures import REQUIRE_SERVICES

pytestmark = pytest.mark.timeout(120)

CHROMIUM = os.environ.get("LORAJOBS_TEST_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "ui"
STEPS = 40  # 4 s with the fake trainer: long enough to see the step move on a 2 s poll


def _browser_missing(why: str) -> None:
    if REQUIRE_SERVICES:
        pytest.fail(f"Chromium is required (LORAJOBS_REQUIRE_SERVICES=1): {why}")
    pytest.skip(why)


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        _browser_missing(f"the playwright package is not installed: {exc}")
    if not (Path(CHROMIUM).exists() or shutil.which(CHROMIUM)):
        _browser_missing(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    with sync_playwright() as pw:
        # --no-sandbox: CI containers run as root, where Chromium's sandbox cannot start.
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                     args=["--no-sandbox", "--disable-gpu"])
        yield browser
        browser.close()


def test_job_progresses_and_finishes_on_the_dashboard(live: Live, browser) -> None:  # noqa: ANN001
    from playwright.sync_api import expect

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page = browser.new_page(viewport={"width": 1200, "height": 1000})
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))

    job_id = live.submit(max_steps=STEPS)
    page.goto(f"{live.url}/ui#key={live.key}")  # the fragment never reaches the server
    row = page.locator(f'tr.job[data-id="{job_id}"]')
    expect(row).to_be_visible(timeout=10_000)
    assert "key=" not in page.url  # the key leaves the address bar (and the history)

    row.click()
    expect(page.locator("#jobtitle")).to_have_text(job_id)
    step = page.locator("#jobstep")
    # Mid-run: the page shows a step strictly between 0 and the end, i.e. it updates live.
    page.wait_for_function(
        f"() => {{ const s = +document.querySelector('#jobstep')?.textContent;"
        f" return s > 0 && s < {STEPS}; }}", timeout=20_000)
    page.screenshot(path=str(ARTIFACTS / "job-running.png"), full_page=True)
    expect(page.locator("#jobstatus")).to_have_text("succeeded", timeout=30_000)
    expect(step).to_have_text(str(STEPS))
    expect(page.locator("#losschart path").first).to_be_visible()
    expect(page.locator("#events")).to_contain_text("finished")
    expect(page.locator("#events")).to_contain_text("checkpoint: checkpoint step 2 uploaded")
    expect(page.locator("a[data-dl]", has_text="adapter_model.safetensors").first) \
        .to_be_visible()
    page.screenshot(path=str(ARTIFACTS / "job-succeeded.png"), full_page=True)

    page.goto(f"{live.url}/ui#/")
    expect(row.locator("td.status")).to_have_text("succeeded", timeout=10_000)
    page.screenshot(path=str(ARTIFACTS / "jobs.png"), full_page=True)
    assert all(u.startswith(live.url) for u in requests), [u for u in requests
                                                           if not u.startswith(live.url)]
    assert not errors, errors
    page.close()


def test_download_link_carries_the_key(live: Live, browser) -> None:  # noqa: ANN001
    """Plain links cannot send the Authorization header; the page fetches and saves."""
    from playwright.sync_api import expect

    job_id = live.submit(max_steps=2)
    live.wait_end(job_id)
    page = browser.new_page(accept_downloads=True)
    page.goto(f"{live.url}/ui#/jobs/{job_id}&key={live.key}")
    expect(page.locator("#jobtitle")).to_have_text(job_id)
    assert "key=" not in page.url and page.url.endswith(f"#/jobs/{job_id}")
    link = page.locator("a[data-dl]", has_text="adapter_config.json").first
    with page.expect_download(timeout=10_000) as info:
        link.click()
    download = info.value
    assert download.suggested_filename == "adapter_config.json"
    saved = Path(download.path()).read_bytes()
    art = next(a for a in live.http.get(f"/v1/jobs/{job_id}/artifacts").json()["data"]
               if a["name"] == "adapter_config.json" and a["step"] is None)
    assert saved == live.http.get(art["url"]).content
    page.close()


def test_wrong_key_shows_the_error(live: Live, browser) -> None:  # noqa: ANN001
    page = browser.new_page()
    page.goto(f"{live.url}/ui#key=lj_wrong")
    from playwright.sync_api import expect

    expect(page.locator("#conn")).to_contain_text("invalid API key", timeout=10_000)
    page.close()


def test_key_through_the_form_never_in_a_url(live: Live, browser) -> None:  # noqa: ANN001
    """The form path: the key goes from the input to the Authorization header of each call,
    and into no URL the page requests; a key in the query string is refused, not used."""
    from playwright.sync_api import expect

    job_id = live.submit(max_steps=2)
    page = browser.new_page()
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto(f"{live.url}/ui")
    page.fill("#apikey", live.key)
    page.click("#keyform button")
    expect(page.locator(f'tr.job[data-id="{job_id}"]')).to_be_visible(timeout=10_000)
    assert requests and not [u for u in requests if live.key in u]

    refused = page.goto(f"{live.url}/ui?key={live.key}")
    assert refused is not None and refused.status == 400
    expect(page.locator("h1")).to_contain_text("do not go in the query string")
    assert live.key not in page.content()
    page.close()
