"""A fine-tuning script written against OpenAI's API with the official `openai` package, as its
user wrote it. Pointed at lorajobs, only three things change, all outside this function: the
client's `base_url` and `api_key`, and the model names in `models`
(tests/openai_compat/test_migration.py runs it against `lorajobs serve`; README "Moving from
OpenAI fine-tuning" shows the diff).

It reads `chat.jsonl` (chat messages) and `preferences.jsonl` (`input`, `preferred_output`,
`non_preferred_output`) from the working directory, and `receiver` is the user's webhook
server: `.url` where it listens, `.secret` it verifies with `client.webhooks.unwrap(...)`, and
`.wait_for(predicate, timeout)` / `.received` (what arrived, each `.verified` and `.event`).
It returns what it saw, for the caller to check.
"""

from __future__ import annotations

import time
from typing import Any

from openai import OpenAI

POLL_SECONDS = 0.2
TIMEOUT_SECONDS = 240.0


def openai_user_script(client: OpenAI, models: dict[str, str], receiver: Any) -> dict[str, Any]:
    tags = {"project": "migration"}

    # 1. Training files
    with open("chat.jsonl", "rb") as fh:
        chat = client.files.create(file=fh, purpose="fine-tune")
    with open("preferences.jsonl", "rb") as fh:
        prefs = client.files.create(file=fh, purpose="fine-tune")

    # 2. Where our jobs' outcomes are posted
    hook = client.webhooks.create(url=receiver.url, name="fine-tuning", event_types=[
        "fine_tuning.job.succeeded", "fine_tuning.job.failed", "fine_tuning.job.cancelled"])
    receiver.secret = hook.signing_secret

    # 3. A supervised job and a DPO job, every hyperparameter "auto"
    sft = client.fine_tuning.jobs.create(
        model=models["sft"], training_file=chat.id, suffix="support", seed=7, metadata=tags,
        method={"type": "supervised", "supervised": {"hyperparameters": {
            "n_epochs": "auto", "batch_size": "auto", "learning_rate_multiplier": "auto"}}})
    dpo = client.fine_tuning.jobs.create(
        model=models["dpo"], training_file=prefs.id, suffix="prefs", metadata=tags,
        method={"type": "dpo", "dpo": {"hyperparameters": {
            "n_epochs": "auto", "batch_size": "auto", "learning_rate_multiplier": "auto",
            "beta": "auto"}}})
    oops = client.fine_tuning.jobs.create(model=models["sft"], training_file=chat.id,
                                          metadata=tags)
    cancelled = client.fine_tuning.jobs.cancel(oops.id)  # created by mistake

    # 4. Follow the events as they come (the API lists them newest first)
    streamed: dict[str, list[Any]] = {}

    def stream(job_id: str) -> None:
        seen = {e.id for e in streamed.setdefault(job_id, [])}
        new = []
        for event in client.fine_tuning.jobs.list_events(job_id, limit=5):  # pages on
            if event.id in seen:
                break
            new.append(event)
        for event in reversed(new):
            streamed[job_id].append(event)
            print(f"{job_id} {event.level}: {event.message}")

    def wait(job_id: str, until: Any, what: str) -> Any:
        deadline = time.monotonic() + TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            stream(job_id)
            job = client.fine_tuning.jobs.retrieve(job_id)
            if until(job):
                stream(job_id)
                return job
            if job.status in ("failed", "cancelled"):
                raise RuntimeError(f"{job_id} {job.status}: {job.error}")
            time.sleep(POLL_SECONDS)
        raise TimeoutError(f"{job_id}: no {what} in {TIMEOUT_SECONDS:.0f}s")

    # 5. Pause the supervised job once it has saved a checkpoint, resume it later
    wait(sft.id, lambda j: j.status == "running"
         and client.fine_tuning.jobs.checkpoints.list(j.id).data, "checkpoint while running")
    pausing = client.fine_tuning.jobs.pause(sft.id)
    paused = wait(sft.id, lambda j: j.status == "paused", "pause")
    resumed = client.fine_tuning.jobs.resume(sft.id)

    sft_done = wait(sft.id, lambda j: j.status == "succeeded", "success")
    dpo_done = wait(dpo.id, lambda j: j.status == "succeeded", "success")

    # 6. Build on a checkpoint: the earliest one becomes the model of a new job
    checkpoints = list(client.fine_tuning.jobs.checkpoints.list(sft.id, limit=2))  # pages on
    earliest = min(checkpoints, key=lambda c: c.step_number)
    third = client.fine_tuning.jobs.create(
        model=earliest.fine_tuned_model_checkpoint, training_file=chat.id, suffix="continued",
        metadata=tags, method={"type": "supervised",
                               "supervised": {"hyperparameters": {"n_epochs": 1}}})
    third_done = wait(third.id, lambda j: j.status == "succeeded", "success")

    # 7. Per-step metrics of every finished job
    results = {j.id: client.files.content(j.result_files[0]).text
               for j in (sft_done, dpo_done, third_done)}

    # 8. Every job's outcome reached our webhook server
    expected = {("fine_tuning.job.succeeded", j.id) for j in (sft, dpo, third)}
    expected.add(("fine_tuning.job.cancelled", oops.id))

    def outcomes() -> set[tuple[str, str]]:
        return {(r.event.type, r.event.data.id) for r in receiver.received if r.verified}

    receiver.wait_for(lambda: expected <= outcomes(), timeout=60)

    return {"files": (chat, prefs), "hook": hook, "created": (sft, dpo, third),
            "cancelled": cancelled, "pausing": pausing, "paused": paused, "resumed": resumed,
            "done": (sft_done, dpo_done, third_done), "checkpoints": checkpoints,
            "events": streamed, "results": results,
            "listed": list(client.fine_tuning.jobs.list(metadata=tags))}
