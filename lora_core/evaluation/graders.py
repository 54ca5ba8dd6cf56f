"""Graders: score a model's output against a reference, in OpenAI's grader shapes.

The same JSON works here and in OpenAI's fine-tuning/evals APIs for the graders we support:

    string_check     {type, name, input, reference, operation: eq | ne | like | ilike}
                     1.0 or 0.0; `like` = reference is a substring of input, `ilike` the same
                     ignoring case (OpenAI's definitions)
    text_similarity  {type, name, input, reference, evaluation_metric, pass_threshold?}
                     a score in [0, 1] from a well-kept library, never our own metric code:
                       fuzzy_match   rapidfuzz.fuzz.ratio / 100 (normalised Indel similarity)
                       bleu          sacrebleu.sentence_bleu(input, [reference]).score / 100
                       gleu          nltk sentence_gleu on whitespace tokens
                       rouge_1..5    rouge_score's rougeN F-measure, rouge_l its rougeL
    multi            {type, name, graders: {key: grader} | grader, calculate_output}
                     the sub-graders' scores combined by an arithmetic formula over their keys
                     (lora_core.evaluation.formula: parsed, never eval'd)

`input` and `reference` are templates: `{{ sample.output_text }}`, `{{ item.reference }}`,
`{{ item.a.b }}` (JSON path into the dataset item), `{{ sample.output_json.x }}` when the output
is JSON. No grader runs user code: python, score_model and label_model graders are refused.

Torch-free: the API's `/fine_tuning/alpha/graders/run` imports this module.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator, model_validator

from lora_core.evaluation.formula import FormulaError, check_formula, evaluate_formula

__all__ = [
    "StringCheckGrader",
    "TextSimilarityGrader",
    "MultiGrader",
    "Grader",
    "GRADER_ADAPTER",
    "GraderError",
    "TemplateError",
    "SUPPORTED_METRICS",
    "UNSUPPORTED_TYPES",
    "render",
    "grade",
    "exact_match_grader",
]

SUPPORTED_METRICS = ("fuzzy_match", "bleu", "gleu", "rouge_1", "rouge_2", "rouge_3", "rouge_4",
                     "rouge_5", "rouge_l")
# OpenAI metrics we cannot compute offline: meteor needs WordNet data downloaded at run time,
# cosine a hosted embedding model.
UNSUPPORTED_METRICS = ("meteor", "cosine")
# OpenAI grader types that run code or call a model: refused, named in the error.
UNSUPPORTED_TYPES = ("python", "score_model", "label_model")
MAX_TEMPLATE_CHARS = 10_000
MAX_NAME_CHARS = 64
MAX_SUB_GRADERS = 16
_TEMPLATE_RE = re.compile(r"\{\{\s*([^{}]*?)\s*\}\}")
_PATH_RE = re.compile(r"^(item|sample)(\.[A-Za-z0-9_\-]+)+$")


class GraderError(ValueError):
    """A grader that cannot be built or run; `param` names the field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class TemplateError(GraderError):
    """A `{{ namespace.path }}` that names nothing in the item or the sample."""


class _Grader(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=MAX_NAME_CHARS)


class _TextGrader(_Grader):
    input: str = Field(max_length=MAX_TEMPLATE_CHARS)
    reference: str = Field(max_length=MAX_TEMPLATE_CHARS)

    @field_validator("input", "reference")
    @classmethod
    def _templates_name_a_namespace(cls, v: str) -> str:
        for path in _TEMPLATE_RE.findall(v):
            if not _PATH_RE.match(path):
                raise ValueError(f"template {{{{ {path} }}}} must be item.<field> or "
                                 "sample.<field> (e.g. {{ sample.output_text }})")
        return v


class StringCheckGrader(_TextGrader):
    type: Literal["string_check"] = "string_check"
    operation: Literal["eq", "ne", "like", "ilike"]


class TextSimilarityGrader(_TextGrader):
    type: Literal["text_similarity"] = "text_similarity"
    evaluation_metric: str
    pass_threshold: float | None = None  # evals' field; the score is reported either way

    @field_validator("evaluation_metric")
    @classmethod
    def _supported(cls, v: str) -> str:
        if v in UNSUPPORTED_METRICS:
            raise ValueError(f"evaluation_metric {v!r} is not supported by this service "
                             f"(supported: {', '.join(SUPPORTED_METRICS)})")
        if v not in SUPPORTED_METRICS:
            raise ValueError(f"unknown evaluation_metric {v!r} (one of "
                             f"{', '.join(SUPPORTED_METRICS)})")
        return v


LeafGrader = Annotated[StringCheckGrader | TextSimilarityGrader, Field(discriminator="type")]


class MultiGrader(_Grader):
    type: Literal["multi"] = "multi"
    graders: dict[str, LeafGrader] | LeafGrader
    calculate_output: str = Field(min_length=1, max_length=1000)

    @model_validator(mode="after")
    def _formula_names_sub_graders(self) -> MultiGrader:
        subs = self.sub_graders()
        if not subs or len(subs) > MAX_SUB_GRADERS:
            raise ValueError(f"graders: 1 to {MAX_SUB_GRADERS} sub-graders")
        try:
            check_formula(self.calculate_output, set(subs))
        except FormulaError as exc:
            raise ValueError(f"calculate_output: {exc}") from None
        return self

    def sub_graders(self) -> dict[str, StringCheckGrader | TextSimilarityGrader]:
        """{formula variable: grader}: the dict's keys, or a single grader's name."""
        if isinstance(self.graders, dict):
            return dict(self.graders)
        return {self.graders.name: self.graders}


Grader = Annotated[StringCheckGrader | TextSimilarityGrader | MultiGrader,
                   Field(discriminator="type")]
GRADER_ADAPTER: TypeAdapter[Grader] = TypeAdapter(Grader)


def exact_match_grader(name: str = "exact_match") -> StringCheckGrader:
    """The default grader: the output equals the reference (both stripped, see generation)."""
    return StringCheckGrader(name=name, input="{{sample.output_text}}",
                             reference="{{item.reference}}", operation="eq")


def _lookup(path: str, context: dict[str, Any]) -> str:
    namespace, *keys = path.split(".")
    value: Any = context.get(namespace)
    for key in keys:
        if isinstance(value, dict) and key in value:
            value = value[key]
        elif isinstance(value, list) and key.isdigit() and int(key) < len(value):
            value = value[int(key)]
        else:
            raise TemplateError(f"{{{{ {path} }}}}: no such variable", param=path)
    if isinstance(value, str):
        return value
    return json.dumps(value)


def render(template: str, *, item: dict[str, Any], sample: dict[str, Any]) -> str:
    """Substitute every `{{ namespace.path }}`; TemplateError for one that names nothing.

    `sample.output_json` is the output parsed as JSON, when it parses to an object."""
    if "output_json" not in sample and isinstance(sample.get("output_text"), str):
        try:
            parsed = json.loads(sample["output_text"])
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            sample = {**sample, "output_json": parsed}
    context = {"item": item, "sample": sample}
    return _TEMPLATE_RE.sub(lambda m: _lookup(m.group(1), context), template)


def _string_check(op: str, text: str, ref: str) -> float:
    if op == "eq":
        return float(text == ref)
    if op == "ne":
        return float(text != ref)
    if op == "like":
        return float(ref in text)
    return float(ref.lower() in text.lower())  # ilike


@lru_cache(maxsize=8)
def _rouge_scorer(kind: str) -> Any:
    from rouge_score import rouge_scorer  # type: ignore[import-untyped]

    return rouge_scorer.RougeScorer([kind], use_stemmer=False)


def _similarity(metric: str, text: str, ref: str) -> float:
    if metric == "fuzzy_match":
        from rapidfuzz import fuzz

        return float(fuzz.ratio(text, ref)) / 100.0
    if metric == "bleu":
        import sacrebleu

        return float(sacrebleu.sentence_bleu(text, [ref]).score) / 100.0
    if metric == "gleu":
        from nltk.translate.gleu_score import sentence_gleu  # type: ignore[import-untyped]

        return float(sentence_gleu([ref.split()], text.split()))
    kind = "rougeL" if metric == "rouge_l" else "rouge" + metric.rsplit("_", 1)[1]
    return float(_rouge_scorer(kind).score(ref, text)[kind].fmeasure)


def grade(grader: StringCheckGrader | TextSimilarityGrader | MultiGrader, *,
          item: dict[str, Any], sample: dict[str, Any]) -> tuple[float, dict[str, float]]:
    """(score, sub-scores) of one sample. Sub-scores: a multi grader's {key: score}, else {}.

    Raises TemplateError for a variable the item/sample lacks, FormulaError for a formula that
    fails on these values (e.g. a division by zero)."""
    if isinstance(grader, MultiGrader):
        subs = {key: grade(g, item=item, sample=sample)[0]
                for key, g in grader.sub_graders().items()}
        return evaluate_formula(grader.calculate_output, subs), subs
    text = render(grader.input, item=item, sample=sample)
    ref = render(grader.reference, item=item, sample=sample)
    if isinstance(grader, StringCheckGrader):
        return _string_check(grader.operation, text, ref), {}
    score = _similarity(grader.evaluation_metric, text, ref)
    return min(1.0, max(0.0, score)), {}  # sacrebleu's exp/log can land a hair past 1.0


def parse_grader(obj: Any) -> StringCheckGrader | TextSimilarityGrader | MultiGrader:
    """A grader from JSON; GraderError naming an unsupported type (pydantic errors otherwise)."""
    if isinstance(obj, dict) and obj.get("type") in UNSUPPORTED_TYPES:
        raise GraderError(f"grader type {obj['type']!r} is not supported by this service: it "
                          "runs code or calls a model (supported: string_check, "
                          "text_similarity, multi)", param="grader.type")
    return GRADER_ADAPTER.validate_python(obj)
