"""Calibration and the open set: what a model's scores mean, fitted on the validation split.

Temperature scaling (one scalar dividing the logits, fitted by minimising the validation NLL)
makes confidences honest without changing any prediction; ECE measures it before and after. The
out-of-distribution score is the energy of the temperature-scaled logits, with its threshold set
so that a stated share of in-distribution validation images pass (``ood_recall``). Both are fitted
once at training time, stored in the model card and replayed by scoring. Pure functions on arrays.
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass

import numpy as np
from scipy.optimize import minimize_scalar

ECE_BINS = 10
#: Temperatures outside this range mean a broken model or a degenerate validation split.
TEMPERATURE_BOUNDS = (0.05, 20.0)
#: Weight of the (log T)^2 prior in the fit: negligible beside a real NLL gain, decisive when there is none.
TEMPERATURE_PRIOR = 0.01
#: Share of in-distribution validation images that must pass the OOD threshold.
DEFAULT_OOD_RECALL = 0.95


@dataclass(frozen=True)
class Calibration:
    """What :func:`calibrate` fitted; stored in the model card."""

    temperature: float
    ece_before: float
    ece_after: float
    nll_before: float
    nll_after: float
    ood_score: str  # "energy": -T * logsumexp(logits / T); higher = less like the training data
    ood_threshold: float  # energy above this = out of distribution
    ood_recall: float  # share of validation images at or below the threshold

    def to_json(self) -> dict[str, float | str]:
        return asdict(self)


def expected_calibration_error(
    probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS
) -> tuple[float, list]:
    """Top-label ECE with equal-width confidence bins; also the per-bin (confidence, accuracy, count)."""
    confidence = probs.max(1)
    correct = probs.argmax(1) == labels
    edges = np.linspace(0, 1, bins + 1)
    ece, table = 0.0, []
    for lo, hi in itertools.pairwise(edges):
        mask = (confidence > lo) & (confidence <= hi)
        if mask.any():
            conf, acc = float(confidence[mask].mean()), float(correct[mask].mean())
            ece += mask.mean() * abs(conf - acc)
            table.append((conf, acc, int(mask.sum())))
    return float(ece), table


def _scaled(logits: np.ndarray, temperature: float) -> tuple[np.ndarray, np.ndarray]:
    """(``logits / temperature`` in float64 for stable tails, its row-wise logsumexp), in plain numpy:
    scoring assesses each object apart, where scipy's per-call overhead cost more than the model."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    top = z.max(axis=1, keepdims=True)
    return z, (top + np.log(np.exp(z - top).sum(axis=1, keepdims=True)))[:, 0]


def probabilities(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Softmax of ``logits / temperature`` (N, C)."""
    z, lse = _scaled(logits, temperature)
    return np.exp(z - lse[:, None])


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the true labels at ``temperature``."""
    z, lse = _scaled(logits, temperature)
    return float((lse - z[np.arange(len(labels)), labels]).mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature minimising validation NLL plus a weak prior towards 1 (searched in log space,
    within TEMPERATURE_BOUNDS). Without the prior, a validation split the model separates perfectly
    (common on small, easy splits) has its NLL fall towards 0 as T -> 0, and the fit sharpens every
    probability to the bound: confidence 1.000 for the wrong answers too."""
    if len(labels) == 0:
        raise ValueError("cannot fit a temperature on an empty validation split")
    lo, hi = np.log(TEMPERATURE_BOUNDS)
    result = minimize_scalar(
        lambda log_t: nll(logits, labels, float(np.exp(log_t))) + TEMPERATURE_PRIOR * log_t**2,
        bounds=(lo, hi),
        method="bounded",
    )
    return float(np.exp(result.x))


def energy(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Energy score per image, ``-T * logsumexp(logits / T)``: higher = further from the training data."""
    return -temperature * _scaled(logits, temperature)[1]


def ood_threshold(in_distribution: np.ndarray, recall: float = DEFAULT_OOD_RECALL) -> float:
    """The score below or at which ``recall`` of the in-distribution scores lie."""
    if not 0 < recall <= 1:
        raise ValueError(f"recall must be within (0, 1], got {recall}")
    return float(np.quantile(np.asarray(in_distribution, dtype=np.float64), recall, method="higher"))


def calibrate(logits: np.ndarray, labels: np.ndarray, recall: float = DEFAULT_OOD_RECALL) -> Calibration:
    """Fit temperature and OOD threshold on validation logits (N, C) and labels (N,)."""
    temperature = fit_temperature(logits, labels)
    scores = energy(logits, temperature)
    threshold = ood_threshold(scores, recall)
    return Calibration(
        temperature=temperature,
        ece_before=expected_calibration_error(probabilities(logits), labels)[0],
        ece_after=expected_calibration_error(probabilities(logits, temperature), labels)[0],
        nll_before=nll(logits, labels),
        nll_after=nll(logits, labels, temperature),
        ood_score="energy",
        ood_threshold=threshold,
        ood_recall=float((scores <= threshold).mean()),
    )
