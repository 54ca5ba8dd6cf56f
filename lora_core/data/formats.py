"""Training-data formats: detect, validate every line, normalise. Torch-free (the API imports it).

Four formats, each a JSON object per record (JSONL, or one JSON list):

    alpaca      {instruction, input?, output}     loss on `output` only (book's prompt template)
    completion  {prompt, completion}              loss on `completion` only
    chat        {messages: [{role, content}]}     loss on assistant turns only
    text        {text}                            loss on everything

`load_examples` returns *normalised* examples, one of three shapes, so tokenisation has three
cases, not four: `{"prompt", "completion"}` (alpaca and completion), `{"messages"}`, `{"text"}`.
Every error names its 1-based line, the field (`messages[1].role`) and what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lora_core.errors import DatasetError

__all__ = [
    "ALPACA_PROMPT",
    "ALPACA_PROMPT_NO_INPUT",
    "CHAT_ROLES",
    "ValidationReport",
    "detect_format",
    "validate_record",
    "normalize_record",
    "iter_records",
    "validate_file",
    "load_examples",
]

# The Alpaca / LLMBook prompt templates; the response follows "### Response:\n".
ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
CHAT_ROLES = ("system", "user", "assistant")
MAX_ERRORS_DEFAULT = 20  # a report of 20 bad lines says enough; we still read every line
# Keys that identify a format, checked in this order (alpaca before completion: more specific).
_FORMAT_KEYS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("chat", ("messages",)),
    ("alpaca", ("instruction", "output")),
    ("completion", ("prompt", "completion")),
    ("text", ("text",)),
)
_FORMATS = tuple(name for name, _ in _FORMAT_KEYS)


@dataclass
class ValidationReport:
    """What `validate_file` found. `errors` holds the first `max_errors` `{line, field, message}`.

    `stats` has min/mean/p50/p95/max of tokens per example (with a tokenizer) or characters.
    """

    format: str | None
    num_examples: int
    num_errors: int
    errors: list[dict[str, Any]] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    num_tokens: int | None = None
    num_truncated: int | None = None
    sha256: str = ""

    @property
    def ok(self) -> bool:
        return self.num_errors == 0 and self.num_examples > 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def detect_format(record: Any) -> str | None:
    """The format whose identifying keys the record has, or None."""
    if not isinstance(record, dict):
        return None
    for name, keys in _FORMAT_KEYS:
        if all(k in record for k in keys):
            return name
    return None


def _check_str(record: dict, key: str, *, required: bool = True, nonempty: bool = False):
    """Yield (field, message) problems for one string field."""
    if key not in record:
        if required:
            yield key, f"missing field '{key}'"
        return
    value = record[key]
    if not isinstance(value, str):
        yield key, f"must be a string, got {type(value).__name__}"
    elif nonempty and not value.strip():
        yield key, f"empty {key}"


def _check_messages(messages: Any) -> Iterator[tuple[str, str]]:
    if not isinstance(messages, list):
        yield "messages", f"must be a list, got {type(messages).__name__}"
        return
    if not messages:
        yield "messages", "empty messages"
        return
    has_assistant = False
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            yield where, f"must be an object, got {type(msg).__name__}"
            continue
        role = msg.get("role")
        if "role" not in msg:
            yield f"{where}.role", "missing field 'role'"
        elif role not in CHAT_ROLES:
            yield f"{where}.role", f"unknown role {role!r}"
        for problem in _check_str(msg, "content"):
            yield f"{where}.{problem[0]}", problem[1]
        if role == "assistant" and isinstance(msg.get("content"), str):
            has_assistant = has_assistant or bool(msg["content"].strip())
    if not has_assistant:
        yield "messages", "no assistant turn"


def validate_record(record: Any, fmt: str) -> list[tuple[str, str]]:
    """Problems of one record as (field, message) pairs; empty when the record is usable."""
    if not isinstance(record, dict):
        return [("", f"must be a JSON object, got {type(record).__name__}")]
    if fmt == "alpaca":
        problems = list(_check_str(record, "instruction", nonempty=True))
        problems += _check_str(record, "input", required=False)
        problems += _check_str(record, "output", nonempty=True)
    elif fmt == "completion":
        problems = list(_check_str(record, "prompt"))
        problems += _check_str(record, "completion", nonempty=True)
    elif fmt == "chat":
        problems = [] if "messages" in record else [("messages", "missing field 'messages'")]
        if "messages" in record:
            problems += _check_messages(record["messages"])
    elif fmt == "text":
        problems = list(_check_str(record, "text", nonempty=True))
    else:
        problems = [("format", f"unknown format {fmt!r}; expected one of {', '.join(_FORMATS)}")]
    return problems


def normalize_record(record: dict, fmt: str) -> dict[str, Any]:
    """One of `{prompt, completion}`, `{messages}`, `{text}` (see the module docstring)."""
    if fmt == "alpaca":
        inp = record.get("input") or ""
        template = ALPACA_PROMPT if inp.strip() else ALPACA_PROMPT_NO_INPUT
        prompt = template.format(instruction=record["instruction"], input=inp)
        return {"prompt": prompt, "completion": record["output"]}
    if fmt == "completion":
        return {"prompt": record["prompt"], "completion": record["completion"]}
    if fmt == "chat":
        messages = record["messages"]
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in messages]}
    return {"text": record["text"]}


def _read_bytes(source: str | os.PathLike[str] | bytes) -> bytes:
    if isinstance(source, bytes | bytearray):
        return bytes(source)
    path = Path(source)
    if not path.is_file():
        raise DatasetError(f"data file not found: {path}", field="file")
    return path.read_bytes()


def iter_records(data: bytes) -> Iterator[tuple[int, Any, str | None]]:
    """Yield (line, record, json_error) for every record; blank lines are skipped.

    A file whose first non-blank byte is `[` is one JSON list (record i gets "line" i+1);
    anything else is JSONL.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        yield 1, None, f"invalid UTF-8: {exc}"
        return
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            yield exc.lineno, None, f"invalid JSON: {exc.msg}"
            return
        for i, item in enumerate(items, start=1):
            yield i, item, None
        return
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line), None
        except json.JSONDecodeError as exc:
            yield lineno, None, f"invalid JSON: {exc.msg} (column {exc.colno})"


def _resolve_format(fmt: str | None, records: list[tuple[int, Any, str | None]]) -> str | None:
    """The given format, or the one detected from the first valid record."""
    if fmt is not None:
        if fmt not in _FORMATS:
            raise DatasetError(
                f"unknown format {fmt!r}; expected one of {', '.join(_FORMATS)}", field="format"
            )
        return fmt
    for _, record, err in records:
        if err is None:
            detected = detect_format(record)
            if detected:
                return detected
    return None


def _render_for_count(example: dict[str, Any], tokenizer: Any) -> str:
    """The text an example trains on, for counting only (tokenize.py does the real masking)."""
    if "messages" in example:
        if hasattr(tokenizer, "apply_chat_template") and getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template(example["messages"], tokenize=False)
        return "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in example["messages"])
    if "text" in example:
        return example["text"]
    return example["prompt"] + example["completion"]


def count_tokens(example: dict[str, Any], tokenizer: Any) -> int:
    """Tokens of a normalised example incl. the appended EOS.

    `tokenizer` is a `tokenizers.Tokenizer` (encode -> Encoding) or a transformers tokenizer
    (encode -> list[int]); the API passes the former to stay free of transformers.
    """
    encoded = tokenizer.encode(_render_for_count(example, tokenizer))
    ids = getattr(encoded, "ids", encoded)
    return len(ids) + 1


def _length_stats(lengths: list[int], unit: str) -> dict[str, Any]:
    if not lengths:
        return {"unit": unit}
    ordered = sorted(lengths)

    def pct(q: float) -> int:
        return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]

    return {
        "unit": unit,
        "min": ordered[0],
        "mean": round(statistics.fmean(ordered), 1),
        "p50": pct(0.50),
        "p95": pct(0.95),
        "max": ordered[-1],
    }


def validate_file(
    source: str | os.PathLike[str] | bytes,
    format: str | None = None,  # noqa: A002 - the public name of the field everywhere
    *,
    tokenizer: Any = None,
    max_seq_length: int | None = None,
    max_errors: int = MAX_ERRORS_DEFAULT,
    max_examples: int | None = None,
) -> ValidationReport:
    """Read every record of a file (or bytes) and report what is wrong and how long it is.

    Never raises for bad records: they are the report. Raises DatasetError only for an unknown
    `format` or a missing file. `max_examples` caps how many examples a file may hold.
    """
    data = _read_bytes(source)
    records = list(iter_records(data))
    fmt = _resolve_format(format, records)
    errors: list[dict[str, Any]] = []
    num_errors = 0
    lengths: list[int] = []
    num_truncated = 0

    def add(line: int, fld: str, message: str) -> None:
        nonlocal num_errors
        num_errors += 1
        if len(errors) < max_errors:
            errors.append({"line": line, "field": fld, "message": message})

    if fmt is None and records:
        add(records[0][0], "", "cannot detect the format: expected keys " + _expected_keys())
    for line, record, json_error in records if fmt else []:
        if json_error:
            add(line, "", json_error)
            continue
        problems = validate_record(record, fmt)
        for fld, message in problems:
            add(line, fld, message)
        if problems:
            continue
        example = normalize_record(record, fmt)
        if tokenizer is not None:
            n = count_tokens(example, tokenizer)
            num_truncated += int(max_seq_length is not None and n > max_seq_length)
        else:
            n = len(_render_for_count(example, None))
        lengths.append(n)
    if not records:
        add(1, "", "empty file: no records")
    if max_examples is not None and len(lengths) > max_examples:
        add(0, "", f"too many examples: {len(lengths)} > {max_examples}")
    return ValidationReport(
        format=fmt,
        num_examples=len(lengths),
        num_errors=num_errors,
        errors=errors,
        stats=_length_stats(lengths, "tokens" if tokenizer is not None else "chars"),
        num_tokens=sum(lengths) if tokenizer is not None else None,
        num_truncated=num_truncated if tokenizer is not None and max_seq_length else None,
        sha256=hashlib.sha256(data).hexdigest(),
    )


def _expected_keys() -> str:
    return "; ".join(f"{name}: {', '.join(keys)}" for name, keys in _FORMAT_KEYS)


def load_examples(
    source: str | os.PathLike[str] | bytes,
    format: str | None = None,  # noqa: A002
) -> tuple[str, list[dict[str, Any]]]:
    """(format, normalised examples) of a file; DatasetError listing every bad line otherwise."""
    data = _read_bytes(source)
    report = validate_file(data, format, max_errors=MAX_ERRORS_DEFAULT)
    if not report.ok:
        first = report.errors[0] if report.errors else {"line": None, "field": None, "message": ""}
        name = source if not isinstance(source, bytes | bytearray) else "data"
        raise DatasetError(
            f"{name}: {report.num_errors} invalid record(s); first: line {first['line']}: "
            f"{first['field'] or 'record'}: {first['message']}",
            line=first["line"],
            field=first["field"] or None,
            errors=report.errors,
        )
    assert report.format is not None
    examples = [
        normalize_record(record, report.format) for _, record, _ in iter_records(data)
    ]
    return report.format, examples
