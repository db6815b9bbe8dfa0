"""What the benches share: sizes, a fresh heap before each timing, throw-away settings."""

from __future__ import annotations

import gc
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mmpipe.config import Settings, get_settings

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
