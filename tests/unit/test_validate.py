"""Great Expectations suites for ingested batches and for the split dataset, run for real on small frames."""

from __future__ import annotations

import json
import posixpath
import re

import pandas as pd
import pytest

from mmpipe.config import CLASSES
from mmpipe.validate import (
    IMAGE_RULES,
    BatchRules,
    ValidationReport,
    bit_depth_problem,
    validate_batch,
    validate_dataset,
)

MODALITY = {"brain_mri": "MR", "chest_xray": "DX", "retinal_oct": None, "lung_ct": "CT", "liver_ct": "CT"}
BATCH_CHECKS = {
    *IMAGE_RULES,
    "class_collapse",
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


def batch(per_class: int = 20) -> pd.DataFrame:
    """A clean batch of 100 images: every class present; retinal OCT arrives as PNG (no Modality header)."""
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
                    "bits_allocated": 8 if MODALITY[label] is None else 16,
                    "float_pixels": False,
                    "photometric": "RGB" if MODALITY[label] is None else "MONOCHROME2",
                    "pixel_std": 30.0 + i,
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
    assert report.success and report.failed_image_ids == [] and report.image_failures == {}
    assert rows["modality"].isna().any()  # a null Modality header must pass the consistency check
    assert check(report, "class_counts").detail["class_counts"] == {c: 20 for c in CLASSES}
    assert {c.severity for c in report.checks if c.name in {"modality_matches_label", "class_counts"}} == {
        "warning"
    }
    assert {c.threshold for c in report.checks if c.scope == "image"} == {0.98}


DEFECTS = {
    "label_in_classes": ("label", "knee_mri"),  # a class the batch was labelled with, not configured
    "rows_in_range": ("orig_rows", 16),
    "cols_in_range": ("orig_cols", 9000),
    "bit_depth_consistent": ("bits_stored", 17),  # more bits stored than the 16 allocated
    "not_blank": ("pixel_std", 0.4),
    "patient_key_present": ("patient_key", None),
}


def spoil(rows: pd.DataFrame, rule: str, n: int) -> list[str]:
    """Give ``n`` images spread over the batch the defect that ``rule`` catches; their ids."""
    column, value = DEFECTS[rule]
    index = rows.index[3 :: len(rows) // n][:n]
    rows.loc[index, column] = value
    return list(rows.loc[index, "image_id"])


@pytest.mark.parametrize("rule", IMAGE_RULES)
def test_one_percent_failing_excludes_only_those_images(rules, rule):
    rows = batch()
    bad = spoil(rows, rule, 1)
    report = validate_batch(rows, rules)
    assert report.success and report.failures("critical") == []
    assert report.image_failures == {rule: bad} and report.failed_image_ids == bad
    judged = check(report, rule)
    assert judged.success and judged.scope == "image" and judged.threshold == 0.98
    assert judged.detail["unexpected_count"] == 1 and judged.detail["unexpected_percent"] == pytest.approx(
        1.0
    )
    assert judged.detail["unexpected_image_ids"] == bad


@pytest.mark.parametrize("rule", IMAGE_RULES)
def test_five_percent_failing_fails_the_batch(rules, rule):
    rows = batch()
    bad = spoil(rows, rule, 5)
    report = validate_batch(rows, rules)
    assert not report.success
    assert [c.name for c in report.failures("critical")] == [rule]
    assert report.image_failures == {rule: bad}
    assert check(report, rule).detail["unexpected_percent"] == pytest.approx(5.0)


def test_thresholds_are_set_per_rule():
    rows = batch()
    spoil(rows, "not_blank", 5)
    spoil(rows, "rows_in_range", 5)
    lenient = BatchRules(classes=CLASSES, rule_mostly={"not_blank": 0.9})
    report = validate_batch(rows, lenient, docs=False)
    assert [c.name for c in report.failures()] == ["rows_in_range"]
    assert check(report, "not_blank").threshold == 0.9 and check(report, "rows_in_range").threshold == 0.98
    assert set(report.image_failures) == {"not_blank", "rows_in_range"}
    assert report.docs == {}
    strict = BatchRules(classes=CLASSES, mostly=1.0)
    rows = batch()
    spoil(rows, "bit_depth_consistent", 1)
    assert [c.name for c in validate_batch(rows, strict, docs=False).failures()] == ["bit_depth_consistent"]


@pytest.mark.parametrize(
    ("stored", "allocated", "photometric", "float_pixels", "problem"),
    [
        (15, 16, "MONOCHROME2", False, None),  # the valid DICOM value a whitelist refused
        (1, 1, "MONOCHROME2", False, None),
        (12, 16, "MONOCHROME1", False, None),
        (8, 8, "RGB", False, None),
        (32, 32, "MONOCHROME2", True, None),
        (24, 32, "YBR_FULL", False, None),
        (17, 16, "MONOCHROME2", False, "BitsStored 17 > BitsAllocated 16"),
        (0, 8, "MONOCHROME2", False, "BitsStored 0 < 1"),
        (32, 32, "MONOCHROME2", False, "BitsAllocated 32 > 16 (grayscale integer)"),
        (64, 64, "MONOCHROME2", True, "BitsAllocated 64 > 32 (float or colour)"),
        (12, 0, None, False, "BitsStored 12 > BitsAllocated 0"),  # no BitsAllocated in the header
    ],
)
def test_bit_depth_is_judged_by_header_consistency(stored, allocated, photometric, float_pixels, problem):
    assert bit_depth_problem(stored, allocated, photometric, float_pixels) == (problem or "consistent")


def test_bit_depth_failures_show_what_is_wrong(rules):
    rows = batch()
    spoil(rows, "bit_depth_consistent", 1)
    detail = check(validate_batch(rows, rules, docs=False), "bit_depth_consistent").detail
    assert detail["unexpected_values"] == [{"value": "BitsStored 17 > BitsAllocated 16", "count": 1}]


def test_class_collapse_fails_a_batch_that_is_mostly_one_class(rules):
    rows = batch()
    rows.loc[5:, "label"] = "chest_xray"  # 95 of 100 images
    report = validate_batch(rows, rules, docs=False)
    assert [c.name for c in report.failures()] == ["class_collapse"]
    assert report.image_failures == {}  # a batch rule excludes no image on its own
    small = rows.iloc[:40]  # a small night may well hold one modality
    assert check(validate_batch(small, rules, docs=False), "class_collapse").success


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
    bad = spoil(rows, "patient_key_present", 1)  # a None among the unexpected values
    rows.loc[0, "modality"] = "CT"  # tuples among the unexpected values
    report = validate_batch(rows, rules, docs=False)
    payload = json.loads(json.dumps(report.to_json(), allow_nan=False))
    assert set(payload) == {"suite", "success", "checks", "failed_image_ids"}
    assert payload["failed_image_ids"] == bad
    assert len(payload["checks"]) == len(BATCH_CHECKS)


RUN_ID = "scheduled__2026-11-23T01:00:00+00:00"


@pytest.fixture(scope="module")
def site(rules) -> dict[str, bytes]:
    rows = batch()
    spoil(rows, "bit_depth_consistent", 1)
    return validate_batch(rows, rules, run_name=RUN_ID, asset="training/").docs


def test_batch_docs_name_the_airflow_run_and_the_ingest_prefix(site):
    index = site["index.html"].decode()
    assert "mmpipe_batch" in index and "expectations/mmpipe_batch.html" in site
    (page,) = [p for p in site if p.startswith(f"validations/mmpipe_batch/{RUN_ID}/")]
    assert page.endswith("-training.html")
    assert f"'run_name': '{RUN_ID}'" in index and "'asset_name': 'training'" in index
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", site[page].decode()))
    assert f"Run Name {RUN_ID}" in text and "Data asset: training" in text
    # GX's own mostly: the page states the threshold and shows the failing share and value
    assert "at least 98 % of the time" in text and "BitsStored 17 > BitsAllocated 16" in text


def test_data_docs_load_nothing_from_the_internet(site):
    pages = {p: b.decode() for p, b in site.items() if p.endswith(".html")}
    assert len(pages) == 3
    for path, html in pages.items():
        remote = re.findall(r'<(?:link|script)\b[^>]*(?:href|src)="(https?:[^"]+)"', html)
        assert remote == [], (path, remote)
        local = re.findall(r'<(?:link|script)\b[^>]*(?:href|src)="([^"#]+\.(?:css|js))"', html)
        assert {"bootstrap.min.css", "jquery.min.js", "bootstrap-table.min.js"} <= {
            u.rsplit("/", 1)[-1] for u in local
        }
        for url in local:  # every stylesheet and script is in the site, relative to the page
            assert posixpath.normpath(posixpath.join(posixpath.dirname(path), url)) in site, (path, url)
        assert "great-expectations-web-assets" not in re.sub(r"<style>.*?</style>", "", html, flags=re.S)


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
        (lambda r: r.drop(columns=["bits_allocated"]), "bits_allocated"),
        (lambda r: r.iloc[0:0], "no catalog rows"),
        (lambda r: r.assign(image_id="same"), "unique"),
        (lambda r: r.assign(orig_rows=r["orig_rows"].astype(str)), "numeric"),
        (lambda r: r.assign(pixel_std=r["pixel_std"].where(r.index != 0)), "'pixel_std' has nulls in 1"),
        (lambda r: r.assign(label=r["label"].where(r.index != 0)), "'label' has nulls"),
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
    with pytest.raises(ValueError, match="no per-image rule named bits_stored_allowed"):
        BatchRules(classes=CLASSES, rule_mostly={"bits_stored_allowed": 0.9})
    with pytest.raises(ValueError, match=r"within \(0, 1\]"):
        BatchRules(classes=CLASSES, rule_mostly={"not_blank": 1.5})
    with pytest.raises(ValueError, match="split"):
        validate_dataset(dataset().drop(columns=["split"]), CLASSES)
    with pytest.raises(TypeError, match="DataFrame"):
        validate_dataset(dataset().to_dict("records"), CLASSES)


def test_validation_settings_become_rules_and_a_bad_one_names_the_fix():
    from mmpipe.config import get_settings
    from mmpipe.dataset import batch_rules
    from mmpipe.errors import ConfigError

    rules = batch_rules(get_settings(validation_mostly=0.95, validation_rule_mostly={"not_blank": 0.9}))
    assert (rules.threshold("not_blank"), rules.threshold("label_in_classes")) == (0.9, 0.95)
    with pytest.raises(ConfigError, match=r"MMPIPE_VALIDATION_.*no per-image rule named bits_stored_allowed"):
        batch_rules(get_settings(validation_rule_mostly={"bits_stored_allowed": 0.9}))
