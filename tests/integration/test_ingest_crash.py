"""A decode process that dies (the OOM killer's SIGKILL, a C decoder's segfault) costs one object,
never the run or its retries: the object is quarantined with the cause, every other one ingests."""

from __future__ import annotations

import faulthandler
import os
import signal
import time

import pytest

from mmpipe import decoding, ingest
from mmpipe.imaging import decode_image as real_decode_image
from mmpipe.store import AccessDenied, open_store
from tests.dicom_factory import dicom_bytes
from tests.faults.proxy import Faults, fault_proxy

pytestmark = pytest.mark.integration

KILLERS = {b"POISON-KILL": signal.SIGKILL, b"POISON-SEGV": signal.SIGSEGV}


def dying_decode(data: bytes, *args, **kwargs):
    """The real decoder, except that marked objects take their process down, as a bomb or a bug would,
    or never finish, as a decoder looping on malformed data would."""
    if data.startswith(b"POISON-HANG"):
        time.sleep(3600)
    for marker, sig in KILLERS.items():
        if data.startswith(marker):
            faulthandler.disable()  # pytest's crash dump of the dying child is noise here
            os.kill(os.getpid(), sig)
    return real_decode_image(data, *args, **kwargs)


@pytest.mark.parametrize("batch_size", [3, 200])  # pipelined batches share the broken pool, or one batch
def test_dead_decode_processes_quarantine_their_object_only(ready, monkeypatch, batch_size) -> None:
    settings, store, catalog = ready(ingest_processes=2)
    monkeypatch.setattr(decoding, "decode_image", dying_decode)  # forked decode processes inherit it
    for n in range(7):
        store.put(f"training/lung_ct/P{n}/ct.dcm", dicom_bytes(n, Modality="CT"))
    store.put("training/lung_ct/P8/bomb.dcm", b"POISON-KILL" + bytes(64))
    store.put("training/lung_ct/P9/bug.dcm", b"POISON-SEGV" + bytes(64))

    report = ingest.run(settings, store, catalog, "crash", batch_size=batch_size)

    assert report["status"] == "succeeded"
    assert (report["ingested"], report["quarantined"], report["images"]) == (7, 2, 7)
    rows = catalog.query("SELECT source_key, reason, detail FROM quarantine ORDER BY source_key")
    assert [(r["source_key"], r["reason"]) for r in rows] == [
        ("training/lung_ct/P8/bomb.dcm", "too_large"),
        ("training/lung_ct/P9/bug.dcm", "corrupt"),
    ]
    assert "SIGKILL" in rows[0]["detail"] and "SIGSEGV" in rows[1]["detail"]
    assert ingest.run(settings, store, catalog, "crash-again")["new_objects"] == 0


def test_a_decode_that_never_finishes_is_killed_and_quarantined(ready, monkeypatch) -> None:
    settings, store, catalog = ready(ingest_processes=2, decode_timeout_seconds=4)
    monkeypatch.setattr(decoding, "decode_image", dying_decode)
    for n in range(5):
        store.put(f"training/liver_ct/P{n}/ct.dcm", dicom_bytes(n, Modality="CT"))
    store.put("training/liver_ct/P7/loop.dcm", b"POISON-HANG" + bytes(64))

    started = time.monotonic()
    report = ingest.run(settings, store, catalog, "hang", batch_size=3)

    assert (report["status"], report["ingested"], report["quarantined"]) == ("succeeded", 5, 1)
    row = catalog.query("SELECT source_key, reason, detail FROM quarantine")[0]
    assert (row["source_key"], row["reason"]) == ("training/liver_ct/P7/loop.dcm", "corrupt")
    assert row["detail"] == "decoding did not finish within 4 s"
    assert time.monotonic() - started < 60


def test_an_isolated_decode_process_reports_faults_not_verdicts(ready, s3_endpoint, monkeypatch) -> None:
    """The decode process an object gets after its chunk's process died: a store error, or exiting
    without an answer, is an error (the object is taken again next run), never a quarantine; a 403
    fails the run."""
    settings, store, catalog = ready(ingest_processes=2, s3_max_attempts=2)
    keys = [f"training/lung_ct/P{n}/ct.dcm" for n in range(4)]
    for n, key in enumerate(keys):
        store.put(key, dicom_bytes(n, Modality="CT"))
    objects = [store.head(k) for k in keys]
    faults = Faults({"503": 1.0}, match=lambda method, path: method == "GET" and "/P0/" in path)
    real = decoding._process
    monkeypatch.setattr(  # P1's decode process dies with status 3 (as a child whose logging failed did)
        decoding,
        "_process",
        lambda context, obj, data: os._exit(3) if "/P1/" in obj.key else real(context, obj, data),
    )
    with fault_proxy(s3_endpoint, faults) as proxy:
        flaky = settings.model_copy(update={"s3_endpoint_url": proxy.url})
        with decoding.Fetcher(
            flaky, open_store(flaky), ingest._context(flaky, catalog, "training/"), 4
        ) as fetcher:
            outcomes = fetcher.isolated(objects[:3])
            faults.rates, faults.match = {"403": 1.0}, lambda method, path: "/P3/" in path
            with pytest.raises(AccessDenied, match="MMPIPE_S3_ACCESS_KEY_ID"):
                fetcher.isolated(objects[3:])
    fates = [(o.obj.key, [e["kind"] for e in o.errors], o.quarantined, len(o.images)) for o in outcomes]
    assert fates == [
        (keys[0], ["store_error"], [], 0),
        (keys[1], ["decoder_error"], [], 0),
        (keys[2], [], [], 1),
    ]
    assert "exited with status 3" in outcomes[1].errors[0]["error"]
