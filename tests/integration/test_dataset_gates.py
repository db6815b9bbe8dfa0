"""The Great Expectations gates through the real pipeline: synthetic studies in SeaweedFS, ingested into
PostgreSQL, validated by ``dataset.validate_ingest`` and ``dataset.prepare_dataset``.

Each defect in more than 2% of a batch (a near-blank image, a label outside the configured classes) must
trip its own rule, keep its batch out of training without deleting anything, fail loudly, and leave a
validation row, a Data Docs site and a report in the store; so must a patient leaking across splits.
Rules at 1% and 5% shares and duplicates: test_dataset_validation.py.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from pydicom.uid import generate_uid

from mmpipe import dataset, ingest, splits, synth
from mmpipe.config import CLASSES
from mmpipe.errors import MmpipeError

pytestmark = pytest.mark.integration


@pytest.fixture
def env(ready, pg_url):
    return ready(database_url=pg_url, split_train=0.5, split_val=0.25, split_test=0.25)


def upload(store, n: int, seed: int) -> list[synth.SynthObject]:
    objects = list(synth.generate(n, size=64, seed=seed, images_per_patient=(1, 2), archive_fraction=0))
    for obj in objects:
        store.put(f"training/{obj.key}", obj.body)
    return objects


def near_blank_ct() -> bytes:
    """An air-only CT slice (-1000 HU, +-3 HU noise) in a wide window: decodable, not constant, but blank."""
    noise = np.random.default_rng(0).integers(-3, 4, (64, 64))
    uid = [generate_uid(entropy_srcs=["mmpipe-test", "blank", k]) for k in ("study", "series", "sop")]
    return synth.dicom_bytes(
        (noise - 1000).astype(np.int16), label="lung_ct", patient_id="BLANK-1", study_uid=uid[0],
        series_uid=uid[1], sop_uid=uid[2], hints={"window": (-1000.0, 2000.0)},
    )  # fmt: skip


def statuses(catalog, run_id: str) -> dict[str, str]:
    rows = catalog.query(
        "SELECT image_id, status, status_reason FROM images WHERE ingest_run_id = :r", r=run_id
    )
    return {r["image_id"]: (r["status"], r["status_reason"]) for r in rows}


def test_a_clean_batch_passes_and_its_report_links_the_data_docs(env):
    settings, store, catalog = env
    upload(store, 30, seed=1)
    ingest.run(settings, store, catalog, "ingest__clean")
    result = dataset.validate_ingest(settings, store, catalog, "ingest__clean")

    assert result["success"] is True and result["n_critical"] == 0
    assert {s for s, _ in statuses(catalog, "ingest__clean").values()} == {"active"}
    (row,) = catalog.query("SELECT * FROM validations WHERE subject = 'ingest:ingest__clean'")
    assert row["suite"] == "batch" and row["success"] and row["docs_uri"] == result["docs_uri"]
    html = store.get(store.key_of(result["docs_uri"])).decode()
    assert (
        result["docs_uri"].startswith(f"s3://{settings.s3_bucket}/reports/validation/")
        and "mmpipe_batch" in html
    )
    report_uri = catalog.scalar(
        "SELECT validation_report_uri FROM ingest_runs WHERE run_id = 'ingest__clean'"
    )
    report = store.get_json(store.key_of(report_uri))
    assert report_uri == result["report_uri"] and report["docs_uri"] == result["docs_uri"]
    assert report["success"] is True and report["images"] == 30 and sum(report["class_counts"].values()) == 30


def _blank(settings, store):
    store.put("training/lung_ct/BLANK-1/0001.dcm", near_blank_ct())
    return settings, "not_blank"


def _wrong_label(settings, store):
    # The batch was labelled under a wider class list than the one training is configured with.
    knee = next(o for o in synth.generate(1, size=64, seed=9, archive_fraction=0))
    store.put("training/knee_mri/KNEE-1/0001.dcm", knee.body)
    return settings.model_copy(update={"classes": (*CLASSES, "knee_mri")}), "label_in_classes"


@pytest.mark.parametrize("defect", [_blank, _wrong_label], ids=["blank", "wrong_label"])
def test_a_critical_defect_excludes_its_batch_fails_loudly_and_deletes_nothing(env, defect):
    settings, store, catalog = env
    upload(store, 12, seed=1)
    ingest.run(settings, store, catalog, "ingest__first")
    dataset.validate_ingest(settings, store, catalog, "ingest__first")

    upload(store, 12, seed=2)
    ingest_settings, check = defect(settings, store)
    ingest.run(ingest_settings, store, catalog, "ingest__bad")
    before = statuses(catalog, "ingest__bad")
    shards = {
        r["shard_uri"]
        for r in catalog.query("SELECT shard_uri FROM images WHERE ingest_run_id = 'ingest__bad'")
    }

    with pytest.raises(dataset.ValidationFailed, match=check) as failure:
        dataset.validate_ingest(settings, store, catalog, "ingest__bad")

    after = statuses(catalog, "ingest__bad")
    assert set(after) == set(before) and len(after) >= 12  # nothing deleted
    assert {status for status, _ in after.values()} == {"excluded"}
    assert Counter(why for _, why in after.values()) == {check: 1, "batch_failed": len(after) - 1}
    assert all(store.head(store.key_of(uri)) for uri in shards)  # curated pixels kept
    assert {s for s, _ in statuses(catalog, "ingest__first").values()} == {
        "active"
    }  # earlier batch unaffected
    (row,) = catalog.query("SELECT * FROM validations WHERE subject = 'ingest:ingest__bad'")
    assert not row["success"] and row["n_critical"] >= 1 and row["docs_uri"] in str(failure.value)
    assert store.head(store.key_of(row["docs_uri"]))
    report = store.get_json(store.key_of(catalog.scalar(
        "SELECT validation_report_uri FROM ingest_runs WHERE run_id = 'ingest__bad'")))  # fmt: skip
    assert report["success"] is False and check in report["critical_failures"]
    assert report["images_excluded"] == len(after) and report["excluded_by_reason"][check] == 1
    # the image failing the rule is named apart from the rest of the batch
    assert {r["rule"]: r["failing"] for r in report["rules"]}[check] == 1
    splits.record_splits(catalog)
    assert {i["ingest_run_id"] for i in splits.usable_images(catalog)} == {"ingest__first"}

    # Rerunning the gate fails the same way; nothing is readmitted behind the operator's back.
    with pytest.raises(dataset.ValidationFailed, match=check):
        dataset.validate_ingest(settings, store, catalog, "ingest__bad")
    assert statuses(catalog, "ingest__bad") == after


def test_a_batch_passing_on_a_rerun_is_readmitted(env):
    """The wrong-label batch is fine once the class is configured: re-validating brings it back."""
    settings, store, catalog = env
    upload(store, 10, seed=7)
    wider, _ = _wrong_label(settings, store)
    ingest.run(wider, store, catalog, "ingest__knee")
    with pytest.raises(dataset.ValidationFailed, match="label_in_classes"):
        dataset.validate_ingest(settings, store, catalog, "ingest__knee")
    assert {s for s, _ in statuses(catalog, "ingest__knee").values()} == {"excluded"}
    result = dataset.validate_ingest(wider, store, catalog, "ingest__knee")
    assert result["success"] and {s for s, _ in statuses(catalog, "ingest__knee").values()} == {"active"}
    assert store.get_json(store.key_of(result["report_uri"]))["images_excluded"] == 0


def test_the_blank_image_is_the_one_named(env):
    settings, store, catalog = env
    upload(store, 6, seed=3)
    _blank(settings, store)
    ingest.run(settings, store, catalog, "ingest__blank")
    with pytest.raises(dataset.ValidationFailed):
        dataset.validate_ingest(settings, store, catalog, "ingest__blank")
    blank = catalog.query(
        "SELECT image_id, pixel_std FROM images WHERE source_key LIKE 'training/lung_ct/BLANK-1/%'"
    )
    assert len(blank) == 1 and 0 < blank[0]["pixel_std"] < 2.0  # it passed ingest: only GX can catch it
    report = store.get_json(store.key_of(catalog.scalar(
        "SELECT validation_report_uri FROM ingest_runs WHERE run_id = 'ingest__blank'")))  # fmt: skip
    (row,) = [r for r in report["rules"] if r["rule"] == "not_blank"]
    assert row["failing"] == 1 and row["examples"] == ["training/lung_ct/BLANK-1/0001.dcm"]
    assert (
        catalog.scalar("SELECT status_reason FROM images WHERE image_id = :i", i=blank[0]["image_id"])
        == "not_blank"
    )


def test_dataset_gate_catches_a_patient_leaking_into_training(env):
    settings, store, catalog = env
    upload(store, 90, seed=4)
    ingest.run(settings, store, catalog, "ingest__base")
    dataset.validate_ingest(settings, store, catalog, "ingest__base")
    first = dataset.prepare_dataset(settings, store, catalog, "retrain__1")
    frozen = splits.snapshot_images(catalog, first["test_snapshot"])

    # Someone "fixes" a test patient's assignment by hand: their frozen test images would now train.
    leaked = frozen[0]["patient_key"]
    catalog.execute("UPDATE patient_splits SET split = 'train' WHERE patient_key = :p", {"p": leaked})
    versions = catalog.scalar("SELECT count(*) FROM dataset_versions")
    with pytest.raises(dataset.ValidationFailed, match="no_patient_leakage") as failure:
        dataset.prepare_dataset(settings, store, catalog, "retrain__2")

    assert catalog.scalar("SELECT count(*) FROM dataset_versions") == versions  # no plan from leaky data
    (row,) = catalog.query("SELECT * FROM validations WHERE subject = 'dataset:retrain__2'")
    assert not row["success"] and row["docs_uri"] in str(failure.value)
    results = store.get(store.key_of(row["docs_uri"])).decode()
    assert "mmpipe_dataset_images" in results


def test_dataset_gate_needs_enough_training_images_per_class(env):
    settings, store, catalog = env
    upload(store, 40, seed=5)
    ingest.run(settings, store, catalog, "ingest__small")
    dataset.validate_ingest(settings, store, catalog, "ingest__small")
    with pytest.raises(dataset.ValidationFailed, match="train_min_per_class"):
        dataset.prepare_dataset(settings, store, catalog, "retrain__small", min_per_class=1000)


def test_images_of_a_batch_never_validated_wait_outside_the_plan(env):
    settings, store, catalog = env
    upload(store, 12, seed=6)
    ingest.run(settings, store, catalog, "ingest__unchecked")
    with pytest.raises(MmpipeError, match="awaiting validation: ingest__unchecked"):
        dataset.prepare_dataset(settings, store, catalog, "retrain__early")
    assert catalog.scalar("SELECT count(*) FROM dataset_versions") == 0
