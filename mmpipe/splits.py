"""Patient-level, deterministic splits and frozen test snapshots.

Splits are stratified by class: the new patients of each class (by their images' majority label)
fill that class's 70/15/15 quotas, counting the patients already recorded, in the order of a hash
of their pseudonymous key. So every class with 7 or more patients has validation and test patients
(a small class drawn at random can have none, and a class without test images cannot be judged),
the assignment is deterministic, and the first assignment is recorded forever: a patient never
straddles splits and nobody moves as new data arrives (changed ratios affect only new patients). Only images of ingest
runs whose batch validation passed are usable. The test set that compares models is a named,
immutable snapshot: freezing a new one is an explicit, recorded act, and its member list is
checked against its content hash every time it is read.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

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


def hash_order(patient_key: str) -> str:
    """A patient's place in the assignment order: a hash of the key, so the order carries no meaning."""
    return hashlib.sha256(patient_key.encode()).hexdigest()


def quotas(ratios: Ratios, recorded: Counter[str], n_new: int) -> dict[str, int]:
    """How many of ``n_new`` patients go to each split so that a class's recorded + new patients come
    closest to ``ratios`` (largest remainder over each split's shortfall; pure)."""
    total = sum(recorded.values()) + n_new
    short = {s: max(0.0, getattr(ratios, s) * total - recorded[s]) for s in SPLITS}
    scale = n_new / sum(short.values())
    exact = {s: short[s] * scale for s in SPLITS}
    out = {s: int(exact[s]) for s in SPLITS}
    by_remainder = sorted(SPLITS, key=lambda s: (out[s] - exact[s], SPLITS.index(s)))
    for s in by_remainder[: n_new - sum(out.values())]:
        out[s] += 1
    return out


def stratified(
    new: Mapping[str, Iterable[str]], recorded: Mapping[str, Counter[str]], ratios: Ratios = Ratios()
) -> dict[str, str]:
    """Splits for new patients: {class: patient keys} -> {patient key: split}, given the recorded
    patients' split counts per class. Deterministic whatever the input order (pure)."""
    out: dict[str, str] = {}
    for label, keys in new.items():
        ordered = sorted(set(keys), key=hash_order)
        quota = quotas(ratios, recorded.get(label, Counter()), len(ordered))
        start = 0
        for split in SPLITS:
            out |= dict.fromkeys(ordered[start : start + quota[split]], split)
            start += quota[split]
    return out


def _majority_labels(rows: Iterable[Mapping[str, Any]]) -> dict[str, str]:
    """patient key -> the label most of their images carry (ties: the first label alphabetically)."""
    counts: dict[str, Counter[str]] = {}
    for r in rows:
        counts.setdefault(r["patient_key"], Counter())[r["label"]] += int(r["n"])
    return {p: min(c, key=lambda label: (-c[label], label)) for p, c in counts.items()}


def record_splits(catalog: Catalog, ratios: Ratios = Ratios()) -> int:
    """Assign every new patient key, stratified by class; existing assignments never change.
    Returns patients added."""
    rows = catalog.query(
        "SELECT i.patient_key, i.label, s.split, count(*) AS n FROM images i "
        "LEFT JOIN patient_splits s ON s.patient_key = i.patient_key GROUP BY i.patient_key, i.label, s.split"
    )
    split_of = {r["patient_key"]: r["split"] for r in rows}
    new: dict[str, list[str]] = {}
    recorded: dict[str, Counter[str]] = {}
    for patient, label in _majority_labels(rows).items():
        if split_of[patient] is None:
            new.setdefault(label, []).append(patient)
        else:
            recorded.setdefault(label, Counter())[split_of[patient]] += 1
    assigned = stratified(new, recorded, ratios)
    rows = [{"patient_key": p, "split": s} for p, s in assigned.items()]
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
