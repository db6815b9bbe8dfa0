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


def test_assignment_is_a_pure_function_of_the_key():
    assert [splits.assign(k) for k in KEYS[:200]] == [splits.assign(k) for k in KEYS[:200]]
    assert splits.assign("patient-00001") == splits.assign("patient-00001", splits.Ratios())


def test_default_shares_are_70_15_15():
    counts = Counter(splits.assign(k) for k in KEYS)
    for split, share in (("train", 0.70), ("val", 0.15), ("test", 0.15)):
        assert counts[split] / len(KEYS) == pytest.approx(share, abs=0.01)


def test_configured_ratios_are_honoured_and_nest(monkeypatch):
    for name, share in (("TRAIN", "0.8"), ("VAL", "0.1"), ("TEST", "0.1")):
        monkeypatch.setenv(f"MMPIPE_SPLIT_{name}", share)
    ratios = splits.Ratios.of(get_settings())
    assert ratios == splits.Ratios(0.8, 0.1, 0.1)
    counts = Counter(splits.assign(k, ratios) for k in KEYS)
    assert counts["train"] / len(KEYS) == pytest.approx(0.8, abs=0.01)
    assert counts["test"] / len(KEYS) == pytest.approx(0.1, abs=0.01)
    # the hash fraction is fixed per patient, so a smaller test share only ever shrinks the test set
    assert {k for k in KEYS if splits.assign(k, ratios) == "test"} <= {
        k for k in KEYS if splits.assign(k) == "test"
    }


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
    assert before == {k: splits.assign(k) for k in first}
    # new data arrives, and meanwhile the ratios were changed: old patients stay, new ones follow the new ratios
    later = KEYS[300:600]
    add_images(catalog, [*first[:50], *later], "run-2", per_patient=1)
    skewed = splits.Ratios(0.2, 0.2, 0.6)
    assert splits.record_splits(catalog, skewed) == 300
    after = {r["patient_key"]: r["split"] for r in catalog.query("SELECT * FROM patient_splits")}
    assert {k: after[k] for k in first} == before
    assert {k: after[k] for k in later} == {k: splits.assign(k, skewed) for k in later}
    assert splits.record_splits(catalog, skewed) == 0


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
