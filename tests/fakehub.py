"""A tiny Hugging Face Hub on a loopback port: the few endpoints `snapshot_download` (hub
client 2.4) calls, so the real client runs against it with `HF_ENDPOINT` pointed here.

    GET  /api/models/<org>/<name>/revision/<rev>     repo info: {"id", "sha", "siblings"}
    GET  /api/models/<org>/<name>/tree/<commit>      the file list [{type, path, size, oid}]
    HEAD /<org>/<name>/resolve/<commit>/<file>       X-Repo-Commit, ETag, Content-Length
    GET  /<org>/<name>/resolve/<commit>/<file>       the bytes

An unknown repo answers 404 with `X-Error-Code: RepoNotFound`, an unknown revision with
`RevisionNotFound` (what the client maps to its error classes). Every request is recorded.
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

__all__ = ["FakeHub"]


class FakeHub:
    def __init__(self) -> None:
        self.repos: dict[str, tuple[str, dict[str, bytes]]] = {}  # repo -> (commit, files)
        self.requests: list[tuple[str, str]] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def add_repo(self, repo: str, files: dict[str, bytes]) -> str:
        commit = hashlib.sha1(json.dumps([repo, sorted(files)]).encode()).hexdigest()
        self.repos[repo] = (commit, files)
        return commit

    def add_dir(self, repo: str, directory: Path, extra: dict[str, bytes] | None = None) -> str:
        files = {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}
        return self.add_repo(repo, {**files, **(extra or {})})

    def start(self) -> FakeHub:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def file_gets(self) -> list[str]:
        return [path for method, path in self.requests if method == "GET" and "/resolve/" in path]

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
                self._serve(body=False)

            def do_GET(self) -> None:  # noqa: N802
                self._serve(body=True)

            def _serve(self, body: bool) -> None:
                path = unquote(urlsplit(self.path).path)
                hub.requests.append((self.command, path))
                parts = path.strip("/").split("/")
                if parts[:2] == ["api", "models"] and len(parts) >= 6:
                    self._api(f"{parts[2]}/{parts[3]}", parts[4], parts[5])
                elif len(parts) >= 5 and parts[2] == "resolve":
                    self._file(f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]), body)
                else:
                    self._error(404, "EntryNotFound")

            def _repo(self, repo: str, revision: str) -> tuple[str, dict[str, bytes]] | None:
                if repo not in hub.repos:
                    self._error(404, "RepoNotFound")
                    return None
                commit, files = hub.repos[repo]
                if revision not in ("main", commit):
                    self._error(404, "RevisionNotFound")
                    return None
                return commit, files

            def _api(self, repo: str, kind: str, revision: str) -> None:
                found = self._repo(repo, revision)
                if found is None:
                    return
                commit, files = found
                if kind == "revision":
                    doc: object = {"id": repo, "sha": commit,
                                   "siblings": [{"rfilename": n} for n in sorted(files)]}
                else:
                    doc = [{"type": "file", "path": n, "size": len(data),
                            "oid": hashlib.sha1(data).hexdigest()}
                           for n, data in sorted(files.items())]
                raw = json.dumps(doc).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def _file(self, repo: str, revision: str, name: str, body: bool) -> None:
                found = self._repo(repo, revision)
                if found is None:
                    return
                commit, files = found
                if name not in files:
                    self._error(404, "EntryNotFound")
                    return
                data = files[name]
                self.send_response(200)
                self.send_header("X-Repo-Commit", commit)
                self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if body:
                    self.wfile.write(data)

            def _error(self, status: int, code: str) -> None:
                raw = json.dumps({"error": code}).encode()
                self.send_response(status)
                self.send_header("X-Error-Code", code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(raw)

        return Handler
