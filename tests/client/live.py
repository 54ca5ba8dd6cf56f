"""A live server for the client-side suites (SDK, CLI, openai package, dashboard).

`start_live()` runs the real processes (API, one worker, reaper) through `LiveService`, registers
the tiny model as "tiny" and hands back what a client needs: the URL and the admin key. The
client suites share one server per test package (starting one costs seconds on 2 shared cores).

The trainer is the fake one by default: it speaks the real events protocol at 0.1 s per step,
so a job with `max_steps=N` takes about N/10 seconds and its progress visibly moves. Tests where
the model matters (downloaded adapter weights, the `submit --wait` demo) use
`trainer=None`, the real `python -m lora_core run` on the tiny model, with few steps.

The fixtures `live` (fake trainer) and `live_real` (real trainer) are defined here once; a test
package that wants them imports them into its conftest.py, which makes `live` one server per
package (pytest scopes a package fixture to the package of the conftest that holds it).
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.servicefixtures import FAKE_TRAINER, LiveService, wait_for

__all__ = ["Live", "start_live", "live", "live_real", "live_webhooks", "alpaca_records",
           "write_jsonl", "MODEL", "TERMINAL", "FAKE_STEP_SECONDS", "REAL_TRAINING",
           "WEBHOOK_LAB"]

MODEL = "tiny"
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
FAKE_STEP_SECONDS = 0.1  # tests/worker/fake_trainer.py's default sleep per step
# The real trainer on the tiny model: ~1 s of training after a ~5 s torch import.
REAL_TRAINING: dict[str, Any] = {"max_steps": 4, "batch_size": 4, "max_seq_length": 128,
                                 "save_steps": 2, "learning_rate": 1e-3, "seed": 3}
# Webhooks to the tests' plain-http loopback receiver (tests/webhook_receiver.py), swept often.
WEBHOOK_LAB: dict[str, Any] = {"webhook_allow_private_addresses": True, "webhook_allow_http": True,
                               "webhook_poll_seconds": 0.1}
WORDS = ["red", "blue", "fish", "stone", "river", "wolf", "green", "book", "wind", "bird"]


def alpaca_records(n: int = 32, seed: int = 0) -> list[dict[str, str]]:
    """Seeded 'reverse the words' records: valid for the validator and learnable."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = rng.sample(WORDS, rng.randint(2, 4))
        out.append({"instruction": "Reverse the order of the words.", "input": " ".join(words),
                    "output": " ".join(reversed(words))})
    return out


def write_jsonl(path: Path, records: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@dataclass
class Live:
    """One running server: `url`, the admin `key`, and an httpx client for setup shortcuts."""

    svc: LiveService
    url: str
    key: str
    http: httpx.Client

    def upload(self, records: list[Any] | None = None, name: str = "train.jsonl") -> str:
        """Upload a dataset over plain HTTP (setup, not the thing under test); its id."""
        data = "".join(json.dumps(r) + "\n" for r in (records or alpaca_records()))
        r = self.http.post("/v1/datasets", files={"file": (name, data.encode())})
        assert r.status_code == 201, r.text
        return r.json()["id"]

    def submit(self, max_steps: int = 10, **spec: Any) -> str:
        """Create a job over plain HTTP; its id. A checkpoint every 2 steps, fewer in long runs
        (the server refuses a job that writes more than max_checkpoints_per_job, 100)."""
        save_steps = max(2, max_steps // 50)
        body = {"base_model": MODEL, "training_file": spec.pop("training_file", None)
                or self.upload(), "training": {"max_steps": max_steps, "save_steps": save_steps},
                "merge": "final", **spec}
        r = self.http.post("/v1/jobs", json=body)
        assert r.status_code == 201, r.text
        return r.json()["id"]

    def job(self, job_id: str) -> dict[str, Any]:
        r = self.http.get(f"/v1/jobs/{job_id}")
        assert r.status_code == 200, r.text
        return r.json()

    def wait_end(self, job_id: str, timeout: float = 60) -> dict[str, Any]:
        return wait_for(lambda: (j := self.job(job_id))["status"] in TERMINAL and j,
                        timeout=timeout, interval=0.2, what=f"job {job_id} to end")

    def wait_status(self, job_id: str, status: str, timeout: float = 30) -> dict[str, Any]:
        return wait_for(lambda: (j := self.job(job_id))["status"] == status and j,
                        timeout=timeout, interval=0.1, what=f"job {job_id} {status}")


def start_live(tmp_dir: Path, tiny_model_dir: Path, *, backend: str = "sqlite",
               trainer: Path | None = FAKE_TRAINER, beat: bool = False,
               **overrides: Any) -> Iterator[Live]:
    """Generator for a fixture: the processes up, "tiny" registered; everything stopped after.
    `beat`: the maintenance process (reaper sweeps + webhook sender) instead of the reaper."""
    svc = LiveService(tmp_dir, backend, trainer=trainer, **overrides)
    try:
        svc.migrate()
        svc.start_worker()
        svc.start_beat() if beat else svc.start_reaper()
        url = svc.start_api()
        assert svc.admin_key is not None
        shutil.copytree(tiny_model_dir, svc.settings.resolved_model_root / MODEL)
        with httpx.Client(base_url=url, timeout=30,
                          headers={"Authorization": f"Bearer {svc.admin_key}"}) as http:
            r = http.post("/v1/models", json={"name": MODEL, "path": MODEL})
            assert r.status_code == 201, r.text
            yield Live(svc=svc, url=url, key=svc.admin_key, http=http)
    finally:
        svc.close()


@pytest.fixture(scope="package")
def live(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Live]:
    """One server with the fake trainer, shared by the tests of a package."""
    yield from start_live(tmp_path_factory.mktemp("live"), tiny_model_dir)


@pytest.fixture(scope="module")
def live_real(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Live]:
    """One server with the real trainer, for the few tests where the weights matter."""
    yield from start_live(tmp_path_factory.mktemp("live-real"), tiny_model_dir, trainer=None)


@pytest.fixture(scope="module")
def live_webhooks(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path
                  ) -> Iterator[Live]:
    """A server that sends webhooks (beat) to a loopback receiver, for the webhook tests."""
    yield from start_live(tmp_path_factory.mktemp("live-webhooks"), tiny_model_dir, beat=True,
                          **WEBHOOK_LAB)
