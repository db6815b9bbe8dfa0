"""The direct HTTP path (mmpipe.store.DirectHttp) against a local HTTP server that misbehaves on cue."""

from __future__ import annotations

import base64
import contextlib
import http.client
import io
import os
import socket
import socketserver
import ssl
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler

import pytest

from mmpipe import store
from mmpipe.store import BACKOFF_CAP, DirectHttp, HttpFailed, backoff
from tests.faults.proxy import LocalServer


class _Server(LocalServer):
    def __init__(self) -> None:
        super().__init__(_Handler)
        self.script: list[tuple[int, bytes]] = []  # answers to give, in order; then 200 b"ok"
        self.requests: list[str] = []
        self.proxy_auth: list[str | None] = []
        self.close_after_each = False
        self.truncate = 0  # answers to cut short
        self.puts: list[tuple[str, bytes]] = []  # (path, body) of each PUT


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as S3 endpoints answer

    def do_GET(self) -> None:
        server: _Server = self.server  # type: ignore[assignment]
        server.requests.append(self.path)
        server.proxy_auth.append(self.headers.get("Proxy-Authorization"))
        status, body = server.script.pop(0) if server.script else (200, b"ok")
        self.send_response(status)
        if server.truncate:
            server.truncate -= 1
            self.send_header("Content-Length", str(len(body) + 100))
            self.end_headers()
            self.wfile.write(body)
            self.close_connection = True
            return
        self.send_header("Content-Length", str(len(body)))
        if server.close_after_each:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def do_PUT(self) -> None:
        server: _Server = self.server  # type: ignore[assignment]
        server.puts.append((self.path, self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(200)
        self.send_header("Content-Length", "3")
        self.end_headers()
        self.wfile.write(b"put")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(autouse=True)
def no_waiting(monkeypatch) -> None:
    """Retries without their backoff sleeps (test_backoff_... checks the delays themselves)."""
    monkeypatch.setattr(store, "backoff", lambda attempt: 0.0)


@pytest.fixture
def server() -> Iterator[_Server]:
    srv = _Server()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def test_keeps_one_connection_and_sends_path_and_query(server) -> None:
    getter = DirectHttp()
    assert getter.get(server.url + "/bucket/a%20b.dcm?X-Sig=1&Y=2") == b"ok"
    conn = getter._route("http", f"127.0.0.1:{server.server_port}").conn
    assert getter.get(server.url + "/bucket/c.dcm") == b"ok"
    assert getter._route("http", f"127.0.0.1:{server.server_port}").conn is conn
    assert server.requests == ["/bucket/a%20b.dcm?X-Sig=1&Y=2", "/bucket/c.dcm"]


SLOW_DOWN = b"<Error><Code>SlowDown</Code></Error>"


def test_retries_server_errors_and_throttling_then_succeeds(server) -> None:
    server.script = [
        (503, SLOW_DOWN),
        (500, b"oops"),
        (429, b""),
        (400, b"<Error><Code>RequestTimeout</Code></Error>"),
    ]
    assert DirectHttp().get(server.url + "/k") == b"ok"
    assert len(server.requests) == 5


@pytest.mark.parametrize(
    ("status", "code"), [(404, "NoSuchKey"), (403, "AccessDenied"), (400, "InvalidArgument")]
)
def test_client_errors_fail_at_once_with_the_s3_code(server, status, code) -> None:
    server.script = [(status, f"<Error><Code>{code}</Code></Error>".encode())]
    with pytest.raises(HttpFailed, match=f"HTTP {status} {code}") as exc:
        DirectHttp().get(server.url + "/k")
    assert (exc.value.status, exc.value.code, exc.value.transient, exc.value.refused) == (
        status,
        code,
        False,
        False,
    )
    assert len(server.requests) == 1


def test_gives_up_after_the_configured_attempts(server) -> None:
    server.script = [(503, SLOW_DOWN)] * 10
    with pytest.raises(HttpFailed, match="HTTP 503 SlowDown") as exc:
        DirectHttp(attempts=3).get(server.url + "/k")
    assert exc.value.transient and len(server.requests) == 3


def test_a_body_cut_short_is_retried(server) -> None:
    server.truncate = 1  # the first answer promises more bytes than it sends, then the connection closes
    assert DirectHttp().get(server.url + "/k") == b"ok"
    assert len(server.requests) == 2


def test_backoff_is_jittered_exponential_and_capped() -> None:
    delays = [[backoff(attempt) for _ in range(200)] for attempt in (1, 2, 3, 8)]
    assert all(0 <= d <= 1 for d in delays[0]) and max(delays[1]) > 1 and max(delays[2]) > 2
    assert max(delays[3]) <= BACKOFF_CAP and len(set(delays[0])) > 100  # jitter: no thundering herd


def test_reconnects_when_the_server_closes_a_kept_connection(server) -> None:
    server.close_after_each = True
    getter = DirectHttp()
    assert [getter.get(server.url + f"/{i}") for i in range(3)] == [b"ok"] * 3


def test_refused_connection_is_reported_as_such() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: connections are refused
        with pytest.raises(HttpFailed) as exc:
            DirectHttp().get(f"http://127.0.0.1:{port}/k")
    assert exc.value.refused


def test_threads_and_forked_processes_never_share_a_connection(server) -> None:
    getter = DirectHttp()
    address = ("http", f"127.0.0.1:{server.server_port}")
    getter.get(server.url + "/parent")
    parent_conn = getter._route(*address).conn

    seen = []
    thread = threading.Thread(target=lambda: seen.append(getter._route(*address).conn))
    thread.start()
    thread.join()
    assert seen[0] is not parent_conn

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: must open its own socket, not reuse the parent's
        ok = getter.get(server.url + "/child") == b"ok" and getter._route(*address).conn is not parent_conn
        os.write(write, b"1" if ok else b"0")
        os._exit(0)
    os.waitpid(pid, 0)
    assert os.read(read, 1) == b"1"
    assert getter.get(server.url + "/parent-again") == b"ok"  # the parent's socket is still its own


# --------------------------------------------------------------------------- proxies and TLS


@pytest.fixture
def no_proxy_env(monkeypatch) -> None:
    for name in ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)


def test_plain_http_goes_through_the_configured_proxy(server, monkeypatch, no_proxy_env) -> None:
    monkeypatch.setenv("http_proxy", f"http://reader:p%40ss@127.0.0.1:{server.server_port}")
    assert DirectHttp().get("http://store.hospital.invalid:9000/bucket/k.dcm?X-Sig=1") == b"ok"
    assert server.requests == ["http://store.hospital.invalid:9000/bucket/k.dcm?X-Sig=1"]
    assert server.proxy_auth == ["Basic " + base64.b64encode(b"reader:p@ss").decode()]


def test_no_proxy_exempts_the_endpoint(server, monkeypatch, no_proxy_env) -> None:
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    assert DirectHttp().get(server.url + "/k") == b"ok"


class _Tunnel(socketserver.ThreadingTCPServer):
    """A CONNECT proxy: relays bytes both ways and remembers what it was asked to reach."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _TunnelHandler)
        self.connects: list[str] = []


class _TunnelHandler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        request = self.rfile.readline().decode().split()
        while self.rfile.readline() not in (b"\r\n", b""):
            pass
        self.server.connects.append(request[1])  # type: ignore[attr-defined]
        host, port = request[1].rsplit(":", 1)
        upstream = socket.create_connection((host, int(port)))
        self.wfile.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        self.wfile.flush()

        def pipe(src: socket.socket, dst: socket.socket) -> None:
            with contextlib.suppress(OSError):
                while chunk := src.recv(65536):
                    dst.sendall(chunk)
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

        back = threading.Thread(target=pipe, args=(upstream, self.connection), daemon=True)
        back.start()
        pipe(self.connection, upstream)
        back.join(5)
        upstream.close()


@pytest.fixture
def tls_server(tmp_path) -> Iterator[tuple[_Server, str]]:
    """An HTTPS endpoint with a certificate of a private CA (as a hospital's MinIO has)."""
    cert, key = tmp_path / "ca.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    srv = _Server()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    srv.socket = context.wrap_socket(srv.socket, server_side=True)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv, str(cert)
    srv.shutdown()
    srv.server_close()


def test_https_tunnels_through_the_proxy_and_trusts_the_configured_ca(
    tls_server, monkeypatch, no_proxy_env
) -> None:
    srv, ca = tls_server
    tunnel = _Tunnel()
    threading.Thread(target=tunnel.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("https_proxy", f"http://127.0.0.1:{tunnel.server_address[1]}")
        url = f"https://localhost:{srv.server_port}/bucket/k.dcm?X-Sig=1"
        getter = DirectHttp(ca)
        assert [getter.get(url), getter.get(url)] == [b"ok", b"ok"]  # one tunnel, kept alive
        assert tunnel.connects == [f"localhost:{srv.server_port}"]
        assert srv.requests == ["/bucket/k.dcm?X-Sig=1"] * 2
        with pytest.raises(HttpFailed, match="SSLCertVerificationError"):
            DirectHttp().get(url)  # the public CA bundle does not vouch for the hospital's CA
    finally:
        tunnel.shutdown()
        tunnel.server_close()


# --------------------------------------------------------------------------- the wire format


def _answer(raw: bytes, method: str = "GET") -> tuple[int, dict[str, str], bytes, bool]:
    return store.read_response(io.BufferedReader(io.BytesIO(raw)), method)


def test_reads_a_sized_answer_and_keeps_the_connection() -> None:
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Amz-Tagging-Count: 3\r\nx-a: 1\r\nX-A: 2\r\n\r\nhello"
    status, headers, body, keep = _answer(raw + b"HTTP/1.1 200 OK\r\n")  # the next answer stays unread
    assert (status, body, keep) == (200, b"hello", True)
    assert headers["x-amz-tagging-count"] == "3" and headers["x-a"] == "1, 2"


def test_reads_a_chunked_answer_with_extensions_and_trailers() -> None:
    raw = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"4;ext=1\r\n<Lis\r\n6\r\ntBucke\r\n0\r\nX-Trailer: t\r\n\r\n")  # fmt: skip
    assert _answer(raw)[2::] == (b"<ListBucke", True)


def test_skips_interim_answers_and_reads_until_close_without_a_length() -> None:
    raw = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.0 200 OK\r\nServer: old\r\n\r\nall of it"
    assert _answer(raw) == (200, {"server": "old"}, b"all of it", False)


def test_connection_close_and_bodiless_answers() -> None:
    assert _answer(b"HTTP/1.1 503 Slow\r\nConnection: close\r\nContent-Length: 2\r\n\r\nno")[3] is False
    assert _answer(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n", "HEAD")[2:] == (b"", True)
    assert _answer(b"HTTP/1.1 204 No Content\r\n\r\n")[2:] == (b"", True)


@pytest.mark.parametrize(
    "raw",
    [
        b"",  # closed before answering
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",  # cut short
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab",  # a chunk cut short
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",  # not a chunk size
        b"HTTP/1.1 200 OK\r\nContent-Length: ten\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Le",  # headers cut short
        b"SSH-2.0-OpenSSH\r\n",  # not HTTP
        b"HTTP/1.1 200 OK\r\nX: " + b"a" * 70000 + b"\r\n\r\n",
    ],
)
def test_broken_answers_raise_what_the_retry_loop_catches(raw) -> None:
    with pytest.raises(http.client.HTTPException):
        _answer(raw)


def test_request_head() -> None:
    get = store.request_head("GET", "/b/k%20x?tagging=", "h:9000", {"Authorization": "sig"}, None)
    assert get == (
        b"GET /b/k%20x?tagging= HTTP/1.1\r\nHost: h:9000\r\nAccept-Encoding: identity\r\nAuthorization: sig\r\n\r\n"
    )
    assert store.request_head("PUT", "/b/k", "h", {}, None).endswith(b"Content-Length: 0\r\n\r\n")
    assert store.request_head("PUT", "/b/k", "h", {}, b"xyz").endswith(b"Content-Length: 3\r\n\r\n")
    with pytest.raises(ValueError, match="line break"):
        store.request_head("PUT", "/b/k", "h", {"Content-Type": "a\r\nX-Injected: 1"}, b"")


def test_puts_send_their_body_and_length(server) -> None:
    getter = DirectHttp()
    body, _ = getter.send("PUT", server.url + "/b/k.json", b'{"a": 1}', {"Content-Type": "application/json"})
    getter.send("PUT", server.url + "/b/empty", None)
    large = os.urandom(store.COPY_LIMIT + 1)  # sent apart from its head
    getter.send("PUT", server.url + "/b/large", large)
    assert body == b"put"
    assert server.puts == [("/b/k.json", b'{"a": 1}'), ("/b/empty", b""), ("/b/large", large)]
    assert getter.get(server.url + "/after") == b"ok"  # the kept connection is still in step
