"""Temperature scaling and the energy OOD threshold on synthetic logits with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from mmpipe.calibration import (
    calibrate,
    energy,
    expected_calibration_error,
    fit_temperature,
    nll,
    ood_threshold,
    probabilities,
)


def _overconfident(
    n: int = 2000, k: int = 5, scale: float = 4.0, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Logits drawn from a well-calibrated model, then multiplied by ``scale`` (overconfidence)."""
    rng = np.random.default_rng(seed)
    honest = rng.normal(0, 1.5, size=(n, k))
    labels = np.array([rng.choice(k, p=p) for p in probabilities(honest)])
    return honest * scale, labels


def test_temperature_recovers_the_overconfidence_factor() -> None:
    logits, labels = _overconfident(scale=4.0)
    t = fit_temperature(logits, labels)
    assert 3.4 < t < 4.6
    assert nll(logits, labels, t) < nll(logits, labels) - 0.3


def test_a_perfectly_separated_validation_split_does_not_sharpen_to_the_bound() -> None:
    """With every validation image right by a wide margin, NLL only falls as T -> 0: the fit must not
    follow it (the unregularised fit went to the 0.05 bound on the demo's Lite0)."""
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 5, 300)
    logits = rng.normal(0, 1, (300, 5))
    logits[np.arange(300), labels] += 9.0
    assert (logits.argmax(1) == labels).all()
    assert 0.5 < fit_temperature(logits, labels) <= 1.0


def test_calibration_lowers_ece_and_keeps_predictions() -> None:
    logits, labels = _overconfident(scale=3.0)
    cal = calibrate(logits, labels)
    assert cal.ece_after < 0.5 * cal.ece_before
    assert (probabilities(logits, cal.temperature).argmax(1) == logits.argmax(1)).all()


def test_ood_threshold_keeps_the_stated_recall_and_flags_flat_logits() -> None:
    logits, labels = _overconfident(scale=3.0)
    cal = calibrate(logits, labels, recall=0.95)
    assert cal.ood_recall == pytest.approx(0.95, abs=0.005)
    # Flat, low logits (no class recognised) have high energy: out of distribution.
    flat = np.full((10, 5), -5.0)
    assert (energy(flat, cal.temperature) > cal.ood_threshold).all()


def test_ece_of_a_perfectly_calibrated_bin_is_zero() -> None:
    probs = np.array([[0.75, 0.25]] * 4)
    ece, table = expected_calibration_error(probs, np.array([0, 0, 0, 1]))
    assert ece == pytest.approx(0.0) and table == [(0.75, 0.75, 4)]


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError):
        fit_temperature(np.zeros((0, 3)), np.zeros(0, dtype=int))
    with pytest.raises(ValueError):
        ood_threshold(np.ones(3), recall=0)
