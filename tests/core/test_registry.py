"""lorajobs.core.registry: models only from inside the model root, safetensors only."""

from __future__ import annotations

import hashlib
import os
import shutil

import pytest

from lorajobs.core import registry
from lorajobs.core.db import get_sessionmaker
from lorajobs.core.errors import Conflict, InvalidRequest
from lorajobs.core.settings import Settings
from tests.dbfixtures import db_settings  # noqa: F401


@pytest.fixture
def settings(db_settings: Settings, tmp_path, tiny_model_dir) -> Settings:  # noqa: F811
    s = db_settings.model_copy(update={"model_root": tmp_path / "models"})
    shutil.copytree(tiny_model_dir, s.resolved_model_root / "org" / "tiny")
    return s


def test_register_inspects_and_hashes(settings: Settings) -> None:
    with get_sessionmaker(settings)() as session:
        row = registry.register_model(session, name="tiny", path_under_model_root="org/tiny/",
                                      settings=settings)
        weights = settings.resolved_model_root / "org/tiny/model.safetensors"
        assert row.path == "org/tiny"
        assert row.weights_sha256 == {
            "model.safetensors": hashlib.sha256(weights.read_bytes()).hexdigest()}
        assert row.architecture == "LlamaForCausalLM" and "q_proj" in row.linear_modules
        assert registry.get_model(session, name="tiny").id == row.id
        with pytest.raises(Conflict):
            registry.register_model(session, name="tiny", path_under_model_root="org/tiny",
                                    settings=settings)
        with pytest.raises(InvalidRequest) as info:
            registry.register_model(session, name="a/b", path_under_model_root="org/tiny",
                                    settings=settings)
        assert info.value.param == "name"


def test_refuses_paths_outside_the_root(settings: Settings, tmp_path) -> None:
    (tmp_path / "outside" / "m").mkdir(parents=True)
    os.symlink(tmp_path / "outside", settings.resolved_model_root / "escape")
    for path in ["..", "../models/org/tiny", "/abs", "org/../../x", "org\x00", "org\\tiny", "",
                 "escape", "escape/m"]:
        with pytest.raises(InvalidRequest) as info:
            registry.resolve_model_path(settings, path)
        assert info.value.param == "path", path


def test_refuses_pickle_only(settings: Settings) -> None:
    d = settings.resolved_model_root / "pickled"
    d.mkdir()
    shutil.copy(settings.resolved_model_root / "org/tiny/config.json", d)
    (d / "pytorch_model.bin").write_bytes(b"not loaded, ever")
    with get_sessionmaker(settings)() as session:
        with pytest.raises(InvalidRequest) as info:
            registry.register_model(session, name="p", path_under_model_root="pickled",
                                    settings=settings)
        assert info.value.param == "path" and "pickle" in info.value.message
        assert registry.list_models(session) == []
