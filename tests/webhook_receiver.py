"""A real HTTP webhook receiver for tests: a threaded server on 127.0.0.1 that verifies every
request with the official `openai` client's `webhooks.unwrap` and dedupes on `webhook-id`,
as a receiver written against OpenAI's documentation would.

`behaviour(request) -> (status, delay_seconds, body)` decides each answer; `stop()` closes the
port (connection refused: the receiver is down) and `start()` reopens the same port.
"""

from __future__ import annotations

import datetime
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import openai


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    path: str
    verified: bool
    event: Any = None  # the unwrapped event when verified


@dataclass
class Receiver:
    secret: str = ""
    behaviour: Callable[[Received], tuple[int, float, bytes]] = \
        lambda r: (200, 0.0, b"ok")  # noqa: E731
    port: int = 0
    received: list[Received] = field(default_factory=list)
    processed: dict[str, int] = field(default_factory=dict)  # webhook-id -> times processed
    duplicates: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    arrived: threading.Condition = field(init=False)
    tls: ssl.SSLContext | None = None  # serve https (see `self_signed`) as "localhost"
    _server: ThreadingHTTPServer | None = None

    def __post_init__(self) -> None:
        self.arrived = threading.Condition(self.lock)
        self.client = openai.OpenAI(api_key="unused", base_url="http://127.0.0.1:9/unused")

    @property
    def url(self) -> str:
        if self.tls is not None:
            return f"https://localhost:{self.port}/hook"
        return f"http://127.0.0.1:{self.port}/hook"

    def start(self) -> Receiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length)
                item = receiver._verify(dict(self.headers.items()), body, self.path)
                with receiver.lock:
                    receiver.received.append(item)
                    receiver.arrived.notify_all()
                status, delay, answer = receiver.behaviour(item)
                if delay:
                    threading.Event().wait(delay)
                try:
                    self.send_response(status)
                    if 300 <= status < 400:
                        self.send_header("Location", f"http://127.0.0.1:{receiver.port}/other")
                    self.send_header("Content-Length", str(len(answer)))
                    self.end_headers()
                    self.wfile.write(answer)
                except OSError:
                    pass  # the sender hung up (timed out, or was killed)

        ThreadingHTTPServer.allow_reuse_address = True
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        if self.tls is not None:
            self._server.socket = self.tls.wrap_socket(self._server.socket, server_side=True)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def _verify(self, headers: dict[str, str], body: bytes, path: str) -> Received:
        try:
            event = self.client.webhooks.unwrap(body, headers, secret=self.secret)
        except openai.InvalidWebhookSignatureError:
            return Received(headers, body, path, verified=False)
        return Received(headers, body, path, verified=True, event=event)

    def process(self, item: Received) -> None:
        """The receiver's dedupe: each webhook-id is processed once, later copies counted."""
        key = item.headers.get("webhook-id") or item.headers.get("Webhook-Id") or ""
        with self.lock:
            if key in self.processed:
                self.duplicates += 1
            self.processed[key] = self.processed.get(key, 0) + (0 if key in self.processed
                                                                  else 1)

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 30) -> bool:
        with self.lock:
            return self.arrived.wait_for(predicate, timeout=timeout)


def self_signed(directory: Path, host: str = "localhost") -> tuple[ssl.SSLContext, Path]:
    """(a server context, the certificate file to trust) for `host`, valid for a day."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    return context, cert_file
