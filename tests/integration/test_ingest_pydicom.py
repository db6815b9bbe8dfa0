"""pydicom's own bundled test files as real-world inputs: every one ends ingested (or duplicate) or
quarantined with the reason the decoder gives it alone, and none crashes the run.

Only DATA_ROOT/test_files is listed: ``get_testdata_files`` could try to download more.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import pytest
from pydicom.data import DATA_ROOT

from mmpipe import ingest
from mmpipe.imaging import Limits, Rejected, decode_image

pytestmark = pytest.mark.integration

TEST_FILES = Path(DATA_ROOT) / "test_files"
PREFIX = "training/chest_xray/pydicom/"
#: Outcomes that do not depend on the oracle below (so a shared bug cannot hide); "image" means
#: ingested or duplicate (several files hold the same pixels in other encodings).
KNOWN = {
    "README.txt": "quarantined:not_image",
    "test1.json": "quarantined:not_image",
    "zipMR.gz": "quarantined:not_image",
    "rtplan.dcm": "quarantined:no_pixel_data",
    "dicomdirtests/DICOMDIR": "quarantined:no_pixel_data",
    "MR_truncated.dcm": "quarantined:corrupt",
    "CT_small.dcm": "image",
    "ExplVR_BigEndNoMeta.dcm": "quarantined:no_pixel_data",  # an RT Plan without file meta
    "dicomdirtests/77654033/CR1/6154": "image",
    "SC_rgb_rle_2frame.dcm": "image",
    "MR_small_bigendian.dcm": "image",
    "JPGExtended.dcm": "image",  # 12-bit JPEG Extended
    "JPEG-lossy.dcm": "image",  # the same frame with Se=0 in its scan header: decoded as IJG reads it
}


def oracle(data: bytes, name: str, size: int, limits: Limits) -> tuple[str, str | None, str | None]:
    """(outcome, content hash, PatientID) from the decoder alone, no store or catalog involved."""
    try:
        decoded = decode_image(data, name, size, limits)
    except Rejected as exc:
        return f"quarantined:{exc.reason.value}", None, None
    return "decoded", hashlib.sha256(decoded.pixels.tobytes()).hexdigest()[:32], decoded.patient_id


def test_every_bundled_pydicom_file_is_accounted_for(ready, pg_url) -> None:
    settings, store, catalog = ready(database_url=pg_url)
    limits = Limits.from_settings(settings)
    files = sorted(p for p in TEST_FILES.rglob("*") if p.is_file())
    assert len(files) > 100  # the bundled set really is there
    expected = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in files:
            rel = path.relative_to(TEST_FILES).as_posix()
            data = path.read_bytes()
            store.put(PREFIX + rel, data)
            expected[PREFIX + rel] = oracle(data, rel, settings.image_size, limits)
        report = ingest.run(settings, store, catalog, "pydicom", batch_size=50)

    assert report["new_objects"] == len(files) == report["accounted"]
    status = {
        r["source_key"]: r["status"] for r in catalog.query("SELECT source_key, status FROM source_objects")
    }
    reasons = {
        r["source_key"]: r["reason"] for r in catalog.query("SELECT source_key, reason FROM quarantine")
    }
    got = {k: f"quarantined:{reasons[k]}" if s == "quarantined" else "image" for k, s in status.items()}
    for rel, outcome in KNOWN.items():
        assert got[PREFIX + rel] == outcome, rel
    for key, (outcome, _, _) in expected.items():
        assert got[key] == ("image" if outcome == "decoded" else outcome), key

    decoded = {key: digest for key, (outcome, digest, _) in expected.items() if outcome == "decoded"}
    stored = {
        r["image_id"]: r["source_key"] for r in catalog.query("SELECT image_id, source_key FROM images")
    }
    assert set(stored) == set(decoded.values())  # one image per distinct pixel content
    assert sum(1 for s in status.values() if s == "duplicate") == len(decoded) - len(stored) > 0
    assert report["quarantined"] > 10 and report["ingested"] > 50
    # real exports put PatientIDs in folder names (dicomdirtests/<PatientID>/...): ingest notices
    flagged = sum(1 for key, (_, _, pid) in expected.items() if pid and len(pid) >= 4 and pid in key)
    assert report["identifier_keys"] == flagged > 0
