"""The reproducibility manifest tenants download names and hashes its inputs, and holds no
server path (not the data dir, the model root, the run dir, nor the interpreter)."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from lora_core.spec import RunSpec
from lorajobs.worker.reproducibility import write_manifest


def _strings(value: Any) -> list[str]:
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in (str(k), *_strings(v))]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return [value] if isinstance(value, str) else []


def test_manifest_records_names_and_hashes_not_paths(tmp_path: Path) -> None:
    server = tmp_path / "srv" / "lorajobs"
    model_dir = server / "models" / "tiny"
    model_dir.mkdir(parents=True)
    data_dir = server / "artifacts" / "datasets"
    data_dir.mkdir(parents=True)
    train, val = data_dir / "ds_train.jsonl", data_dir / "ds_val.jsonl"
    train.write_bytes(b'{"instruction": "a", "output": "b"}\n')
    val.write_bytes(b'{"instruction": "c", "output": "d"}\n')
    run_spec = RunSpec(model_dir=model_dir, train_file=train, validation_file=val,
                       output_dir=server / "artifacts" / "jobs" / "job_x" / "run")
    path = write_manifest(
        tmp_path / "reproducibility.json", job_id="job_x",
        spec={"base_model": "tiny", "training_file": "ds_train", "training": {"seed": 3}},
        run_spec=run_spec.model_dump(mode="json"),
        base_model={"name": "tiny", "weights_sha256": {"model.safetensors": "ab" * 32}},
        dataset={"id": "ds_train", "sha256": hashlib.sha256(train.read_bytes()).hexdigest()},
        world_size=1, attempt=1, resumed_from_step=None)
    doc = json.loads(path.read_text())

    leaked = [s for s in _strings(doc)
              if str(tmp_path) in s or s.startswith("/") or sys.executable in s]
    assert leaked == []
    assert doc["run_spec"]["train_file"] == {
        "name": "ds_train.jsonl", "sha256": hashlib.sha256(train.read_bytes()).hexdigest()}
    assert doc["run_spec"]["validation_file"] == {
        "name": "ds_val.jsonl", "sha256": hashlib.sha256(val.read_bytes()).hexdigest()}
    assert "model_dir" not in doc["run_spec"] and "output_dir" not in doc["run_spec"]
    assert doc["run_spec"]["lora"]["r"] == run_spec.lora.r  # the resolved spec is all there
    assert doc["seed"] == 3 and doc["base_model"]["name"] == "tiny"
    assert doc["libraries"]["python"]
