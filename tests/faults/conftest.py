"""Fixtures of the fault-injection suite, and its summary: the figures docs/reliability.md tabulates,
printed at the end of every run of the suite (``pytest tests/faults``): one table for ingest, one
for scoring."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from mmpipe import catalog as catalog_mod
from mmpipe import embedded, ingest, score
from mmpipe.config import get_settings
from mmpipe.store import open_store
from tests.faults.workload import SCORE_PREFIX, Signature, corpus, fates, foreign_tags, signature
from tests.integration.test_score import register

FIGURES: list[dict[str, Any]] = []
SCORE_FIGURES: list[dict[str, Any]] = []
MODEL = "tiny-1"
COLUMNS = (  # (figure, heading, width)
    ("fault", "fault", 38),
    ("injected", "injected", 16),
    ("first_run", "faulted run", 26),
    ("left_for_rerun", "left", 4),
    ("rerun_new_objects", "rerun took", 10),
    ("listed", "listed", 6),
    ("accounted", "accounted", 9),
    ("extra_pixel_copies", "pixel copies", 12),
    ("orphans_swept", "swept", 5),
    ("orphans_left", "orphans", 7),
    ("transient_quarantines", "fault quarantines", 17),
    ("same_as_clean_run", "= clean run", 11),
)
SCORE_COLUMNS = (
    ("fault", "fault", 38),
    ("injected", "injected", 24),
    ("first_run", "faulted run", 26),
    ("left_for_rerun", "left", 4),
    ("rerun_scored", "rerun took", 10),
    ("listed", "listed", 6),
    ("accounted", "accounted", 9),
    ("duplicate_rows", "dup rows", 8),
    ("tags_inconsistent", "bad tags", 8),
    ("fault_verdicts", "fault verdicts", 14),
    ("same_as_clean_run", "= clean run", 11),
)


@pytest.fixture(scope="session")
def objects() -> dict[str, bytes]:
    return corpus()


@pytest.fixture(scope="session")
def reference(s3_endpoint: str, objects: dict[str, bytes], tmp_path_factory) -> Signature:
    """The catalog a clean run of the corpus gives (embedded SQLite; the faulted runs use PostgreSQL)."""
    home = tmp_path_factory.mktemp("clean-run")
    settings = get_settings(
        home=home, s3_endpoint_url=s3_endpoint, s3_bucket="fault-reference", s3_access_key_id="t",
        s3_secret_access_key="t", pseudonym_salt="test-salt-not-for-production", image_size=64, shard_size=8,
    )  # fmt: skip
    store = open_store(settings)
    store.ensure_bucket()
    for key, body in objects.items():
        store.put(key, body)
    catalog = catalog_mod.open_catalog(settings)
    catalog_mod.upgrade(catalog)
    ingest.run(settings, store, catalog, "clean")
    return signature(catalog)


def score_settings(**overrides: Any) -> Any:
    return get_settings(**{"ingest_processes": 2, "score_threads": 1, **overrides})


@pytest.fixture(scope="session")
def incoming() -> dict[str, bytes]:
    """The same corpus, arriving for scoring."""
    return corpus(SCORE_PREFIX)


def upload_incoming(store: Any, catalog: Any, incoming: dict[str, bytes]) -> dict[str, dict[str, str]]:
    """The corpus with the hospital's tags on some objects, and a tinycnn champion (see
    tests/integration/test_score.py: random weights, fixed seed); returns the hospital's tags."""
    foreign = foreign_tags(list(incoming))
    for key, body in incoming.items():
        store.put(key, body)
        if key in foreign:
            store.set_tags(key, foreign[key])
    register(store, catalog, MODEL)
    return foreign


@pytest.fixture(scope="session")
def score_reference(s3_endpoint: str, incoming: dict[str, bytes], tmp_path_factory) -> dict[str, tuple]:
    """Each object's fate and tags after a clean scoring run (embedded SQLite; faulted runs: PostgreSQL)."""
    settings = score_settings(
        home=tmp_path_factory.mktemp("clean-score"), s3_endpoint_url=s3_endpoint, s3_bucket="score-reference",
        s3_access_key_id="t", s3_secret_access_key="t", pseudonym_salt="test-salt-not-for-production",
    )  # fmt: skip
    store = open_store(settings)
    store.ensure_bucket()
    catalog = catalog_mod.open_catalog(settings)
    catalog_mod.upgrade(catalog)
    upload_incoming(store, catalog, incoming)
    summary = score.run(settings, store, catalog, "clean")
    assert summary["status"] == "finished" and summary["not_reached"] == 0, summary
    return fates(store, catalog, MODEL)


@pytest.fixture
def scoring(ready, incoming) -> Callable[..., tuple]:
    """``ready`` with the corpus under incoming/, some of it carrying the hospital's tags, and a
    champion: (settings, store, catalog, hospital's tags)."""

    def make(**overrides: Any) -> tuple:
        settings, store, catalog = ready(**{"ingest_processes": 2, "score_threads": 1, **overrides})
        return settings, store, catalog, upload_incoming(store, catalog, incoming)

    return make


@pytest.fixture
def loaded(ready, objects) -> Callable[..., tuple]:
    """``ready`` with the corpus uploaded (shards of 8 images: several per run)."""

    def make(**overrides: Any) -> tuple:
        settings, store, catalog = ready(**{"shard_size": 8, "ingest_processes": 2, **overrides})
        for key, body in objects.items():
            store.put(key, body)
        return settings, store, catalog

    return make


@pytest.fixture
def own_store(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A SeaweedFS of this test's own, which the test may stop and start again."""
    server = {"handle": embedded.start(tmp_path / "store")}
    yield server
    embedded.stop(server["handle"])


@pytest.fixture
def record() -> Callable[[str, dict[str, Any]], None]:
    """Add a row to the suite's summary table of ingest."""
    return lambda fault, figures: FIGURES.append({"fault": fault, **figures})


@pytest.fixture
def record_score() -> Callable[[str, dict[str, Any]], None]:
    """Add a row to the suite's summary table of scoring."""
    return lambda fault, figures: SCORE_FIGURES.append({"fault": fault, **figures})


def pytest_terminal_summary(terminalreporter: Any) -> None:
    write = terminalreporter.write_line
    for stage, rows, columns in (("ingest", FIGURES, COLUMNS), ("scoring", SCORE_FIGURES, SCORE_COLUMNS)):
        if not rows:
            continue
        write("")
        write(f"fault-injection suite, {stage}: the run after each fault (see docs/reliability.md)")
        write(" | ".join(f"{title:<{width}}" for _, title, width in columns))
        for row in rows:
            write(" | ".join(f"{row.get(key, '')!s:<{width}}"[:width] for key, _, width in columns))
