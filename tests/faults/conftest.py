"""Fixtures of the fault-injection suite, and its summary: the figures docs/reliability.md tabulates,
printed at the end of every run of the suite (``pytest tests/faults``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from mmpipe import catalog as catalog_mod
from mmpipe import embedded, ingest
from mmpipe.config import get_settings
from mmpipe.store import open_store
from tests.faults.workload import Signature, corpus, signature

FIGURES: list[dict[str, Any]] = []
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
    """Add a row to the suite's summary table."""
    return lambda fault, figures: FIGURES.append({"fault": fault, **figures})


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not FIGURES:
        return
    write = terminalreporter.write_line
    write("")
    write("fault-injection suite: the run after each fault (see docs/reliability.md)")
    write(" | ".join(f"{title:<{width}}" for _, title, width in COLUMNS))
    for row in FIGURES:
        write(" | ".join(f"{row.get(key, '')!s:<{width}}"[:width] for key, _, width in COLUMNS))
