"""`make demo`: the whole product end to end on this machine, in about three minutes.

    1. build a tiny Llama-style model + tokenizer locally (no hub) and a fresh data dir
    2. start the embedded service (`lorajobs serve`: API + worker + reaper, SQLite, no Redis)
    3. over HTTP: register the model, upload the bundled train/eval files, submit a job,
       follow its progress, download the adapter and the merged model (sha256-verified)
    4. load them with PEFT / transformers: merged logits == base+adapter logits; eval loss of
       the base vs the fine-tuned model
    5. the exact-match curve the job graded itself (`evaluation` with a string_check grader:
       the base at step 0, then every checkpoint; the best checkpoint is the job's result)
    6. print a summary and stop the service

The task (bundled in lora_core/assets): "Name the animal in the list. Input: road house table
deer. Output: deer" — a random-init base cannot do it, a LoRA adapter learns it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from lorajobs.client import Client
from lorajobs.localserver import ServerStartError, free_port, http_ok, start_server, stop_server

MODEL_NAME = "tiny-llama"
READY_TIMEOUT_S = 90
EVAL_EXAMPLES = 100  # held-out records scored by the loss check
EVAL_SAMPLES = 64  # held-out prompts the job's own grader scores at step 0 and each checkpoint
# The recipe measured to learn the task on 2 CPU cores in about a minute: lm_head is a target
# because a random-init base's output layer otherwise caps how confident the logits can get.
DEMO_JOB: dict[str, Any] = {
    "base_model": MODEL_NAME,
    "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "init": "kaiming",
             "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                "down_proj", "lm_head"]},
    "training": {"max_steps": 4000, "batch_size": 16, "gradient_accumulation_steps": 1,
                 "learning_rate": 3e-3, "lr_scheduler": "cosine", "warmup_ratio": 0.05,
                 "max_seq_length": 256, "logging_steps": 25, "save_steps": 1000,
                 "eval_steps": 1000,
                 # fp32: at 64 wide, bf16 autocast costs more in casts than it saves in
                 # matmuls, and its rounding cost this task ~20 points of exact match.
                 "precision": "fp32"},
    "merge": "final",
    "suffix": "animal-demo",
    # graded generations inside the job: greedy answers to held-out prompts, exact match
    "evaluation": {"num_samples": EVAL_SAMPLES, "max_new_tokens": 4, "batch_size": 32,
                   "graders": [{"type": "string_check", "name": "exact_match",
                                "operation": "eq", "input": "{{sample.output_text}}",
                                "reference": "{{item.reference}}"}],
                   "select": {"metric": "exact_match", "mode": "max"}},
}


def start_service(data_dir: Path, port: int, log_path: Path) -> subprocess.Popen[bytes]:
    """`lorajobs serve` on `port`, ready once /readyz answers and the admin key is written."""
    def ready() -> bool:
        return http_ok(f"http://127.0.0.1:{port}/readyz") and (data_dir / "admin_key").exists()

    try:
        return start_server([sys.executable, "-m", "lorajobs", "serve", "--port", str(port)],
                            ready=ready, timeout=READY_TIMEOUT_S, log=log_path,
                            env={**os.environ, "LORAJOBS_DATA_DIR": str(data_dir)})
    except ServerStartError as exc:
        raise SystemExit(f"the service did not start: {exc}") from None


def build_model(model_root: Path, train_file: Path) -> Path:
    from lora_core.model_files.tiny import make_tiny_model

    lines = [json.loads(x) for x in train_file.read_text().splitlines()[:200]]
    extra = [r["prompt"] + r["completion"] for r in lines]
    return make_tiny_model(model_root / MODEL_NAME, seed=0, extra_text=extra)


def run_job(client: Client, train_file: Path, eval_file: Path) -> tuple[str, float]:
    from lorajobs.cli.remote import watch

    client.models.register(MODEL_NAME, MODEL_NAME)
    train_ds = client.datasets.upload(train_file)
    eval_ds = client.datasets.upload(eval_file)
    print(f"uploaded {train_ds.num_examples} training and {eval_ds.num_examples} "
          f"held-out examples ({train_ds.format})")
    job = client.jobs.create({**DEMO_JOB, "training_file": train_ds.id,
                              "validation_file": eval_ds.id})
    print(f"submitted {job.id}: estimate {job.estimate}")
    started = time.monotonic()
    job = watch(client, job.id)
    if job.status != "succeeded":
        raise SystemExit(f"job {job.id} ended {job.status}: {job.error}")
    return job.id, time.monotonic() - started


def evaluate(base_dir: Path, adapter_dir: Path, merged_dir: Path, eval_file: Path
             ) -> dict[str, Any]:
    """Logits check and eval loss: base vs base+adapter vs merged."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(merged_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    tuned = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), adapter_dir)
    records = [json.loads(x) for x in eval_file.read_text().splitlines()][:EVAL_EXAMPLES]
    probe = tok([r["prompt"] + r["completion"] for r in records[:8]], return_tensors="pt",
                padding=True)
    with torch.no_grad():
        diff = (merged(**probe).logits - tuned(**probe).logits).abs().max().item()
    return {
        "max_abs_logits_diff": diff,
        "eval_loss_base": _completion_loss(base, tok, records),
        "eval_loss_tuned": _completion_loss(merged, tok, records),
    }


def _completion_loss(model: Any, tok: Any, records: list[dict[str, str]]) -> float:
    """Mean cross-entropy over completion tokens (+EOS), the loss the job trains."""
    import torch

    losses = []
    for r in records:
        prompt = tok(r["prompt"])["input_ids"]
        full = tok(r["prompt"] + r["completion"])["input_ids"] + [tok.eos_token_id]
        labels = [-100] * len(prompt) + full[len(prompt):]
        with torch.no_grad():
            out = model(input_ids=torch.tensor([full]), labels=torch.tensor([labels]))
        losses.append(out.loss.item())
    return sum(losses) / len(losses)


def main(argv: list[str] | None = None) -> None:
    from lora_core.data.synthetic import bundled_demo_files

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("demo-output"))
    args = parser.parse_args(argv)
    workdir = args.workdir.resolve()
    shutil.rmtree(workdir, ignore_errors=True)
    data_dir = workdir / "data"
    train_file, eval_file = bundled_demo_files()
    t0 = time.monotonic()
    print(f"building a tiny Llama-style model in {data_dir / 'models' / MODEL_NAME}")
    build_model(data_dir / "models", train_file)
    port = free_port()
    print(f"starting the embedded service on http://127.0.0.1:{port} (log: {workdir}/serve.log)")
    proc = start_service(data_dir, port, workdir / "serve.log")
    try:
        key = (data_dir / "admin_key").read_text().strip()
        with Client(f"http://127.0.0.1:{port}", key) as client:
            job_id, job_seconds = run_job(client, train_file, eval_file)
            adapter = client.jobs.download(job_id, workdir / "adapter")
            merged = client.jobs.download(job_id, workdir / "merged", merged=True)
            metrics = client.jobs.metrics(job_id)
            curve = client.jobs.evaluations(job_id)
            job = client.jobs.get(job_id)
    finally:
        stop_server(proc)
    print(f"downloaded {len(adapter)} adapter files and {len(merged)} merged-model files "
          "(sha256 verified)")
    figures = evaluate(data_dir / "models" / MODEL_NAME, workdir / "adapter",
                       workdir / "merged", eval_file)
    figures.update(_grader_figures(curve, job.metrics or {}))
    _print_summary(job_id, job_seconds, metrics, figures, workdir, time.monotonic() - t0)


def _grader_figures(curve: list[dict[str, Any]], job_metrics: dict[str, Any]
                    ) -> dict[str, Any]:
    """The job's own exact-match curve (step 0 = base) and the step it chose as its result."""
    points = [(row["step"], row["scores"].get("exact_match")) for row in curve]
    by_step = dict(points)
    best = job_metrics.get("best_step")
    return {"exact_match_curve": points, "best_step": best,
            "exact_match_base": by_step.get(0) or 0.0,
            "exact_match_tuned": by_step.get(best) or 0.0}


def _print_summary(job_id: str, job_seconds: float, metrics: list[Any],
                   f: dict[str, Any], workdir: Path, total_seconds: float) -> None:
    evals = [m.eval_loss for m in metrics if m.eval_loss is not None]
    ok = (f["eval_loss_tuned"] <= f["eval_loss_base"] / 2
          and f["exact_match_tuned"] > f["exact_match_base"] + 0.5
          and f["max_abs_logits_diff"] < 1e-3)
    print("\n=== lorajobs demo summary ===")
    print(f"job                      {job_id} ({job_seconds:.0f}s from submit to succeeded)")
    print(f"eval loss (held out)     base {f['eval_loss_base']:.3f} -> fine-tuned "
          f"{f['eval_loss_tuned']:.4f}  (job's eval curve: {', '.join(f'{e:.3f}' for e in evals)})")
    curve = ", ".join(f"{step}: {'-' if v is None else f'{v:.0%}'}"
                      for step, v in f["exact_match_curve"])
    print(f"exact match (job grader) base {f['exact_match_base']:.0%} -> fine-tuned "
          f"{f['exact_match_tuned']:.0%} at step {f['best_step']} (the job's result)")
    print(f"  curve by step          {curve}")
    print(f"merged vs base+adapter   max |logits diff| = {f['max_abs_logits_diff']:.2e}")
    print(f"adapter                  {workdir / 'adapter'}")
    print(f"merged model             {workdir / 'merged'}")
    print(f"total                    {total_seconds:.0f}s  -> {'OK' if ok else 'NOT OK'}")
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
