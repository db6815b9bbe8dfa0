"""Patient-level splits: deterministic, configurable, recorded once; usable images are validated ones.

The catalog here is a real SQLite database migrated with the project's SQL (no services needed).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from mmpipe import splits
from mmpipe.catalog import Catalog, upgrade
from mmpipe.config import get_settings
from mmpipe.errors import ConfigError, MmpipeError

KEYS = [f"patient-{i:05d}" for i in range(20_000)]


@pytest.fixture
def catalog(tmp_path: Path) -> Catalog:
    db = Catalog(f"sqlite:///{tmp_path / 'catalog.db'}")
    upgrade(db)
    return db


def add_images(catalog: Catalog, patients: list[str], run_id: str, per_patient: int = 2) -> None:
    rows = [
        {
            "image_id": f"{p}-{run_id}-{k}", "source_key": f"training/brain_mri/{p}/{k}.dcm", "source_etag": "e",
            "member_path": "", "label": "brain_mri", "label_source": "prefix", "patient_key": p, "study_key": p,
            "orig_rows": 64, "orig_cols": 64, "bits_stored": 12, "pixel_mean": 90.0, "pixel_std": 30.0,
            "shard_uri": "s3://b/curated/x.npz", "shard_index": k, "ingest_run_id": run_id,
        }
        for p in patients
        for k in range(per_patient)
    ]  # fmt: skip
    catalog.upsert("images", rows, ["image_id"])


def mark_validated(catalog: Catalog, run_id: str, success: bool = True) -> None:
    row = {
        "validation_id": f"batch:{run_id}", "subject": f"ingest:{run_id}", "suite": "batch", "success": success,
        "n_critical": 0 if success else 1, "n_warnings": 0, "results_json": "{}",
    }  # fmt: skip
    catalog.upsert("validations", [row], ["validation_id"])


def test_assignment_is_deterministic_whatever_the_order():
    new = {"brain_mri": KEYS[:200], "retinal_oct": KEYS[200:230]}
    shuffled = {"retinal_oct": list(reversed(KEYS[200:230])), "brain_mri": KEYS[:200][::-1]}
    assert splits.stratified(new, {}) == splits.stratified(shuffled, {})


def test_default_shares_are_70_15_15_per_class():
    small = [f"other-{i}" for i in range(40)]
    assigned = splits.stratified({"a": KEYS, "b": small}, {})
    for keys in (KEYS, small):
        counts = Counter(assigned[k] for k in keys)
        assert counts == {"train": 0.70 * len(keys), "val": 0.15 * len(keys), "test": 0.15 * len(keys)}


@pytest.mark.parametrize("n", range(7, 40))
def test_a_small_class_always_gets_validation_and_test_patients(n):
    counts = Counter(splits.stratified({"retinal_oct": KEYS[:n]}, {}).values())
    assert min(counts["val"], counts["test"]) >= 1 and sum(counts.values()) == n
    assert abs(counts["test"] - 0.15 * n) < 1 and abs(counts["val"] - 0.15 * n) < 1


def test_new_patients_fill_the_shortfall_of_their_class():
    recorded = {"lung_ct": Counter({"train": 10})}  # earlier nights: only training patients so far
    assigned = splits.stratified({"lung_ct": KEYS[:4]}, recorded)
    assert Counter(assigned.values()) == {"val": 2, "test": 2}


def test_configured_ratios_are_honoured(monkeypatch):
    for name, share in (("TRAIN", "0.8"), ("VAL", "0.1"), ("TEST", "0.1")):
        monkeypatch.setenv(f"MMPIPE_SPLIT_{name}", share)
    ratios = splits.Ratios.of(get_settings())
    assert ratios == splits.Ratios(0.8, 0.1, 0.1)
    counts = Counter(splits.stratified({"a": KEYS[:1000]}, {}, ratios).values())
    assert counts == {"train": 800, "val": 100, "test": 100}


@pytest.mark.parametrize("shares", [(0.7, 0.2, 0.2), (0.5, 0.3, 0.1)])
def test_ratios_not_summing_to_one_are_rejected_clearly(shares):
    settings = get_settings(split_train=shares[0], split_val=shares[1], split_test=shares[2])
    with pytest.raises(MmpipeError, match="split ratios"):
        splits.Ratios.of(settings)


def test_negative_or_oversized_shares_are_rejected_by_the_settings():
    with pytest.raises(ConfigError, match="MMPIPE_SPLIT_VAL"):
        get_settings(split_val=-0.1)


def test_recorded_assignments_never_move(catalog: Catalog):
    first = KEYS[:300]
    add_images(catalog, first, "run-1")
    assert splits.record_splits(catalog) == 300
    before = {r["patient_key"]: r["split"] for r in catalog.query("SELECT * FROM patient_splits")}
    assert before == splits.stratified({"brain_mri": first}, {})
    # new data arrives, and meanwhile the ratios were changed: old patients stay, new ones make up
    # the class's shortfall against the new ratios (20/20/60 of 600: val short by 75, test by 315)
    later = KEYS[300:600]
    add_images(catalog, [*first[:50], *later], "run-2", per_patient=1)
    skewed = splits.Ratios(0.2, 0.2, 0.6)
    assert splits.record_splits(catalog, skewed) == 300
    after = {r["patient_key"]: r["split"] for r in catalog.query("SELECT * FROM patient_splits")}
    assert {k: after[k] for k in first} == before
    assert Counter(after[k] for k in later) == {"val": 58, "test": 242}
    assert splits.record_splits(catalog, skewed) == 0


def test_a_patient_counts_for_the_class_most_of_their_images_carry(catalog: Catalog):
    add_images(catalog, KEYS[:20], "run-1", per_patient=3)
    catalog.execute("UPDATE images SET label = 'liver_ct' WHERE image_id LIKE '%-0'")  # 1 of 3 images each
    splits.record_splits(catalog)
    assert Counter(r["split"] for r in catalog.query("SELECT split FROM patient_splits")) == {
        "train": 14, "val": 3, "test": 3,
    }  # fmt: skip


def test_only_images_of_validated_runs_are_usable(catalog: Catalog):
    add_images(catalog, KEYS[:40], "run-ok")
    add_images(catalog, KEYS[40:80], "run-failed")
    add_images(catalog, KEYS[80:120], "run-pending")
    mark_validated(catalog, "run-ok")
    mark_validated(catalog, "run-failed", success=False)
    splits.record_splits(catalog)
    usable = splits.usable_images(catalog)
    assert {i["ingest_run_id"] for i in usable} == {"run-ok"} and len(usable) == 80
    assert splits.pending_validation(catalog) == ["run-failed", "run-pending"]
    test = splits.usable_images(catalog, "test")
    assert test and {i["split"] for i in test} == {"test"}
    catalog.execute("UPDATE images SET status = 'excluded' WHERE image_id = :i", {"i": usable[0]["image_id"]})
    assert usable[0]["image_id"] not in {i["image_id"] for i in splits.usable_images(catalog)}


def test_members_hash_ignores_order():
    assert splits.members_hash(["b", "a", "c"]) == splits.members_hash(["c", "b", "a"])
    assert splits.members_hash(["a", "b"]) != splits.members_hash(["a", "b", "c"])
