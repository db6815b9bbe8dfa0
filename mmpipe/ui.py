"""`mmpipe ui` / `make ui`: the Airflow UI on the demo's Airflow home, bound to 127.0.0.1.

Starts the API server, the scheduler and the DAG processor as subprocesses (mmpipe never imports
airflow) on ``MMPIPE_HOME/airflow``, the home `make demo` ran its DAGs in, so the demo's runs are
there and a backfill can be triggered right away. Login is the simple auth manager's ``admin``
user with a generated password, printed once the server answers. The processes share one JWT
secret kept under the home (an API server and a scheduler that disagree reject every task), the
scheduler serves no log port (the API server reads the local log files), and the embedded store
is started if the home recorded one.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from mmpipe import embedded
from mmpipe.config import get_settings
from mmpipe.demo import airflow_env
from mmpipe.errors import ConfigError, MmpipeError

SERVICES = (("api-server",), ("scheduler", "--skip-serve-logs"), ("dag-processor",))
USER = "admin"


def _secret(path: Path) -> str:
    """A random secret kept under the home (0600), the same for every process and every start."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_urlsafe(32))
    return path.read_text().strip()


def ui_env(home: Path, port: int, base: dict[str, str]) -> dict[str, str]:
    """The demo's Airflow environment plus what separate server processes need to agree on."""
    airflow_home = home / "airflow"
    return airflow_env(home, base) | {
        "MMPIPE_HOME": str(home),
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{port}",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
        "AIRFLOW__API_AUTH__JWT_SECRET": _secret(airflow_home / "secrets" / "jwt_secret"),
        "AIRFLOW__API__SECRET_KEY": _secret(airflow_home / "secrets" / "api_secret_key"),
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{USER}:admin",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(airflow_home / "passwords.json"),
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "False",
    }


@dataclass
class Airflow:
    """The running Airflow processes of one home."""

    url: str
    env: dict[str, str]
    logs: Path
    procs: list[subprocess.Popen] = field(default_factory=list)

    @property
    def password_file(self) -> Path:
        return Path(self.env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"])

    def password(self) -> str:
        return json.loads(self.password_file.read_text())[USER]

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def start(home: Path, port: int, base: dict[str, str], timeout: float = 240) -> Airflow:
    """Migrate the metadata database, start the three processes and wait until the API answers."""
    env = ui_env(home, port, base)
    logs = home / "airflow" / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    airflow = [sys.executable, "-m", "airflow"]
    with (logs / "db-migrate.log").open("ab") as log:
        if subprocess.run(
            [*airflow, "db", "migrate"], env=env, stdout=log, stderr=log, check=False
        ).returncode:
            raise MmpipeError(f"airflow db migrate failed; see {logs / 'db-migrate.log'}")
    running = Airflow(f"http://127.0.0.1:{port}", env, logs)
    try:
        for service in SERVICES:
            with (logs / f"{service[0]}.log").open("ab") as log:
                running.procs.append(
                    subprocess.Popen(
                        [*airflow, *service],
                        env=env,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
        deadline = time.monotonic() + timeout
        while not _answers(f"{running.url}/api/v2/monitor/health"):
            if time.monotonic() > deadline or any(p.poll() is not None for p in running.procs):
                raise MmpipeError(f"the Airflow UI did not start on {running.url}; see the logs in {logs}")
            time.sleep(1)
    except BaseException:  # a failed start, Ctrl-C or SIGTERM: leave no process behind
        running.stop()
        raise
    return running


def _answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=2)
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False
    return True


def _port_taken(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def run(port: int = 8080) -> None:
    """Start the UI in the foreground until Ctrl-C, after saying where it is and how to log in."""
    settings = get_settings()
    home = settings.home.resolve()
    if _port_taken(port):
        raise ConfigError(f"port {port} on 127.0.0.1 is taken: choose another with `mmpipe ui --port N`")
    if embedded.is_recorded(settings.home, settings.s3_endpoint_url):
        embedded.serve(settings.home)
    print(f"starting Airflow (API server, scheduler, DAG processor) on {home / 'airflow'} ...", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    airflow = start(home, port, dict(os.environ))
    print(
        f"\nAirflow UI: {airflow.url}\n"
        f"log in as {USER!r} with password {airflow.password()!r} (kept in {airflow.password_file})\n"
        f"the demo's runs are under DAGs; trigger a backfill with mmpipe_retrain's Trigger button\n"
        f"logs: {airflow.logs}; stop with Ctrl-C",
        flush=True,
    )
    try:
        while all(p.poll() is None for p in airflow.procs):
            time.sleep(1)
        raise MmpipeError(f"an Airflow process exited; see the logs in {airflow.logs}")
    finally:
        airflow.stop()
