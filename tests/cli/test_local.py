"""The local commands as a subprocess: make-tiny-model, validate-data, train, merge."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lora_core.data.synthetic import bundled_demo_files

pytestmark = pytest.mark.slow


def lorajobs(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lorajobs", *args], capture_output=True,
                          text=True, timeout=300, cwd=cwd,
                          env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1",
                               "LORAJOBS_TOKEN_CACHE": "off", "HOME": str(cwd)})


def test_validate_train_and_merge_locally(tmp_path: Path) -> None:
    model = tmp_path / "model"
    assert lorajobs("make-tiny-model", str(model), cwd=tmp_path).returncode == 0
    assert (model / "model.safetensors").exists() and not list(model.glob("*.bin"))

    train_file, eval_file = bundled_demo_files()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(train_file.read_text().splitlines()[0] + "\n{\"prompt\": 3}\n")
    out = lorajobs("validate-data", str(bad), cwd=tmp_path)
    assert out.returncode != 0 and "line 2" in out.stdout + out.stderr

    spec = {"model_dir": str(model), "train_file": str(train_file),
            "validation_file": str(eval_file), "output_dir": str(tmp_path / "run"),
            "lora": {"r": 4}, "training": {"max_steps": 3, "batch_size": 4,
                                           "gradient_accumulation_steps": 1,
                                           "max_seq_length": 64}}
    spec_file = tmp_path / "run.yaml"
    spec_file.write_text(yaml.safe_dump(spec))
    trained = lorajobs("train", str(spec_file), cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert "completed at step 3" in trained.stdout
    adapter = tmp_path / "run" / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 4

    merged = lorajobs("merge", "--base", str(model), "--adapter", str(adapter), "-o",
                      str(tmp_path / "merged"), cwd=tmp_path)
    assert merged.returncode == 0, merged.stderr[-2000:]
    assert (tmp_path / "merged" / "manifest.json").exists()
    assert "max |logits diff|" in merged.stdout


def test_bad_spec_is_one_line_naming_the_field(tmp_path: Path) -> None:
    spec_file = tmp_path / "run.yaml"
    spec_file.write_text(yaml.safe_dump({"model_dir": str(tmp_path / "missing"),
                                         "train_file": "x.jsonl", "output_dir": "out",
                                         "lora": {"r": 0}}))
    out = lorajobs("train", str(spec_file), cwd=tmp_path)
    assert out.returncode == 1
    assert "lora.r" in out.stderr and out.stderr.count("\n") == 1
    assert not (tmp_path / "out").exists()
