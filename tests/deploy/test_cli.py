"""The CLI as a newcomer meets it: after the embedded store was started once in a home (what `make demo`
does), every command reaches it with no exports, and starts it again on its port when it is down;
summaries are tables for people and JSON with ``--json``; `mmpipe init` guards the pseudonym salt."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mmpipe import embedded
from mmpipe.config import get_settings, record_settings
from tests.conftest import export_env

pytestmark = pytest.mark.integration


def mmpipe(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mmpipe", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=300
    )


@pytest.fixture
def checkout(tmp_path):
    """A working directory whose default home (.mmpipe) is fresh, and an environment with no MMPIPE_*."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MMPIPE_")}
    yield tmp_path, env
    store = embedded.running(tmp_path / ".mmpipe" / "store")
    if store:
        embedded.stop(store)


def test_commands_reach_the_recorded_store_without_exports(checkout):
    cwd, env = checkout
    started = mmpipe("--json", "store", "serve", "--detach", env=env, cwd=cwd)
    assert started.returncode == 0, started.stderr
    endpoint = json.loads(started.stdout)["endpoint"]
    record = json.loads((cwd / ".mmpipe" / "settings.json").read_text())
    assert record["s3_endpoint_url"] == endpoint and record["s3_access_key_id"]
    assert mmpipe("store", "serve", "--stop", env=env, cwd=cwd).returncode == 0
    assert embedded.running(cwd / ".mmpipe" / "store") is None

    # The store is down and nothing is exported: init starts it again, on the same port.
    init = mmpipe("init", env=env, cwd=cwd)
    assert init.returncode == 0, init.stderr
    assert embedded.running(cwd / ".mmpipe" / "store").endpoint == endpoint
    assert "migrations applied" in init.stdout and endpoint in init.stdout  # a table, not JSON
    assert not init.stdout.lstrip().startswith("{")
    synth = mmpipe("synth", "--images", "10", "--size", "64", env=env, cwd=cwd)
    assert synth.returncode == 0, synth.stderr
    ingest = mmpipe("ingest", "--json", "--run-id", "cli-test", env=env, cwd=cwd)  # --json after the command
    assert ingest.returncode == 0, ingest.stderr
    summary = json.loads(ingest.stdout)
    assert summary["status"] == "succeeded" and summary["images"] == 10
    assert summary["validation"]["success"] is True


def test_recorded_settings_fill_only_what_is_not_configured(tmp_path, monkeypatch):
    home = tmp_path / "home"
    record_settings(home, s3_endpoint_url="http://127.0.0.1:20001", image_size=64, s3_access_key_id="k")
    monkeypatch.setenv("MMPIPE_HOME", str(home))
    monkeypatch.delenv("MMPIPE_S3_ENDPOINT_URL", raising=False)
    monkeypatch.setenv("MMPIPE_IMAGE_SIZE", "96")
    settings = get_settings()
    assert settings.s3_endpoint_url == "http://127.0.0.1:20001"
    assert settings.image_size == 96  # the environment wins over the record
    assert settings.s3_access_key_id.get_secret_value() == "k"
    assert (home / "settings.json").stat().st_mode & 0o077 == 0  # it holds keys
    monkeypatch.setenv("MMPIPE_S3_ENDPOINT_URL", "https://minio.hospital")
    monkeypatch.delenv("MMPIPE_IMAGE_SIZE")
    other = get_settings()  # a configured store: the embedded stack's record does not apply
    assert (other.s3_endpoint_url, other.image_size, other.s3_access_key_id) == (
        "https://minio.hospital",
        256,
        None,
    )


def test_init_refuses_a_changed_or_placeholder_salt(ready, monkeypatch, tmp_path):
    settings, _, catalog = ready()
    export_env(monkeypatch, settings)
    env = dict(os.environ)
    assert mmpipe("init", env=env, cwd=tmp_path).returncode == 0
    assert catalog.query("SELECT status, reason FROM pseudonym_salts") == [
        {"status": "active", "reason": "first init"}
    ]
    changed = mmpipe(
        "init", env=env | {"MMPIPE_PSEUDONYM_SALT": "another-salt-of-enough-length"}, cwd=tmp_path
    )
    assert changed.returncode == 2 and "differs from the one this catalog" in changed.stderr
    assert "Traceback" not in changed.stderr
    rotated = mmpipe(
        "--json", "init", "--rotate-salt", "salt leaked, ticket 42",
        env=env | {"MMPIPE_PSEUDONYM_SALT": "another-salt-of-enough-length"}, cwd=tmp_path,
    )  # fmt: skip
    assert rotated.returncode == 0, rotated.stderr
    assert json.loads(rotated.stdout)["salt"] == "rotated"
    rows = catalog.query("SELECT status, reason FROM pseudonym_salts ORDER BY status")
    assert rows == [
        {"status": "active", "reason": "salt leaked, ticket 42"},
        {"status": "retired", "reason": "first init"},
    ]
    assert mmpipe("init", env=env, cwd=tmp_path).returncode == 2  # the old salt is now the wrong one
    placeholder = mmpipe("init", env=env | {"MMPIPE_PSEUDONYM_SALT": "CHANGE_ME"}, cwd=tmp_path)
    assert placeholder.returncode == 2 and "placeholder" in placeholder.stderr
