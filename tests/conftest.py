"""Fixtures shared by the whole suite: a tiny model built once per session, service switches."""

from __future__ import annotations

import os

import pytest

REQUIRE_SERVICES = os.environ.get("LORAJOBS_REQUIRE_SERVICES") == "1"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory):
    """A 2-layer, 64-wide Llama-style model with its tokenizer (fp32, safetensors)."""
    from lora_core.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-model"), seed=0)
