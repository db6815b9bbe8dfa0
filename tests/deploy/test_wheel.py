"""What a hospital installs is the wheel, not the checkout: build it as the images do, install it into a
fresh venv and run `mmpipe init` against PostgreSQL and the real S3 endpoint.

The dependencies (torch alone is gigabytes) come from the suite's own environment through a ``.pth``
line, which Python appends after the fresh venv's site-packages: mmpipe itself must import from the
wheel's install, which the test asserts, so a migration missing from the package data fails here.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import sqlalchemy as sa

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def run(*cmd: str | Path, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300, **kwargs)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel built from what the Dockerfiles copy (pyproject.toml, README.md, mmpipe/), off the checkout."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "mmpipe", src / "mmpipe", ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp_path_factory.mktemp("dist")
    built = run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", dist, src)
    assert built.returncode == 0, built.stderr
    (found,) = dist.glob("mmpipe-*.whl")
    return found


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("venv")
    assert run(sys.executable, "-m", "venv", "--without-pip", root).returncode == 0
    python = root / "bin" / "python"
    installed = run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", wheel)
    assert installed.returncode == 0, installed.stderr
    (own_site,) = root.glob("lib/python3.*/site-packages")
    (own_site / "suite-dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return root


def clean_env(**settings: str) -> dict[str, str]:
    """No PYTHONPATH (it would put the checkout first), only the settings mmpipe needs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MMPIPE_", "PYTHON"))}
    return env | {"HF_HUB_OFFLINE": "1", **settings}


def test_wheel_carries_every_migration(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    migrations = {f"mmpipe/sql/{p.name}" for p in (ROOT / "mmpipe" / "sql").glob("*.sql")}
    assert migrations and migrations <= names


def test_installed_wheel_runs_init_against_postgres(venv, tmp_path, pg_url, s3_endpoint):
    env = clean_env(
        MMPIPE_HOME=str(tmp_path / "home"), MMPIPE_S3_ENDPOINT_URL=s3_endpoint, MMPIPE_S3_BUCKET="wheel-init",
        MMPIPE_S3_ACCESS_KEY_ID="test", MMPIPE_S3_SECRET_ACCESS_KEY="test-secret", MMPIPE_DATABASE_URL=pg_url,
    )  # fmt: skip
    where = run(venv / "bin" / "python", "-c", "import mmpipe; print(mmpipe.__file__)", env=env, cwd=tmp_path)
    assert Path(where.stdout.strip()).is_relative_to(venv), where.stdout + where.stderr

    first = run(venv / "bin" / "mmpipe", "--json", "init", env=env, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    expected = sorted(p.name.split("_")[0] for p in (ROOT / "mmpipe" / "sql").glob("*.sql"))
    assert json.loads(first.stdout)["migrations applied"] == ", ".join(expected)
    engine = sa.create_engine(pg_url)
    with engine.connect() as conn:
        recorded = sorted(conn.execute(sa.text("SELECT version FROM schema_migrations")).scalars())
        assert recorded == expected
        assert conn.execute(sa.text("SELECT count(*) FROM leaderboard")).scalar() == 0
    engine.dispose()

    again = run(venv / "bin" / "mmpipe", "--json", "init", env=env, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["migrations applied"] == "none (up to date)"
