"""The open set: what one object's images say, and why a human should look.

A classifier of five modalities gives one of five answers for anything, an ultrasound or a scanned
letter included. Scoring therefore asks three more questions of every object, each answered from
what the model card recorded on the validation split or from the object's own header:

- ``out_of_distribution``: the energy of the temperature-scaled logits is above the card's
  threshold (:mod:`mmpipe.calibration`), or the image's features are further from every class
  than the validation images are (:class:`FeatureStats`, a Mahalanobis distance); an object whose
  images all are becomes ``unknown``. The energy alone misses most photographs and documents: a
  small model is as sure of them as of its classes;
- ``header_disagrees``: the DICOM header contradicts the prediction under the header rules of
  labelling (:mod:`mmpipe.labels`): a rule names another class (Modality MR predicted as lung CT),
  or the predicted class's rules admit no such modality (an ultrasound, Modality US, predicted as
  any of the five);
- ``low_confidence`` and ``members_disagree``: a top probability under ``low_confidence``, or
  images of one object (an archive, a series) predicted as different classes.

``mmpipe-review=yes`` always comes with these reasons. Pure functions on arrays.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from mmpipe.calibration import energy, probabilities
from mmpipe.labels import HeaderRule, parse_rules

LOW_CONFIDENCE, OUT_OF_DISTRIBUTION = "low_confidence", "out_of_distribution"
HEADER_DISAGREES, MEMBERS_DISAGREE = "header_disagrees", "members_disagree"
REASONS = (OUT_OF_DISTRIBUTION, HEADER_DISAGREES, MEMBERS_DISAGREE, LOW_CONFIDENCE)

#: Header rules for the header check when no ``label_rules`` are configured: what each default
#: class's DICOM says about itself (rules naming classes that are not configured are left out).
DEFAULT_HEADER_RULES: tuple[dict[str, str], ...] = (
    {"modality": "MR", "label": "brain_mri"},
    {"modality": "CR|DX", "label": "chest_xray"},
    {"modality": "OPT|OCT", "label": "retinal_oct"},
    {"modality": "CT", "body_part": "CHEST|LUNG|THORAX", "label": "lung_ct"},
    {"modality": "CT", "body_part": "ABDOMEN|LIVER|ABDOMENPELVIS", "label": "liver_ct"},
)


def header_rules(configured: Sequence[Mapping[str, str]], classes: Sequence[str]) -> tuple[HeaderRule, ...]:
    """The rules of the header check: the configured labelling rules, else the defaults for the classes."""
    raw = configured or [r for r in DEFAULT_HEADER_RULES if r["label"] in classes]
    return parse_rules(raw, classes)


def header_contradicts(
    rules: Sequence[HeaderRule], predicted: str, modality: str | None, body_part: str | None
) -> bool:
    """Whether a header (Modality, BodyPartExamined) contradicts ``predicted`` under ``rules``."""
    if not (modality or "").strip():
        return False
    matching = {r.label for r in rules if r.matches(modality, body_part, None)}
    if matching:
        return predicted not in matching
    own = [r for r in rules if r.label == predicted]
    value = modality.strip().upper()
    return bool(own) and all(r.modality is not None and value not in r.modality for r in own)


#: Share of validation images the feature check lets pass (the energy check has the card's recall).
FEATURE_RECALL = 0.975
SHRINKAGE = 0.1  # of the covariance towards its mean variance: few images per feature dimension


@dataclass(frozen=True)
class FeatureStats:
    """Class means and a shared precision matrix of a model's penultimate features, fitted on the
    training split, with the Mahalanobis distance below which FEATURE_RECALL of validation lies."""

    means: np.ndarray  # (C, D)
    precision: np.ndarray  # (D, D)
    threshold: float
    recall: float

    def distance(self, features: np.ndarray) -> np.ndarray:
        """Squared Mahalanobis distance (N,) to the nearest class mean."""
        diff = np.asarray(features, np.float64)[:, None, :] - self.means[None]
        return np.einsum("nkd,de,nke->nk", diff, self.precision, diff).min(1)

    def to_npz(self) -> dict[str, np.ndarray]:
        return {
            "means": self.means,
            "precision": self.precision,
            "threshold": np.array([self.threshold, self.recall]),
        }

    @classmethod
    def from_npz(cls, arrays: Mapping[str, np.ndarray]) -> FeatureStats:
        threshold, recall = arrays["threshold"]
        return cls(arrays["means"], arrays["precision"], float(threshold), float(recall))


def fit_features(
    train: np.ndarray, train_labels: np.ndarray, val: np.ndarray, classes: int, recall: float = FEATURE_RECALL
) -> FeatureStats:
    """Class means and shrunk shared covariance on the training features; threshold on validation."""
    train = np.asarray(train, np.float64)
    present = [c for c in range(classes) if (train_labels == c).any()]
    means = np.stack([train[train_labels == c].mean(0) for c in present])
    centred = train - means[np.searchsorted(present, train_labels)]
    cov = centred.T @ centred / max(len(train) - 1, 1)
    cov = (1 - SHRINKAGE) * cov + SHRINKAGE * np.trace(cov) / len(cov) * np.eye(len(cov))
    stats = FeatureStats(means, np.linalg.pinv(cov), 0.0, recall)
    scores = stats.distance(val)
    threshold = float(np.quantile(scores, recall, method="higher"))
    return FeatureStats(means, stats.precision, threshold, float((scores <= threshold).mean()))


@dataclass
class Assessment:
    """What scoring concludes about one object from its images."""

    unknown: bool  # every image is out of distribution
    modality: str | None  # the predicted class (None when unknown)
    confidence: float  # mean probability of that class over the in-distribution images
    reasons: list[str] = field(default_factory=list)  # why a human should look, in REASONS order
    probs: np.ndarray | None = None  # (N, C) temperature-scaled probabilities per image
    energies: np.ndarray | None = None  # (N,) OOD score per image
    ood: np.ndarray | None = None  # (N,) bool

    @property
    def review(self) -> bool:
        return bool(self.reasons)


def assess(
    logits: np.ndarray,
    classes: Sequence[str],
    temperature: float,
    ood_threshold: float | None,
    low_confidence: float,
    headers: Sequence[tuple[str | None, str | None]] = (),
    rules: Sequence[HeaderRule] = (),
    far: np.ndarray | None = None,
) -> Assessment:
    """One object's verdict from its images' raw logits (N, C), their DICOM headers
    ((Modality, BodyPartExamined) per image; None where there is no header) and whether their
    features lie beyond the feature threshold (``far``, (N,) bool, when the model has FeatureStats)."""
    probs = probabilities(logits, temperature)
    scores = energy(logits, temperature)
    ood = scores > ood_threshold if ood_threshold is not None else np.zeros(len(probs), bool)
    if far is not None:
        ood = ood | far
    keep = ~ood
    if not keep.any():
        return Assessment(True, None, 0.0, [OUT_OF_DISTRIBUTION], probs, scores, ood)
    mean = probs[keep].mean(0)
    top = int(mean.argmax())
    predicted = probs.argmax(1)
    found = {
        OUT_OF_DISTRIBUTION: bool(ood.any()),
        HEADER_DISAGREES: any(
            header_contradicts(rules, classes[p], *h)
            for h, p, k in zip(headers, predicted, keep, strict=False)
            if k
        ),
        MEMBERS_DISAGREE: bool((predicted[keep] != top).any()),
        LOW_CONFIDENCE: bool((probs[keep].max(1) < low_confidence).any()),
    }
    reasons = [r for r in REASONS if found[r]]
    return Assessment(False, classes[top], float(mean[top]), reasons, probs, scores, ood)
