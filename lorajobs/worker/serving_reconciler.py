"""Beat's (and `serve`'s) serving reconciler: deployments reloaded on servers that forgot them,
and succeeded jobs whose spec says `deploy: {target}` deployed (once, automatically).

A vLLM server keeps runtime-loaded adapters in memory only: after a restart it serves none.
Every `serving_reconcile_seconds` this thread asks every server of every target with
deployments what it serves (GET /v1/models) and loads what is missing
(lorajobs/core/serving.reconcile), so a restarted server answers `ft:` models again within
about one interval plus its load time.
"""

from __future__ import annotations

import logging
import threading

from lorajobs.core import serving
from lorajobs.core.db import get_sessionmaker
from lorajobs.core.settings import Settings
from lorajobs.core.storage import get_store

__all__ = ["run_serving_loop", "start_serving_thread"]

log = logging.getLogger(__name__)


def run_serving_loop(settings: Settings, stop_event: threading.Event) -> None:
    """Reconcile until `stop_event`; never dies on an error (next interval)."""
    store = get_store(settings)
    sessions = get_sessionmaker(settings)
    while not stop_event.is_set():
        try:
            with sessions() as session:
                deployed = serving.deploy_succeeded_jobs(session, settings, store)
                loads = serving.reconcile(session, settings, store)
            if deployed:
                log.info("serving reconciler: %d finished job(s) deployed as their specs asked",
                         deployed)
            if loads:
                log.info("serving reconciler: %d adapter(s) loaded again", loads)
        except Exception:  # noqa: BLE001 - the loop must outlive a DB or server outage
            log.exception("serving reconcile failed; retrying next interval")
        stop_event.wait(settings.serving_reconcile_seconds)


def start_serving_thread(settings: Settings, stop_event: threading.Event) -> threading.Thread:
    thread = threading.Thread(target=run_serving_loop, args=(settings, stop_event),
                              daemon=True, name="lorajobs-serving")
    thread.start()
    return thread
