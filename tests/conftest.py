"""Shared fixtures: a real SeaweedFS S3 endpoint, real PostgreSQL databases, isolated settings.

Nothing here is mocked: the store is `weed mini` over HTTP, the catalog is PostgreSQL on
127.0.0.1:5432 (``MMPIPE_TEST_DATABASE_URL``), the database hospitals run. SQLite, the embedded
default, only when a test asks for it (``ready(catalog="sqlite")``, or the ``catalog_kind``
parametrisation where the embedded default matters). Each test gets its own bucket and database.
"""

from __future__ import annotations

import json
import os
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

os.environ["HF_HUB_OFFLINE"] = "1"
REPO = Path(__file__).resolve().parents[1]
# Airflow reads its config at import: point it at a throwaway home before any test imports it.
AIRFLOW_HOME = Path(tempfile.mkdtemp(prefix="mmpipe-airflow-"))
os.environ.update(
    {
        "AIRFLOW_HOME": str(AIRFLOW_HOME),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{AIRFLOW_HOME / 'airflow.db'}",
    }
)

from mmpipe import catalog as catalog_mod  # noqa: E402
from mmpipe import embedded  # noqa: E402
from mmpipe.config import Settings, get_settings  # noqa: E402
from mmpipe.store import open_store  # noqa: E402

PG_URL = os.environ.get("MMPIPE_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = embedded.start(tmp_path_factory.mktemp("seaweedfs"))
    yield server.endpoint
    embedded.stop(server)


@pytest.fixture(scope="session")
def pg_admin() -> Iterator[sa.Engine]:
    engine = sa.create_engine(PG_URL, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 5})
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except sa.exc.OperationalError as exc:  # must run in CI: fail loudly, never skip
        pytest.fail(f"PostgreSQL not reachable at {PG_URL} (set MMPIPE_TEST_DATABASE_URL): {exc.orig}")
    yield engine
    engine.dispose()


@pytest.fixture
def pg_database(pg_admin: sa.Engine) -> Iterator[Callable[[], str]]:
    """Makes fresh, empty PostgreSQL databases (as many as the test asks for), dropped afterwards."""
    names: list[str] = []

    def make() -> str:
        name = f"mmpipe_test_{uuid.uuid4().hex[:12]}"
        with pg_admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        names.append(name)
        return pg_admin.url.set(database=name).render_as_string(hide_password=False)

    yield make
    with pg_admin.connect() as conn:
        for name in names:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def pg_url(pg_database: Callable[[], str]) -> str:
    """A fresh, empty PostgreSQL database for one test, dropped afterwards."""
    return pg_database()


#: The catalog a test gets when it asks for none: an address that fails loudly, never a silent SQLite.
NO_CATALOG = "postgresql://no-catalog-asked-for.invalid/none"


@pytest.fixture
def make_settings(s3_endpoint: str, tmp_path: Path) -> Callable[..., Settings]:
    """Settings bound to a fresh bucket and a temp home; no catalog unless ``database_url`` is given
    (``database_url=None``: the embedded default, SQLite under home)."""

    def make(**overrides: object) -> Settings:
        values: dict[str, object] = {
            "home": tmp_path / "home",
            "s3_endpoint_url": s3_endpoint,
            "s3_bucket": f"t-{uuid.uuid4().hex[:16]}",
            "s3_access_key_id": "test",
            "s3_secret_access_key": "test-secret",
            "pseudonym_salt": "test-salt-not-for-production",
            "image_size": 64,
            "ingest_workers": 4,
            "database_url": NO_CATALOG,
        }
        values.update(overrides)
        return get_settings(**values)

    return make


@pytest.fixture
def ready(make_settings: Callable[..., Settings], pg_database: Callable[[], str]) -> Callable[..., tuple]:
    """(settings, store, catalog) with the bucket created and the schema migrated.

    The catalog is a fresh PostgreSQL database; ``catalog="sqlite"`` gives the embedded default
    (SQLite under the temp home) instead, and an explicit ``database_url`` wins over both.
    """

    def make(catalog: str = "postgresql", **overrides: object) -> tuple:
        if catalog not in ("postgresql", "sqlite"):
            raise ValueError(f"catalog must be 'postgresql' or 'sqlite', got {catalog!r}")
        overrides.setdefault("database_url", pg_database() if catalog == "postgresql" else None)
        settings = make_settings(**overrides)
        store = open_store(settings)
        store.ensure_bucket()
        db = catalog_mod.open_catalog(settings)
        catalog_mod.upgrade(db)
        return settings, store, db

    return make


@pytest.fixture(params=["postgresql", "sqlite"])
def catalog_kind(request: pytest.FixtureRequest) -> str:
    """Both catalogs, for tests where the embedded default (SQLite) must behave as PostgreSQL does."""
    return request.param


def export_env(monkeypatch: pytest.MonkeyPatch, settings: Settings) -> None:
    """Expose ``settings`` as MMPIPE_* env vars, for code that builds its own (pipeline, CLI, DAGs)."""
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        if hasattr(value, "get_secret_value"):
            value = value.get_secret_value()
        if isinstance(value, tuple | list | dict):
            value = json.dumps(value, default=str)
        monkeypatch.setenv(f"MMPIPE_{name.upper()}", str(value))
    monkeypatch.setenv("MMPIPE_DATABASE_URL", settings.db_url)
