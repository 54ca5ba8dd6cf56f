"""The `lorajobs` CLI as a subprocess against a live server (fake trainer, SQLite).

Checked the way a user meets it: the text on stdout/stderr and the exit code. Every error is
exactly one line on stderr that names what to fix, with exit code 1.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli.runcli import cli, cli_env, cli_in_terminal
from tests.client.live import MODEL, Live, alpaca_records, write_jsonl
from tests.servicefixtures import wait_for

pytestmark = pytest.mark.timeout(120)


def _spec(tmp_path: Path, max_steps: int = 20, **fields: object) -> Path:
    write_jsonl(tmp_path / "train.jsonl", alpaca_records(16))
    spec = {"base_model": MODEL, "training_file": "./train.jsonl",
            "training": {"max_steps": max_steps, "save_steps": 5}, **fields}
    path = tmp_path / "job.yaml"
    path.write_text(json.dumps(spec))  # JSON is YAML
    return path


def _one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and "Traceback" not in result.stderr
    return lines[0]


def test_submit_wait_shows_a_moving_bar_in_a_terminal(live: Live, tmp_path: Path) -> None:
    code, raw = cli_in_terminal(live, "submit", str(_spec(tmp_path)), "--wait", cwd=tmp_path)
    assert code == 0, raw
    assert "\x1b[2K" in raw  # the line is erased and redrawn: a live bar, not a log
    out = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", raw)
    job_id = re.search(r"submitted (job_\w+)", out)
    assert job_id, out
    # The bar is redrawn in place: several different step counts reached the terminal.
    steps = {int(m) for m in re.findall(r"step (\d+)/20", out)}
    assert len(steps) >= 3 and 20 in steps, out
    assert "━" in out
    assert f"download: lorajobs download {job_id.group(1)} -o ./adapter" in out
    assert live.job(job_id.group(1))["status"] == "succeeded"


def test_submit_wait_without_a_terminal_logs_lines(live: Live, tmp_path: Path) -> None:
    r = cli(live, "submit", str(_spec(tmp_path)), "--wait", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("uploaded train.jsonl as ds_")
    progress = [line for line in lines if re.search(r"step \d+/20", line)]
    assert len(progress) >= 3 and "\x1b[" not in r.stdout  # plain lines, no cursor codes
    assert lines[-1].startswith("download: lorajobs download job_")


def test_submit_json_then_jobs_list_and_show(live: Live, tmp_path: Path) -> None:
    r = cli(live, "submit", str(_spec(tmp_path, max_steps=2)), "--wait", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    job = json.loads(r.stdout[r.stdout.index("{"):])  # after the "uploaded ..." line
    assert job["status"] == "succeeded" and job["id"].startswith("job_")
    listed = json.loads(cli(live, "jobs", "list", "--json", cwd=tmp_path).stdout)
    assert job["id"] in [j["id"] for j in listed]
    table = cli(live, "jobs", "list", cwd=tmp_path)
    assert table.returncode == 0 and job["id"] in table.stdout  # the whole id, never cut
    shown = json.loads(cli(live, "jobs", "show", job["id"], "--json", cwd=tmp_path).stdout)
    assert shown["id"] == job["id"] and shown["progress"]["step"] == 2
    human = cli(live, "jobs", "show", job["id"], cwd=tmp_path)
    assert human.returncode == 0 and "succeeded" in human.stdout and "step 2/2" in human.stdout


def test_logs_follow_streams_until_the_job_ends(live: Live, tmp_path: Path) -> None:
    job_id = live.submit(max_steps=15)
    r = cli(live, "logs", job_id, "-f", cwd=tmp_path, timeout=60)
    assert r.returncode == 0, r.stderr
    assert live.job(job_id)["status"] == "succeeded"  # it returned because the job ended
    types = [line.split()[2].rstrip(":") for line in r.stdout.splitlines()]
    assert types[0] == "created" and "started" in types and "finished" in types
    assert types[-1] == "status"  # the final transition is the last thing shown
    assert "[info]" not in r.stdout and " info " in r.stdout
    as_json = cli(live, "logs", job_id, "--json", cwd=tmp_path)
    events = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert [e["type"] for e in events] == types
    assert [e["id"] for e in events] == sorted(e["id"] for e in events)


def test_cancel_a_running_job(live: Live, tmp_path: Path) -> None:
    job_id = live.submit(max_steps=1000)
    live.wait_status(job_id, "running")
    r = cli(live, "cancel", job_id, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert job_id in r.stdout and ("stopping" in r.stdout or "cancelled" in r.stdout)
    assert live.wait_end(job_id)["status"] == "cancelled"
    again = _one_error_line(cli(live, "cancel", job_id, cwd=tmp_path))
    assert "cancelled" in again


def test_download_adapter_merged_and_a_checkpoint(live: Live, tmp_path: Path) -> None:
    job_id = live.submit(max_steps=4)
    assert live.wait_end(job_id)["status"] == "succeeded"
    arts = live.http.get(f"/v1/jobs/{job_id}/artifacts").json()["data"]
    for args, kind, step in ((["-o", "a"], "adapter", None), (["--merged", "-o", "m"], "merged",
                                                              None),
                             (["--step", "2", "-o", "c"], "adapter", 2)):
        r = cli(live, "download", job_id, *args, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        assert "sha256 verified" in r.stdout
        want = {a["name"]: a["size"] for a in arts if a["kind"] == kind and a["step"] == step}
        got = {p.name: p.stat().st_size for p in (tmp_path / args[-1]).iterdir()}
        assert got == want and want
    r = cli(live, "download", job_id, "--tensorboard", "-o", "tb", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    (event_file,) = (tmp_path / "tb").iterdir()
    assert event_file.name.startswith("events.out.tfevents.")
    missing = _one_error_line(cli(live, "download", job_id, "--step", "3", "-o", "x",
                                  cwd=tmp_path))
    assert "step 3" in missing


def test_datasets_upload_and_list(live: Live, tmp_path: Path) -> None:
    good = write_jsonl(tmp_path / "good.jsonl", alpaca_records(5))
    r = cli(live, "datasets", "upload", str(good), "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    ds = json.loads(r.stdout)
    assert ds["num_examples"] == 5 and ds["format"] == "alpaca"
    listed = cli(live, "datasets", "list", cwd=tmp_path)
    assert ds["id"] in listed.stdout


def test_models_list_and_register(live: Live, tmp_path: Path, tiny_model_dir: Path) -> None:
    """`models register` copies into the server's model root: same machine, same settings."""
    server = {k: v for k, v in live.svc.env.items() if k.startswith("LORAJOBS_")}
    env = {**cli_env(live, tmp_path), **server, "LORAJOBS_URL": live.url,
           "LORAJOBS_API_KEY": live.key}
    r = cli(live, "models", "register", "tiny-copy", str(tiny_model_dir), "--json",
            cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["name"] == "tiny-copy"
    listed = json.loads(cli(live, "models", "list", "--json", cwd=tmp_path).stdout)
    assert {"tiny", "tiny-copy"} <= {m["name"] for m in listed}
    human = cli(live, "models", "list", cwd=tmp_path).stdout
    assert "LlamaForCausalLM" in human and "tiny-copy" in human


def test_keys_create_for_a_new_tenant(live: Live, tmp_path: Path) -> None:
    r = cli(live, "keys", "create", "--name", "ci", "--tenant", "team-cli", "--json",
            cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    key = json.loads(r.stdout)["key"]
    env = {**cli_env(live, tmp_path), "LORAJOBS_API_KEY": key}
    theirs = cli(live, "jobs", "list", "--json", cwd=tmp_path, env=env)
    assert theirs.returncode == 0 and json.loads(theirs.stdout) == []  # a tenant of its own


def test_plot_writes_a_png(live: Live, tmp_path: Path) -> None:
    job_id = live.submit(max_steps=6)
    live.wait_end(job_id)
    r = cli(live, "plot", job_id, "-o", "loss.png", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    data = (tmp_path / "loss.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_errors_are_one_line_that_says_what_to_fix(live: Live, tmp_path: Path) -> None:
    job_id = live.submit(max_steps=1)
    wrong = {**cli_env(live, tmp_path), "LORAJOBS_API_KEY": "lj_wrong"}
    line = _one_error_line(cli(live, "jobs", "show", job_id, cwd=tmp_path, env=wrong))
    assert "API key" in line and "--api-key" in line

    line = _one_error_line(cli(live, "jobs", "show", "job_000000000000000000000000",
                               cwd=tmp_path))
    assert "job_000000000000000000000000" in line and "lorajobs jobs list" in line

    before = len(live.http.get("/v1/datasets", params={"limit": 100}).json()["data"])
    typo = _spec(tmp_path, training={"max_step": 3})
    line = _one_error_line(cli(live, "submit", str(typo), cwd=tmp_path))
    assert "training.max_step" in line and "did you mean 'max_steps'" in line
    after = len(live.http.get("/v1/datasets", params={"limit": 100}).json()["data"])
    assert after == before  # refused before uploading anything

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\nnot json\n{"instruction": "c"}\n')
    line = _one_error_line(cli(live, "datasets", "upload", str(bad), cwd=tmp_path))
    assert "2 bad lines" in line and "line 2" in line and "line 3: output" in line
    spec = _spec(tmp_path)
    spec.write_text(spec.read_text().replace("./train.jsonl", "./bad.jsonl"))
    line = _one_error_line(cli(live, "submit", str(spec), cwd=tmp_path))
    assert "line 2" in line

    line = _one_error_line(cli(live, "jobs", "list", cwd=tmp_path,
                               env={**cli_env(live, tmp_path),
                                    "LORAJOBS_URL": "http://127.0.0.1:9"}))
    assert "lorajobs serve" in line


def test_help_lists_the_client_commands() -> None:
    r = subprocess.run([sys.executable, "-m", "lorajobs", "--help"], capture_output=True,
                       text=True, timeout=30, env={"COLUMNS": "120", "PATH": "/usr/bin"})
    for command in ("submit", "jobs", "logs", "cancel", "download", "datasets", "models",
                    "keys", "plot", "webhooks"):
        assert command in r.stdout


def test_events_follow_waits_for_a_job_that_has_not_started(live: Live, tmp_path: Path
                                                             ) -> None:
    """`logs -f` on a queued job keeps following through its start to its end."""
    blocker = live.submit(max_steps=10)  # one worker: the next job waits behind this one
    queued = live.submit(max_steps=2)
    assert live.job(queued)["status"] == "queued"
    r = cli(live, "logs", queued, "-f", cwd=tmp_path, timeout=60)
    assert r.returncode == 0 and "finished" in r.stdout
    wait_for(lambda: live.job(blocker)["status"] == "succeeded", timeout=30)
