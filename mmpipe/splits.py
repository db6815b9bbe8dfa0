"""Patient-level, deterministic splits and frozen test snapshots.

A patient's split is a pure function of their pseudonymous key (a hash mapped to [0, 1)), and the
first assignment is recorded forever, so a patient never straddles splits and nobody moves as
new data arrives. The test set that compares models is a named, immutable snapshot: freezing a
new one is an explicit, recorded act.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

import sqlalchemy as sa

from mmpipe.catalog import Catalog
from mmpipe.errors import MmpipeError
from mmpipe.store import Store

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Ratios:
    train: float = 0.70
    val: float = 0.15
    test: float = 0.15

    def __post_init__(self) -> None:
        if min(self.train, self.val, self.test) < 0 or abs(self.train + self.val + self.test - 1) > 1e-6:
            raise MmpipeError(f"split ratios must be non-negative and sum to 1, got {self}")


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
    """Active images (not excluded by validation) with their split."""
    sql = (
        "SELECT i.image_id, i.label, i.patient_key, i.shard_uri, i.shard_index, s.split, i.orig_rows, i.orig_cols, "
        "i.bits_stored, i.pixel_mean, i.pixel_std, i.modality FROM images i "
        "JOIN patient_splits s ON s.patient_key = i.patient_key WHERE i.status = 'active'"
    )
    if split:
        return catalog.query(sql + " AND s.split = :s ORDER BY i.image_id", s=split)
    return catalog.query(sql + " ORDER BY i.image_id")


def members_hash(image_ids: Iterable[str]) -> str:
    return hashlib.sha256("\n".join(sorted(image_ids)).encode()).hexdigest()


def current_snapshot(catalog: Catalog) -> str | None:
    return catalog.scalar("SELECT name FROM test_snapshots ORDER BY created_at DESC, name DESC LIMIT 1")


def freeze_test(catalog: Catalog, store: Store, name: str, reason: str) -> dict:
    """Freeze today's test-split images as snapshot ``name``; refuses to overwrite an existing one."""
    if catalog.scalar("SELECT 1 FROM test_snapshots WHERE name = :n", n=name):
        raise MmpipeError(f"test snapshot {name!r} already exists and is immutable; choose a new name")
    members = usable_images(catalog, "test")
    if not members:
        raise MmpipeError("no test-split images to freeze: ingest data first (`mmpipe ingest`)")
    ids = [m["image_id"] for m in members]
    members_uri = store.put_json(
        f"reports/test-snapshots/{name}.json", {"name": name, "reason": reason, "image_ids": ids}
    )
    row = {
        "name": name,
        "n_images": len(ids),
        "content_hash": members_hash(ids),
        "members_uri": members_uri,
        "reason": reason,
    }
    with catalog.begin() as conn:
        catalog.upsert("test_snapshots", [row], ["name"], conn, update=False)
        conn.execute(
            sa.text("INSERT INTO test_snapshot_members (name, image_id) VALUES (:n, :i)"),
            [{"n": name, "i": i} for i in ids],
        )
    return row


def snapshot_images(catalog: Catalog, name: str) -> list[dict]:
    """The frozen members of a snapshot (whatever their status today: the snapshot never changes)."""
    rows = catalog.query(
        "SELECT i.image_id, i.label, i.shard_uri, i.shard_index FROM test_snapshot_members m "
        "JOIN images i ON i.image_id = m.image_id WHERE m.name = :n ORDER BY i.image_id",
        n=name,
    )
    if not rows:
        raise MmpipeError(f"test snapshot {name!r} not found or empty; freeze one with `mmpipe dataset freeze-test`")
    return rows
