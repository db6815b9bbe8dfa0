"""The reference baselines: a thumbnail linear model finds coarse cues and misses fine ones."""

from __future__ import annotations

import numpy as np

from mmpipe.baselines import majority, reference_baselines, thumbnail_linear, thumbnails


def _images(n: int, seed: int, fine: bool) -> tuple[np.ndarray, np.ndarray]:
    """Class 1 is brighter (coarse cue) or carries a 1-pixel checkerboard (fine cue, same mean)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    images = rng.integers(90, 110, size=(n, 64, 64)).astype(np.float64)
    if fine:
        checker = (np.indices((64, 64)).sum(0) % 2) * 60 - 30
        images[labels == 1] += checker
    else:
        images[labels == 1] += 40
    return images.clip(0, 255).astype(np.uint8), labels


def test_thumbnails_average_areas() -> None:
    images = np.zeros((1, 32, 32), np.uint8)
    images[0, :16] = 255
    thumb = thumbnails(images, side=2)
    assert thumb.shape == (1, 4) and np.allclose(thumb, [[1, 1, 0, 0]])


def test_linear_thumbnail_learns_coarse_cues_and_misses_fine_ones() -> None:
    for fine, low, high in ((False, 0.95, 1.01), (True, 0.0, 0.7)):
        x, y = _images(300, 0, fine)
        tx, ty = _images(200, 1, fine)
        accuracy = (thumbnail_linear(x, y, tx, 2).argmax(1) == ty).mean()
        assert low <= accuracy < high, (fine, accuracy)


def test_majority_and_names() -> None:
    probs = majority(np.array([2, 2, 1]), 4, 3)
    assert (probs.argmax(1) == 2).all() and np.allclose(probs.sum(1), 1)
    x, y = _images(40, 0, False)
    assert set(reference_baselines(x, y, x[:5], 2)) == {"majority", "linear_thumbnail_16"}
