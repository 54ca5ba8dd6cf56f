"""Fixtures shared by the whole suite: a tiny model built once per session, a private PostgreSQL
server, and a migrated service with no processes yet."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.s3fixtures import aws_env, private_s3, s3_bucket, s3_server  # noqa: F401 - fixtures

if TYPE_CHECKING:
    from tests.servicefixtures import LiveService

# The CPU thread tuner (lora_core.training.thread_tuner) changes the thread count when timing
# says so, and the thread count changes the order of some reductions: tests that compare loss
# curves bit for bit (resume, perf_loss, DPO) must not depend on the machine's load. Off for
# the test processes and the trainers they start (service tests also pin trainer_threads=1);
# tests/lora_core/test_thread_tuner.py turns it on where it is the subject.
os.environ.setdefault("LORAJOBS_THREAD_TUNING", "off")  # off by default too: an operator's
# `on` in the developer's shell must not reach the suite

# `make test` hands whole files to its processes (`--dist loadfile --no-loadscope-reorder`) in
# collection order, and the suite ends when its last file does. These files took longest in a
# full run (2026-12-06; most are one or two tests that start servers or train), so they start
# first and the short ones fill in behind them. Only the order changes, never what runs.
LONGEST_FIRST = (
    "tests/worker/test_faults.py", "tests/lora_core/test_deepspeed.py",
    "tests/reliability/test_fuzz.py", "tests/lora_core/test_evaluation.py",
    "tests/lora_core/test_merge.py", "tests/lora_core/test_dpo.py",
    "tests/lora_core/test_perf_loss.py", "tests/serving/test_vllm_e2e.py",
    "tests/bench/test_train_bench_smoke.py", "tests/worker/test_webhook_delivery.py",
    "tests/e2e/test_real_trainer.py", "tests/cli/test_client_install.py",
    "tests/openai_compat/test_migration.py", "tests/reliability/test_fleet.py",
    "tests/reliability/test_attacks.py", "tests/worker/test_checkpoint_sync.py",
    "tests/api/test_streams.py", "tests/worker/test_prewarm.py",
    "tests/reliability/test_kill9.py", "tests/worker/test_lifecycle.py",
    "tests/cli/test_local.py", "tests/worker/test_embedded_webhooks.py",
    "tests/api/test_artifacts_s3.py", "tests/e2e/test_pause_exact.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    root = config.rootpath

    def key(item: pytest.Item) -> int:
        try:
            name = item.path.relative_to(root).as_posix()
        except ValueError:
            return len(rank)
        return rank.get(name, len(rank))

    items.sort(key=key)  # stable: each file's own order, and the other files', is kept


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory):
    """A 2-layer, 64-wide Llama-style model with its tokenizer (fp32, safetensors)."""
    from lora_core.model_files.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-model"), seed=0)


@pytest.fixture
def private_pg():
    """A PostgreSQL server of this test's own on a free port (initdb + pg_ctl in a temp dir):
    fault tests stop and restart it, never the machine's shared one."""
    from tests.reliability.servers import PrivatePostgres

    server = PrivatePostgres()
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def service(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LiveService]:
    """Migrated, no processes yet: each test starts the ones it needs. SQLite + embedded broker
    unless parametrized indirectly with "postgresql" (+ the shared Redis)."""
    from tests.servicefixtures import LiveService

    svc = LiveService(tmp_path, getattr(request, "param", "sqlite"))
    try:
        svc.migrate()
        yield svc
    finally:
        svc.close()
