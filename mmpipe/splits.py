"""Patient-level, deterministic splits and frozen test snapshots.

A patient's split is a pure function of their pseudonymous key (a hash mapped to [0, 1)), and the
first assignment is recorded forever, so a patient never straddles splits and nobody moves as
new data arrives (changing the ratios affects only patients seen afterwards). Only images of ingest
runs whose batch validation passed are usable. The test set that compares models is a named,
immutable snapshot: freezing a new one is an explicit, recorded act, and its member list is
checked against its content hash every time it is read.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

import sqlalchemy as sa

from mmpipe.catalog import Catalog
from mmpipe.config import Settings
from mmpipe.errors import MmpipeError
from mmpipe.store import Store

SPLITS = ("train", "val", "test")

#: Images whose ingest run passed the GX batch suite (``dataset.validate_ingest`` records it).
VALIDATED = (
    "EXISTS (SELECT 1 FROM validations v WHERE v.subject = 'ingest:' || i.ingest_run_id "
    "AND v.suite = 'batch' AND v.success)"
)


@dataclass(frozen=True)
class Ratios:
    train: float = 0.70
    val: float = 0.15
    test: float = 0.15

    def __post_init__(self) -> None:
        if min(self.train, self.val, self.test) < 0 or abs(self.train + self.val + self.test - 1) > 1e-6:
            raise MmpipeError(f"split ratios must be non-negative and sum to 1, got {self}")

    @classmethod
    def of(cls, settings: Settings) -> Ratios:
        """From ``MMPIPE_SPLIT_TRAIN``, ``MMPIPE_SPLIT_VAL`` and ``MMPIPE_SPLIT_TEST``."""
        return cls(settings.split_train, settings.split_val, settings.split_test)


def assign(patient_key: str, ratios: Ratios = Ratios()) -> str:
    """The split a patient belongs to, from a hash of their key alone."""
    fraction = int(hashlib.sha256(patient_key.encode()).hexdigest()[:15], 16) / 16**15
    if fraction < ratios.train:
        return "train"
    return "val" if fraction < ratios.train + ratios.val else "test"


def record_splits(catalog: Catalog, ratios: Ratios = Ratios()) -> int:
    """Assign every new patient key; existing assignments never change. Returns patients added."""
    new = catalog.query(
        "SELECT DISTINCT i.patient_key FROM images i LEFT JOIN patient_splits s ON s.patient_key = i.patient_key "
        "WHERE s.patient_key IS NULL"
    )
    rows = [{"patient_key": r["patient_key"], "split": assign(r["patient_key"], ratios)} for r in new]
    return catalog.upsert("patient_splits", rows, ["patient_key"], update=False)


def usable_images(catalog: Catalog, split: str | None = None) -> list[dict]:
    """Active images (not excluded) of validated ingest runs, with their split."""
    sql = (
        "SELECT i.image_id, i.label, i.patient_key, i.shard_uri, i.shard_index, s.split, i.orig_rows, i.orig_cols, "
        "i.bits_stored, i.pixel_mean, i.pixel_std, i.modality, i.ingest_run_id FROM images i "
        f"JOIN patient_splits s ON s.patient_key = i.patient_key WHERE i.status = 'active' AND {VALIDATED}"
    )
    if split:
        return catalog.query(sql + " AND s.split = :s ORDER BY i.image_id", s=split)
    return catalog.query(sql + " ORDER BY i.image_id")


def pending_validation(catalog: Catalog) -> list[str]:
    """Ingest runs with active images but no passing batch validation: their images wait outside plans."""
    rows = catalog.query(
        f"SELECT DISTINCT i.ingest_run_id FROM images i WHERE i.status = 'active' AND NOT {VALIDATED} "
        "ORDER BY i.ingest_run_id"
    )
    return [r["ingest_run_id"] for r in rows]


def members_hash(image_ids: Iterable[str]) -> str:
    return hashlib.sha256("\n".join(sorted(image_ids)).encode()).hexdigest()


def current_snapshot(catalog: Catalog) -> str | None:
    return catalog.scalar("SELECT name FROM test_snapshots ORDER BY created_at DESC, name DESC LIMIT 1")


def freeze_test(catalog: Catalog, store: Store, name: str, reason: str) -> dict:
    """Freeze today's usable test-split images as snapshot ``name``; refuses to overwrite one."""
    if not name or name != name.strip() or "/" in name:
        raise MmpipeError(f"invalid test snapshot name {name!r}: use e.g. 'test-v2' (no slashes or spaces)")
    if catalog.scalar("SELECT 1 FROM test_snapshots WHERE name = :n", n=name):
        raise MmpipeError(f"test snapshot {name!r} already exists and is immutable; choose a new name")
    members = usable_images(catalog, "test")
    if not members:
        raise MmpipeError(
            "no validated test-split images to freeze: ingest and validate data first "
            "(`mmpipe ingest`, `mmpipe validate --run-id ...`)"
        )
    ids = [m["image_id"] for m in members]
    content_hash = members_hash(ids)
    members_uri = store.put_json(
        f"reports/test-snapshots/{name}.json",
        {"name": name, "reason": reason, "content_hash": content_hash, "image_ids": ids},
    )
    row = {
        "name": name,
        "n_images": len(ids),
        "content_hash": content_hash,
        "members_uri": members_uri,
        "reason": reason,
    }
    with catalog.begin() as conn:
        catalog.upsert("test_snapshots", [row], ["name"], conn, update=False)
        conn.execute(
            sa.text("INSERT INTO test_snapshot_members (name, image_id, label) VALUES (:n, :i, :l)"),
            [{"n": name, "i": m["image_id"], "l": m["label"]} for m in members],
        )
    return row


def snapshot_images(catalog: Catalog, name: str) -> list[dict]:
    """The frozen members of a snapshot with their frozen labels (whatever the image's status or label
    today), verified against its hash."""
    recorded = catalog.scalar("SELECT content_hash FROM test_snapshots WHERE name = :n", n=name)
    if recorded is None:
        raise MmpipeError(f"test snapshot {name!r} not found; freeze one with `mmpipe dataset freeze-test`")
    rows = catalog.query(
        "SELECT i.image_id, m.label, i.patient_key, i.shard_uri, i.shard_index FROM test_snapshot_members m "
        "JOIN images i ON i.image_id = m.image_id WHERE m.name = :n ORDER BY i.image_id",
        n=name,
    )
    if members_hash(r["image_id"] for r in rows) != recorded:
        raise MmpipeError(
            f"test snapshot {name!r} no longer matches its content hash: its member list was altered; "
            "freeze a new snapshot instead of editing one"
        )
    return rows
