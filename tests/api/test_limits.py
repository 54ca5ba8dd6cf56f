"""What one tenant's job may take from shared hardware: spec bounds from settings and the model
(each a 422 naming the field), the storage quota with DELETE and /v1/usage."""

from __future__ import annotations

from typing import Any

import pytest

from tests.api.conftest import MODEL_NAME, Api

# (body overrides, the field the 422 names). Each was accepted (201) before the bounds.
OVER_LIMIT: list[tuple[dict[str, Any], str]] = [
    ({"training": {"max_seq_length": 4096}}, "training.max_seq_length"),  # tiny model: 2048
    ({"training": {"max_seq_length": 262_144}}, "training.max_seq_length"),
    ({"training": {"batch_size": 4096, "max_seq_length": 16}}, "training.batch_size"),
    ({"training": {"gradient_accumulation_steps": 1024}},
     "training.gradient_accumulation_steps"),
    ({"training": {"batch_size": 200}}, "training.batch_size"),  # 200 x 2048 tokens
    ({"distributed": {"num_processes": 64}}, "distributed.num_processes"),
    ({"training": {"max_steps": 1000, "save_steps": 1}}, "training.save_steps"),
    ({"training": {"max_steps": 50, "save_steps": 1}, "merge": "all"}, "merge"),
]


@pytest.mark.parametrize(("overrides", "field"), OVER_LIMIT,
                         ids=[f for _, f in OVER_LIMIT])
def test_spec_over_a_bound_is_a_422_naming_the_field(api: Api, overrides: dict[str, Any],
                                                      field: str) -> None:
    ds = api.dataset("alice")
    resp = api.submit("alice", {"base_model": MODEL_NAME, "training_file": ds, **overrides})
    assert resp.status_code == 422, resp.text
    body = resp.json()
    assert body["error"]["param"] == field and body["error"]["code"] == "spec_limit_exceeded"
    assert field in {e["field"] for e in body["errors"]}
    assert api.enqueued == []


def test_bounds_leave_room_for_reasonable_specs(api: Api) -> None:
    """At the limits, and merge "all" with rotation keeping the merges few: accepted."""
    ds = api.dataset("alice")
    s = api.settings
    accum = s.max_gradient_accumulation_steps
    api.job("alice", ds, training={"max_seq_length": 2048, "batch_size": 128,
                                   "gradient_accumulation_steps": accum})
    api.job("alice", ds, distributed={"num_processes": s.max_processes_per_job})
    api.job("alice", ds, merge="all", training={"max_steps": 50, "save_steps": 1,
                                                "save_total_limit": 2})
    many = api.submit("alice", {"base_model": MODEL_NAME, "training_file": ds, "training": {
        "max_steps": 1000, "save_steps": 1, "batch_size": 4096, "max_seq_length": 16}})
    assert {e["field"] for e in many.json()["errors"]} == {"training.save_steps",
                                                          "training.batch_size"}


def test_unset_save_steps_is_spread_under_the_checkpoint_bound(api: Api) -> None:
    """Once per epoch is our default, not the client's: 500 one-step epochs save every 5 steps
    (100 checkpoints, the bound) instead of being refused; a short run keeps once per epoch."""
    ds = api.dataset("alice")
    limit = api.settings.max_checkpoints_per_job
    job = api.job("alice", ds, training={"epochs": 5 * limit, "batch_size": 64})
    assert job["spec"]["training"]["save_steps"] == 5
    short = api.job("alice", ds, training={"epochs": 2, "batch_size": 64})
    assert short["spec"]["training"]["save_steps"] is None
