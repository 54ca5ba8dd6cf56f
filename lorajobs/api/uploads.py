"""Multipart uploads streamed into a dataset `Upload`: validated while the body arrives.

    request body ─▶ python_multipart's push parser (event loop)
                      ├─ text fields ─▶ `fields` (at most MAX_FIELDS, each <= MAX_FIELD_BYTES)
                      └─ the file part ─▶ FLUSH_BYTES batches ─▶ threadpool: Upload.write
                                          (size cap, staging file, sha256, record validation)

Nothing of the body is spooled elsewhere (Starlette's `request.form()` spools a file part to a
temporary file in $TMPDIR, often a tmpfs, i.e. memory, before the route sees a byte), and the
API's memory is one batch plus one record whatever the file's size. The body is read to its end
even after the validator has its verdict, so the client, still sending, reads the 422 instead
of a reset connection; bytes after the verdict are counted (413 past the cap), not parsed.

Called from the route, i.e. after authentication: an anonymous client never makes the server
write a byte to disk.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from lorajobs.core.datasets import Upload
from lorajobs.core.errors import InvalidRequest

__all__ = ["FLUSH_BYTES", "ReceivedForm", "receive_upload"]

FLUSH_BYTES = 1024 * 1024  # file bytes handed to the threadpool at once: ~3 hops per MiB saved
MAX_FIELDS = 4  # text fields besides the file (format, purpose, ...)
MAX_FIELD_BYTES = 1024
FILE_FIELD = "file"


@dataclass
class ReceivedForm:
    """A multipart body received: its text fields and the file's `Upload` (not finished)."""

    fields: dict[str, str]
    filename: str | None
    upload: Upload


@dataclass
class _Part:
    headers: dict[bytes, bytes] = field(default_factory=dict)
    name: str = ""
    filename: str | None = None
    data: bytearray = field(default_factory=bytearray)


class _FormState:
    """The parser's callbacks (synchronous, in the event loop): they only collect bytes."""

    def __init__(self) -> None:
        self.fields: dict[str, str] = {}
        self.part = _Part()
        self.header_name = b""
        self.header_value = b""
        self.file_started = False  # the file part's headers are complete: make the Upload
        self.filename: str | None = None
        self.pending = bytearray()  # file bytes not yet written
        self.file_parts = 0

    def callbacks(self) -> dict[str, Callable[..., None]]:
        return {"on_part_begin": self.on_part_begin, "on_part_data": self.on_part_data,
                "on_part_end": self.on_part_end, "on_header_field": self.on_header_field,
                "on_header_value": self.on_header_value, "on_header_end": self.on_header_end,
                "on_headers_finished": self.on_headers_finished}

    def on_part_begin(self) -> None:
        self.part = _Part()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.header_value += data[start:end]

    def on_header_end(self) -> None:
        self.part.headers[self.header_name.lower()] = self.header_value
        self.header_name = self.header_value = b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self.part.headers.get(b"content-disposition", b""))
        name = options.get(b"name")
        if name is None:
            raise InvalidRequest("a multipart part has no name", param=FILE_FIELD)
        self.part.name = name.decode("utf-8", "replace")
        if b"filename" in options:
            if self.part.name != FILE_FIELD or self.file_parts:
                raise InvalidRequest(f"one file only, in the multipart field {FILE_FIELD!r}",
                                     param=FILE_FIELD)
            self.file_parts += 1
            self.part.filename = options[b"filename"].decode("utf-8", "replace")
            self.filename = self.part.filename
            self.file_started = True
        elif len(self.fields) >= MAX_FIELDS:
            raise InvalidRequest(f"at most {MAX_FIELDS} form fields besides the file",
                                 param=self.part.name)

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self.part.filename is not None:
            self.pending += data[start:end]
            return
        self.part.data += data[start:end]
        if len(self.part.data) > MAX_FIELD_BYTES:
            raise InvalidRequest(f"form field {self.part.name!r} is longer than "
                                 f"{MAX_FIELD_BYTES} bytes", param=self.part.name)

    def on_part_end(self) -> None:
        if self.part.filename is None:
            self.fields[self.part.name] = self.part.data.decode("utf-8", "replace")


async def receive_upload(request: Request, make_upload: Callable[[dict[str, str]], Upload]
                         ) -> ReceivedForm:
    """Stream a multipart body's `file` part into `make_upload(fields seen before the file)`.

    InvalidRequest (422) for a body that is not multipart, lacks the file or is malformed;
    PayloadTooLarge (413) from the Upload. On any error the staged file is removed.
    """
    ctype, options = parse_options_header(request.headers.get("content-type", ""))
    boundary = options.get(b"boundary")
    if ctype != b"multipart/form-data" or not boundary:
        raise InvalidRequest(f"multipart field {FILE_FIELD!r} is required (send "
                             "multipart/form-data)", param=FILE_FIELD)
    state = _FormState()
    parser = MultipartParser(boundary, state.callbacks())  # type: ignore[arg-type]
    upload: Upload | None = None
    try:
        async for chunk in request.stream():
            parser.write(chunk)
            if state.file_started and upload is None:
                upload = await run_in_threadpool(make_upload, dict(state.fields))
            if upload is not None and len(state.pending) >= FLUSH_BYTES:
                await _flush(state, upload)
        parser.finalize()
        if upload is None:
            raise InvalidRequest(f"multipart field {FILE_FIELD!r} is required", param=FILE_FIELD)
        await _flush(state, upload)
    except FormParserError as exc:
        if upload is not None:
            upload.discard()
        raise InvalidRequest(f"malformed multipart body: {exc}", param=FILE_FIELD) from exc
    except BaseException:
        if upload is not None:
            upload.discard()
        raise
    return ReceivedForm(fields=state.fields, filename=state.filename, upload=upload)


async def _flush(state: _FormState, upload: Upload) -> None:
    if not state.pending:
        return
    data = bytes(state.pending)
    state.pending.clear()
    if upload.done:
        upload.write(data)  # counted only: cheap, no thread hop
    else:
        await run_in_threadpool(upload.write, data)
