"""`lorajobs samples JOB [--step N]` and the scores `lorajobs jobs show JOB` prints (issue 14)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.cli.runcli import cli
from tests.client.live import Live
from tests.evalfixtures import record_evaluations
from tests.servicefixtures import wait_for

pytestmark = pytest.mark.timeout(180)


def test_samples_and_scores(live: Live, tmp_path: Path) -> None:
    job_id = live.submit(max_steps=4)
    wait_for(lambda: live.job(job_id)["status"] == "succeeded", timeout=60, what="the job")
    record_evaluations(live, job_id)
    best = cli(live, "samples", job_id, cwd=tmp_path)
    assert best.returncode == 0, best.stderr
    assert "step 2" in best.stdout and "fox" in best.stdout and "tree" in best.stdout
    step4 = cli(live, "samples", job_id, "--step", "4", "--json", cwd=tmp_path)
    body = json.loads(step4.stdout)
    assert body["step"] == 4 and body["base_scores"] == {"exact_match": 0.0}
    assert [s["output"] for s in body["samples"]] == ["fix", "<b>x</b>"]
    missing = cli(live, "samples", job_id, "--step", "3", cwd=tmp_path)
    assert missing.returncode != 0 and "no evaluation at step 3" in missing.stderr
    show = cli(live, "jobs", "show", job_id, cwd=tmp_path)
    assert show.returncode == 0 and "evaluations" in show.stdout and "exact_match" in show.stdout
    assert "result: step 2" in show.stdout
