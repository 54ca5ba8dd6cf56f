"""DPO on LoRA (method "dpo"): the preference format, the spec, and real training runs.

The runs are trainer child processes (`python -m lora_core run`), as the worker spawns them:
one straight run (loss ln 2 at step 1, reward fields in progress events, merged + verified,
held-out preference accuracy >= 0.9 from a base near 0.5) and one killed with SIGKILL after
its first checkpoint and started again, whose losses must equal the straight run's.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from lora_core.data.formats import load_examples, validate_file
from lora_core.data.synthetic import make_preference_pairs
from lora_core.errors import DatasetError, SpecError
from lora_core.events import iter_events

STEPS = 15
SAVE_STEPS = 5
HELD_OUT = 100
CHILD_TIMEOUT = 600  # a hang guard only: a run takes ~30 s on an idle 2-core machine


def _pair(chosen: str = "fox", rejected: str = "tree", **input_extra: Any) -> dict[str, Any]:
    return {"input": {"messages": [{"role": "user", "content": "Name the animal: fox tree"}],
                      **input_extra},
            "preferred_output": [{"role": "assistant", "content": chosen}],
            "non_preferred_output": [{"role": "assistant", "content": rejected}]}


def _jsonl(records: list[Any]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


# -- format --------------------------------------------------------------------------------------
def test_preference_format_is_detected_and_normalised() -> None:
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {}}}]
    fmt, examples = load_examples(_jsonl([_pair(), _pair(tools=tools)]))
    assert fmt == "preference"
    assert examples[0] == {"prompt": [{"role": "user", "content": "Name the animal: fox tree"}],
                           "chosen": [{"role": "assistant", "content": "fox"}],
                           "rejected": [{"role": "assistant", "content": "tree"}]}
    assert examples[1]["tools"] == tools


def test_bad_preference_lines_are_named() -> None:
    wrong_role = _pair()
    wrong_role["preferred_output"][0]["role"] = "user"
    no_input = _pair()
    del no_input["input"]
    bad_tools = _pair(tools={"name": "x"})
    report = validate_file(_jsonl([_pair(), wrong_role, _pair("fox", "fox"), bad_tools]),
                           "preference")
    found = {(e["line"], e["field"]) for e in report.errors}
    assert (2, "preferred_output[0].role") in found
    assert (3, "non_preferred_output") in found  # identical answers teach nothing
    assert (4, "input.tools") in found
    report = validate_file(_jsonl([no_input]), "preference")
    assert [(e["line"], e["field"]) for e in report.errors] == [(1, "input")]
    with pytest.raises(DatasetError) as info:
        load_examples(_jsonl([_pair(), wrong_role]))
    assert info.value.line == 2


# -- spec ----------------------------------------------------------------------------------------
def test_method_and_data_format_must_agree(tmp_path: Path) -> None:
    from pydantic import ValidationError

    from lora_core.spec import RunSpec

    base = {"model_dir": tmp_path, "train_file": tmp_path / "t.jsonl", "output_dir": tmp_path}
    spec = RunSpec(**base, method="dpo", dpo={"beta": 0.5})
    assert spec.dpo.beta == 0.5 and RunSpec(**base).method == "sft"
    for bad in ({"method": "dpo", "data_format": "chat"},
                {"data_format": "preference"},
                {"method": "dpo", "distributed": {"num_processes": 2}},
                {"method": "dpo", "dpo": {"beta": 0}},
                {"method": "ppo"}):
        with pytest.raises(ValidationError):
            RunSpec(**base, **bad)


def test_sft_on_preference_data_names_the_method(tiny_model_dir: Path, tmp_path: Path) -> None:
    from lora_core.spec import RunSpec
    from lora_core.training.trainer import train

    data = tmp_path / "pairs.jsonl"
    data.write_bytes(_jsonl([_pair()] * 4))
    spec = RunSpec(model_dir=tiny_model_dir, train_file=data, output_dir=tmp_path / "out")
    with pytest.raises(SpecError) as info:
        train(spec)
    assert info.value.param == "method" and "dpo" in info.value.message
    assert not (tmp_path / "out").exists()


def test_cli_method_flag_reaches_the_spec(tmp_path: Path) -> None:
    from lora_core.child_process import load_spec

    spec_file = tmp_path / "run.json"
    spec_file.write_text(json.dumps({"model_dir": "m", "train_file": "t.jsonl",
                                     "output_dir": "o", "dpo": {"beta": 0.2}}))
    spec = load_spec(spec_file, {"method": "dpo", "dpo": {"beta": 0.3}})
    assert spec.method == "dpo" and spec.dpo.beta == 0.3
    assert load_spec(spec_file).method == "sft"


# -- training ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def task(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """128 training pairs; 100 held-out pairs whose word lists never occur in training.
    Chosen and rejected words have as many tokens (make_preference_pairs)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))

    def count(word: str) -> int:
        return len(tokenizer(word, add_special_tokens=False)["input_ids"])

    root = tmp_path_factory.mktemp("dpo")
    train = make_preference_pairs(128, seed=1, token_count=count)
    seen = {r["input"]["messages"][0]["content"] for r in train}
    held = make_preference_pairs(HELD_OUT, seed=2, token_count=count,
                                 exclude={s.split(": ", 1)[1] for s in seen})
    assert not seen & {r["input"]["messages"][0]["content"] for r in held}
    (root / "train.jsonl").write_bytes(_jsonl(train))
    (root / "valid.jsonl").write_bytes(_jsonl(held[:16]))
    return {"root": root, "train": root / "train.jsonl", "valid": root / "valid.jsonl",
            "held": held, "tokenizer": tokenizer}


def _write_spec(task: dict[str, Any], model_dir: Path, name: str, merge: str) -> Path:
    spec = {"model_dir": str(model_dir), "train_file": str(task["train"]),
            "validation_file": str(task["valid"]), "output_dir": str(task["root"] / name),
            "method": "dpo", "dpo": {"beta": 0.1},
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
            "training": {"max_steps": STEPS, "batch_size": 16, "gradient_accumulation_steps": 1,
                         "learning_rate": 5e-3, "save_steps": SAVE_STEPS, "precision": "fp32",
                         "seed": 0, "max_seq_length": 64},
            "merge": merge}
    path = task["root"] / f"{name}.json"
    path.write_text(json.dumps(spec))
    return path


def _child(spec: Path, events: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LORAJOBS_TOKEN_CACHE": "off"}
    return subprocess.Popen([sys.executable, "-m", "lora_core", "run", "--spec", str(spec),
                             "--events-file", str(events)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _losses(events: Path) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in iter_events(events) if e["type"] == "progress"}


@pytest.fixture(scope="module")
def straight(task: dict[str, Any], tiny_model_dir: Path) -> dict[str, Any]:
    events = task["root"] / "straight.jsonl"
    proc = _child(_write_spec(task, tiny_model_dir, "straight", "final"), events)
    _, err = proc.communicate(timeout=CHILD_TIMEOUT)
    assert proc.returncode == 0, err.decode()[-3000:]
    return {"events": list(iter_events(events)), "losses": _losses(events),
            "out": task["root"] / "straight"}


@pytest.fixture
def one_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the box is shared: 2 threads under contention run ~8x slower
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_dpo_starts_at_ln2_reports_rewards_and_merges(straight: dict[str, Any]) -> None:
    losses = straight["losses"]
    assert sorted(losses) == list(range(1, STEPS + 1))
    # step 1: B = 0, so policy == reference bit for bit and the loss is -log sigmoid(0)
    assert abs(losses[1] - math.log(2)) < 1e-6
    assert losses[STEPS] < losses[1] - 0.05
    progress = [e for e in straight["events"] if e["type"] == "progress"]
    first, last = progress[0], progress[-1]
    assert first["reward_margin"] == 0 and first["rewards_chosen"] == 0
    assert last["reward_margin"] > 0 and last["reward_accuracy"] >= 0.9
    assert last["rewards_chosen"] > last["rewards_rejected"]
    # completion tokens through the collator (counted a batch ahead: the dataloader prefetches)
    assert progress[0]["tokens_per_second"] > 0 and last["tokens_seen"] > 0
    types = [e["type"] for e in straight["events"]]
    assert types.count("checkpoint") == STEPS // SAVE_STEPS
    assert "merged" in types and types[-1] == "finished"
    finished = straight["events"][-1]
    assert finished["status"] == "completed" and finished["metrics"]["reward_accuracy"] >= 0.9
    evals = [e for e in straight["events"] if e["type"] == "eval"]  # each epoch (8 steps) + end
    assert [e["step"] for e in evals] == [8, STEPS] and evals[-1]["eval_loss"] < math.log(2)
    assert finished["metrics"]["eval_reward_accuracy"] >= 0.8
    assert (straight["out"] / "merged" / "final" / "manifest.json").exists()
    assert not (straight["out"] / "checkpoints" / "README.md").exists()
    for adapter in [straight["out"] / "adapter",
                    *(straight["out"] / "checkpoints").glob("checkpoint-*/adapter")]:
        assert not (adapter / "ref").exists()  # no copy of the adapter as the reference


@pytest.mark.slow
def test_tuned_model_ranks_held_out_pairs(straight: dict[str, Any], task: dict[str, Any],
                                          tiny_model_dir: Path, one_thread: None) -> None:
    from peft import PeftModel

    from lora_core.data.synthetic import preference_accuracy
    from lora_core.training.peft_setup import load_base_model

    base = load_base_model(tiny_model_dir, "float32")
    base_acc = preference_accuracy(base, task["tokenizer"], task["held"])
    tuned = PeftModel.from_pretrained(base, str(straight["out"] / "adapter"))
    tuned_acc = preference_accuracy(tuned, task["tokenizer"], task["held"])
    assert 0.3 <= base_acc <= 0.7, base_acc  # prefers nothing (measured 0.53)
    assert tuned_acc >= 0.9, tuned_acc  # measured 0.97


@pytest.mark.slow
def test_sigkill_then_restart_continues_the_same_run(
    straight: dict[str, Any], task: dict[str, Any], tiny_model_dir: Path
) -> None:
    spec = _write_spec(task, tiny_model_dir, "killed", "none")
    events = task["root"] / "killed.jsonl"
    proc = _child(spec, events)
    deadline = time.monotonic() + CHILD_TIMEOUT
    while not any(e["type"] == "checkpoint" for e in iter_events(events)):
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:] if proc.stderr else ""
        assert time.monotonic() < deadline
        time.sleep(0.05)  # polling a file another process appends to: no event to await
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    before = _losses(events)
    assert max(before) < STEPS

    events.unlink()
    proc = _child(spec, events)
    _, err = proc.communicate(timeout=CHILD_TIMEOUT)
    assert proc.returncode == 0, err.decode()[-3000:]
    started = next(e for e in iter_events(events) if e["type"] == "started")
    resumed = started["resumed_from_step"]
    assert resumed is not None and SAVE_STEPS <= resumed < STEPS
    after = _losses(events)
    assert sorted(after) == list(range(resumed + 1, STEPS + 1))
    for step, loss in {**before, **after}.items():
        assert loss == pytest.approx(straight["losses"][step], abs=1e-5), step


@pytest.mark.slow
def test_loss_is_sigmoid_dpo_against_the_adapter_disabled_base(
    straight: dict[str, Any], task: dict[str, Any], tiny_model_dir: Path, one_thread: None,
    tmp_path: Path,
) -> None:
    """TRL's loss on a batch of the trained adapter == -log sigmoid(beta * margin) computed
    here, the reference being the same PeftModel under `disable_adapter()`; no ref copy."""
    import datasets
    import torch
    from peft import PeftModel

    from lora_core.data.synthetic import completion_logps
    from lora_core.spec import RunSpec
    from lora_core.training.dpo import _trainer_class, build_dpo_args, use_base_as_reference
    from lora_core.training.peft_setup import load_base_model

    pairs = task["held"][:8]
    data = tmp_path / "pairs.jsonl"
    data.write_bytes(_jsonl(pairs))
    spec = RunSpec.model_validate({**json.loads(_write_spec(task, tiny_model_dir, "x", "none")
                                                .read_text()),
                                   "train_file": str(data), "output_dir": str(tmp_path / "o")})
    model = PeftModel.from_pretrained(load_base_model(tiny_model_dir, "float32"),
                                      str(straight["out"] / "adapter"))
    _, examples = load_examples(data)
    trainer = _trainer_class()(model=model, args=build_dpo_args(spec, "fp32", has_eval=False),
                               train_dataset=datasets.Dataset.from_list(examples),
                               processing_class=task["tokenizer"])
    use_base_as_reference(trainer.model)
    assert trainer.ref_model is None and list(model.peft_config) == ["default"]
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(pairs))])
    model.eval()
    with torch.no_grad():
        theirs = float(trainer.compute_loss(model, batch))

    def logps(r: dict[str, Any]) -> list[float]:
        return completion_logps(model, task["tokenizer"], r["input"]["messages"],
                                [r["preferred_output"], r["non_preferred_output"]])

    policy = [logps(r) for r in pairs]
    with model.disable_adapter():
        ref = [logps(r) for r in pairs]
    margins = torch.tensor([(pc - rc) - (pr - rr) for (pc, pr), (rc, rr) in zip(policy, ref,
                                                                               strict=True)])
    ours = float(-torch.nn.functional.logsigmoid(spec.dpo.beta * margins).mean())
    assert ours == pytest.approx(theirs, abs=1e-5)
    assert float(margins.mean()) > 1.0  # a trained adapter: the check is not ln 2 vs ln 2
