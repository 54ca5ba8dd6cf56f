"""lora_core.data.reader and the streaming validator: any chunking reads the same records, every
bound is a line error (never an exception), memory does not grow with the file."""

from __future__ import annotations

import json
import random
import tracemalloc

import pytest

from lora_core.data.formats import DatasetValidator, validate_file
from lora_core.data.reader import RecordReader

ROWS = [{"instruction": "ä" * i + "x", "input": "\\" * (i % 3), "output": f"{i}.5",
         "n": i / 3, "ok": [True, None]} for i in range(60)]


def _read(data: bytes, chunk: int, cap: int = 1 << 20) -> list:
    reader, out = RecordReader(cap), []
    for start in range(0, len(data), chunk):
        out += reader.feed(data[start:start + chunk])
    return out + reader.close()


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 64, 4096, 1 << 20])
def test_any_chunking_reads_the_same_records(chunk: int) -> None:
    rng = random.Random(chunk)
    jsonl = "".join(json.dumps(r, ensure_ascii=rng.random() < 0.5) + "\n" for r in ROWS).encode()
    as_list = json.dumps(ROWS, indent=2, ensure_ascii=False).encode()
    scalars = b'[1, 22.5e3, true, false, null, "s", 12345]'
    assert [(line, value) for line, value, _ in _read(jsonl, chunk)] == \
        [(i + 1, r) for i, r in enumerate(ROWS)]
    assert _read(as_list, chunk) == [(i + 1, r, None) for i, r in enumerate(ROWS)]
    assert [v for _, v, _ in _read(scalars, chunk)] == [1, 22.5e3, True, False, None, "s", 12345]
    mixed = b'\xef\xbb\xbf \n\n{"text": "a"}\r\n\xff\n  \n{"x": 1} 2\n{"text": "b"}'
    got = _read(mixed, chunk)
    assert [(line, err is None) for line, _, err in got] == [(3, True), (4, False), (6, False),
                                                             (7, True)]
    assert got[1][2].startswith("invalid UTF-8") and "Extra data" in got[2][2]


def test_bounds_are_line_errors() -> None:
    deep = b"[" * 100_000
    assert _read(b'{"text": "a"}\n' + deep + b'\n{"text": "b"}\n', 4096) == [
        (1, {"text": "a"}, None), (2, None, "invalid JSON: nested too deeply"),
        (3, {"text": "b"}, None)]
    assert _read(deep, 4096) == [(1, None, "invalid JSON: nested too deeply")]
    digits = _read(b'{"n": ' + b"1" * 5000 + b'}\n{"text": "b"}\n', 100)
    assert digits[0][0] == 1 and "4300 digits" in digits[0][2] and digits[1][1] == {"text": "b"}
    long_line = _read(b'{"text": "' + b"a" * 5000 + b'"}\n{"text": "b"}\n', 100, cap=1000)
    assert long_line == [(1, None, "line longer than 1000 bytes"), (2, {"text": "b"}, None)]
    long_record = _read(b'[{"text": "' + b"a" * 5000 + b'"}, {"text": "b"}]', 100, cap=1000)
    assert long_record == [(1, None, "record longer than 1000 bytes")]


def test_a_broken_list_names_the_record_and_stops() -> None:
    assert _read(b'[{"a": 1}, {"a": 2} {"a": 3}]', 3)[1:] == [(2, {"a": 2}, None), (
        3, None, "invalid JSON: expected ',' or ']' after record, got '{'")]
    assert _read(b'[{"a": 1}] x', 3)[1] == (2, None, "extra data after the JSON list")
    assert _read(b'[{"a": 1}', 3)[1] == (2, None, "invalid JSON: the list is not closed with ']'")
    assert _read(b'[{"a": tru}]', 1)[0][2].startswith("invalid JSON: Expecting value")


def test_validator_stops_at_the_example_cap_and_after_many_errors() -> None:
    fed = 0

    def lines():  # 100k records, made as they are read
        nonlocal fed
        for _ in range(100):
            chunk = b'{"text": "hello"}\n' * 1000
            fed += len(chunk)
            yield chunk

    v = DatasetValidator(max_examples=2500)
    for chunk in lines():
        v.feed(chunk)
        if v.stopped:
            break
    report = v.finish()
    assert not report.ok and report.num_examples == 2500 and fed < 5 * 18_000
    assert report.errors[-1] == {"line": 2501, "field": "",
                                 "message": "too many examples: the limit is 2500; reading "
                                            "stopped here"}
    hostile = b"[" + b"{}," * 300_000 + b"{}]"  # the file, 1 MiB of it
    report = validate_file(hostile)
    assert report.stopped == "10000 invalid records: reading stopped here"
    assert report.num_errors == 10_000 and len(report.errors) == 21


def test_fast_char_lengths_match_the_rendered_text() -> None:
    rows = [{"instruction": "do x", "input": "  ", "output": "y"},
            {"instruction": "do x", "input": "ctx", "output": "yy"},
            {"prompt": "", "completion": "c"},
            {"messages": [{"role": "system", "content": ""}, {"role": "user", "content": "hi"},
                          {"role": "assistant", "content": "yo"}]},
            {"text": "tt"}]
    from lora_core.data.formats import _render_for_count, normalize_record

    for row in rows:
        report = validate_file(json.dumps(row).encode())
        assert report.ok, report.errors
        expected = len(_render_for_count(normalize_record(row, report.format), None))
        assert report.stats["max"] == expected, row


def test_validating_memory_does_not_grow_with_the_file() -> None:
    line = json.dumps({"instruction": "name the animal " * 4, "output": "cat"}).encode() + b"\n"
    block = line * (256 * 1024 // len(line))

    def peak(mib: int) -> int:
        tracemalloc.start()
        v = DatasetValidator()
        for _ in range(mib * 4):
            v.feed(block)
        report = v.finish()
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert report.ok
        return top

    small, large = peak(1), peak(8)
    assert large < 2 * 1024 * 1024 and large < small + 256 * 1024, (small, large)
