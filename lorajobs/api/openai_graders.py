"""`/openai/v1/fine_tuning/alpha/graders/run` and `/validate`, answered as OpenAI's are, for the
graders we run (lora_core.evaluation.graders: string_check, text_similarity, multi).

    validate  {grader}                         -> {grader}   (400 naming the field otherwise)
    run       {grader, model_sample, item?}    -> {reward, metadata: {name, type, errors,
                                                   execution_time, scores, token_usage,
                                                   sampled_model_name}, sub_rewards,
                                                   model_grader_token_usage_per_model}

As OpenAI does, a grader that parses but fails on this sample (a template variable the item
lacks, a formula that divides by zero) answers 200 with reward 0 and the matching error flag
(`invalid_variable_error`, `formula_parse_error`), not a 400. Python, score_model and
label_model graders are refused (they run code or call a model).
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lora_core.errors import validation_problems
from lora_core.evaluation.formula import FormulaError
from lora_core.evaluation.graders import GraderError, TemplateError, grade, parse_grader
from lorajobs.api.deps import PrincipalDep
from lorajobs.api.openai_compat import OpenAIRoute
from lorajobs.core.errors import InvalidRequest

router = APIRouter(prefix="/openai/v1/fine_tuning/alpha/graders", tags=["openai-compatible"],
                   route_class=OpenAIRoute)

MAX_SAMPLE_CHARS = 100_000
_ERROR_FLAGS = ("formula_parse_error", "invalid_variable_error", "model_grader_parse_error",
                "model_grader_refusal_error", "model_grader_server_error", "other_error",
                "python_grader_runtime_error", "python_grader_server_error",
                "sample_parse_error", "truncated_observation_error",
                "unresponsive_reward_error")


class ValidateBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    grader: dict[str, Any]


class RunBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    grader: dict[str, Any]
    model_sample: str = Field(max_length=MAX_SAMPLE_CHARS)
    item: dict[str, Any] | None = None


def _parse(obj: dict[str, Any]) -> Any:
    """The grader, or InvalidRequest (-> 400 invalid_request_error) naming the field."""
    try:
        return parse_grader(obj)
    except GraderError as exc:
        raise InvalidRequest(str(exc), param=exc.param) from None
    except ValidationError as exc:
        param, problems = validation_problems(exc.errors())
        raise InvalidRequest(problems, param=f"grader.{param}" if param else "grader") from None


@router.post("/validate")
def validate_grader(body: ValidateBody, principal: PrincipalDep) -> dict[str, Any]:
    """The grader back when it is one we can run; 400 naming the field otherwise."""
    grader = _parse(body.grader)
    return {"grader": grader.model_dump(mode="json", exclude_none=True)}


@router.post("/run")
def run_grader(body: RunBody, principal: PrincipalDep) -> dict[str, Any]:
    """Grade one model sample against one item."""
    grader = _parse(body.grader)
    errors = dict.fromkeys(_ERROR_FLAGS, False)
    t0 = time.perf_counter()
    reward, subs = 0.0, dict[str, float]()
    try:
        reward, subs = grade(grader, item=body.item or {},
                             sample={"output_text": body.model_sample})
    except TemplateError:
        errors["invalid_variable_error"] = True
    except FormulaError:
        errors["formula_parse_error"] = True
    return {
        "reward": reward,
        "metadata": {"name": grader.name, "type": grader.type, "errors": errors,
                     "execution_time": time.perf_counter() - t0, "scores": dict(subs),
                     "token_usage": None, "sampled_model_name": None},
        "sub_rewards": dict(subs),
        "model_grader_token_usage_per_model": {},
    }
