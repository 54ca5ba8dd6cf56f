"""Train -> deploy -> chat, against a real vLLM (CPU build) started by the test.

A job trains on a tiny Llama-style model with head_dim 128 (vLLM's CPU attention rejects 16)
through the live server (API, worker with the real trainer, beat); the admin registers the vLLM
server as a target; the tenant deploys the job with the SDK and the official `openai` client
chats with `job.fine_tuned_model` through lorajobs: greedy tokens equal transformers + PEFT on
the downloaded adapter. Another tenant gets 404; a vLLM restart is healed by beat's reconciler;
undeploy removes the model from /openai/v1/models. vLLM lives in its own venv
(tests/vllm_env.py, built once per machine: `python -m tests.vllm_env`, as .ci/run does).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from lorajobs.client import Client
from lorajobs.localserver import free_port
from tests import vllm_env
from tests.client.live import alpaca_records
from tests.servicefixtures import LiveService, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

MODEL = "tiny"
MESSAGES = [{"role": "user", "content": "Add 3 and 4."}]
NEW_TOKENS = 8
VLLM_START_TIMEOUT_S = 240  # ~60-90 s measured; the machine is shared


class VllmServer:
    """`python -m vllm.entrypoints.openai.api_server` from the cached venv, on one port."""

    def __init__(self, model_dir: Path, log: Path) -> None:
        self.python = vllm_env.ensure()
        self.model_dir, self.log = model_dir, log
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.started = time.monotonic()
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1",
               "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [str(self.python), "-m", "vllm.entrypoints.openai.api_server",
                 "--model", str(self.model_dir), "--served-model-name", MODEL,
                 "--enable-lora", "--max-lora-rank", "16", "--max-model-len", "256",
                 "--dtype", "float32", "--enforce-eager",
                 # A small warm-up/profiling batch: startup is most of this test's time.
                 "--max-num-seqs", "4", "--max-num-batched-tokens", "256",
                 "--host", "127.0.0.1", "--port", str(self.port)],
                env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self) -> None:
        def up() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"vLLM exited: {self.log.read_text()[-3000:]}")
            try:
                return httpx.get(f"{self.url}/v1/models", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(up, timeout=VLLM_START_TIMEOUT_S, interval=0.5, what="vLLM /v1/models")
        print(f"vLLM answered {time.monotonic() - self.started:.1f} s after its start")

    def models(self) -> set[str]:
        return {m["id"] for m in httpx.get(f"{self.url}/v1/models", timeout=5).json()["data"]}

    def stop(self) -> None:
        print(f"--- vllm.log ---\n{self.log.read_text(errors='replace')[-3000:]}")
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    from lora_core.model_files.tiny import make_tiny_model

    # hidden 256 / 2 heads: head_dim 128, which vLLM's CPU attention supports.
    return make_tiny_model(tmp_path / "model", hidden_size=256, num_heads=2, num_kv_heads=2,
                           seed=0)


@pytest.fixture
def vllm(model_dir: Path, tmp_path: Path) -> Iterator[VllmServer]:
    server = VllmServer(model_dir, tmp_path / "vllm.log")
    server.start()  # starts loading while the job trains
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def svc(tmp_path: Path, model_dir: Path) -> Iterator[LiveService]:
    service = LiveService(tmp_path / "svc", "sqlite", trainer=None,
                          serving_reconcile_seconds=1)
    try:
        service.migrate()
        service.start_worker()
        service.start_beat()
        service.start_api()
        import shutil

        shutil.copytree(model_dir, service.settings.resolved_model_root / MODEL)
        yield service
    finally:
        for name in ("api", "beat"):  # shown by pytest when the test fails
            print(f"--- {name}.log ---\n{service.log(name)[-4000:]}")
        service.close()


def _reference(model_dir: Path, adapter_dir: Path) -> tuple[list[int], str]:
    """transformers + PEFT, greedy, on the adapter downloaded from lorajobs: (token ids, text).
    Exactly NEW_TOKENS (EOS masked until then, as vLLM's `min_tokens` does): a random-init
    model often ends at once, and an empty answer would compare nothing."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    ids = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                             do_sample=False)
    new = [int(t) for t in out[0, ids.shape[1]:]]
    return new, tok.decode(new, skip_special_tokens=True)


# vLLM's own sampling parameters, sent through the openai client (and relayed by lorajobs).
GREEDY: dict[str, object] = {"max_tokens": NEW_TOKENS, "temperature": 0,
                             "extra_body": {"min_tokens": NEW_TOKENS, "return_token_ids": True}}


def test_train_deploy_chat(svc: LiveService, vllm: VllmServer, model_dir: Path,
                           tmp_path: Path) -> None:
    import openai

    url = svc.base_url or ""
    with Client(url, svc.admin_key) as admin:
        admin.request("POST", "/v1/models", json={"name": MODEL, "path": MODEL})
        team_a = admin.keys.create(name="a", tenant="team-a", manage_keys=True)["key"]
        team_b = admin.keys.create(name="b", tenant="team-b", manage_keys=True)["key"]
        admin.request("POST", "/v1/serving-targets", json={
            "name": "default", "urls": [vllm.url], "base_models": [MODEL],
            "adapter_dir": str(tmp_path / "adapters")})
    with Client(url, team_a) as client:
        data = tmp_path / "train.jsonl"
        import json

        data.write_text("".join(json.dumps(r) + "\n" for r in alpaca_records(32)))
        dataset = client.datasets.upload(data)
        job = client.jobs.create({"base_model": MODEL, "training_file": dataset.id,
                                  "training": {"max_steps": 4, "batch_size": 4,
                                               "max_seq_length": 128, "learning_rate": 1e-2,
                                               "save_steps": 4, "seed": 0},
                                  "lora": {"r": 8}, "merge": "final"})
        job = client.jobs.wait(job.id, timeout=300, poll_interval=0.2)
        assert job.status == "succeeded", job
        succeeded_at = time.time()
        vllm.wait_ready()
        ready_at = time.time()
        dep = client.jobs.deploy(job.id, "default")
        oa = openai.OpenAI(base_url=f"{url}/openai/v1", api_key=team_a)
        name = client.jobs.get(job.id).fine_tuned_model
        assert dep["model"] == name == f"ft:{MODEL}:lorajobs:{job.id}" and dep["live"]
        assert name is not None
        answer = oa.chat.completions.create(model=name, messages=MESSAGES,  # type: ignore
                                            **GREEDY)
        first_answer_at = time.time()
        print(f"\nsucceeded -> first answer: {first_answer_at - succeeded_at:.2f} s "
              f"(of which waiting for vLLM to finish starting: {ready_at - succeeded_at:.2f} s;"
              f" deploy + first chat: {first_answer_at - ready_at:.2f} s)")
        client.jobs.download(job.id, tmp_path / "adapter")

    expected_ids, expected = _reference(model_dir, tmp_path / "adapter")
    assert getattr(answer.choices[0], "token_ids", None) == expected_ids
    assert answer.choices[0].message.content == expected
    base = oa.chat.completions.create(model=MODEL, messages=MESSAGES,  # type: ignore
                                      **GREEDY)
    assert getattr(base.choices[0], "token_ids", None) != expected_ids  # the adapter matters

    streamed = oa.chat.completions.create(model=name, messages=MESSAGES,  # type: ignore
                                          stream=True, **GREEDY)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == expected

    other = openai.OpenAI(base_url=f"{url}/openai/v1", api_key=team_b)
    with pytest.raises(openai.NotFoundError):
        other.chat.completions.create(model=name, messages=MESSAGES)  # type: ignore[arg-type]
    assert name not in {m.id for m in other.models.list()}
    assert name in {m.id for m in oa.models.list()}

    # Restart vLLM: it forgets runtime-loaded adapters; beat's reconciler loads it again.
    vllm.stop()
    vllm.start()
    vllm.wait_ready()
    restarted_at = time.time()
    wait_for(lambda: name in vllm.models(), timeout=30, interval=0.2, what="adapter reloaded")
    print(f"reloaded {time.time() - restarted_at:.2f} s after vLLM answered again")
    again = oa.chat.completions.create(model=name, messages=MESSAGES,  # type: ignore
                                       **GREEDY)
    assert getattr(again.choices[0], "token_ids", None) == expected_ids

    with Client(url, team_a) as client:
        client.jobs.undeploy(job.id, "default")
    assert name not in {m.id for m in oa.models.list()}
    # A reconcile sweep that read the deployment before the undeploy may land its reload after
    # the unload; it re-checks the row and unloads again (test_deploy.py, deterministically).
    wait_for(lambda: name not in vllm.models(), timeout=30, interval=0.2,
             what="the adapter unloaded from vLLM")
