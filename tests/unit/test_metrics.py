"""Evaluation metrics against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from mmpipe.calibration import expected_calibration_error
from mmpipe.evaluate import compute_metrics

CLASSES = ("a", "b", "c")


def test_metrics_match_hand_computation() -> None:
    labels = np.array([0, 0, 1, 1, 2, 2])
    probs = np.array(
        [
            [0.9, 0.05, 0.05],
            [0.2, 0.7, 0.1],
            [0.1, 0.8, 0.1],
            [0.3, 0.6, 0.1],
            [0.1, 0.1, 0.8],
            [0.6, 0.2, 0.2],
        ]
    )
    m = compute_metrics(labels, probs, CLASSES)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["confusion"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    # class a: TP1 FP1 FN1 -> P .5 R .5; b: TP2 FP1 FN0 -> P 2/3 R 1; c: TP1 FP0 FN1 -> P 1 R .5
    assert m["per_class"]["a"]["precision"] == pytest.approx(0.5)
    assert m["per_class"]["b"]["recall"] == pytest.approx(1.0)
    assert m["per_class"]["c"]["f1"] == pytest.approx(2 / 3)
    # specificity of b: TN = 3 of the 4 non-b images
    assert m["per_class"]["b"]["specificity"] == pytest.approx(3 / 4)
    assert m["macro_f1"] == pytest.approx(np.mean([0.5, 0.8, 2 / 3]))
    assert 0.5 < m["macro_auc"] <= 1.0


def test_auc_is_none_for_a_class_absent_from_the_test_set() -> None:
    m = compute_metrics(np.array([0, 1, 0, 1]), np.eye(3)[[0, 1, 0, 1]] * 0.9 + 0.03, CLASSES)
    assert m["per_class"]["c"]["auc"] is None
    assert m["macro_auc"] == pytest.approx(1.0)


def test_ece_zero_when_confidence_equals_accuracy() -> None:
    probs = np.array([[0.75, 0.25]] * 4)
    labels = np.array([0, 0, 0, 1])  # 75% confident, 75% right
    ece, table = expected_calibration_error(probs, labels)
    assert ece == pytest.approx(0.0)
    assert table == [(0.75, 0.75, 4)]
    overconfident, _ = expected_calibration_error(np.array([[0.95, 0.05]] * 4), np.array([0, 1, 1, 1]))
    assert overconfident == pytest.approx(0.7)


def test_stage_two_marker_is_the_first_epoch_recorded_in_stage_two() -> None:
    from mmpipe.evaluate import stage_two_start

    two = [{"epoch": e, "stage": s} for e, s in enumerate([1, 1, 1, 2, 2])]
    assert stage_two_start(two) == 3
    assert stage_two_start(two[:3]) is None  # stopped in stage 1: no marker
