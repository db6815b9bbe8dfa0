"""The catalog and metrics database (PostgreSQL in production, SQLite for the embedded default).

Schema lives in versioned SQL files ``sql/NNN_name.sql`` (``mmpipe/sql`` links to them), package
data so that an installed wheel can migrate, applied in order by :func:`upgrade` and recorded in
``schema_migrations`` so re-running is a no-op. Everything else is thin: parameterised SQL, UPSERTs
for idempotent tasks, one transaction per logical step.

A connection that drops mid-transaction (a database restart or failover, a terminated backend)
rolled its transaction back: :meth:`Catalog.transaction` and the one-statement helpers run it
again on a fresh connection, so callers pass idempotent work.
"""

from __future__ import annotations

import logging
import random
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from mmpipe.config import Settings
from mmpipe.errors import CatalogError

log = logging.getLogger(__name__)
T = TypeVar("T")

SQL_DIR = Path(__file__).resolve().parent / "sql"
IN_CHUNK = 500  # bound parameters per IN (...) list, well under SQLite's and PostgreSQL's limits
DISCONNECT_ATTEMPTS = 4
_MIGRATION = re.compile(r"^(\d{3})_[a-z0-9_]+\.sql$")
_DISK_FULL = ("disk is full", "No space left on device", "could not extend file")


class Disconnected(CatalogError):
    """The connection dropped mid-transaction, which therefore rolled back."""


def _redact(url: str) -> str:
    return re.sub(r"//([^:@/]+):[^@/]*@", r"//\1:***@", url)


def migrations(sql_dir: Path = SQL_DIR) -> list[tuple[str, Path]]:
    files = sorted(p for p in sql_dir.glob("*.sql") if _MIGRATION.match(p.name))
    if not files:
        raise CatalogError(f"no migrations found in {sql_dir}")
    return [(p.name.split("_", 1)[0], p) for p in files]


def split_statements(script: str) -> list[str]:
    """Split a migration on ``;`` at line ends, dropping ``--`` comment lines."""
    lines = [line for line in script.splitlines() if not line.strip().startswith("--")]
    return [s.strip() for s in re.split(r";\s*$", "\n".join(lines), flags=re.M) if s.strip()]


class Catalog:
    def __init__(self, url: str):
        self.url = url
        connect_args = {"timeout": 30} if url.startswith("sqlite") else {"connect_timeout": 5}
        self.engine: Engine = sa.create_engine(url, connect_args=connect_args, pool_pre_ping=True)
        if url.startswith("sqlite"):
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)

    @contextmanager
    def begin(self) -> Iterator[Connection]:
        """One transaction; database errors become a one-line CatalogError."""
        try:
            with self.engine.begin() as conn:
                yield conn
        except sa.exc.DBAPIError as exc:
            text = str(exc.orig).strip().splitlines()[0] if exc.orig else str(exc)
            if exc.connection_invalidated:
                raise Disconnected(f"catalog connection to {_redact(self.url)} dropped ({text})") from None
            if not isinstance(exc, sa.exc.OperationalError | sa.exc.ProgrammingError):
                raise
            if any(full in text for full in _DISK_FULL):
                raise CatalogError(
                    f"catalog database at {_redact(self.url)} is out of disk space ({text}): free some"
                ) from None
            if "no such table" in text or "does not exist" in text:
                raise CatalogError(
                    f"catalog at {_redact(self.url)} is not migrated: run `mmpipe db upgrade`"
                ) from None
            if isinstance(exc, sa.exc.ProgrammingError):
                raise
            raise CatalogError(
                f"catalog database unreachable at {_redact(self.url)} ({text}): start it or set MMPIPE_DATABASE_URL"
            ) from None

    def transaction(self, work: Callable[[Connection], T]) -> T:
        """``work(conn)`` in one transaction, run again on a fresh connection if the connection
        dropped (see the module doc): ``work`` must be idempotent and leave its inputs unchanged."""
        for attempt in range(1, DISCONNECT_ATTEMPTS + 1):
            try:
                with self.begin() as conn:
                    return work(conn)
            except Disconnected as exc:
                if attempt == DISCONNECT_ATTEMPTS:
                    raise
                log.warning("%s; running the transaction again (attempt %d)", exc, attempt + 1)
                time.sleep(random.random() * 0.5 * 2**attempt)
        raise AssertionError("unreachable")

    def query(self, sql: str, **params: Any) -> list[dict[str, Any]]:
        return self.transaction(
            lambda conn: [dict(row._mapping) for row in conn.execute(sa.text(sql), params)]
        )

    def query_in(self, sql: str, values: Iterable[str]) -> list[dict[str, Any]]:
        values = list(values)
        return self.transaction(lambda conn: select_in(conn, sql, values))

    def scalar(self, sql: str, **params: Any) -> Any:
        return self.transaction(lambda conn: conn.execute(sa.text(sql), params).scalar())

    def execute(self, sql: str, rows: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None) -> None:
        self.transaction(lambda conn: conn.execute(sa.text(sql), rows or {}))

    def upsert(
        self,
        table: str,
        rows: Iterable[Mapping[str, Any]],
        keys: Sequence[str],
        conn: Connection | None = None,
        update: bool = True,
    ) -> int:
        """Insert rows; on key conflict update the other columns (or keep the old row if ``update`` is False)."""
        rows = list(rows)
        if not rows:
            return 0
        sql = upsert_sql(table, list(rows[0]), keys, update)
        if conn is not None:
            conn.execute(sa.text(sql), rows)
        else:
            self.transaction(lambda own: own.execute(sa.text(sql), rows))
        return len(rows)

    def dispose(self) -> None:
        self.engine.dispose()


def select_in(conn: Connection, sql: str, values: Iterable[str]) -> list[dict[str, Any]]:
    """Rows of ``sql`` (with an ``{in}`` placeholder) for ``values``, in chunks of bound parameters."""
    values, rows = list(values), []
    for start in range(0, len(values), IN_CHUNK):
        names = {f"v{n}": v for n, v in enumerate(values[start : start + IN_CHUNK])}
        in_list = ", ".join(":" + k for k in names)
        rows += [dict(r._mapping) for r in conn.execute(sa.text(sql.format(**{"in": in_list})), names)]
    return rows


def upsert_sql(table: str, columns: Sequence[str], keys: Sequence[str], update: bool = True) -> str:
    cols = ", ".join(columns)
    values = ", ".join(f":{c}" for c in columns)
    others = [c for c in columns if c not in keys]
    action = (
        "DO UPDATE SET " + ", ".join(f"{c} = excluded.{c}" for c in others)
        if update and others
        else "DO NOTHING"
    )
    return f"INSERT INTO {table} ({cols}) VALUES ({values}) ON CONFLICT ({', '.join(keys)}) {action}"


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def open_catalog(settings: Settings) -> Catalog:
    if settings.db_url.startswith("sqlite"):
        settings.home.mkdir(parents=True, exist_ok=True)
    return Catalog(settings.db_url)


def upgrade(catalog: Catalog, sql_dir: Path = SQL_DIR) -> list[str]:
    """Apply pending migrations in order; returns the versions applied (empty when up to date)."""
    applied: list[str] = []
    with catalog.begin() as conn:
        conn.execute(
            sa.text(
                "CREATE TABLE IF NOT EXISTS schema_migrations "
                "(version TEXT PRIMARY KEY, name TEXT NOT NULL, applied_at TIMESTAMP DEFAULT CURRENT_TIMESTAMP)"
            )
        )
    for version, path in migrations(sql_dir):
        with catalog.begin() as conn:
            # Serialise concurrent upgraders on PostgreSQL; SQLite's write lock does the same.
            if conn.dialect.name == "postgresql":
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(727271)"))
            done = conn.execute(sa.text("SELECT 1 FROM schema_migrations WHERE version = :v"), {"v": version})
            if done.first():
                continue
            for statement in split_statements(path.read_text()):
                conn.exec_driver_sql(statement)
            conn.execute(
                sa.text("INSERT INTO schema_migrations (version, name) VALUES (:v, :n)"),
                {"v": version, "n": path.name},
            )
            applied.append(version)
    return applied


def current_version(catalog: Catalog) -> str | None:
    try:
        return catalog.scalar("SELECT max(version) FROM schema_migrations")
    except CatalogError:
        return None
