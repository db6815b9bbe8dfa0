"""``mmpipe bench ingest``: both sides get the same synthetic DICOM objects, each in a fresh bucket of
one throw-away embedded store (SeaweedFS) on this machine. The naive loop is what a first script
does: list, then for each object get -> ``dcmread`` -> ``pixel_array`` -> min-max scale -> resize ->
put one file per image. mmpipe's side is the real :func:`mmpipe.ingest.run` (catalog on the embedded
SQLite default), whose figure includes everything the naive loop skips (pseudonyms, dedupe,
quarantine, catalog rows). A second run with nothing new measures the cost of an idle nightly run.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from mmpipe import decoding, ingest, synth
from mmpipe.bench.common import (
    CANONICAL_SIZE,
    SOURCE_SIZE,
    naive_pixels,
    seeded_sides,
    throwaway_store,
    timed,
)
from mmpipe.catalog import open_catalog, upgrade
from mmpipe.errors import ConfigError, MmpipeError
from mmpipe.progress import progress
from mmpipe.store import Store

PREFIX = ingest.TRAINING_PREFIX


def naive_ingest(store: Store, prefix: str, size: int) -> int:
    """The baseline: one object at a time, one output file per image."""
    done = 0
    for obj in progress(store.list(prefix), desc="naive loop", unit="obj"):
        resized = naive_pixels(store.get(obj.key), size)
        buffer = io.BytesIO()
        np.save(buffer, resized)
        store.put(f"naive/{obj.key}.npy", buffer.getvalue())
        done += 1
    return done


def bench(objects: int, workdir: Path) -> dict[str, Any]:
    if objects < 1:
        raise ConfigError(f"--objects must be at least 1, got {objects}")
    with throwaway_store(workdir) as server:
        print(f"generating {objects} synthetic DICOM objects ({SOURCE_SIZE} px)...", flush=True)
        corpus = list(synth.generate(objects, size=SOURCE_SIZE, formats={"dicom": 1.0}, archive_fraction=0))
        sides = seeded_sides(workdir, server.endpoint, {PREFIX + o.key: o.body for o in corpus})

        _, naive_store = sides["naive"]
        done, naive_s = timed(lambda: naive_ingest(naive_store, PREFIX, CANONICAL_SIZE))
        print(f"naive sequential loop: {done} objects in {naive_s:.1f} s = {done / naive_s:.1f} objects/s")

        settings, store = sides["mmpipe"]
        catalog = open_catalog(settings)
        upgrade(catalog)
        first, mmpipe_s = timed(lambda: ingest.run(settings, store, catalog, "bench-first"))
        if first["images"] != objects:
            raise MmpipeError(f"bench corpus not fully ingested: {json.dumps(first)}")
        print(
            f"mmpipe ingest ({decoding.decode_processes(settings)} decode processes): {first['new_objects']} "
            f"objects in {mmpipe_s:.1f} s = {objects / mmpipe_s:.1f} objects/s"
        )
        rerun, rerun_s = timed(lambda: ingest.run(settings, store, catalog, "bench-rerun"))
        print(f"rerun with nothing new: {rerun['new_objects']} objects in {rerun_s:.2f} s")
        catalog.dispose()
    mmpipe_rate, naive_rate = objects / mmpipe_s, done / naive_s
    return {
        "bench": "ingest",
        "objects": objects,
        "mmpipe_per_s": round(mmpipe_rate, 2),
        "naive_per_s": round(naive_rate, 2),
        "speedup": round(mmpipe_rate / naive_rate, 2),
        "rerun_fraction": round(rerun_s / mmpipe_s, 4),
    }
