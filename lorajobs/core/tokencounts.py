"""Token counts of a dataset: counted once, by the trainer that tokenises it, never per request.

    POST /v1/jobs ─▶ lookup(dataset sha256, format, model, max_seq_length)  one primary-key read
                       hit  ─▶ estimate.num_tokens + the truncation warning, at once
                       miss ─▶ estimate.num_tokens = null (counted when the job starts)
    trainer `started` {num_tokens, num_truncated, num_dropped}
                     ─▶ record_started: INSERT the count (first writer wins) and fill in the
                        job's estimate, compatibility warning and a `warning` event

Why the trainer: it tokenises the file anyway, with the model's real tokenizer and chat
template, and keeps the features in its own cache under the same key (lora_core.data.cache:
data bytes, format, max_seq_length, tokenizer). Counting in the API instead re-read and
re-tokenised the whole file on every POST, before the quota check (3 s for 150k examples,
~40 s of CPU and GBs of memory for 2M, repeatable by any tenant).

Keyed by content (the dataset's sha256), not by id: a re-upload of the same bytes reuses the
count, and deleting a dataset leaves nothing to clean (a row is ~100 bytes). The model is the
registration (its id), which fixes the tokenizer files. This module is the only writer of the
`token_counts` table.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import insert
from sqlalchemy.orm import Session

from lora_core.events import StartedEvent
from lorajobs.core import jobs
from lorajobs.core.tables import Dataset, Job, RegisteredModel, TokenCount

__all__ = ["lookup", "record_started", "truncation_warning"]

log = logging.getLogger(__name__)


def truncation_warning(truncated: int) -> str:
    return f"{truncated} training example(s) exceed max_seq_length and will be truncated"


def lookup(session: Session, *, dataset: Dataset, model: RegisteredModel,
           max_seq_length: int) -> TokenCount | None:
    """The stored count, or None if no job has tokenised this combination yet."""
    return session.get(TokenCount, (dataset.sha256, dataset.format, model.id, max_seq_length))


def _insert_ignoring_duplicates(session: Session, values: dict[str, Any]) -> None:
    """INSERT ... ON CONFLICT DO NOTHING: two workers may count the same key at once."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        session.execute(pg_insert(TokenCount).values(**values).on_conflict_do_nothing())
    elif dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        session.execute(sqlite_insert(TokenCount).values(**values).on_conflict_do_nothing())
    else:  # pragma: no cover - the service runs on these two
        session.execute(insert(TokenCount).values(**values))


def record_started(session: Session, job_id: str, event: StartedEvent) -> None:
    """Store the counts of a trainer's `started` event and complete the job's estimate.

    Runs inside the worker's event transaction (no commit here). Idempotent: a resumed attempt
    reports the same counts again and changes nothing. Never raises for a missing row or an
    event without counts: counting is informational, training goes on.
    """
    num_tokens = event.num_tokens
    job = session.get(Job, job_id)
    if num_tokens is None or job is None:
        return
    dataset = session.get(Dataset, job.training_file)
    model = session.query(RegisteredModel).filter_by(name=job.base_model).one_or_none()
    max_len = (job.spec or {}).get("training", {}).get("max_seq_length")
    truncated, dropped = event.num_truncated, event.num_dropped
    if dataset is not None and model is not None and isinstance(max_len, int):
        _insert_ignoring_duplicates(session, {
            "dataset_sha256": dataset.sha256, "format": dataset.format, "model_id": model.id,
            "max_seq_length": max_len, "num_tokens": num_tokens, "num_truncated": truncated,
            "num_dropped": dropped})
    if (job.estimate or {}).get("num_tokens") is None:
        job.estimate = {**(job.estimate or {}), "num_tokens": num_tokens}
    if truncated:
        warning = truncation_warning(truncated)
        compat = dict(job.compatibility or {})
        if warning not in compat.get("warnings", []):
            compat["warnings"] = [*compat.get("warnings", []), warning]
            job.compatibility = compat
            jobs.add_event(session, job_id, "warning", warning, level="warning")
