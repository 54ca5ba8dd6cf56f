"""A model upload: a multipart body of files (or one tar) streamed into a staging directory.

    request body ─▶ python_multipart's push parser (event loop)
                      ├─ text fields (`name`) ─▶ `fields` (small, few)
                      └─ each file part ─▶ FLUSH_BYTES batches ─▶ threadpool: write to
                         staging/<its checked file name>, all parts counted against
                         max_model_bytes (413 the moment they pass it)

Like api/uploads.py (datasets), nothing is spooled elsewhere and the API's memory is one batch
whatever the model's size. The caller owns the staging directory (and removes it on any
error); validation of the model itself (safetensors headers, no pickle) comes after, in
lorajobs.core.registry.register_stored_model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, cast

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from lorajobs.core.errors import InvalidRequest, PayloadTooLarge
from lorajobs.core.model_import import MAX_FILES, check_file_name

__all__ = ["ReceivedModel", "receive_model_upload", "TAR_SUFFIXES"]

FLUSH_BYTES = 1024 * 1024
MAX_FIELDS = 4
MAX_FIELD_BYTES = 1024
FILE_FIELDS = ("files", "file")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")


@dataclass
class ReceivedModel:
    """The text fields and the file names written under the staging directory."""

    fields: dict[str, str]
    files: list[str]
    tar: str | None  # the one part was a tar archive, written under this name


@dataclass
class _State:
    staging: Path
    max_bytes: int
    fields: dict[str, str] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    headers: dict[bytes, bytes] = field(default_factory=dict)
    header_name: bytes = b""
    header_value: bytes = b""
    part_name: str = ""
    field_data: bytearray = field(default_factory=bytearray)
    in_file: bool = False  # the current part is a file
    # What the callbacks asked, in order, for the threadpool to do: ("open", name),
    # ("write", bytes), ("close", None). One parser.write may end one file and start the next.
    ops: list[tuple[str, object]] = field(default_factory=list)
    queued_bytes: int = 0
    closes: int = 0
    out: BinaryIO | None = None  # the file being written (threadpool side)
    total: int = 0
    tar: str | None = None

    def callbacks(self) -> dict[str, Callable[..., None]]:
        return {"on_part_begin": self.on_part_begin, "on_part_data": self.on_part_data,
                "on_part_end": self.on_part_end, "on_header_field": self.on_header_field,
                "on_header_value": self.on_header_value, "on_header_end": self.on_header_end,
                "on_headers_finished": self.on_headers_finished}

    def on_part_begin(self) -> None:
        self.headers, self.field_data, self.part_name = {}, bytearray(), ""

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.header_value += data[start:end]

    def on_header_end(self) -> None:
        self.headers[self.header_name.lower()] = self.header_value
        self.header_name = self.header_value = b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self.headers.get(b"content-disposition", b""))
        name = options.get(b"name")
        if name is None:
            raise InvalidRequest("a multipart part has no name", param="files")
        self.part_name = name.decode("utf-8", "replace")
        if b"filename" not in options:
            if len(self.fields) >= MAX_FIELDS:
                raise InvalidRequest(f"at most {MAX_FIELDS} form fields besides the files",
                                     param=self.part_name)
            return
        if self.part_name not in FILE_FIELDS:
            raise InvalidRequest(f"files go in the multipart field 'files', not "
                                 f"{self.part_name!r}", param=self.part_name)
        # A browser or curl may send a path ("model/config.json"): its last component counts.
        filename = options[b"filename"].decode("utf-8", "replace").replace("\\", "/")
        base = filename.rsplit("/", 1)[-1]
        if base.endswith(TAR_SUFFIXES):
            if self.files or self.tar:
                raise InvalidRequest("send either one tar archive or the model's files",
                                     param="files")
            self.tar = "upload" + base[base.index(".tar") if ".tar" in base else -4:]
            base = self.tar
        else:
            if self.tar:
                raise InvalidRequest("send either one tar archive or the model's files",
                                     param="files")
            check_file_name(base)
            if base in self.files:
                raise InvalidRequest(f"file {base!r} sent twice", param="files")
            if len(self.files) >= MAX_FILES:
                raise InvalidRequest(f"more than {MAX_FILES} files", param="files")
        self.files.append(base)
        self.in_file = True
        self.ops.append(("open", base))

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self.in_file:
            self.ops.append(("write", data[start:end]))
            self.queued_bytes += end - start
            self.total += end - start
            if self.total > self.max_bytes:
                raise PayloadTooLarge(f"the model's files exceed {self.max_bytes} bytes",
                                      param="files")
            return
        self.field_data += data[start:end]
        if len(self.field_data) > MAX_FIELD_BYTES:
            raise InvalidRequest(f"form field {self.part_name!r} is longer than "
                                 f"{MAX_FIELD_BYTES} bytes", param=self.part_name)

    def on_part_end(self) -> None:
        if self.in_file:
            self.ops.append(("close", None))
            self.closes += 1
            self.in_file = False
        else:
            self.fields[self.part_name] = self.field_data.decode("utf-8", "replace")


async def receive_model_upload(request: Request, staging: Path, *, max_bytes: int
                               ) -> ReceivedModel:
    """Stream the body's file parts into `staging` (which the caller removes on error).

    InvalidRequest (422) for a body that is not multipart, has no file, names a file we do
    not accept (pickle, a directory, an unknown suffix) or is malformed; PayloadTooLarge (413)
    past `max_bytes` of file data."""
    ctype, options = parse_options_header(request.headers.get("content-type", ""))
    boundary = options.get(b"boundary")
    if ctype != b"multipart/form-data" or not boundary:
        raise InvalidRequest("send the model's files as multipart/form-data (field 'files')",
                             param="files")
    state = _State(staging=staging, max_bytes=max_bytes)
    parser = MultipartParser(boundary, state.callbacks())  # type: ignore[arg-type]
    try:
        async for chunk in request.stream():
            parser.write(chunk)
            await _drain(state, force=False)
        parser.finalize()
        await _drain(state, force=True)
    except FormParserError as exc:
        raise InvalidRequest(f"malformed multipart body: {exc}", param="files") from exc
    finally:
        if state.out is not None:
            state.out.close()
    if not state.files:
        raise InvalidRequest("no files: send the model's files (or one tar) in the multipart "
                             "field 'files'", param="files")
    return ReceivedModel(fields=state.fields, files=list(state.files), tar=state.tar)


async def _drain(state: _State, *, force: bool) -> None:
    """Run the queued file operations in the threadpool: once FLUSH_BYTES are queued, at the
    end of a file, and at the end of the body (a thread hop per MiB, not per chunk)."""
    if not state.ops or not (force or state.closes or state.queued_bytes >= FLUSH_BYTES):
        return
    ops, state.ops = state.ops, []
    state.queued_bytes = state.closes = 0
    await run_in_threadpool(_apply, state, ops)


def _apply(state: _State, ops: list[tuple[str, object]]) -> None:
    for op, arg in ops:
        if op == "open":
            state.out = open(state.staging / str(arg), "xb")
        elif op == "write":
            assert state.out is not None
            state.out.write(cast(bytes, arg))
        elif state.out is not None:
            state.out.close()
            state.out = None
