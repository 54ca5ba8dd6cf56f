"""`lorajobs submit --wait` with the real trainer on the tiny model, then the download command
it prints, run as printed, and a loss plot of the real curve."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from tests.cli.runcli import cli
from tests.client.live import MODEL, REAL_TRAINING, Live, alpaca_records, write_jsonl

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def test_submit_wait_download_plot_real_trainer(live_real: Live, tmp_path: Path) -> None:
    from safetensors.numpy import load_file

    write_jsonl(tmp_path / "train.jsonl", alpaca_records(32))
    spec = tmp_path / "job.yaml"
    spec.write_text(f"base_model: {MODEL}\ntraining_file: ./train.jsonl\nmerge: none\n"
                    f"lora: {{r: 8, alpha: 16}}\ntraining: {json.dumps(REAL_TRAINING)}\n")
    r = cli(live_real, "submit", str(spec), "--wait", cwd=tmp_path, timeout=180)
    assert r.returncode == 0, (r.stdout, r.stderr, live_real.svc.log("worker")[-2000:])
    last = r.stdout.strip().splitlines()
    assert re.match(r"job_\w+ succeeded  train_loss=\d+\.\d{4}$", last[-2]), last
    download = last[-1].removeprefix("download: ").split("  ")[0]
    assert "--merged" not in download  # merge: none -> no merged model to offer
    args = shlex.split(download.split(" (")[0])
    assert args[:2] == ["lorajobs", "download"]
    got = cli(live_real, *args[1:], cwd=tmp_path)
    assert got.returncode == 0, got.stderr
    tensors = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert any("lora_A" in k for k in tensors)
    job_id = args[2]
    plot = cli(live_real, "plot", job_id, "-o", "loss.png", cwd=tmp_path)
    assert plot.returncode == 0, plot.stderr
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"
