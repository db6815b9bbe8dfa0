"""Great Expectations suites for ingested batches and for the split dataset, run for real on small frames."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from mmpipe.config import CLASSES
from mmpipe.validate import BatchRules, ValidationReport, validate_batch, validate_dataset

MODALITY = {"brain_mri": "MR", "chest_xray": "DX", "retinal_oct": None, "lung_ct": "CT", "liver_ct": "CT"}
BATCH_CHECKS = {
    "label_not_null",
    "label_in_classes",
    "rows_in_range",
    "cols_in_range",
    "bits_stored_allowed",
    "not_blank",
    "content_hash_unique",
    "patient_key_not_null",
    "modality_matches_label",
    "class_counts",
}
DATASET_CHECKS = {
    "split_in_set",
    "label_in_classes",
    "patient_key_not_null",
    "no_patient_leakage",
    "train_min_per_class",
    "test_nonempty_per_class",
}


def batch(per_class: int = 3) -> pd.DataFrame:
    """A clean batch: every class present; retinal OCT arrives as PNG, so without a Modality header."""
    rows = []
    for label in CLASSES:
        for _ in range(per_class):
            i = len(rows)
            rows.append(
                {
                    "image_id": f"img-{i:03d}",
                    "label": label,
                    "orig_rows": 512,
                    "orig_cols": 480,
                    "bits_stored": 8 if MODALITY[label] is None else 12,
                    "pixel_mean": 90.0,
                    "pixel_std": 30.0 + i,
                    "content_hash": f"{i:064x}",
                    "patient_key": f"pt-{i // 2}",
                    "modality": MODALITY[label],
                }
            )
    return pd.DataFrame(rows)


def dataset() -> pd.DataFrame:
    """Per class 8 patients with 2 images each: 6 patients in train, 1 in val, 1 in test."""
    rows = []
    for label in CLASSES:
        for patient in range(8):
            split = "train" if patient < 6 else ("val" if patient == 6 else "test")
            for image in range(2):
                rows.append(
                    {
                        "image_id": f"{label}-{patient}-{image}",
                        "label": label,
                        "patient_key": f"{label}-pt{patient}",
                        "split": split,
                    }
                )
    return pd.DataFrame(rows)


def check(report: ValidationReport, name: str):
    (found,) = [c for c in report.checks if c.name == name]
    return found


@pytest.fixture(scope="module")
def rules() -> BatchRules:
    return BatchRules(classes=CLASSES)


def test_clean_batch_passes_every_check(rules):
    rows = batch()
    report = validate_batch(rows, rules)
    assert report.suite == "batch"
    assert {c.name for c in report.checks} == BATCH_CHECKS
    assert [c.name for c in report.checks if not c.success] == []
    assert report.success and report.failed_image_ids == []
    assert rows["modality"].isna().any()  # a null Modality header must pass the consistency check
    assert check(report, "class_counts").detail["class_counts"] == {c: 3 for c in CLASSES}
    assert {c.severity for c in report.checks if c.name in {"modality_matches_label", "class_counts"}} == {
        "warning"
    }


def _blank(rows):
    rows.loc[2, "pixel_std"] = 0.4
    return ["img-002"]


def _wrong_label(rows):
    rows.loc[4, "label"] = "abdominal_us"
    return ["img-004"]


def _null_label(rows):
    rows.loc[5, "label"] = None
    return ["img-005"]


def _duplicate_hash(rows):
    rows.loc[7, "content_hash"] = rows.loc[1, "content_hash"]
    return ["img-001", "img-007"]


def _null_patient(rows):
    rows.loc[9, "patient_key"] = None
    return ["img-009"]


def _undersized_rows(rows):
    rows.loc[11, "orig_rows"] = 16
    return ["img-011"]


def _oversized_cols(rows):
    rows.loc[12, "orig_cols"] = 9000
    return ["img-012"]


def _odd_bits(rows):
    rows.loc[13, "bits_stored"] = 9
    return ["img-013"]


@pytest.mark.parametrize(
    ("defect", "expected_check"),
    [
        (_blank, "not_blank"),
        (_wrong_label, "label_in_classes"),
        (_null_label, "label_not_null"),
        (_duplicate_hash, "content_hash_unique"),
        (_null_patient, "patient_key_not_null"),
        (_undersized_rows, "rows_in_range"),
        (_oversized_cols, "cols_in_range"),
        (_odd_bits, "bits_stored_allowed"),
    ],
)
def test_each_batch_defect_fails_its_critical_check_and_names_the_images(rules, defect, expected_check):
    rows = batch()
    bad_ids = defect(rows)
    report = validate_batch(rows, rules)
    assert not report.success
    assert [c.name for c in report.failures("critical")] == [expected_check]
    assert report.failed_image_ids == bad_ids
    failed = check(report, expected_check)
    assert failed.severity == "critical"
    assert failed.detail["unexpected_count"] == len(bad_ids)
    assert failed.detail["unexpected_image_ids"] == bad_ids


def test_failed_image_ids_union_critical_failures_in_input_order(rules):
    rows = batch()
    expected = sorted(_null_patient(rows) + _blank(rows))
    assert validate_batch(rows, rules).failed_image_ids == expected


def test_modality_mismatch_is_only_a_warning(rules):
    rows = batch()
    rows.loc[0, "modality"] = "CT"  # a brain MRI whose header says CT
    report = validate_batch(rows, rules)
    assert report.success
    assert report.failures("critical") == [] and report.failed_image_ids == []
    (warning,) = report.failures("warning")
    assert warning.name == "modality_matches_label"
    assert warning.detail["unexpected_image_ids"] == ["img-000"]
    assert warning.detail["unexpected_values"] == [{"value": ["brain_mri", "CT"], "count": 1}]


def test_modality_of_a_class_without_a_mapping_is_not_judged():
    rules = BatchRules(classes=CLASSES, modality_for_class={"brain_mri": ("MR",)})
    rows = batch()
    rows.loc[rows["label"] == "lung_ct", "modality"] = "XA"
    assert check(validate_batch(rows, rules), "modality_matches_label").success


def test_absent_class_fails_class_counts_as_a_warning(rules):
    rows = batch()
    rows = rows[rows["label"] != "liver_ct"].reset_index(drop=True)
    report = validate_batch(rows, rules)
    assert report.success
    counts = check(report, "class_counts")
    assert not counts.success and counts.severity == "warning"
    assert counts.detail["missing_values"] == ["liver_ct"]
    assert counts.detail["class_counts"]["liver_ct"] == 0


def test_to_json_is_json_serialisable_and_leaves_out_the_docs(rules):
    rows = batch()
    _null_patient(rows)  # a NaN among the unexpected values
    rows.loc[0, "modality"] = "CT"  # tuples among the unexpected values
    report = validate_batch(rows, rules)
    payload = json.loads(json.dumps(report.to_json(), allow_nan=False))
    assert set(payload) == {"suite", "success", "checks", "failed_image_ids"}
    assert payload["failed_image_ids"] == ["img-009"]
    assert len(payload["checks"]) == len(BATCH_CHECKS)


def test_batch_docs_are_a_data_docs_site_for_the_suite(rules):
    docs = validate_batch(batch(), rules).docs
    assert "mmpipe_batch" in docs["index.html"].decode()
    assert "expectations/mmpipe_batch.html" in docs
    assert any(p.startswith("validations/mmpipe_batch/") and p.endswith(".html") for p in docs)
    assert any(p.startswith("static/") for p in docs)


def test_clean_dataset_passes():
    report = validate_dataset(dataset(), CLASSES, min_per_class=12)
    assert report.suite == "dataset"
    assert {c.name for c in report.checks} == DATASET_CHECKS
    assert report.success and report.failed_image_ids == []
    counts = check(report, "train_min_per_class").detail["split_counts"]
    assert counts["brain_mri"] == {"train": 12, "val": 2, "test": 2}


def test_dataset_catches_a_patient_in_train_and_test():
    rows = dataset()
    rows.loc[rows["image_id"] == "chest_xray-0-1", "split"] = "test"
    report = validate_dataset(rows, CLASSES)
    assert not report.success
    assert [c.name for c in report.failures()] == ["no_patient_leakage"]
    assert report.failed_image_ids == ["chest_xray-0-0", "chest_xray-0-1"]


def test_dataset_catches_a_class_missing_from_test():
    rows = dataset()
    rows = rows[~((rows["label"] == "liver_ct") & (rows["split"] == "test"))]
    report = validate_dataset(rows, CLASSES)
    assert [c.name for c in report.failures()] == ["test_nonempty_per_class"]
    assert check(report, "test_nonempty_per_class").detail["unexpected_labels"] == ["liver_ct"]
    assert report.failed_image_ids == []  # a dataset-level failure quarantines no image


def test_dataset_catches_too_few_training_images():
    rows = dataset()
    keep_one_patient = rows["patient_key"] == "lung_ct-pt0"
    rows = rows[~((rows["label"] == "lung_ct") & (rows["split"] == "train") & ~keep_one_patient)]
    report = validate_dataset(rows, CLASSES, min_per_class=5)
    (failed,) = report.failures()
    assert failed.name == "train_min_per_class"
    assert failed.detail["unexpected_labels"] == ["lung_ct"]
    assert failed.detail["split_counts"]["lung_ct"]["train"] == 2


def test_dataset_docs_cover_both_suites():
    index = validate_dataset(dataset(), CLASSES).docs["index.html"].decode()
    assert "mmpipe_dataset_images" in index and "mmpipe_dataset_classes" in index


def test_a_gx_error_fails_the_check_with_its_message(rules):
    rows = batch()
    rows["pixel_std"] = rows["pixel_std"].astype(complex)  # numeric, but not comparable to the floor
    report = validate_batch(rows, rules)
    blank = check(report, "not_blank")
    assert not report.success and not blank.success
    assert "not supported" in blank.detail["error"]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda r: r.drop(columns=["content_hash"]), "content_hash"),
        (lambda r: r.iloc[0:0], "no catalog rows"),
        (lambda r: r.assign(image_id="same"), "unique"),
        (lambda r: r.assign(orig_rows=r["orig_rows"].astype(str)), "numeric"),
        (lambda r: r.assign(pixel_std=r["pixel_std"].where(r.index != 0)), "'pixel_std' has nulls in 1"),
        (lambda r: r.assign(content_hash=r["content_hash"].where(r.index != 0)), "'content_hash' has nulls"),
    ],
)
def test_batch_rejects_malformed_input_clearly(rules, mutate, message):
    with pytest.raises(ValueError, match=message):
        validate_batch(mutate(batch()), rules)


def test_rules_and_arguments_are_checked():
    with pytest.raises(ValueError, match="min_side"):
        BatchRules(classes=CLASSES, min_side=64, max_side=32)
    with pytest.raises(ValueError, match="distinct"):
        BatchRules(classes=("a", "a"))
    with pytest.raises(ValueError, match="split"):
        validate_dataset(dataset().drop(columns=["split"]), CLASSES)
    with pytest.raises(TypeError, match="DataFrame"):
        validate_dataset(dataset().to_dict("records"), CLASSES)
