"""The bulk-read HTTP path (mmpipe.store.Getter) against a local HTTP server that misbehaves on cue."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from mmpipe.store import GetFailed, Getter


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.script: list[tuple[int, bytes]] = []  # answers to give, in order; then 200 b"ok"
        self.requests: list[str] = []
        self.close_after_each = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_port}"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as S3 endpoints answer

    def do_GET(self) -> None:
        server: _Server = self.server  # type: ignore[assignment]
        server.requests.append(self.path)
        status, body = server.script.pop(0) if server.script else (200, b"ok")
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        if server.close_after_each:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[_Server]:
    srv = _Server()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def test_keeps_one_connection_and_sends_path_and_query(server) -> None:
    getter = Getter()
    assert getter.get(server.url + "/bucket/a%20b.dcm?X-Sig=1&Y=2") == b"ok"
    conn = getter._connection("http", f"127.0.0.1:{server.server_port}")
    assert getter.get(server.url + "/bucket/c.dcm") == b"ok"
    assert getter._connection("http", f"127.0.0.1:{server.server_port}") is conn
    assert server.requests == ["/bucket/a%20b.dcm?X-Sig=1&Y=2", "/bucket/c.dcm"]


def test_retries_server_errors_then_succeeds(server) -> None:
    server.script = [(503, b"busy"), (500, b"oops")]
    assert Getter().get(server.url + "/k") == b"ok"
    assert len(server.requests) == 3


def test_client_errors_fail_at_once_with_the_s3_code(server) -> None:
    server.script = [(404, b"<Error><Code>NoSuchKey</Code></Error>")]
    with pytest.raises(GetFailed, match="HTTP 404 NoSuchKey") as exc:
        Getter().get(server.url + "/k")
    assert exc.value.code == "NoSuchKey" and not exc.value.refused
    assert len(server.requests) == 1


def test_gives_up_after_persistent_server_errors(server) -> None:
    server.script = [(503, b"")] * 10
    with pytest.raises(GetFailed, match="HTTP 503"):
        Getter().get(server.url + "/k")
    assert len(server.requests) == 4


def test_reconnects_when_the_server_closes_a_kept_connection(server) -> None:
    server.close_after_each = True
    getter = Getter()
    assert [getter.get(server.url + f"/{i}") for i in range(3)] == [b"ok"] * 3


def test_refused_connection_is_reported_as_such() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: connections are refused
        with pytest.raises(GetFailed) as exc:
            Getter().get(f"http://127.0.0.1:{port}/k")
    assert exc.value.refused


def test_threads_and_forked_processes_never_share_a_connection(server) -> None:
    getter = Getter()
    address = ("http", f"127.0.0.1:{server.server_port}")
    getter.get(server.url + "/parent")
    parent_conn = getter._connection(*address)

    seen = []
    thread = threading.Thread(target=lambda: seen.append(getter._connection(*address)))
    thread.start()
    thread.join()
    assert seen[0] is not parent_conn

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: must open its own socket, not reuse the parent's
        ok = getter.get(server.url + "/child") == b"ok" and getter._connection(*address) is not parent_conn
        os.write(write, b"1" if ok else b"0")
        os._exit(0)
    os.waitpid(pid, 0)
    assert os.read(read, 1) == b"1"
    assert getter.get(server.url + "/parent-again") == b"ok"  # the parent's socket is still its own
