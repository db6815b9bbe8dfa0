"""The catalog against the real PostgreSQL server (and SQLite, the embedded default)."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from mmpipe import catalog as catalog_mod
from mmpipe.errors import CatalogError

pytestmark = pytest.mark.integration

TABLES = {
    "ingest_runs",
    "source_objects",
    "images",
    "duplicates",
    "quarantine",
    "validations",
    "patient_splits",
    "test_snapshots",
    "test_snapshot_members",
    "dataset_versions",
    "training_runs",
    "epoch_metrics",
    "models",
    "evaluations",
    "model_aliases",
    "promotions",
    "predictions",
    "score_failures",
    "label_state",
    "baseline_evaluations",
    "alias_history",
    "alias_locks",
}


@pytest.fixture(params=["postgres", "sqlite"])
def db(request, pg_url, tmp_path) -> catalog_mod.Catalog:
    url = pg_url if request.param == "postgres" else f"sqlite:///{tmp_path / 'catalog.db'}"
    catalog = catalog_mod.Catalog(url)
    yield catalog
    catalog.dispose()


def test_upgrade_creates_schema_and_is_idempotent(db) -> None:
    assert catalog_mod.upgrade(db) == [m for m, _ in catalog_mod.migrations()]
    assert catalog_mod.upgrade(db) == []
    names = set(sa.inspect(db.engine).get_table_names())
    assert names >= TABLES | {"schema_migrations"}
    assert "leaderboard" in sa.inspect(db.engine).get_view_names()
    assert catalog_mod.current_version(db) == catalog_mod.migrations()[-1][0]


def test_snapshot_labels_are_backfilled_from_the_images_they_froze(db, tmp_path) -> None:
    """A catalog frozen before migration 005 keeps evaluating against the labels its images had."""
    older = tmp_path / "sql"
    older.mkdir()
    for version, path in catalog_mod.migrations():
        if version < "005":
            (older / path.name).write_text(path.read_text())
    catalog_mod.upgrade(db, older)
    image = {"image_id": "img1", "source_key": "training/a.dcm", "source_etag": "e", "member_path": ""}
    image |= {"label": "lung_ct", "label_source": "prefix", "patient_key": "p", "study_key": "s"}
    image |= {"orig_rows": 8, "orig_cols": 8, "bits_stored": 8, "pixel_mean": 1.0, "pixel_std": 1.0}
    image |= {"shard_uri": "s3://b/curated/x.npz", "shard_index": 0, "ingest_run_id": "r"}
    db.upsert("images", [image], ["image_id"])
    db.execute("INSERT INTO test_snapshot_members (name, image_id) VALUES ('test-v1', 'img1')")
    assert "005" in catalog_mod.upgrade(db)
    assert db.scalar("SELECT label FROM test_snapshot_members WHERE image_id = 'img1'") == "lung_ct"


def test_not_migrated_is_one_clear_error(db) -> None:
    with pytest.raises(CatalogError, match="not migrated: run `mmpipe db upgrade`"):
        db.query("SELECT * FROM images")


def test_unreachable_database_names_the_fix() -> None:
    db = catalog_mod.Catalog("postgresql://someone:secret@127.0.0.1:1/nowhere")
    with pytest.raises(CatalogError) as err:
        db.query("SELECT 1")
    assert "MMPIPE_DATABASE_URL" in str(err.value)
    assert "secret" not in str(err.value)  # credentials are redacted


def test_upsert_updates_or_keeps(db) -> None:
    catalog_mod.upgrade(db)
    row = {"alias": "champion", "model_version": "a"}
    db.upsert("model_aliases", [row], ["alias"])
    db.upsert("model_aliases", [row | {"model_version": "b"}], ["alias"], update=False)
    assert db.scalar("SELECT model_version FROM model_aliases") == "a"
    db.upsert("model_aliases", [row | {"model_version": "c"}], ["alias"])
    assert db.query("SELECT alias, model_version FROM model_aliases") == [
        {"alias": "champion", "model_version": "c"}
    ]
