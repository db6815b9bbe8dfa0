"""What the benches share: sizes, a fresh heap before each timing, throw-away settings and seeded
buckets, and the naive loops' decode."""

from __future__ import annotations

import gc
import io
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from PIL import Image

from mmpipe import embedded
from mmpipe.config import Settings, get_settings
from mmpipe.store import Store, open_store

SOURCE_SIZE = 64  # side of the synthetic DICOM images
CANONICAL_SIZE = 64  # side both sides resize to


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """``fn()`` and its wall time, started from a collected heap: a nightly run starts in a fresh
    process, so the previous section's garbage is not this section's cost."""
    gc.collect()
    started = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - started


def bench_settings(home: Path, endpoint: str, **overrides: Any) -> Settings:
    return get_settings(
        home=home,
        s3_endpoint_url=endpoint,
        s3_bucket=f"bench-{uuid.uuid4().hex[:12]}",
        s3_access_key_id="bench",
        s3_secret_access_key="bench-secret",
        database_url=f"sqlite:///{home / 'catalog.db'}",
        pseudonym_salt="bench-salt-not-secret",
        image_size=CANONICAL_SIZE,
        **overrides,
    )


@contextmanager
def throwaway_store(workdir: Path) -> Iterator[embedded.EmbeddedStore]:
    """A fresh embedded store under ``workdir``, stopped on the way out whatever happened."""
    server = embedded.start(workdir / "store")
    try:
        yield server
    finally:
        embedded.stop(server)


def seeded_sides(
    workdir: Path, endpoint: str, objects: Mapping[str, bytes], **overrides: Any
) -> dict[str, tuple[Settings, Store]]:
    """The naive and the mmpipe side: each its own settings and a fresh bucket holding ``objects``."""
    sides = {}
    for side in ("naive", "mmpipe"):
        settings = bench_settings(workdir / side, endpoint, **overrides)
        store = open_store(settings)
        store.ensure_bucket()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda item, s=store: s.put(*item), objects.items()))
        sides[side] = (settings, store)
    return sides


def naive_pixels(body: bytes, size: int) -> np.ndarray:
    """What a first script does with a DICOM object: ``dcmread`` -> ``pixel_array`` -> min-max scale
    to uint8 -> bilinear resize to ``size``."""
    pixels = pydicom.dcmread(io.BytesIO(body)).pixel_array.astype(np.float32)
    lo, hi = float(pixels.min()), float(pixels.max())
    scaled = ((pixels - lo) * (255.0 / max(hi - lo, 1e-6))).astype(np.uint8)
    return np.asarray(Image.fromarray(scaled).resize((size, size), Image.Resampling.BILINEAR))
