"""`fine_tuning.alpha.graders.run` / `.validate` through the official client, with the shapes
and examples of OpenAI's graders guide; unsupported graders are a 400 naming why."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest
from openai import OpenAI

from tests.client.live import Live

pytestmark = pytest.mark.timeout(300)  # the shared live server starts on first use

EXACT = {"type": "string_check", "name": "exact", "operation": "eq",
         "input": "{{ sample.output_text }}", "reference": "{{ item.reference_answer }}"}


@pytest.fixture
def client(live: Live) -> Iterator[OpenAI]:
    with OpenAI(base_url=f"{live.url}/openai/v1", api_key=live.key, max_retries=0) as c:
        yield c


def test_validate_returns_the_grader(client: OpenAI) -> None:
    assert client.fine_tuning.alpha.graders.validate(grader=EXACT).grader.name == "exact"


@pytest.mark.parametrize(("sample", "reward"), [("Paris", 1.0), ("paris", 0.0)])
def test_run_string_check(client: OpenAI, sample: str, reward: float) -> None:
    res = client.fine_tuning.alpha.graders.run(grader=EXACT, model_sample=sample,
                                               item={"reference_answer": "Paris"})
    assert res.reward == reward and res.metadata.type == "string_check"
    assert res.metadata.name == "exact" and not any(
        v for k, v in res.metadata.errors.model_dump().items() if isinstance(v, bool))


def test_run_text_similarity_and_multi(client: OpenAI) -> None:
    sim = {"type": "text_similarity", "name": "sim", "evaluation_metric": "rouge_1",
           "input": "{{sample.output_text}}", "reference": "{{item.ref}}"}
    res = client.fine_tuning.alpha.graders.run(grader=sim, model_sample="the cat sat on a mat",
                                               item={"ref": "the cat sat on the mat"})
    assert res.reward == pytest.approx(5 / 6)
    multi = {"type": "multi", "name": "m", "calculate_output": "(sim + 2 * exact) / 3",
             "graders": {"sim": sim, "exact": {**EXACT, "reference": "{{item.ref}}"}}}
    res = client.fine_tuning.alpha.graders.run(grader=multi, model_sample="the cat sat on a mat",
                                               item={"ref": "the cat sat on the mat"})
    assert res.reward == pytest.approx(5 / 18) and res.sub_rewards == {
        "sim": pytest.approx(5 / 6), "exact": 0.0}


def test_missing_variable_is_flagged_not_refused(client: OpenAI) -> None:
    res = client.fine_tuning.alpha.graders.run(grader=EXACT, model_sample="x", item={})
    assert res.reward == 0.0 and res.metadata.errors.invalid_variable_error


@pytest.mark.parametrize(("grader", "match"), [
    ({"type": "python", "name": "p", "source": "def grade(s, i): return 1"}, "not supported"),
    ({**EXACT, "operation": "regex"}, "operation"),
    ({"type": "multi", "name": "m", "calculate_output": "__import__('os')",
      "graders": {"a": EXACT}}, "calculate_output"),
    ({"type": "text_similarity", "name": "s", "evaluation_metric": "cosine",
      "input": "a", "reference": "b"}, "cosine"),
])
def test_unsupported_or_invalid_graders_are_400(client: OpenAI, grader: dict,
                                                 match: str) -> None:
    with pytest.raises(openai.BadRequestError, match=match):
        client.fine_tuning.alpha.graders.validate(grader=grader)  # type: ignore[arg-type]
    with pytest.raises(openai.BadRequestError, match=match):
        client.fine_tuning.alpha.graders.run(grader=grader, model_sample="x")  # type: ignore[arg-type]
