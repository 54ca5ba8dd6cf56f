"""Every problem of a spec is reported at once, naming each field (not just the first)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from lora_core.errors import validation_problems
from lora_core.spec import RunSpec


def _errors(**overrides) -> list:
    body = {"model_dir": "m", "train_file": "t", "output_dir": "o", **overrides}
    with pytest.raises(ValidationError) as info:
        RunSpec.model_validate(body)
    return info.value.errors()


def test_every_problem_is_named_once() -> None:
    errors = _errors(lora={"r": 0}, training={"learning_rate": -1, "epochs": 0})
    param, text = validation_problems(errors)
    assert param == "lora.r"
    for field in ("lora.r", "training.learning_rate", "training.epochs"):
        assert text.count(f"{field}:") == 1, text


def test_names_are_renamed_for_the_caller() -> None:
    errors = _errors(training={"epochs": 0})
    param, text = validation_problems(errors, {"training.epochs": "hyperparameters.n_epochs"})
    assert param == "hyperparameters.n_epochs"
    assert text.startswith("hyperparameters.n_epochs: ")
