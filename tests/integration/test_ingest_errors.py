"""Faults are not verdicts: what ingest cannot settle today stays unseen for the next run, and is
reported; only data faults quarantine, and a quarantine can be released after a fix. Runs left
running by a killed process are marked abandoned. Real SeaweedFS, the catalogs of both kinds."""

from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import pydicom
import pytest

from mmpipe import cli, decoding, ingest
from mmpipe.errors import MmpipeError
from tests.conftest import export_env
from tests.dicom_factory import dicom_bytes

pytestmark = pytest.mark.integration


def upload(store, n: int, prefix: str = "training/lung_ct") -> list[str]:
    keys = [f"{prefix}/E{i:03d}/im.dcm" for i in range(n)]
    for i, key in enumerate(keys):
        store.put(key, dicom_bytes(i, Modality="CT", PatientID=f"MRN-ERR-{i:04d}"))
    return keys


def buggy_for(victims: set[str]):
    """decode_image with a regression for some objects; its message quotes a header value, as a
    careless f-string would."""
    real = decoding.decode_image

    def decode(data: bytes, name: str, *args):
        if any(data == victim for victim in victims):
            raise ValueError(f"cannot handle patient {pydicom.dcmread(io.BytesIO(data)).PatientID}")
        return real(data, name, *args)

    return decode


def test_a_decoder_bug_holds_objects_back_reports_them_and_fails_past_the_share(
    ready, monkeypatch, catalog_kind
) -> None:
    settings, store, catalog = ready(catalog=catalog_kind, ingest_processes=2, decoder_error_max_share=0.1)
    keys = upload(store, 12)
    victim = store.get(keys[2])
    monkeypatch.setattr(decoding, "decode_image", buggy_for({victim}))  # forked decode processes inherit it

    report = ingest.run(settings, store, catalog, "buggy", batch_size=12)  # 1 of 12 < 10%: the run goes on
    assert (report["status"], report["ingested"], report["decoder_errors"], report["quarantined"]) == (
        "succeeded", 11, 1, 0,
    )  # fmt: skip
    (error,) = report["errors"]
    assert (error["kind"], error["source_key"]) == ("decoder_error", keys[2])
    assert "in decode" in error["traceback"] and "builtins.ValueError" in error["traceback"]
    written = store.get(store.key_of(report["report_uri"])).decode()
    recorded = json.dumps(catalog.query("SELECT * FROM ingest_errors"), default=str)
    assert "MRN-ERR-0002" not in written and "MRN-ERR-0002" not in recorded
    row = catalog.query(
        "SELECT status, decoder_errors, store_errors FROM ingest_runs WHERE run_id = 'buggy'"
    )[0]
    assert row == {"status": "succeeded", "decoder_errors": 1, "store_errors": 0}
    assert catalog.scalar("SELECT count(*) FROM quarantine") == 0  # a bug is no verdict on the data

    tight = settings.model_copy(update={"decoder_error_max_share": 0.01})
    with pytest.raises(MmpipeError, match=r"1 of 1 objects .* a bug, not bad data"):
        ingest.run(tight, store, catalog, "still-buggy")  # the object is taken again, and fails again
    assert catalog.scalar("SELECT status FROM ingest_runs WHERE run_id = 'still-buggy'") == "failed"

    monkeypatch.undo()  # the fix
    fixed = ingest.run(settings, store, catalog, "fixed")
    assert (fixed["new_objects"], fixed["ingested"], fixed["decoder_errors"]) == (1, 1, 0)
    assert catalog.scalar("SELECT count(*) FROM source_objects WHERE status = 'ingested'") == 12


def test_a_batch_task_over_the_share_fails_after_recording_the_rest(ready, monkeypatch) -> None:
    settings, store, catalog = ready(ingest_processes=1)
    keys = upload(store, 4)
    monkeypatch.setattr(decoding, "decode_image", buggy_for({store.get(keys[0])}))
    listing = ingest.open_run(store, catalog, "dag", "training/", settings)
    with pytest.raises(MmpipeError, match="1 of 4 objects"):
        ingest.ingest_objects(settings, store, catalog, "dag", listing.new, "training/")
    assert catalog.scalar("SELECT count(*) FROM source_objects") == 3  # the rest is recorded
    with pytest.raises(MmpipeError, match="accounting broken"):
        ingest.finish_run(store, catalog, "dag", len(listing.new), listing.listed, [])
    report = store.get_json(store.key_of(catalog.scalar("SELECT report_uri FROM ingest_runs")))
    assert [e["source_key"] for e in report["errors"]] == [keys[0]]


def test_quarantine_release_requeues_after_a_fix(ready, monkeypatch, capsys, catalog_kind) -> None:
    settings, store, catalog = ready(catalog=catalog_kind, max_image_pixels=24 * 24)
    upload(store, 3)  # 32x32 images: refused as too large under this limit
    store.put("training/lung_ct/E900/bad.dcm", b"not an image at all" * 10)
    first = ingest.run(settings, store, catalog, "night-1")
    assert first["quarantine_reasons"] == {"too_large": 3, "not_image": 1}

    export_env(monkeypatch, settings.model_copy(update={"max_image_pixels": 64 * 64}))  # the fix

    def release(*args: str) -> str:
        assert cli.main(["quarantine", "release", *args]) == 0
        return capsys.readouterr().out

    assert json.loads(release("--reason", "wrong run", "--run", "night-0", "--json"))["objects"] == 0
    table = release("--reason", "raised max_image_pixels", "--run", "night-1").splitlines()
    assert table[0].split() == ["quarantine", "reason", "objects", "members"]
    assert ["not_image", "1", "1"] in [line.split() for line in table] and ["total", "4", "4"] in [
        line.split() for line in table
    ]
    assert catalog.scalar("SELECT count(*) FROM source_objects WHERE status = 'queued'") == 4
    assert catalog.query("SELECT reason, objects, run_filter FROM quarantine_releases") == [
        {"reason": "raised max_image_pixels", "objects": 4, "run_filter": "night-1"}
    ]

    fixed = ingest.run(settings.model_copy(update={"max_image_pixels": 64 * 64}), store, catalog, "night-2")
    assert (fixed["new_objects"], fixed["ingested"], fixed["quarantined"]) == (4, 3, 1)
    assert catalog.query("SELECT source_key, reason FROM quarantine") == [
        {"source_key": "training/lung_ct/E900/bad.dcm", "reason": "not_image"}
    ]
    assert ingest.run(settings, store, catalog, "night-3")["new_objects"] == 0
    assert json.loads(release("--reason", "again", "--json"))["objects"] == 1  # only what is quarantined


def test_a_run_left_running_is_abandoned_by_the_next_run_or_the_sweep(ready) -> None:
    settings, store, catalog = ready()
    upload(store, 2)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    gone = f"{socket.gethostname()}:{int(dead.stdout)}:12345"  # that process has exited
    ingest.start_run(catalog, "killed", "training/", owner=gone)
    ingest.start_run(catalog, "silent", "training/")  # another host's run: only its heartbeat tells
    ingest.start_run(catalog, "alive", "training/", owner=ingest.process_owner())
    old = datetime.now(UTC).replace(tzinfo=None) - timedelta(hours=settings.abandon_after_hours + 1)
    catalog.execute("UPDATE ingest_runs SET heartbeat_at = :t WHERE run_id = 'silent'", {"t": old})

    ingest.run(settings, store, catalog, "next")
    status = {r["run_id"]: r["status"] for r in catalog.query("SELECT run_id, status FROM ingest_runs")}
    assert status == {"killed": "abandoned", "silent": "abandoned", "alive": "running", "next": "succeeded"}

    catalog.execute("UPDATE ingest_runs SET heartbeat_at = :t WHERE run_id = 'alive'", {"t": old})
    ingest.sweep_orphans(settings, store, catalog)
    assert catalog.scalar("SELECT status FROM ingest_runs WHERE run_id = 'alive'") == "abandoned"
