"""The shared normalisation: robust scaling, aspect-preserving resize and padding."""

from __future__ import annotations

import numpy as np
import pytest

from mmpipe.pixels import normalise, resize_pad, scale_to_uint8


def test_percentile_scaling_ignores_hot_pixels() -> None:
    ramp = np.tile(np.linspace(-1000, 1000, 200), (200, 1))
    ramp[0, 0] = 1e9  # one hot pixel must not crush the contrast of everything else
    out = scale_to_uint8(ramp)
    assert out.dtype == np.uint8
    assert out.min() == 0 and out.max() == 255
    assert 120 < out[:, 95:105].mean() < 135


def test_window_clips_outside_values() -> None:
    hu = np.array([[-2000, -160, 40, 240, 3000]], dtype=np.float32)
    assert scale_to_uint8(hu, window=(-160, 240)).tolist() == [[0, 0, 128, 255, 255]]


def test_constant_image_is_black_not_nan() -> None:
    assert not scale_to_uint8(np.full((8, 8), 7.0)).any()


def test_resize_keeps_aspect_and_centres() -> None:
    wide = np.full((50, 100), 200, dtype=np.uint8)
    out = resize_pad(wide, 64)
    assert out.shape == (64, 64)
    rows = np.flatnonzero(out.any(axis=1))
    assert (rows.min(), rows.max()) == (16, 47)  # 32 rows of content, centred
    assert out[:, 0].any() and out[:, 63].any()


def test_normalise_rejects_non_2d() -> None:
    with pytest.raises(ValueError, match="2-D"):
        normalise(np.zeros((3, 8, 8)), 16)
