"""Reference baselines on the same data as a candidate: what a deep model must beat to matter.

A majority-class guess and a linear model (logistic regression) on 16×16 thumbnails. When the
thumbnail model is nearly as good as a fine-tuned CNN, the benchmark cannot rank backbones and a
promotion gate on it decides noise; the gate therefore requires a margin over it.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

THUMBNAIL_SIDE = 16


def thumbnails(images: np.ndarray, side: int = THUMBNAIL_SIDE) -> np.ndarray:
    """uint8 images (N, H, W) -> area-averaged ``side``×``side`` thumbnails, flattened (N, side²) in [0, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(images)).float().unsqueeze(1) / 255.0
    return F.adaptive_avg_pool2d(x, side).flatten(1).numpy()


def majority(train_labels: np.ndarray, n_test: int, n_classes: int) -> np.ndarray:
    """Probabilities (n_test, C) of always answering the most frequent training class."""
    probs = np.zeros((n_test, n_classes))
    probs[:, np.bincount(train_labels, minlength=n_classes).argmax()] = 1.0
    return probs


def thumbnail_linear(
    train_images: np.ndarray,
    train_labels: np.ndarray,
    test_images: np.ndarray,
    n_classes: int,
    side: int = THUMBNAIL_SIDE,
) -> np.ndarray:
    """Probabilities (N, C) of a standardised logistic regression on thumbnails (deterministic)."""
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    model.fit(thumbnails(train_images, side), train_labels)
    probs = np.zeros((len(test_images), n_classes))
    probs[:, model.classes_] = model.predict_proba(thumbnails(test_images, side))
    return probs


def reference_baselines(
    train_images: np.ndarray, train_labels: np.ndarray, test_images: np.ndarray, n_classes: int
) -> dict[str, np.ndarray]:
    """Both baselines' test probabilities, by name."""
    return {
        "majority": majority(train_labels, len(test_images), n_classes),
        f"linear_thumbnail_{THUMBNAIL_SIDE}": thumbnail_linear(
            train_images, train_labels, test_images, n_classes
        ),
    }
