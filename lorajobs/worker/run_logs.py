"""A job's log files in the store: every run of an attempt in one artifact, each run's upload
under its own keys.

    node-local scratch   run/events-attempt<N>.jsonl, run/trainer-attempt<N>.log  (RunPaths)
    store                <run prefix>/logs/<name>        (checkpoint_sync.run_prefix: per claim)
    artifact             kind "log", step null, name <name>: the newest upload of that name

A pause or a graceful shutdown refunds the attempt, so the job's next run writes log files of
the same names, on whichever node claims it. Before its trainer starts, `restore_logs` makes
this node's copies the registered ones, unless the local copy already begins with them (the
node that ran the earlier run: settle.trim_paused_scratch keeps its logs), so the trainer
appends to every earlier run of the attempt. After it, `upload_logs` uploads under the run's
own prefix what extends the registered copy, and the settle moves the artifact row to it; an
earlier attempt's file that does not extend it (a stale copy on a node that ran that attempt
before another node ran it further) is left out, and the row keeps the newer copy.

No object is ever rewritten: an earlier run's copy stays under its own prefix, superseded,
until the job's files are deleted (usage.delete_job_artifacts deletes `jobs/<job>/`).
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from tenacity import Retrying, stop_after_delay

from lorajobs.core.storage import ArtifactStore
from lorajobs.core.tables import Artifact
from lorajobs.worker.checkpoint_sync import RETRY_WAIT, upload_file
from lorajobs.worker.runspec import RunPaths

__all__ = ["LOG_KIND", "restore_logs", "upload_logs", "begins_with"]

log = logging.getLogger(__name__)

LOG_KIND = "log"  # Artifact.kind of the log files
CHUNK_BYTES = 1 << 20


def begins_with(path: Path, size: int, sha256: str) -> bool:
    """The file at `path` exists and its first `size` bytes hash to `sha256`."""
    try:
        if path.stat().st_size < size:
            return False
        digest, left = hashlib.sha256(), size
        with open(path, "rb") as fh:
            while left > 0 and (chunk := fh.read(min(CHUNK_BYTES, left))):
                digest.update(chunk)
                left -= len(chunk)
    except FileNotFoundError:
        return False
    return left == 0 and digest.hexdigest() == sha256


def _registered(sessions: sessionmaker[Session], job_id: str
                ) -> dict[str, tuple[str, int, str]]:
    """name -> (key, size, sha256) of the job's log artifacts."""
    with sessions() as session:
        rows = session.execute(select(Artifact.name, Artifact.storage_key, Artifact.size,
                                      Artifact.sha256)
                               .where(Artifact.job_id == job_id, Artifact.kind == LOG_KIND,
                                      Artifact.step.is_(None))).all()
    return {name: (key, size, sha256) for name, key, size, sha256 in rows}


def restore_logs(sessions: sessionmaker[Session], store: ArtifactStore, *, job_id: str,
                 paths: RunPaths, retry_seconds: float) -> list[str]:
    """Make this run's log files (the attempt's names) begin with the job's registered copies,
    fetched from the store where the local copy does not; returns the names fetched.

    Best effort, never raises: a run is not held up by its logs. A copy that cannot be fetched
    (logged) leaves the local file as it is; the earlier runs' lines stay in the store under
    their run's key, but the artifact of that name then holds this node's runs only."""
    try:
        registered = _registered(sessions, job_id)
    except Exception:  # noqa: BLE001 - the database; the supervisor finds out on its own
        log.exception("job %s: reading the registered logs failed; not restored", job_id)
        return []
    fetched = []
    for local in (paths.events_file, paths.log_file):
        if local.name not in registered:
            continue
        key, size, sha256 = registered[local.name]
        if begins_with(local, size, sha256):
            continue  # this node ran the earlier runs: the trainer appends to its copy
        part = local.with_name(f".{local.name}.download")
        try:
            for attempt in Retrying(stop=stop_after_delay(retry_seconds), wait=RETRY_WAIT,
                                    reraise=True):
                with attempt:
                    store.get_file(key, part)
            if part.stat().st_size != size or not begins_with(part, size, sha256):
                raise ValueError(f"{key} does not match its recorded size and sha256")
        except Exception:  # noqa: BLE001 - the store's errors are its implementation's
            part.unlink(missing_ok=True)
            log.exception("job %s: fetching %s (the attempt's earlier runs) failed; this "
                          "run's log starts without them", job_id, key)
            continue
        os.replace(part, local)
        fetched.append(local.name)
        log.info("job %s: %s restored from the store (%d bytes of earlier runs)", job_id,
                 local.name, size)
    return fetched


def upload_logs(sessions: sessionmaker[Session], store: ArtifactStore, *, job_id: str,
                paths: RunPaths, prefix: str, retry_seconds: float
                ) -> list[tuple[str, str, int, str]]:
    """Upload this node's log files to `<prefix>/logs/<name>`: the run's own (restored before
    it ran, so they hold the attempt's every run), and an earlier attempt's only where it
    extends the registered copy (a worker killed before it uploaded them). Returns
    (name, key, size, sha256) of each file uploaded, to be registered by the settle."""
    current = {paths.events_file.name, paths.log_file.name}
    try:
        registered = _registered(sessions, job_id)
    except Exception:  # noqa: BLE001 - the database: upload what is surely newest
        log.exception("job %s: reading the registered logs failed; uploading only this "
                      "attempt's", job_id)
        registered = None
    uploaded = []
    for path in paths.log_files():
        name = path.name
        if name not in current:
            if registered is None:
                continue
            if name in registered:
                _, size, sha256 = registered[name]
                if path.stat().st_size <= size or not begins_with(path, size, sha256):
                    continue  # nothing new here, or a stale copy of a newer registered one
        f = upload_file(store, path, f"{prefix}/logs/{name}", name, retry_seconds=retry_seconds)
        uploaded.append((name, f.key, f.size, f.sha256))
    return uploaded
