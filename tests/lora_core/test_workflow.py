"""pipeline.run (train + merge + stage events) and the `python -m lora_core` child process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lora_core.events import read_events

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def train_file(tmp_path_factory) -> Path:
    from lora_core.data.synthetic import make_examples

    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in make_examples(24, seed=4)))
    return path


def _spec_dict(model_dir, train_file, out, **training) -> dict:
    return {
        "model_dir": str(model_dir), "train_file": str(train_file), "output_dir": str(out),
        "lora": {"r": 4, "target_modules": ["q_proj", "v_proj"]},
        "training": {"max_steps": 4, "batch_size": 4, "gradient_accumulation_steps": 1,
                     "learning_rate": 1e-3, "max_seq_length": 128, "save_steps": 2, **training},
        "merge": "all",
    }


@pytest.mark.slow
def test_pipeline_trains_merges_every_checkpoint_and_reports_stages(
    tiny_model_dir, train_file, tmp_path, monkeypatch
):
    import lora_core.model_files.headers as inspect_mod
    from lora_core.spec import RunSpec
    from lora_core.workflow import run

    reads: list[Path] = []  # the base model's headers are read once per run, not per use
    read = inspect_mod._read_model_dir
    monkeypatch.setattr(inspect_mod, "_read_model_dir", lambda d: reads.append(d) or read(d))
    inspect_mod._INFO_CACHE.clear()
    events: list[tuple[str, dict]] = []
    spec = RunSpec.model_validate(_spec_dict(tiny_model_dir, train_file, tmp_path / "out"))
    result = run(spec, lambda t, **f: events.append((t, f)))
    assert [d.resolve() for d in reads].count(Path(tiny_model_dir).resolve()) == 1, reads
    stages = [f["stage"] for t, f in events if t == "stage"]
    assert stages == ["preparing", "training", "saving", "merging", "verifying"]
    merged = [f for t, f in events if t == "merged"]
    assert [m["step"] for m in merged] == [2, 4, 4]
    assert all(m["max_abs_diff"] < 1e-4 for m in merged)
    assert events[-1][0] == "finished" and events[-1][1]["status"] == "completed"
    out = tmp_path / "out" / "merged"
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2", "checkpoint-4", "final"]
    assert (out / "final" / "manifest.json").exists() and (out / "final" / "config.json").exists()
    assert (result.adapter_path / "manifest.json").exists()


def _child(args: list[str], **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "lora_core", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kw)


def test_child_reports_data_errors_and_exits_2(tiny_model_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "bot", "content": "x"}]}\n')
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(_spec_dict(tiny_model_dir, bad, tmp_path / "out")))
    events_file = tmp_path / "events.jsonl"
    proc = _child(["run", "--spec", str(spec), "--events-file", str(events_file)])
    assert proc.wait(timeout=60) == 2, proc.stdout.read().decode()
    events, _ = read_events(events_file)
    error = events[-1]
    assert error["type"] == "error" and error["code"] == "invalid_dataset" and error["user_fault"]
    assert error["errors"][0] == {"line": 1, "field": "messages[0].role",
                                  "message": "unknown role 'bot'"}
    assert not (tmp_path / "out").exists()


def test_child_bad_spec_is_a_user_error(tmp_path):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"model_dir": "x", "train_file": "y", "output_dir": "z",
                                "lora": {"r": 0}}))
    events_file = tmp_path / "events.jsonl"
    proc = _child(["run", "--spec", str(spec), "--events-file", str(events_file)])
    assert proc.wait(timeout=60) == 2
    error = read_events(events_file)[0][-1]
    assert error["code"] == "invalid_spec" and error["param"] == "lora.r"


def test_validate_data_cli_exit_codes(tmp_path):
    good, bad = tmp_path / "good.jsonl", tmp_path / "bad.jsonl"
    good.write_text('{"text": "hello"}\n')
    bad.write_text('{"text": "hello"}\n{"text": 3}\n')
    assert _child(["validate-data", str(good)]).wait(timeout=30) == 0
    proc = _child(["validate-data", str(bad)])
    assert proc.wait(timeout=30) == 2
    assert b"line 2: text: must be a string" in proc.stdout.read()


@pytest.mark.slow
def test_child_sigterm_stops_cooperatively_with_a_checkpoint(tiny_model_dir, train_file, tmp_path):
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(_spec_dict(tiny_model_dir, train_file, tmp_path / "out",
                                          max_steps=100000, save_steps=100000)))
    events_file = tmp_path / "events.jsonl"
    proc = _child(["run", "--spec", str(spec), "--events-file", str(events_file)])
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and proc.poll() is None:
        if any(e["type"] == "progress" for e in read_events(events_file)[0]):
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0, proc.stdout.read().decode()[-3000:]
    events = read_events(events_file)[0]
    finished = events[-1]
    assert finished["type"] == "finished" and finished["status"] == "stopped"
    ckpt = [e for e in events if e["type"] == "checkpoint"]
    assert len(ckpt) == 1 and (Path(ckpt[0]["path"]) / "COMPLETE").exists()
    assert not (tmp_path / "out" / "merged").exists()
