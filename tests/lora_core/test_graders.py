"""Graders against hand-computed values and OpenAI's documented semantics; the formula parser
refuses anything but arithmetic."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from lora_core.evaluation.formula import FormulaError, check_formula, evaluate_formula
from lora_core.evaluation.graders import (
    GraderError,
    TemplateError,
    grade,
    parse_grader,
    render,
)
from lora_core.evaluation.spec import EvaluationSpec


def _check(op: str, output: str, reference: str) -> float:
    g = parse_grader({"type": "string_check", "name": "s", "operation": op,
                      "input": "{{ sample.output_text }}", "reference": "{{ item.reference }}"})
    return grade(g, item={"reference": reference}, sample={"output_text": output})[0]


# OpenAI's graders guide: eq/ne case-sensitive equality, like = input contains reference
# (case-sensitive), ilike = contains, ignoring case; 1 or 0.
@pytest.mark.parametrize(("op", "output", "reference", "expected"), [
    ("eq", "Paris", "Paris", 1.0), ("eq", "paris", "Paris", 0.0), ("eq", "Paris ", "Paris", 0.0),
    ("ne", "Paris", "Paris", 0.0), ("ne", "London", "Paris", 1.0),
    ("like", "The capital is Paris.", "Paris", 1.0), ("like", "the capital is paris", "Paris", 0.0),
    ("ilike", "the capital is PARIS", "paris", 1.0), ("ilike", "Lyon", "paris", 0.0),
])
def test_string_check(op, output, reference, expected):
    assert _check(op, output, reference) == expected


def _similarity(metric: str, output: str, reference: str) -> float:
    g = parse_grader({"type": "text_similarity", "name": "t", "evaluation_metric": metric,
                      "input": "{{sample.output_text}}", "reference": "{{item.reference}}"})
    return grade(g, item={"reference": reference}, sample={"output_text": output})[0]


# Hand-computed: hypothesis "the cat sat on a mat" vs reference "the cat sat on the mat".
#   rouge_1: overlap {the, cat, sat, on, mat} = 5 of 6 each side -> P = R = F = 5/6
#   rouge_2: bigrams the-cat, cat-sat, sat-on shared of 5 each -> 3/5
#   rouge_l: LCS the cat sat on mat = 5 -> 5/6
#   fuzzy_match: Indel similarity 2*M/(20+22), M = 19 common characters -> 38/42
@pytest.mark.parametrize(("metric", "expected"), [
    ("rouge_1", 5 / 6), ("rouge_2", 3 / 5), ("rouge_l", 5 / 6), ("fuzzy_match", 38 / 42),
    ("rouge_3", 2 / 4),  # trigrams the-cat-sat, cat-sat-on shared of 4 each
])
def test_text_similarity_hand_computed(metric, expected):
    assert _similarity(metric, "the cat sat on a mat", "the cat sat on the mat") == \
        pytest.approx(expected)


@pytest.mark.parametrize("metric", ["fuzzy_match", "bleu", "gleu", "rouge_1", "rouge_l"])
def test_identical_text_scores_one_and_disjoint_text_zero(metric):
    text = "the quick brown fox jumps over the lazy dog"
    assert _similarity(metric, text, text) == pytest.approx(1.0)
    assert _similarity(metric, "alpha beta gamma delta", "one two three four") == \
        pytest.approx(0.0, abs=0.35 if metric == "fuzzy_match" else 1e-9)


def test_bleu_is_sacrebleu_sentence_bleu_over_100():
    import sacrebleu

    hyp, ref = "the cat sat on a mat", "the cat sat on the mat"
    assert _similarity("bleu", hyp, ref) == pytest.approx(
        sacrebleu.sentence_bleu(hyp, [ref]).score / 100)


def test_multi_grader_formula_over_named_sub_graders():
    # OpenAI's multigrader shape: graders keyed by the names the formula uses
    g = parse_grader({
        "type": "multi", "name": "combo", "calculate_output": "(name + 2 * email) / 3",
        "graders": {
            "name": {"type": "string_check", "name": "name_grader", "operation": "ilike",
                     "input": "{{sample.output_json.name}}", "reference": "{{item.name}}"},
            "email": {"type": "string_check", "name": "email_grader", "operation": "eq",
                      "input": "{{sample.output_json.email}}", "reference": "{{item.email}}"},
        }})
    item = {"name": "Ada", "email": "ada@example.com"}
    score, subs = grade(g, item=item, sample={"output_text":
                                             '{"name": "ada", "email": "ada@example.org"}'})
    assert subs == {"name": 1.0, "email": 0.0} and score == pytest.approx(1 / 3)


def test_templates_nested_paths_and_missing_variables():
    assert render("{{item.a.b}}-{{ item.list.1 }}", item={"a": {"b": "x"}, "list": [1, 2]},
                  sample={}) == "x-2"
    with pytest.raises(TemplateError):
        render("{{item.nope}}", item={}, sample={})
    with pytest.raises(ValidationError, match="item.<field> or sample.<field>"):
        parse_grader({"type": "string_check", "name": "s", "operation": "eq",
                      "input": "{{ __import__('os') }}", "reference": "x"})


@pytest.mark.parametrize("grader", [
    {"type": "python", "name": "p", "source": "def grade(sample, item): return 1"},
    {"type": "score_model", "name": "m", "model": "gpt-4o", "input": []},
])
def test_graders_that_run_code_or_models_are_refused(grader):
    with pytest.raises(GraderError, match="not supported"):
        parse_grader(grader)


@pytest.mark.parametrize("metric", ["meteor", "cosine", "bogus"])
def test_unsupported_metrics_are_named(metric):
    with pytest.raises(ValidationError, match=metric):
        _similarity(metric, "a", "b")


@pytest.mark.parametrize(("formula", "values", "expected"), [
    ("a + b * 2", {"a": 1, "b": 0.5}, 2.0), ("max(a, b) - min(a, b)", {"a": 1, "b": 0.25}, 0.75),
    ("-a ^ 2", {"a": 3}, -9.0), ("1 + a ^ 2", {"a": 3}, 10.0),
    ("sqrt(a) + abs(-b) + floor(1.7) + ceil(0.2)", {"a": 4, "b": 1}, 5.0),
    ("exp(log(a))", {"a": 2.5}, 2.5), ("a ** 2 % 3", {"a": 2}, 1.0), ("min(a) + max(b)",
                                                                        {"a": 2, "b": 1}, 3.0),
])
def test_formula_values(formula, values, expected):
    assert evaluate_formula(formula, values) == pytest.approx(expected)


@pytest.mark.parametrize("formula", [
    "__import__('os').system('true')", "a.__class__", "a[0]", "(lambda: 1)()", "a if b else 1",
    "a < b", "'x'", "c + 1", "max(a, key=b)", "open('x')", "a ** 1000", "(" * 300 + "a" + ")" * 300,
])
def test_formula_refuses_everything_but_arithmetic(formula):
    with pytest.raises(FormulaError):
        check_formula(formula, {"a", "b"})
        evaluate_formula(formula, {"a": 2.0, "b": 1.0})


@pytest.mark.parametrize("formula", ["a / b", "log(b - 1)", "exp(1000 * a)",
                                     "floor(1e308 * a * 10)"])
def test_formula_runtime_errors_are_formula_errors(formula):
    with pytest.raises(FormulaError):
        evaluate_formula(formula, {"a": 1, "b": 0})


def test_evaluation_spec_checks_names_select_and_early_stopping():
    assert EvaluationSpec().graders[0].name == "exact_match"
    with pytest.raises(ValidationError, match="unique"):
        EvaluationSpec(graders=[{"type": "string_check", "name": "x", "operation": "eq",
                                 "input": "a", "reference": "b"}] * 2)
    with pytest.raises(ValidationError, match="neither"):
        EvaluationSpec(select={"metric": "nope"})
    with pytest.raises(ValidationError, match="needs select"):
        EvaluationSpec(early_stopping={"patience": 2})
    assert EvaluationSpec(select={"metric": "valid_loss"}).select.resolved_mode == "min"
    assert EvaluationSpec(select={"metric": "exact_match"}).select.resolved_mode == "max"
