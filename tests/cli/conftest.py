"""The CLI suite's servers: one with the fake trainer, one with the real trainer (one test)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.client.live import Live, start_live


@pytest.fixture(scope="package")
def live(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Live]:
    yield from start_live(tmp_path_factory.mktemp("live"), tiny_model_dir)


@pytest.fixture(scope="module")
def live_real(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Live]:
    yield from start_live(tmp_path_factory.mktemp("live-real"), tiny_model_dir, trainer=None)
