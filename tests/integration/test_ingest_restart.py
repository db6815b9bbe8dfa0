"""A run SIGKILLed half-way and restarted finishes the remaining work: no duplicates, full accounting,
and the same catalog a clean run produces."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import MRImageStorage, generate_uid

from mmpipe import ingest

pytestmark = pytest.mark.integration

N_OBJECTS = 60
BATCH = 4
CHILD = f"""
import json, sys
from mmpipe import ingest
from mmpipe.catalog import open_catalog
from mmpipe.config import get_settings
from mmpipe.store import open_store
settings = get_settings(**json.loads(sys.argv[1]))
ingest.run(settings, open_store(settings), open_catalog(settings), "nightly", batch_size={BATCH})
"""


def dicom(n: int) -> bytes:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID, ds.StudyInstanceUID = MRImageStorage, generate_uid(), generate_uid()
    ds.Modality, ds.PatientID = "MR", f"P{n // 3:03d}"
    pixels = (
        np.random.default_rng(n).integers(0, 4000, (384, 384)).astype(np.uint16)
    )  # slow enough to interrupt
    ds.set_pixel_data(pixels, "MONOCHROME2", 16)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def objects() -> dict[str, bytes]:
    bodies = {f"training/brain_mri/E{n:03d}/im.dcm": dicom(n) for n in range(N_OBJECTS - 2)}
    bodies["training/brain_mri/E900/copy.dcm"] = bodies["training/brain_mri/E000/im.dcm"]
    bodies["training/brain_mri/E901/bad.dcm"] = b"not dicom" * 50
    return bodies


def overrides(settings) -> dict[str, object]:
    return {
        "home": str(settings.home),
        "s3_endpoint_url": settings.s3_endpoint_url,
        "s3_bucket": settings.s3_bucket,
        "s3_access_key_id": settings.s3_access_key_id.get_secret_value(),
        "s3_secret_access_key": settings.s3_secret_access_key.get_secret_value(),
        "pseudonym_salt": settings.pseudonym_salt.get_secret_value(),
        "database_url": settings.database_url,
        "image_size": settings.image_size,
        "ingest_processes": 2,
    }


def outcome(catalog) -> dict[str, object]:
    images = catalog.query(
        "SELECT image_id, source_key, member_path, label, patient_key, study_key, status FROM images"
    )
    return {
        "images": sorted(map(repr, images)),
        "sources": sorted(
            (r["source_key"], r["status"]) for r in catalog.query("SELECT * FROM source_objects")
        ),
        "duplicates": sorted(
            (r["source_key"], r["duplicate_of"]) for r in catalog.query("SELECT * FROM duplicates")
        ),
        "quarantine": sorted(
            (r["source_key"], r["reason"]) for r in catalog.query("SELECT * FROM quarantine")
        ),
    }


def test_killed_run_restarts_without_duplicates(ready, pg_url) -> None:
    settings, store, catalog = ready(database_url=pg_url)
    bodies = objects()
    for key, body in bodies.items():
        store.put(key, body)

    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, json.dumps(overrides(settings))],
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 60
    committed = 0
    while time.monotonic() < deadline and child.poll() is None:
        committed = catalog.scalar("SELECT count(*) FROM source_objects")
        if committed >= 2 * BATCH:
            break
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL, child.stderr.read().decode()[-2000:]
    survivors = _survivors(settings.s3_bucket)
    for pid in survivors:
        os.kill(pid, signal.SIGKILL)
    assert survivors == []  # its decode processes died with it
    at_kill = catalog.scalar("SELECT count(*) FROM source_objects")
    assert 0 < at_kill < N_OBJECTS  # really killed half-way
    assert catalog.scalar("SELECT status FROM ingest_runs WHERE run_id = 'nightly'") == "running"

    # Airflow retries the same run; everything already committed is skipped
    report = ingest.run(settings, store, catalog, "nightly", batch_size=BATCH)
    assert report["new_objects"] == N_OBJECTS - at_kill
    assert report["ingested"] + report["duplicate"] + report["quarantined"] == report["new_objects"]
    assert catalog.scalar("SELECT count(*) FROM source_objects") == N_OBJECTS
    assert catalog.scalar("SELECT count(*) FROM images") == N_OBJECTS - 2
    for uri in {r["shard_uri"] for r in catalog.query("SELECT shard_uri FROM images")}:
        ingest.load_shard(store, uri)  # every referenced shard exists and is whole

    # the same inputs in one clean run (on the embedded SQLite catalog) give the same catalog
    clean_settings, clean_store, clean_catalog = ready(catalog="sqlite")
    for key, body in bodies.items():
        clean_store.put(key, body)
    ingest.run(clean_settings, clean_store, clean_catalog, "clean", batch_size=BATCH)
    assert outcome(catalog) == outcome(clean_catalog)
    assert outcome(catalog)["duplicates"] == [
        ("training/brain_mri/E900/copy.dcm", _image_of(catalog, "training/brain_mri/E000/im.dcm"))
    ]


def _image_of(catalog, key: str) -> str:
    return catalog.scalar("SELECT image_id FROM images WHERE source_key = :k", k=key)


def _survivors(marker: str, wait: float = 5.0) -> list[int]:
    """Processes whose command line holds ``marker`` (the child's unique bucket), after a grace period."""
    deadline = time.monotonic() + wait
    while True:
        found = []
        for proc in Path("/proc").iterdir():
            try:
                if proc.name.isdigit() and marker.encode() in (proc / "cmdline").read_bytes():
                    found.append(int(proc.name))
            except OSError:
                continue
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def test_sweep_deletes_only_what_a_batch_that_never_committed_wrote(ready, monkeypatch) -> None:
    settings, store, catalog = ready(shard_size=2)
    for n in range(5):
        store.put(f"training/brain_mri/E{n:03d}/im.dcm", dicom(n))
    store.put("training/brain_mri/E009/bad.dcm", b"not dicom" * 50)
    real_upsert = catalog.upsert

    def commit_dies(table, rows, *args, **kwargs):
        if table == "images":
            raise RuntimeError("task killed before its commit")
        return real_upsert(table, rows, *args, **kwargs)

    monkeypatch.setattr(catalog, "upsert", commit_dies)
    with pytest.raises(RuntimeError, match="killed"):
        ingest.run(settings, store, catalog, "killed")
    monkeypatch.undo()
    orphans = {o.key for o in store.list("curated/") + store.list("quarantine/")}
    assert len(orphans) == 4 and catalog.scalar("SELECT count(*) FROM images") == 0  # 3 shards, 1 record

    ingest.run(settings, store, catalog, "next-night")
    kept = {store.key_of(r["shard_uri"]) for r in catalog.query("SELECT shard_uri FROM images")}
    kept |= {store.key_of(r["record_uri"]) for r in catalog.query("SELECT record_uri FROM quarantine")}
    assert len(kept) == 4 and not kept & orphans

    assert ingest.sweep_orphans(settings, store, catalog)["orphans_deleted"] == 0  # within the grace
    swept = ingest.sweep_orphans(settings.model_copy(update={"orphan_grace_hours": 0}), store, catalog)
    assert (swept["shards"], swept["quarantine_records"], swept["orphans_deleted"]) == (6, 2, 4)
    assert swept["bytes_freed"] > 0
    assert {o.key for o in store.list("curated/") + store.list("quarantine/")} == kept
    assert len(ingest.load_pixels(store, catalog.query("SELECT image_id, shard_uri FROM images"))) == 5
