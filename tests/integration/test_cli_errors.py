"""Wrong configuration ends in one clear line naming the fix (exit 2), never a traceback wall."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import export_env

pytestmark = pytest.mark.integration


def mmpipe(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mmpipe", *args], env=env, capture_output=True, text=True, timeout=120
    )


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("mmpipe: error:")]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0]


@pytest.fixture
def env(ready, monkeypatch) -> dict[str, str]:
    settings, _, _ = ready()
    export_env(monkeypatch, settings)
    return dict(os.environ)


def test_unreachable_store(env) -> None:
    env["MMPIPE_S3_ENDPOINT_URL"] = "http://127.0.0.1:1"
    assert_one_line_error(mmpipe("synth", "--images", "5", env=env), "unreachable", "MMPIPE_S3_ENDPOINT_URL")


def test_missing_bucket(env) -> None:
    env["MMPIPE_S3_BUCKET"] = "no-such-bucket-here"
    assert_one_line_error(mmpipe("ingest", env=env), "no-such-bucket-here", "mmpipe init")


def test_empty_bucket(env) -> None:
    assert_one_line_error(mmpipe("ingest", env=env), "nothing to ingest", "training/<class>/")


def test_unreachable_database(env) -> None:
    env["MMPIPE_DATABASE_URL"] = "postgresql://postgres@127.0.0.1:1/mmpipe"
    assert_one_line_error(mmpipe("db", "upgrade", env=env), "unreachable", "MMPIPE_DATABASE_URL")


def test_unknown_backbone(env) -> None:
    result = mmpipe(
        "train",
        "--plan",
        "s3://b/plans/x.json",
        "--candidate",
        '{"name": "x", "backbone": "alexnet9"}',
        "--run-id",
        "r",
        env=env,
    )
    assert_one_line_error(result, "unknown backbone 'alexnet9'", "resnet18")


def test_invalid_setting(env) -> None:
    env["MMPIPE_IMAGE_SIZE"] = "huge"
    assert_one_line_error(mmpipe("db", "upgrade", env=env), "MMPIPE_IMAGE_SIZE")


def test_missing_salt(env) -> None:
    del env["MMPIPE_PSEUDONYM_SALT"]
    env["MMPIPE_HOME"] = env["MMPIPE_HOME"] + "-nosalt"
    subprocess.run(
        [sys.executable, "-m", "mmpipe", "synth", "--images", "4"], env=env, check=True, capture_output=True
    )
    assert_one_line_error(mmpipe("ingest", env=env), "MMPIPE_PSEUDONYM_SALT", "mmpipe init")
