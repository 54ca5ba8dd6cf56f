"""The SDK registers base models from any machine: a directory uploaded (sync and asyncio),
only the files the server accepts sent, streamed from disk; errors as documented classes."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from lorajobs.client import AsyncClient, Client, InvalidRequestError
from lorajobs.client.model_files import MODEL_FILE_SUFFIXES, model_upload_files
from lorajobs.core.model_import import ALLOWED_SUFFIXES
from tests.client.live import Live


def test_client_and_server_accept_the_same_files() -> None:
    assert MODEL_FILE_SUFFIXES == ALLOWED_SUFFIXES


def test_upload_sync_and_async(live: Live, tiny_model_dir: Path, tmp_path: Path) -> None:
    model_dir = tmp_path / "downloaded"
    shutil.copytree(tiny_model_dir, model_dir)
    (model_dir / "README.md").write_text("# a model card")  # as a hub download leaves them
    (model_dir / "pytorch_model.bin").write_bytes(b"\x80\x04 pickle")
    (model_dir / ".gitattributes").write_text("*.safetensors filter=lfs")
    sent = [p.name for p in model_upload_files(model_dir)]
    assert sent == sorted(p.name for p in tiny_model_dir.iterdir())
    with Client(live.url, live.key) as client:
        model = client.models.upload("sdk-upload", model_dir)
        assert model.source == "upload" and model.architecture == "LlamaForCausalLM"
        assert "sdk-upload" in [m.name for m in client.models.list()]
        with pytest.raises(InvalidRequestError) as bad:
            client.models.register_from("bad", hf_repo="not a repo id")
        assert bad.value.param == "source.hf_repo"

    async def upload() -> str | None:
        async with AsyncClient(live.url, live.key) as aclient:
            return (await aclient.upload_model("sdk-upload-aio", model_dir)).content_sha256

    assert asyncio.run(upload()) == model.content_sha256

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with Client(live.url, live.key) as client, pytest.raises(ValueError, match="safetensors"):
        client.models.upload("nope", empty)
