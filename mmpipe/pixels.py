"""Pixel normalisation shared by ingest and scoring, so both see identical inputs.

Contract: a 2-D float array in the modality's native units (after rescale slope/intercept,
MONOCHROME1 inversion and any VOI window already applied by the decoder) becomes a square
``uint8`` image of side ``size``: intensities scaled between the 0.5th and 99.5th percentiles
(robust to hot pixels and padding), then an aspect-preserving resize and centred zero padding.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

LOW_PERCENTILE = 0.5
HIGH_PERCENTILE = 99.5


def scale_to_uint8(array: np.ndarray, window: tuple[float, float] | None = None) -> np.ndarray:
    """Map intensities to 0..255: within ``window`` (centre-width already resolved) or robust percentiles."""
    data = np.asarray(array, dtype=np.float32)
    if window is None:
        lo, hi = np.percentile(data, [LOW_PERCENTILE, HIGH_PERCENTILE])
    else:
        lo, hi = window
    if hi <= lo:
        return np.zeros(data.shape, dtype=np.uint8)
    scaled = (np.clip(data, lo, hi) - lo) * (255.0 / (hi - lo))
    return np.rint(scaled).astype(np.uint8)


def resize_pad(image: np.ndarray, size: int) -> np.ndarray:
    """Aspect-preserving resize of a 2-D uint8 image so its long side is ``size``, centred on zeros."""
    rows, cols = image.shape
    scale = size / max(rows, cols)
    new_rows, new_cols = max(1, round(rows * scale)), max(1, round(cols * scale))
    resized = np.asarray(Image.fromarray(image).resize((new_cols, new_rows), Image.Resampling.BILINEAR))
    out = np.zeros((size, size), dtype=np.uint8)
    top, left = (size - new_rows) // 2, (size - new_cols) // 2
    out[top : top + new_rows, left : left + new_cols] = resized
    return out


def normalise(array: np.ndarray, size: int, window: tuple[float, float] | None = None) -> np.ndarray:
    """Native-unit 2-D array -> canonical ``size``x``size`` uint8 image (see module doc)."""
    if array.ndim != 2:
        raise ValueError(f"normalise expects a 2-D array, got shape {array.shape}")
    return resize_pad(scale_to_uint8(array, window), size)
