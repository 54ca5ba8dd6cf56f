"""`lorajobs deploy JOB`: publish a finished job on a serving target and remove it again
(against tests/fake_vllm.py, a fake vLLM HTTP server; the real one is tests/serving)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.cli.runcli import cli
from tests.client.live import MODEL, Live
from tests.fake_vllm import FakeVllm


def test_deploy_then_remove(live: Live, tmp_path: Path) -> None:
    job_id = live.submit(max_steps=4)
    assert live.wait_end(job_id)["status"] == "succeeded"
    with FakeVllm(MODEL) as fake:
        r = live.http.post("/v1/serving-targets", json={
            "name": "cli-target", "urls": [fake.url], "base_models": [MODEL],
            "adapter_dir": str(tmp_path / "adapters")})
        assert r.status_code == 201, r.text
        shown = cli(live, "deploy", job_id, "--target", "cli-target", cwd=tmp_path)
        assert shown.returncode == 0, shown.stderr
        name = f"ft:{MODEL}:lorajobs:{job_id}"
        assert f"{name} on cli-target: live on 1/1 server(s)" in shown.stdout
        again = cli(live, "deploy", job_id, "--target", "cli-target", "--json", cwd=tmp_path)
        assert json.loads(again.stdout)["model"] == name and list(fake.adapters) == [name]
        removed = cli(live, "deploy", job_id, "--target", "cli-target", "--remove",
                      cwd=tmp_path)
        assert removed.returncode == 0, removed.stderr
        assert fake.adapters == {}
        missing = cli(live, "deploy", job_id, "--target", "nowhere", cwd=tmp_path)
        assert missing.returncode != 0 and "nowhere" in missing.stderr
        assert live.http.delete("/v1/serving-targets/cli-target").status_code == 204
