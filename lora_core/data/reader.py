"""Records of a data file, parsed as the bytes arrive: memory bounded by one record, not the file.

A push parser: `feed(chunk)` takes any slice of the file and returns the records it completed,
`close()` those the end of the file completes. A record is `(line, value, error)`; when `error`
(a message) is not None the record is bad and `value` is None.

    JSONL       one JSON value per line (split at b"\\n"; a trailing "\\r" is JSON whitespace),
                blank lines skipped, `line` = the 1-based line number. A bad line is an error for
                that line only: reading resumes after its newline.
    JSON list   the file's first non-blank byte is `[`: one list of records, parsed one element at
                a time (`raw_decode` at a cursor), never as a whole; `line` = the 1-based element
                index. A syntax error ends the list (there is no way to resynchronise).

Bounds, which the API's upload path relies on:
- a record (a line, or one list element) longer than `max_record_bytes` is an error; its bytes
  are skipped (JSONL) or end the list, never buffered past the bound;
- nesting deeper than the interpreter's recursion limit (`[` x 100,000) is an error for that
  record (`RecursionError` caught), as is an integer of more than 4300 digits (`ValueError`);
- invalid UTF-8 is an error for its line (JSONL) or ends the list.
A leading UTF-8 byte-order mark is skipped.
"""

from __future__ import annotations

import codecs
import json
import json.scanner
import re
import sys
from typing import Any, cast

__all__ = ["MAX_RECORD_BYTES", "Record", "RecordReader"]

# 1 MiB per record: ~250k tokens of English, more than any context a job trains on, and a bound
# on what one record costs while parsed (a few times its size as Python objects).
MAX_RECORD_BYTES = 1024 * 1024
Record = tuple[int, Any, str | None]
_WS_BYTES = b" \t\n\r"
_WS = re.compile(r"[ \t\n\r]*")
_SCALAR_END = re.compile(r"[ \t\n\r,\]]")
_DECODER = json.JSONDecoder()
# The C scanner json.loads ends in: (value, end). (typeshed types its argument oddly.)
_SCAN: Any = cast(Any, json.scanner).make_scanner(_DECODER)
# A decode error this close to the end of the buffer may be a record cut by the chunk boundary
# ("tru|e", "\\u12|34", "1.|5"): wait for more bytes. Longer than any literal or escape.
_TAIL_CHARS = 6
# A list element cut by the chunk boundary is decoded again once the buffer has grown by this
# factor (or the file ended): each byte is decoded O(log(record size)) times, not once a chunk.
_RETRY_GROWTH = 2


def _skip_ws(match: Any, text: str, pos: int) -> int:
    """The position after the JSON whitespace at `pos` (`_WS` matches the empty string too)."""
    return int(match(text, pos).end())


def _parse_error(exc: BaseException) -> str:
    if isinstance(exc, RecursionError):
        return "invalid JSON: nested too deeply"
    if isinstance(exc, json.JSONDecodeError):
        return f"invalid JSON: {exc.msg} (column {exc.colno})"
    # ValueError: an integer of more than sys.get_int_max_str_digits() digits (4300)
    return f"invalid JSON: {str(exc).split(':', 1)[0]}"


class RecordReader:
    """Push parser for JSONL or one JSON list (see the module docstring)."""

    def __init__(self, max_record_bytes: int | None = MAX_RECORD_BYTES) -> None:
        """`max_record_bytes=None`: no bound (a file validated before, read again)."""
        self.max_record_bytes = max_record_bytes if max_record_bytes is not None else sys.maxsize
        self.mode: str | None = None  # "jsonl" | "list": the first non-blank byte decides
        self._bom: bytes | None = b""  # the first bytes while they may be a byte-order mark
        self._line = 0  # JSONL: lines completed (list: unused)
        self._partial = bytearray()  # JSONL: the line being received
        self._skipping = False  # JSONL: inside an over-long line, dropping bytes to its end
        self._utf8 = codecs.getincrementaldecoder("utf-8")()  # list
        self._text = ""  # list: decoded, not yet parsed
        self._state = "open"  # list: open | first | value | sep | end
        self._index = 0  # list: elements completed
        self._retry_at = 0  # list: decode again once len(_text) reaches this
        self.done = False  # list ended or broke: the rest of the input is not read

    def feed(self, chunk: bytes) -> list[Record]:
        if self.mode is None:
            chunk = self._decide(chunk)
            if self.mode is None:
                return []
        if self.mode == "jsonl":
            return self._feed_lines(chunk)
        return self._feed_list(chunk, final=False)

    def close(self) -> list[Record]:
        if self.mode == "jsonl":
            if not (self._skipping or self._partial.strip(_WS_BYTES)):
                return []
            self._line += 1
            record = self._line_record(bytes(self._partial))
            self._partial.clear()
            return [record]
        if self.mode == "list":
            return self._feed_list(b"", final=True)
        return []  # empty or all blank: no records

    # -- which format ----------------------------------------------------------------------
    def _decide(self, chunk: bytes) -> bytes:
        """Skip a BOM and leading blanks (counting their newlines); set `mode` at the first
        other byte and return the chunk from there."""
        if self._bom is not None:
            head = self._bom + chunk
            if len(head) < len(codecs.BOM_UTF8) and codecs.BOM_UTF8.startswith(head):
                self._bom = head
                return b""
            chunk = head[len(codecs.BOM_UTF8):] if head.startswith(codecs.BOM_UTF8) else head
            self._bom = None
        rest = chunk.lstrip(_WS_BYTES)
        self._line += chunk.count(b"\n", 0, len(chunk) - len(rest))
        if rest:
            self.mode = "list" if rest[:1] == b"[" else "jsonl"
        return rest

    # -- JSONL ------------------------------------------------------------------------------
    def _line_record(self, raw: bytes) -> Record:
        """One line, the slow way (every error path ends here, so messages are json.loads')."""
        if self._skipping or len(raw) > self.max_record_bytes:
            self._skipping = False
            return self._line, None, f"line longer than {self.max_record_bytes} bytes"
        try:
            return self._line, json.loads(raw.decode("utf-8")), None
        except UnicodeDecodeError as exc:
            return self._line, None, f"invalid UTF-8: {exc.reason} at byte {exc.start}"
        except (ValueError, RecursionError) as exc:
            return self._line, None, _parse_error(exc)

    def _feed_lines(self, chunk: bytes) -> list[Record]:
        out: list[Record] = []
        nl = chunk.find(b"\n")
        if nl < 0:
            self._append_partial(chunk)
            return out
        if self._skipping or self._partial:  # the line the previous chunks began
            if not self._skipping:
                self._partial += chunk[:nl]
            self._line += 1
            raw = bytes(self._partial)
            self._partial.clear()
            if self._skipping or raw.strip(_WS_BYTES):
                out.append(self._line_record(raw))
            chunk = chunk[nl + 1:]
        last = chunk.rfind(b"\n")
        if last >= 0:
            block = chunk[:last + 1]
            if len(block) <= self.max_record_bytes:
                self._block_fast(block, out)
            else:
                self._block_slow(block, out)
        self._append_partial(chunk[last + 1:])
        return out

    def _append_partial(self, data: bytes) -> None:
        if self._skipping:
            return
        self._partial += data
        if len(self._partial) > self.max_record_bytes:
            self._skipping = True  # reported at the line's newline, or at close()
            self._partial.clear()

    def _block_slow(self, block: bytes, out: list[Record]) -> None:
        """Complete lines, one json.loads each."""
        start = 0
        while (nl := block.find(b"\n", start)) >= 0:
            self._line += 1
            raw = block[start:nl]
            start = nl + 1
            if raw.strip(_WS_BYTES):
                out.append(self._line_record(raw))

    def _block_fast(self, block: bytes, out: list[Record]) -> None:
        """Complete lines (the block is shorter than a record's bound), decoded once and parsed
        with the C scanner at each line's start (no json.loads wrapper per line).
        Anything unusual (bad UTF-8, an error, a value not ending its line) takes the slow path,
        so results and messages are exactly json.loads' line by line."""
        try:
            text = block.decode("utf-8")
        except UnicodeDecodeError:
            self._block_slow(block, out)
            return
        scan, find, ws = _SCAN, text.find, _WS.match
        pos, line = 0, self._line
        while (nl := find("\n", pos)) >= 0:
            line += 1
            start = _skip_ws(ws, text, pos) if text[pos] in " \t\r" else pos
            if start < nl:
                try:
                    value, end = scan(text, start)
                except (StopIteration, ValueError, RecursionError):
                    end = -1
                if end == nl or (0 <= end < nl and not text[end:nl].strip(" \t\r")):
                    out.append((line, value, None))
                else:  # an error, trailing data, or a value that runs past the newline
                    self._line = line
                    out.append(self._line_record(text[pos:nl].encode()))
            pos = nl + 1
        self._line = line

    # -- JSON list --------------------------------------------------------------------------
    def _feed_list(self, chunk: bytes, *, final: bool) -> list[Record]:
        if self.done:
            return []
        out: list[Record] = []
        try:
            self._text += self._utf8.decode(chunk, final=final)
        except UnicodeDecodeError as exc:
            return self._stop(out, f"invalid UTF-8: {exc.reason}")
        if not final and len(self._text) < self._retry_at:
            return out
        text, pos = self._text, 0
        while not self.done:
            pos = _skip_ws(_WS.match, text, pos)
            if pos >= len(text):
                break
            char = text[pos]
            if self._state == "open":  # the first non-blank character, "[" by construction
                self._state, pos = "first", pos + 1
            elif self._state == "end":
                self._stop(out, "extra data after the JSON list")
            elif char == "]" and self._state in ("first", "sep"):
                self._state, pos = "end", pos + 1
            elif self._state == "sep":
                if char == ",":
                    self._state, pos = "value", pos + 1
                else:
                    self._stop(out, f"invalid JSON: expected ',' or ']' after record, got "
                                    f"{char!r}")
            else:
                record, pos = self._element(text, pos, final)
                if record is None:
                    break  # cut by the chunk boundary: wait for more bytes
                out.append(record)
                self._state = "sep"
        if self.done:
            self._text = ""
            return out
        self._text = text[pos:]
        self._retry_at = max(0, self._retry_at - pos)
        if final and self._state != "end":
            self._stop(out, "invalid JSON: the list is not closed with ']'")
        return out

    def _element(self, text: str, pos: int, final: bool) -> tuple[Record | None, int]:
        """(record, position after it), or (None, pos) when more bytes are needed."""
        avail = len(text) - pos
        if not final and text[pos] not in '{["' and not _SCALAR_END.search(text, pos):
            return self._wait(avail, pos)  # a number or literal may go on in the next chunk
        try:
            value, end = _DECODER.raw_decode(text, pos)
        except RecursionError as exc:
            return self._stop([], _parse_error(exc))[0], pos
        except ValueError as exc:
            cut = (isinstance(exc, json.JSONDecodeError)
                   and (exc.msg.startswith("Unterminated string")
                        or exc.pos >= len(text) - _TAIL_CHARS))
            if cut and not final:
                return self._wait(avail, pos)
            return self._stop([], _parse_error(exc))[0], pos
        if end - pos > self.max_record_bytes:
            return self._too_long(), pos
        self._index += 1
        self._retry_at = 0
        return (self._index, value, None), end

    def _wait(self, avail: int, pos: int) -> tuple[Record | None, int]:
        if avail > self.max_record_bytes:
            return self._too_long(), pos
        self._retry_at = pos + max(avail * _RETRY_GROWTH, avail + 1024)
        return None, pos

    def _too_long(self) -> Record:
        return self._stop([], f"record longer than {self.max_record_bytes} bytes")[0]

    def _stop(self, out: list[Record], message: str) -> list[Record]:
        self.done = True
        self._index += 1
        out.append((self._index, None, message))
        return out
