"""A fault-injecting HTTP reverse proxy on loopback, in front of the moto S3 server.

It forwards every request to the upstream and fails a fixed fraction of them the way object
stores fail under load: 500 InternalError, 503 ServiceUnavailable, 503 SlowDown, or a connection
dropped without an answer. Faults are
- deterministic: whether a request fails is a hash of the seed, the request (method, path, query,
  range) and its attempt number, so thread timing does not change which requests fail;
- bounded: one request (same method, path, query and range) fails at most `max_failures` times in
  all, so a client that retries enough always gets through.
`outage` holds path fragments whose requests fail every time (503) until it is cleared: a
persistent fault, as when one object's partition is down.
"""

from __future__ import annotations

import hashlib
import http.client
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

FAULTS = (
    (500, "InternalError", "We encountered an internal error. Please try again."),
    (503, "ServiceUnavailable", "Service is unable to handle request."),
    (503, "SlowDown", "Please reduce your request rate."),
    (None, "drop", "connection closed without a response"),
)
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "trailer", "upgrade"}


class FaultProxy:
    def __init__(self, upstream: str, *, rate: float = 0.25, seed: int = 0, max_failures: int = 2) -> None:
        target = urlsplit(upstream)
        self.upstream = (target.hostname, target.port)
        self.rate, self.seed, self.max_failures = rate, seed, max_failures
        self.outage: set[str] = set()
        self.stats: Counter[str] = Counter()
        self.put_bytes: Counter[str] = Counter()  # request path -> bytes uploaded to it
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request, in arrival order
        self._attempts: Counter[str] = Counter()
        self._failures: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def count(self, method: str, target: str, body: bytes) -> None:
        """Requests per method and bytes uploaded per path prefix (a write-amplification probe)."""
        with self._lock:
            self.stats[f"method:{method}"] += 1
            self.requests.append((method, urlsplit(target).path))
            if method in ("PUT", "POST"):
                self.put_bytes[urlsplit(target).path] += len(body)

    def decide(self, method: str, target: str, range_header: str) -> tuple | None:
        """The fault for this request, or None to forward it."""
        signature = f"{method} {target} {range_header}"
        with self._lock:
            self.stats["requests"] += 1
            if any(fragment in target for fragment in self.outage):
                self.stats["outage"] += 1
                return FAULTS[1]
            attempt = self._attempts[signature]
            self._attempts[signature] += 1
            digest = hashlib.sha256(f"{self.seed}\0{signature}\0{attempt}".encode()).digest()
            draw = int.from_bytes(digest[:8], "little") / 2**64
            if draw >= self.rate or self._failures[signature] >= self.max_failures:
                return None
            self._failures[signature] += 1
            fault = FAULTS[digest[8] % len(FAULTS)]
            self.stats[fault[1]] += 1
            return fault

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # quiet: tests read proxy.stats instead
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while size := int(self.rfile.readline().strip() or b"0", 16):
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                    self.rfile.readline()
                    return b"".join(chunks)
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _fail(self, status: int, code: str, message: str) -> None:
                body = (
                    f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                    f"<Message>{message}</Message><RequestId>faultproxy</RequestId></Error>"
                ).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(0 if self.command == "HEAD" else len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _forward(self, body: bytes) -> None:
                upstream = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                    headers["Content-Length"] = str(len(body))
                    upstream.request(self.command, self.path, body=body, headers=headers)
                    response = upstream.getresponse()
                    data = response.read()
                finally:
                    upstream.close()
                self.send_response(response.status)
                for name, value in response.getheaders():
                    if name.lower() not in HOP_BY_HOP | {"content-length"}:
                        self.send_header(name, value)
                # HEAD answers carry the object's length, not the (empty) body's
                self.send_header(
                    "Content-Length",
                    response.getheader("Content-Length", "0") if self.command == "HEAD" else str(len(data)),
                )
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def _handle(self) -> None:
                body = self._body()
                proxy.count(self.command, self.path, body)
                fault = proxy.decide(self.command, self.path, self.headers.get("Range", ""))
                if fault is None:
                    self._forward(body)
                elif fault[0] is None:
                    self.close_connection = True  # the client sees the connection drop mid-request
                else:
                    self._fail(*fault)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _handle

        return Handler
