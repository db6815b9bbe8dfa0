"""The tag budget and the open-set verdict: pure functions, checked on the cases that break them."""

from __future__ import annotations

import numpy as np
import pytest

from mmpipe import openset, tagging
from mmpipe.calibration import calibrate, energy
from mmpipe.labels import parse_rules

OURS = {"mmpipe-modality": "lung_ct", "mmpipe-review": "yes", "mmpipe-review-reason": "low_confidence",
        "mmpipe-confidence": "0.512", "mmpipe-model": "m1", "mmpipe-images": "1"}  # fmt: skip
CLASSES = ("a", "b", "c")


@pytest.mark.parametrize("foreign", [0, 5, 8, 10])
def test_budget_keeps_foreign_tags_and_fills_the_rest_in_priority_order(foreign) -> None:
    current = {f"dept-{i}": str(i) for i in range(foreign)} | {
        "mmpipe-modality": "brain_mri",
        "mmpipe-old": "x",
    }
    plan = tagging.plan_tags(current, OURS)
    assert len(plan.tags) <= tagging.MAX_TAGS
    assert {k: v for k, v in plan.tags.items() if k.startswith("dept-")} == {
        f"dept-{i}": str(i) for i in range(foreign)
    }
    assert "mmpipe-old" not in plan.tags  # a previous model's own tags are replaced
    room = min(tagging.MAX_TAGS - foreign, len(OURS))
    assert list(plan.written) == list(OURS)[:room] and list(plan.left_out) == list(OURS)[room:]
    assert plan.fits == (room > 0)


def test_values_are_made_acceptable_to_s3() -> None:
    assert tagging.clean_value("a,b;c" + "x" * 300) == "a_b_c" + "x" * 251


def logits_for(rows) -> np.ndarray:
    return np.array(rows, dtype=np.float64)


def test_confident_agreeing_images_need_no_review() -> None:
    a = openset.assess(logits_for([[9, 0, 0], [8, 1, 0]]), CLASSES, 1.0, None, 0.6)
    assert (a.unknown, a.modality, a.reasons, a.review) == (False, "a", [], False)


def test_every_review_carries_its_reasons() -> None:
    mixed = logits_for([[9, 0, 0], [0, 9, 0], [1, 1, 0.9]])
    rules = parse_rules([{"modality": "CT", "label": "c"}, {"modality": "MR", "label": "b"}], CLASSES)
    a = openset.assess(mixed, CLASSES, 1.0, None, 0.6, [(None, None), ("CT", None), ("", "")], rules)
    assert a.review and a.reasons == ["header_disagrees", "members_disagree", "low_confidence"]


def test_energy_threshold_separates_the_open_set() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 300)
    val = rng.normal(0, 1, (300, 3))
    val[np.arange(300), labels] += 8  # in distribution: one large logit
    cal = calibrate(val, labels, recall=0.95)
    far = rng.normal(0, 1, (50, 3))  # nothing stands out: high energy
    assert (energy(far, cal.temperature) > cal.ood_threshold).mean() > 0.9
    a = openset.assess(far, CLASSES, cal.temperature, cal.ood_threshold, 0.6)
    assert a.unknown and a.modality is None and a.reasons == ["out_of_distribution"]
    part = openset.assess(np.vstack([val[:3], far[:1]]), CLASSES, cal.temperature, cal.ood_threshold, 0.6)
    assert not part.unknown and "out_of_distribution" in part.reasons


@pytest.mark.parametrize(
    ("predicted", "modality", "body_part", "contradicts"),
    [
        ("lung_ct", "MR", "HEAD", True),  # a rule names another class
        ("lung_ct", "CT", "CHEST", False),
        ("liver_ct", "CT", "CHEST", True),
        ("liver_ct", "CT", "", False),  # CT without a body part: either CT class
        ("chest_xray", "US", "ABDOMEN", True),  # no rule of the class admits ultrasound
        ("brain_mri", None, None, False),  # no header: nothing to contradict
    ],
)
def test_header_check_uses_the_labelling_rules(predicted, modality, body_part, contradicts) -> None:
    rules = openset.header_rules([], ("brain_mri", "chest_xray", "retinal_oct", "lung_ct", "liver_ct"))
    assert openset.header_contradicts(rules, predicted, modality, body_part) is contradicts


def test_default_header_rules_cover_only_configured_classes() -> None:
    rules = openset.header_rules([], ("brain_mri", "lung_ct"))
    assert {r.label for r in rules} == {"brain_mri", "lung_ct"}
    assert any(r.matches("MR", None, None) and r.label == "brain_mri" for r in rules)


def test_feature_check_flags_what_lies_far_from_every_class() -> None:
    rng = np.random.default_rng(1)
    centres = rng.normal(0, 5, (3, 8))
    labels = rng.integers(0, 3, 400)
    train = centres[labels] + rng.normal(0, 1, (400, 8))
    val = centres[labels[:200]] + rng.normal(0, 1, (200, 8))
    stats = openset.fit_features(train, labels, val, 3)
    assert stats.recall >= openset.FEATURE_RECALL
    fresh = centres[labels[:300] % 3] + rng.normal(0, 1, (300, 8))
    assert (stats.distance(fresh) > stats.threshold).mean() < 0.06  # in distribution: mostly passes
    far = rng.normal(0, 1, (100, 8)) * 3 + 20
    assert (stats.distance(far) > stats.threshold).all()
    again = openset.FeatureStats.from_npz(stats.to_npz())
    assert again.threshold == stats.threshold and np.allclose(again.distance(far), stats.distance(far))
