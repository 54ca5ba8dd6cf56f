"""`lorajobs models upload NAME DIR` from a client machine (the files streamed over HTTP into
the server's store) and `models add` argument checks."""

from __future__ import annotations

import json
from pathlib import Path

from tests.cli.runcli import cli
from tests.client.live import Live


def test_models_upload_then_list(live: Live, tiny_model_dir: Path, tmp_path: Path) -> None:
    up = cli(live, "models", "upload", "cli-upload", str(tiny_model_dir), cwd=tmp_path)
    assert up.returncode == 0, up.stderr
    assert up.stdout.startswith("registered cli-upload (")
    listed = cli(live, "models", "list", "--json", cwd=tmp_path)
    rows = {m["name"]: m for m in json.loads(listed.stdout)}
    assert rows["cli-upload"]["source"] == "upload"
    again = cli(live, "models", "upload", "cli-upload", str(tiny_model_dir), cwd=tmp_path)
    assert again.returncode != 0 and "already registered" in again.stderr


def test_models_add_needs_one_source(live: Live, tmp_path: Path) -> None:
    both = cli(live, "models", "add", "x", "--s3", "s3://b/p", "--hf-repo", "a/b",
               cwd=tmp_path)
    assert both.returncode != 0 and "exactly one of --s3 and --hf-repo" in both.stderr
    bad = cli(live, "models", "add", "x", "--hf-repo", "../../etc", cwd=tmp_path)
    assert bad.returncode != 0 and "source.hf_repo" in bad.stderr
