"""Training-data formats: detect, validate every line, normalise. Torch-free (the API imports it).

Five formats, each a JSON object per record (JSONL, or one JSON list):

    alpaca      {instruction, input?, output}     loss on `output` only (book's prompt template)
    completion  {prompt, completion}              loss on `completion` only
    chat        {messages: [{role, content}]}     loss on assistant turns only
    text        {text}                            loss on everything
    preference  {input: {messages, tools?},       OpenAI's DPO format (method "dpo" only):
                 preferred_output: [assistant],   the preferred and the rejected continuation
                 non_preferred_output: [assistant]} of the same conversation

`load_examples` returns *normalised* examples, one of four shapes, so SFT tokenisation has three
cases, not four: `{"prompt", "completion"}` (alpaca and completion), `{"messages"}`, `{"text"}`;
preference records become `{"prompt": [messages], "chosen": [...], "rejected": [...], "tools"?}`
(TRL's conversational preference columns, lora_core.training.dpo).
Every error names its 1-based line, the field (`messages[1].role`) and what is wrong.

Files are read as a stream (`DatasetValidator`, on `lora_core.data.reader`): a 200 MiB upload
is validated in the memory of one record, and its sha256 computed on the way.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, TypeGuard

from lora_core.data.reader import MAX_RECORD_BYTES, RecordReader
from lora_core.errors import DatasetError

Source = str | os.PathLike[str] | bytes | bytearray | BinaryIO

__all__ = [
    "ALPACA_PROMPT",
    "ALPACA_PROMPT_NO_INPUT",
    "CHAT_ROLES",
    "DatasetValidator",
    "MAX_RECORD_BYTES",
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
# ... up to this many bad records: past it the file is not a dataset with a few bad lines, and
# reading on (a 20 MiB `[{},{},...]` is 7M records) costs CPU and tells the user nothing more.
MAX_ERRORS_COUNTED = 10_000
READ_CHUNK = 1024 * 1024
# The parser gets at most this much at once, so a cap stops it within ~22k records of 3 bytes
# (`{},`), not after a whole chunk's 350k.
FEED_PIECE = 64 * 1024
# Keys that identify a format, checked in this order (alpaca before completion: more specific).
_FORMAT_KEYS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("preference", ("input", "preferred_output", "non_preferred_output")),
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
    stopped: str | None = None  # why reading ended early (too many records or errors), if it did

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


def _check_messages(
    messages: Any, name: str = "messages", *, need_assistant: bool = True
) -> Iterator[tuple[str, str]]:
    """Problems of a list of {role, content} messages; fields named `name[i].role` etc."""
    if not isinstance(messages, list):
        yield name, f"must be a list, got {type(messages).__name__}"
        return
    if not messages:
        yield name, f"empty {name}"
        return
    has_assistant = False
    for i, msg in enumerate(messages):
        where = f"{name}[{i}]"
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
    if need_assistant and not has_assistant:
        yield name, "no assistant turn"


_PREFERENCE_OUTPUTS = ("preferred_output", "non_preferred_output")


def _check_preference(record: dict) -> Iterator[tuple[str, str]]:
    """OpenAI's preference record: input.messages (the conversation so far), optional
    input.tools, and two lists of assistant messages that must differ."""
    inp = record.get("input")
    if "input" not in record:
        yield "input", "missing field 'input'"
    elif not isinstance(inp, dict):
        yield "input", f"must be an object, got {type(inp).__name__}"
    else:
        if "messages" not in inp:
            yield "input.messages", "missing field 'messages'"
        else:
            yield from _check_messages(inp["messages"], "input.messages", need_assistant=False)
        tools = inp.get("tools")
        if tools is not None and not isinstance(tools, list):
            yield "input.tools", f"must be a list, got {type(tools).__name__}"
        elif tools:
            for i, tool in enumerate(tools):
                if not isinstance(tool, dict):
                    yield f"input.tools[{i}]", f"must be an object, got {type(tool).__name__}"
    for key in _PREFERENCE_OUTPUTS:
        if key not in record:
            yield key, f"missing field '{key}'"
            continue
        yield from _check_messages(record[key], key)
        if isinstance(record[key], list):
            for i, msg in enumerate(record[key]):
                if isinstance(msg, dict) and msg.get("role") not in ("assistant", None):
                    yield f"{key}[{i}].role", f"must be 'assistant', got {msg.get('role')!r}"
    if record.get("preferred_output") == record.get("non_preferred_output") and all(
            k in record for k in _PREFERENCE_OUTPUTS):
        yield "non_preferred_output", "equals preferred_output: the pair teaches nothing"


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
    elif fmt == "preference":
        problems = list(_check_preference(record))
    else:
        problems = [("format", f"unknown format {fmt!r}; expected one of {', '.join(_FORMATS)}")]
    return problems


def normalize_record(record: dict, fmt: str) -> dict[str, Any]:
    """One of `{prompt, completion}`, `{messages}`, `{text}`, `{prompt, chosen, rejected}`
    (see the module docstring)."""
    if fmt == "alpaca":
        inp = record.get("input") or ""
        template = ALPACA_PROMPT if inp.strip() else ALPACA_PROMPT_NO_INPUT
        prompt = template.format(instruction=record["instruction"], input=inp)
        return {"prompt": prompt, "completion": record["output"]}
    if fmt == "completion":
        return {"prompt": record["prompt"], "completion": record["completion"]}
    if fmt == "chat":
        return {"messages": _plain_messages(record["messages"])}
    if fmt == "preference":
        out = {"prompt": _plain_messages(record["input"]["messages"]),
               "chosen": _plain_messages(record["preferred_output"]),
               "rejected": _plain_messages(record["non_preferred_output"])}
        if record["input"].get("tools"):
            out["tools"] = record["input"]["tools"]
        return out
    return {"text": record["text"]}


def _plain_messages(messages: list[dict[str, Any]]) -> list[dict[str, str]]:
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _read_bytes(source: str | os.PathLike[str] | bytes) -> bytes:
    if isinstance(source, bytes | bytearray):
        return bytes(source)
    path = Path(source)
    if not path.is_file():
        raise DatasetError(f"data file not found: {path}", field="file")
    return path.read_bytes()


def iter_chunks(source: Source, chunk_size: int = READ_CHUNK) -> Iterator[bytes]:
    """The bytes of a file, bytes or binary stream, `chunk_size` at a time."""
    if isinstance(source, bytes | bytearray | memoryview):
        view = memoryview(source)
        for start in range(0, len(view), chunk_size):
            yield bytes(view[start:start + chunk_size])
        return
    if hasattr(source, "read"):
        while chunk := source.read(chunk_size):  # type: ignore[union-attr]
            yield chunk
        return
    path = Path(source)  # type: ignore[arg-type]
    if not path.is_file():
        raise DatasetError(f"data file not found: {path}", field="file")
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_size):
            yield chunk


def iter_records(
    source: Source, max_record_bytes: int | None = MAX_RECORD_BYTES
) -> Iterator[tuple[int, Any, str | None]]:
    """Yield (line, record, json_error) for every record; blank lines are skipped.

    A file whose first non-blank byte is `[` is one JSON list (its i-th element gets "line" i);
    anything else is JSONL. Streams: memory is bounded by one record (lora_core.data.reader).
    """
    reader = RecordReader(max_record_bytes)
    for chunk in iter_chunks(source):
        yield from reader.feed(chunk)
        if reader.done:
            return
    yield from reader.close()


def _render_for_count(example: dict[str, Any], tokenizer: Any) -> str:
    """The text an example trains on, for counting only (tokenize.py does the real masking).
    A preference pair trains on two sequences: prompt + chosen and prompt + rejected."""
    if "chosen" in example:
        return "".join(_render_for_count({"messages": example["prompt"] + example[side]},
                                         tokenizer) for side in ("chosen", "rejected"))
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


def _text(value: Any) -> TypeGuard[str]:
    """A non-blank string (`_check_str(nonempty=True)` finds nothing wrong)."""
    return type(value) is str and bool(value) and not value.isspace()


_ALPACA_CHARS = len(ALPACA_PROMPT.format(instruction="", input=""))
_ALPACA_NO_INPUT_CHARS = len(ALPACA_PROMPT_NO_INPUT.format(instruction=""))
_CHAT_MARKUP_CHARS = len("<||>\n\n")  # _render_for_count's markup around role and content


def _alpaca_length(r: dict) -> int | None:
    instruction, output, inp = r.get("instruction"), r.get("output"), r.get("input", "")
    if not (_text(instruction) and _text(output) and type(inp) is str):
        return None
    if inp and not inp.isspace():
        return _ALPACA_CHARS + len(instruction) + len(inp) + len(output)
    return _ALPACA_NO_INPUT_CHARS + len(instruction) + len(output)


def _completion_length(r: dict) -> int | None:
    prompt, completion = r.get("prompt"), r.get("completion")
    return len(prompt) + len(completion) if type(prompt) is str and _text(completion) else None


def _text_length(r: dict) -> int | None:
    text = r.get("text")
    return len(text) if _text(text) else None


def _chat_length(r: dict) -> int | None:
    messages = r.get("messages")
    if type(messages) is not list or not messages:
        return None
    total, answered = 0, False
    for m in messages:
        if type(m) is not dict:
            return None
        role, content = m.get("role"), m.get("content")
        if role not in CHAT_ROLES or type(content) is not str:
            return None
        answered = answered or (role == "assistant" and not content.isspace() and bool(content))
        total += _CHAT_MARKUP_CHARS + len(role) + len(content)
    return total if answered else None


def _preference_length(r: dict) -> int | None:
    """Rare enough (DPO files are small) to take the full check: no shortcut."""
    if validate_record(r, "preference"):
        return None
    return len(_render_for_count(normalize_record(r, "preference"), None))


# The character length `_render_for_count` gives a valid record, without building the text;
# None when the record may have a problem (validate_record then says which). Per format.
_FAST_LENGTH = {"alpaca": _alpaca_length, "completion": _completion_length,
                "text": _text_length, "chat": _chat_length, "preference": _preference_length}


def _length_stats(histogram: dict[int, int], unit: str) -> dict[str, Any]:
    """min/mean/p50/p95/max of a {length: count} histogram (its size is bounded by the distinct
    lengths, at most sqrt(2 * file size), not by the number of examples)."""
    n = sum(histogram.values())
    if not n:
        return {"unit": unit}
    ordered = sorted(histogram.items())

    def pct(q: float) -> int:
        rank = min(n - 1, int(q * (n - 1) + 0.5))  # index into the sorted lengths
        seen = 0
        for length, count in ordered:
            seen += count
            if seen > rank:
                return length
        return ordered[-1][0]

    return {
        "unit": unit,
        "min": ordered[0][0],
        "mean": round(sum(k * c for k, c in ordered) / n, 1),
        "p50": pct(0.50),
        "p95": pct(0.95),
        "max": ordered[-1][0],
    }


def _check_format(fmt: str | None) -> str | None:
    if fmt is not None and fmt not in _FORMATS:
        raise DatasetError(f"unknown format {fmt!r}; expected one of {', '.join(_FORMATS)}",
                           field="format")
    return fmt


class DatasetValidator:
    """Validate a data file fed in chunks, as it arrives: `feed(chunk)` ... `finish()`.

    Memory is bounded by one record and a length histogram, whatever the file's size; the sha256
    is of every byte fed. Reading stops early (`stopped`) once the file has more than
    `max_examples` records or `MAX_ERRORS_COUNTED` bad ones: the report is then final, and a
    caller may stop parsing (feeding still hashes, nothing more is parsed).
    """

    def __init__(
        self,
        format: str | None = None,  # noqa: A002 - the public name of the field everywhere
        *,
        tokenizer: Any = None,
        max_seq_length: int | None = None,
        max_errors: int = MAX_ERRORS_DEFAULT,
        max_examples: int | None = None,
        max_record_bytes: int | None = MAX_RECORD_BYTES,
    ) -> None:
        self.format = _check_format(format)
        self.tokenizer = tokenizer
        self.max_seq_length = max_seq_length
        self.max_errors = max_errors
        self.max_examples = max_examples
        self.stopped: str | None = None  # why reading ended before the end of the file
        self.num_records = 0
        self.num_errors = 0
        self.num_truncated = 0
        self.errors: list[dict[str, Any]] = []
        self._reader = RecordReader(max_record_bytes)
        self._sha256 = hashlib.sha256()
        self._lengths: dict[int, int] = {}
        self._finished = False

    def feed(self, chunk: bytes) -> None:
        self._sha256.update(chunk)
        view = memoryview(chunk)
        for start in range(0, len(view), FEED_PIECE):
            if self.stopped:
                return
            self._consume(self._reader.feed(bytes(view[start:start + FEED_PIECE])))

    def finish(self) -> ValidationReport:
        if not self.stopped and not self._finished:
            self._consume(self._reader.close())
        self._finished = True
        if self.num_records == 0 and not self.num_errors:
            self._add(1, "", "empty file: no records")
        counted = self.tokenizer is not None
        return ValidationReport(
            format=self.format,
            num_examples=sum(self._lengths.values()),
            num_errors=self.num_errors,
            errors=self.errors,
            stats=_length_stats(self._lengths, "tokens" if counted else "chars"),
            num_tokens=sum(k * c for k, c in self._lengths.items()) if counted else None,
            num_truncated=self.num_truncated if counted and self.max_seq_length else None,
            sha256=self._sha256.hexdigest(),
            stopped=self.stopped,
        )

    def _add(self, line: int, fld: str, message: str, *, always: bool = False) -> None:
        self.num_errors += 1
        if always or len(self.errors) < self.max_errors:
            self.errors.append({"line": line, "field": fld, "message": message})

    def _stop(self, line: int, message: str) -> None:
        """The reason reading stopped is listed even past `max_errors`."""
        self.stopped = message
        self.errors.append({"line": line, "field": "", "message": message})

    def _consume(self, records: list[tuple[int, Any, str | None]]) -> None:
        for line, record, json_error in records:
            self.num_records += 1
            if self.max_examples is not None and self.num_records > self.max_examples:
                self._stop(line, f"too many examples: the limit is {self.max_examples}; "
                                 "reading stopped here")
                self.num_errors += 1
                return
            if json_error:
                self._add(line, "", json_error)
            else:
                self._record(line, record)
            if self.num_errors >= MAX_ERRORS_COUNTED:
                self._stop(line, f"{self.num_errors} invalid records: reading stopped here")
                return

    def _record(self, line: int, record: Any) -> None:
        fmt = self.format
        if fmt is None:
            fmt = self.format = detect_format(record)
            if fmt is None:
                self._add(line, "", _UNDETECTED)
                return
        if self.tokenizer is None:
            n = _FAST_LENGTH[fmt](record) if type(record) is dict else None
            if n is not None:
                self._lengths[n] = self._lengths.get(n, 0) + 1
                return
        problems = validate_record(record, fmt)
        for fld, message in problems:
            self._add(line, fld, message)
        if problems:
            return
        example = normalize_record(record, fmt)
        if self.tokenizer is not None:
            n = count_tokens(example, self.tokenizer)
            self.num_truncated += int(self.max_seq_length is not None and n > self.max_seq_length)
        else:
            n = len(_render_for_count(example, None))
        self._lengths[n] = self._lengths.get(n, 0) + 1


def validate_file(
    source: Source,
    format: str | None = None,  # noqa: A002 - the public name of the field everywhere
    *,
    tokenizer: Any = None,
    max_seq_length: int | None = None,
    max_errors: int = MAX_ERRORS_DEFAULT,
    max_examples: int | None = None,
    max_record_bytes: int | None = MAX_RECORD_BYTES,
) -> ValidationReport:
    """Read every record of a file, bytes or binary stream and report what is wrong and how long
    it is, streaming (see DatasetValidator).

    Never raises for bad records: they are the report. Raises DatasetError only for an unknown
    `format` or a missing file. `max_examples` caps how many records a file may hold.
    """
    validator = DatasetValidator(format, tokenizer=tokenizer, max_seq_length=max_seq_length,
                                 max_errors=max_errors, max_examples=max_examples,
                                 max_record_bytes=max_record_bytes)
    for chunk in iter_chunks(source):
        validator.feed(chunk)
        if validator.stopped:
            break
    return validator.finish()


def _expected_keys() -> str:
    return "; ".join(f"{name}: {', '.join(keys)}" for name, keys in _FORMAT_KEYS)


_UNDETECTED = "cannot detect the format: expected keys " + _expected_keys()


def load_examples(
    source: Source,
    format: str | None = None,  # noqa: A002
) -> tuple[str, list[dict[str, Any]]]:
    """(format, normalised examples) of a file; DatasetError listing every bad line otherwise.

    No bound on a record's size: files reaching here were validated when uploaded (under the
    server's bound) or are the caller's own.
    """
    if not isinstance(source, str | os.PathLike | bytes | bytearray):
        source = source.read()  # a stream is read twice below: take its bytes once
    report = validate_file(source, format, max_errors=MAX_ERRORS_DEFAULT, max_record_bytes=None)
    if not report.ok:
        first: dict[str, Any] = (report.errors[0] if report.errors
                                 else {"line": None, "field": None, "message": ""})
        name = source if not isinstance(source, bytes | bytearray) else "data"
        raise DatasetError(
            f"{name}: {report.num_errors} invalid record(s); first: line {first['line']}: "
            f"{first['field'] or 'record'}: {first['message']}",
            line=first["line"],
            field=first["field"] or None,
            errors=report.errors,
        )
    assert report.format is not None
    examples = [normalize_record(record, report.format)
                for _, record, _ in iter_records(source, max_record_bytes=None)]
    return report.format, examples
