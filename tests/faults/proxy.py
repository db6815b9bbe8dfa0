"""A fault-injecting HTTP proxy in front of the real store (SeaweedFS): what a hospital's S3 endpoint
or the network in between does on a bad night.

Every request is forwarded unchanged (method, path, headers, body: signatures stay valid) unless the
seeded fault plan picks, for a request it matches, one of:

- ``503``: a ``SlowDown`` error answer, the store never asked;
- ``403``: an ``AccessDenied`` answer (credentials rotated under a running job);
- ``reset``: the connection reset (RST) before any answer;
- ``cut``: the answer's headers and half its body, then a reset (a body cut short);
- ``slow``: the request forwarded after ``slow_seconds``.
"""

from __future__ import annotations

import http.client
import random
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

ERROR = b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>%s</Code><Message>injected</Message></Error>'
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "upgrade"}


@dataclass
class Faults:
    """Which requests suffer which fault, with what probability (seeded, so a run is repeatable)."""

    rates: dict[str, float] = field(default_factory=dict)  # fault -> probability per matching request
    match: Callable[[str, str], bool] = lambda method, path: True
    slow_seconds: float = 0.5
    seed: int = 0
    injected: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        self._rng, self._lock = random.Random(self.seed), threading.Lock()

    def pick(self, method: str, path: str) -> str | None:
        if not self.match(method, path):
            return None
        with self._lock:
            draw = self._rng.random()
            for fault, rate in self.rates.items():
                if draw < rate:
                    self.injected[fault] += 1
                    return fault
                draw -= rate
        return None


class LocalServer(ThreadingHTTPServer):
    """An HTTP server on a free port of 127.0.0.1, one daemon thread per connection."""

    daemon_threads = True

    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(("127.0.0.1", 0), handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_port}"


class _Proxy(LocalServer):
    def __init__(self, upstream: str, faults: Faults) -> None:
        super().__init__(_Handler)
        self.upstream = urlsplit(upstream).netloc
        self.faults = faults
        self.requests = 0


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as S3 endpoints answer

    def do_GET(self) -> None:
        self._relay()

    do_PUT = do_POST = do_DELETE = do_HEAD = do_GET

    def _relay(self) -> None:
        server: _Proxy = self.server  # type: ignore[assignment]
        server.requests += 1
        body = self._request_body()
        fault = server.faults.pick(self.command, self.path)
        if fault in ("503", "403"):
            return self._answer(int(fault), ERROR % (b"SlowDown" if fault == "503" else b"AccessDenied"))
        if fault == "reset":
            return self._reset()
        if fault == "slow":
            time.sleep(server.faults.slow_seconds)
        status, headers, payload = self._forward(body)
        self.send_response(status)
        for name, value in headers.items():
            if name.lower() not in HOP_BY_HOP and name.lower() != "content-length":
                self.send_header(name, value)
        length = headers.get("Content-Length") if self.command == "HEAD" else str(len(payload))
        self.send_header("Content-Length", length or "0")
        self.end_headers()
        if self.command == "HEAD":
            return None
        if fault == "cut" and len(payload) > 1:
            self.wfile.write(payload[: len(payload) // 2])
            self.wfile.flush()
            return self._reset()
        self.wfile.write(payload)
        return None

    def _request_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0], 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b""):  # trailers
                pass
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _forward(self, body: bytes) -> tuple[int, http.client.HTTPMessage, bytes]:
        server: _Proxy = self.server  # type: ignore[assignment]
        chunked = self.headers.get("Transfer-Encoding", "").lower() == "chunked"
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        if chunked:
            headers["Transfer-Encoding"] = "chunked"
        conn = http.client.HTTPConnection(server.upstream, timeout=120)
        try:
            conn.request(self.command, self.path, body=body or None, headers=headers, encode_chunked=chunked)
            response = conn.getresponse()
            payload = response.read()
            return response.status, response.headers, payload
        except OSError:  # the store itself is down: the client sees a reset, as it would without us
            self._reset()
            raise
        finally:
            conn.close()

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _reset(self) -> None:
        """Close with RST (SO_LINGER 0): the client sees 'connection reset by peer'."""
        with suppress(OSError):
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
        self.close_connection = self.was_reset = True

    def handle_one_request(self) -> None:
        self.was_reset = False
        try:
            super().handle_one_request()
        except (OSError, ValueError):  # writing to the socket we reset on purpose, or the client left
            if not self.was_reset:
                self.close_connection = True

    def finish(self) -> None:
        with suppress(OSError, ValueError):  # the socket we reset on purpose
            super().finish()

    def log_message(self, *args: object) -> None:
        pass


@contextmanager
def fault_proxy(upstream: str, faults: Faults) -> Iterator[_Proxy]:
    """A proxy to ``upstream`` injecting ``faults``, for the duration of the block."""
    proxy = _Proxy(upstream, faults)
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    try:
        yield proxy
    finally:
        proxy.shutdown()
        proxy.server_close()
