"""`lorajobs webhooks ...` against a live server that sends webhooks (beat) to a real receiver:
every subcommand, as a person or a script (`--json`) runs it, and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.cli.runcli import cli
from tests.client.live import Live
from tests.servicefixtures import wait_for
from tests.webhook_receiver import Receiver

pytestmark = pytest.mark.timeout(240)

SUCCEEDED = "fine_tuning.job.succeeded"


def test_webhooks_commands(live_webhooks: Live, tmp_path: Path) -> None:
    live = live_webhooks
    receiver = Receiver().start()
    try:
        made = cli(live, "webhooks", "create", receiver.url, "-e", SUCCEEDED, "-e",
                   "job.running", "--name", "ci", "--json", cwd=tmp_path)
        assert made.returncode == 0, made.stderr
        hook = json.loads(made.stdout)
        assert hook["signing_secret"].startswith("whsec_")
        receiver.secret = hook["signing_secret"]
        hook_id = hook["id"]

        listed = cli(live, "webhooks", "list", cwd=tmp_path)
        assert listed.returncode == 0 and hook_id in listed.stdout, listed.stderr
        shown = cli(live, "webhooks", "show", hook_id, cwd=tmp_path)
        assert shown.returncode == 0 and receiver.url in shown.stdout
        assert "secret hint: whsec_..." in shown.stdout
        assert hook["signing_secret"] not in shown.stdout

        nothing = cli(live, "webhooks", "update", hook_id, cwd=tmp_path)
        assert nothing.returncode == 1 and "nothing to change" in nothing.stderr
        narrowed = cli(live, "webhooks", "update", hook_id, "-e", SUCCEEDED, "--json",
                       cwd=tmp_path)
        assert json.loads(narrowed.stdout)["event_types"] == [SUCCEEDED], narrowed.stderr

        job_id = live.submit(max_steps=2)
        live.wait_end(job_id)
        wait_for(lambda: live.http.get(f"/v1/webhooks/{hook_id}/deliveries",
                                       params={"status": "delivered"}).json()["data"],
                 timeout=60, interval=0.2, what="the delivery")
        table = cli(live, "webhooks", "deliveries", hook_id, cwd=tmp_path)
        assert table.returncode == 0, table.stderr
        assert SUCCEEDED in table.stdout and "delivered" in table.stdout and job_id in table.stdout
        rows = json.loads(cli(live, "webhooks", "deliveries", hook_id, "--status", "delivered",
                              "--json", cwd=tmp_path).stdout)
        assert [r["job_id"] for r in rows] == [job_id] and rows[0]["attempt_log"]
        replayed = cli(live, "webhooks", "replay", hook_id, rows[0]["id"], cwd=tmp_path)
        assert replayed.returncode == 0 and f"replay of {rows[0]['id']}" in replayed.stdout
        assert receiver.wait_for(lambda: sum(r.verified and r.headers.get("webhook-id")
                                             == rows[0]["event_id"]
                                             for r in receiver.received) == 2)

        rotated = cli(live, "webhooks", "rotate-secret", hook_id, "--keep-old-secret",
                      cwd=tmp_path)
        assert rotated.returncode == 0 and "signing secret (shown once): whsec_" in rotated.stdout
        assert hook["signing_secret"] not in rotated.stdout
        off = cli(live, "webhooks", "update", hook_id, "--disable", cwd=tmp_path)
        assert off.returncode == 0 and "disabled" in off.stdout

        bad = cli(live, "webhooks", "create", receiver.url, "-e", "job.exploded", cwd=tmp_path)
        assert bad.returncode == 1 and "unknown event types" in bad.stderr
        gone = cli(live, "webhooks", "delete", hook_id, cwd=tmp_path)
        assert gone.returncode == 0 and f"{hook_id}: deleted" in gone.stdout
        missing = cli(live, "webhooks", "show", hook_id, cwd=tmp_path)
        assert missing.returncode == 1 and "no webhook endpoint" in missing.stderr
    finally:
        receiver.stop()
