"""Ingest end to end on the real SeaweedFS endpoint and PostgreSQL: a hospital export as it comes.

Every input is built here: DICOM (with and without extension or file meta), PNG/JPEG at 8 and 16
bits, grey and RGB, zip/tar/tar.gz archives with nested folders and mixed content, and the broken
and malicious objects an export also holds. Each must end ingested, duplicate or quarantined with
the right reason, the report must prove the accounting, and a rerun must do nothing.
"""

from __future__ import annotations

import hashlib
import io
import struct
import tarfile
import threading
import time
import zipfile
import zlib

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, SecondaryCaptureImageStorage, generate_uid

from mmpipe import ingest
from mmpipe.store import ObjectInfo

pytestmark = pytest.mark.integration

TABLES = ("source_objects", "images", "duplicates", "quarantine", "label_manifests")
LIMITS = {
    "max_archive_members": 40,
    "max_archive_bytes": 2 * 2**20,
    "max_image_pixels": 300 * 300,
    "max_frames": 4,
    "max_object_bytes": 3 * 2**19,
    "shard_size": 4,
}


# --------------------------------------------------------------------------- inputs


def pattern(seed: int, shape: tuple[int, ...] = (48, 40), peak: int = 4000) -> np.ndarray:
    """A unique, non-blank image: a seeded random field (never two alike)."""
    return np.random.default_rng(seed).integers(0, peak, shape).astype(np.uint16)


def dicom(
    pixels: np.ndarray, *, modality: str = "MR", meta: bool = True, body_part: str = "", **attrs: object
) -> bytes:
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage if modality == "CT" else SecondaryCaptureImageStorage
    ds.SOPInstanceUID, ds.StudyInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.PatientID = modality, "PAT-TEST-0001"
    if body_part:
        ds.BodyPartExamined = body_part
    ds.set_pixel_data(pixels, "MONOCHROME2", 16 if pixels.dtype == np.uint16 else 8)
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    buffer = io.BytesIO()
    if meta:
        ds.save_as(buffer, enforce_file_format=True)
    else:  # a bare dataset: no preamble, no "DICM", no file meta
        ds.file_meta = FileMetaDataset()
        pydicom.dcmwrite(buffer, ds, implicit_vr=True, little_endian=True)
    return buffer.getvalue()


def raster(array: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def png_rgb16(seed: int) -> bytes:
    """A 48-bit RGB PNG, written by hand (Pillow cannot write one)."""
    pixels = np.random.default_rng(seed).integers(0, 65535, (30, 34, 3)).astype(">u2")
    raw = b"".join(b"\x00" + row.tobytes() for row in pixels)

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    header = struct.pack(">IIBBBBB", 34, 30, 16, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def rgb(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (36, 44, 3)).astype(np.uint8)


def gray8(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (40, 40)).astype(np.uint8)


def make_zip(members: list[tuple[str, bytes]], symlink: str | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, body in members:
            archive.writestr(name, body)
        if symlink:
            info = zipfile.ZipInfo(symlink)
            info.external_attr = 0o120777 << 16
            archive.writestr(info, "/etc/passwd")
    return buffer.getvalue()


def make_tar(members: list[tuple[str, bytes]], mode: str = "w", link: tuple[str, str] | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as archive:
        for name, body in members:
            info = tarfile.TarInfo(name)
            info.size = len(body)
            archive.addfile(info, io.BytesIO(body))
        if link:
            info = tarfile.TarInfo(link[0])
            info.type, info.linkname = tarfile.SYMTYPE, link[1]
            archive.addfile(info)
    return buffer.getvalue()


def export() -> dict[str, tuple[bytes, str, dict[str, str]]]:
    """key -> (body, expected object status, {member path: expected quarantine reason})."""
    mr = dicom(pattern(1))
    truncated_png = raster(gray8(20), "PNG")
    brain = "training/brain_mri/"
    nested = make_zip(
        [
            ("A/B/img1.dcm", dicom(pattern(2))),
            ("A/img2.png", raster(gray8(3), "PNG")),
            ("notes/readme.txt", b"exported by PACS\n"),
            ("inner.tar.gz", make_tar([("x/y.dcm", dicom(pattern(4)))], "w:gz")),
        ]
    )
    too_deep = make_zip([("l1.zip", make_zip([("l2.zip", make_zip([("a.dcm", dicom(pattern(5)))]))]))])
    return {
        f"{brain}E001/IMG0001.dcm": (mr, "ingested", {}),
        f"{brain}E001/IMG0002": (dicom(pattern(6)), "ingested", {}),
        f"{brain}E002/bare.dcm": (dicom(pattern(7), meta=False), "ingested", {}),
        f"{brain}E003/slice8.png": (raster(gray8(8), "PNG"), "ingested", {}),
        f"{brain}E003/slice16.png": (raster(pattern(9, peak=60000), "PNG"), "ingested", {}),
        f"{brain}E004/photo.jpg": (raster(rgb(10), "JPEG"), "ingested", {}),
        f"{brain}E004/rgb.png": (raster(rgb(11), "PNG"), "ingested", {}),
        f"{brain}E004/rgb16.png": (png_rgb16(24), "ingested", {}),
        f"{brain}E005/gray.jpeg": (raster(gray8(12), "JPEG"), "ingested", {}),
        f"{brain}E006/export.zip": (nested, "ingested", {"notes/readme.txt": "not_image"}),
        f"{brain}E007/export.tar": (
            make_tar([("S1/a.dcm", dicom(pattern(13))), ("S1/b.jpg", raster(gray8(14), "JPEG"))]),
            "ingested",
            {},
        ),
        f"{brain}E008/copy-of-IMG0001.dcm": (mr, "duplicate", {}),
        f"{brain}E009/empty.dcm": (b"", "quarantined", {"": "empty"}),
        f"{brain}E010/truncated.dcm": (dicom(pattern(15))[:900], "quarantined", {"": "corrupt"}),
        f"{brain}E011/fake.png": (b"<html>not an image</html>\n" * 10, "quarantined", {"": "not_image"}),
        f"{brain}E012/cut.png": (truncated_png[: len(truncated_png) // 2], "quarantined", {"": "corrupt"}),
        f"{brain}E013/slip.zip": (
            make_zip([("ok.dcm", dicom(pattern(16))), ("../../etc/evil.dcm", b"x")]),
            "quarantined",
            {"": "unsafe_archive"},
        ),
        f"{brain}E014/absolute.tar": (
            make_tar([("/tmp/evil.dcm", b"x")]),
            "quarantined",
            {"": "unsafe_archive"},
        ),
        f"{brain}E015/link.tar.gz": (
            make_tar([("a.dcm", dicom(pattern(17)))], "w:gz", link=("b.dcm", "/etc/passwd")),
            "quarantined",
            {"": "unsafe_archive"},
        ),
        f"{brain}E016/link.zip": (make_zip([], symlink="pw"), "quarantined", {"": "unsafe_archive"}),
        f"{brain}E017/bomb.zip": (
            make_zip([("zeros.dcm", bytes(8 * 2**20))]),
            "quarantined",
            {"": "too_large"},
        ),
        f"{brain}E018/many.zip": (
            make_zip([(f"f{n}.dcm", b"x") for n in range(LIMITS["max_archive_members"] + 1)]),
            "quarantined",
            {"": "too_large"},
        ),
        f"{brain}E019/wide.dcm": (dicom(pattern(18, (310, 310))), "quarantined", {"": "too_large"}),
        f"{brain}E020/frames.dcm": (
            dicom(pattern(19, (5, 16, 16)), NumberOfFrames=5),
            "quarantined",
            {"": "too_large"},
        ),
        f"{brain}E021/deep.zip": (too_deep, "quarantined", {"l1.zip!l2.zip": "unsafe_archive"}),
        f"{brain}E022/blank.dcm": (dicom(np.full((32, 32), 100, np.uint16)), "quarantined", {"": "blank"}),
        f"{brain}E023/nopixels.dcm": (_no_pixels(), "quarantined", {"": "no_pixel_data"}),
        f"{brain}E024/empty.zip": (make_zip([]), "quarantined", {"": "empty"}),
        f"{brain}E029/bomb-total.zip": (
            make_zip([(f"z{i}.dcm", bytes(2**20)) for i in range(3)]),  # each fits, together they do not
            "quarantined",
            {"": "too_large"},
        ),
        f"{brain}E028/huge.dcm": (np.random.default_rng(0).bytes(2**21), "quarantined", {"": "too_large"}),
        "training/knee_xr/E025/a.dcm": (dicom(pattern(21)), "quarantined", {"": "unlabelled"}),
        "training/chest_xray/E026/cr.dcm": (dicom(pattern(22), modality="CR"), "ingested", {}),
        "training/chest_xray/E027/mf.dcm": (
            dicom(pattern(23, (3, 20, 20)), modality="CR", NumberOfFrames=3),
            "ingested",
            {},
        ),
    }


def _no_pixels() -> bytes:
    ds = pydicom.dcmread(io.BytesIO(dicom(pattern(99))))
    del ds.PixelData
    buffer = io.BytesIO()
    ds.save_as(buffer)
    return buffer.getvalue()


def upload(store, objects: dict[str, tuple[bytes, str, dict[str, str]]]) -> None:
    for key, (body, _, _) in objects.items():
        store.put(key, body)


def snapshot(store, catalog) -> dict[str, object]:
    """Everything ingest may write, for before/after comparisons."""
    tables = {t: sorted(map(repr, catalog.query(f"SELECT * FROM {t}"))) for t in TABLES}
    written = sorted((o.key, o.etag) for p in ("curated/", "quarantine/") for o in store.list(p))
    return {"tables": tables, "store": written}


# --------------------------------------------------------------------------- tests


def test_hospital_export_is_fully_accounted_and_a_rerun_does_nothing(ready, catalog_kind) -> None:
    settings, store, catalog = ready(catalog=catalog_kind, **LIMITS)
    objects = export()
    upload(store, objects)
    originals = {o.key: o.etag for o in store.list("training/")}

    report = ingest.run(settings, store, catalog, "manual__first", batch_size=7)

    assert report["listed"] == report["new_objects"] == len(objects)
    assert report["ingested"] + report["duplicate"] + report["quarantined"] == len(objects)
    status = {r["source_key"]: r["status"] for r in catalog.query("SELECT * FROM source_objects")}
    assert status == {key: expected for key, (_, expected, _) in objects.items()}
    reasons = {
        (r["source_key"], r["member_path"]): r["reason"] for r in catalog.query("SELECT * FROM quarantine")
    }
    assert reasons == {(k, m): reason for k, (_, _, q) in objects.items() for m, reason in q.items()}
    assert report["quarantine_reasons"] == dict(
        sorted((r, list(reasons.values()).count(r)) for r in set(reasons.values()))
    )

    images = catalog.query("SELECT * FROM images ORDER BY source_key, member_path")
    members = {(r["source_key"], r["member_path"]) for r in images}
    assert {m for k, m in members if k.endswith("E006/export.zip")} == {
        "A/B/img1.dcm",
        "A/img2.png",
        "inner.tar.gz!x/y.dcm",
    }
    assert report["images"] == len(images) == 16
    by_key = {r["source_key"]: r for r in images if not r["member_path"]}
    assert {r["bits_stored"] for r in images if r["source_key"].endswith(".png")} == {8, 16}
    multi = by_key["training/chest_xray/E027/mf.dcm"]
    assert (multi["frame"], multi["n_frames"], multi["modality"], multi["label"]) == (
        1,
        3,
        "CR",
        "chest_xray",
    )
    assert all(r["label_source"] == "prefix" and r["status"] == "active" for r in images)
    # archive members without a PatientID share a patient per archive folder, not per class folder
    png_patients = {r["patient_key"] for r in images if r["source_key"].endswith("E006/export.zip")}
    assert len(png_patients) == 2  # img2.png (folder A) vs the DICOMs' own PatientID

    dup = catalog.query("SELECT * FROM duplicates")
    assert [(d["source_key"].split("/")[2], d["label"]) for d in dup] == [("E008", "brain_mri")]
    assert dup[0]["duplicate_of"] == by_key["training/brain_mri/E001/IMG0001.dcm"]["image_id"]

    # every shard row holds exactly the pixels its content hash names
    for row in images:
        pixels, ids = ingest.load_shard(store, row["shard_uri"])
        assert ids[row["shard_index"]] == row["image_id"]
        assert hashlib.sha256(pixels[row["shard_index"]].tobytes()).hexdigest()[:32] == row["image_id"]
        assert pixels.shape[1:] == (settings.image_size, settings.image_size)
    assert len({r["shard_uri"] for r in images}) >= 4  # shard_size 4: several shards

    # quarantine records are machine-readable JSON beside the catalog rows
    for row in catalog.query("SELECT * FROM quarantine"):
        record = store.get_json(store.key_of(row["record_uri"]))
        assert (record["reason"], record["source_key"], record["member_path"]) == (
            row["reason"],
            row["source_key"],
            row["member_path"],
        )
    assert store.get_json(store.key_of(report["report_uri"]))["accounted"] == len(objects)

    # originals are never modified (bytes, ETags, no tags)
    assert {o.key: o.etag for o in store.list("training/")} == originals
    assert store.get_tags(next(iter(objects))) == {}

    before = snapshot(store, catalog)
    again = ingest.run(settings, store, catalog, "manual__again")
    assert (again["new_objects"], again["already_seen"], again["images"]) == (0, len(objects), 0)
    assert snapshot(store, catalog) == before


def test_changed_etag_supersedes_and_reverting_revives(ready, pg_url) -> None:
    settings, store, catalog = ready(database_url=pg_url)
    key = "training/lung_ct/E1/slice.dcm"
    first, second = dicom(pattern(30), modality="CT"), dicom(pattern(31), modality="CT")
    store.put(key, first)
    ingest.run(settings, store, catalog, "r1")
    store.put(key, second)
    report = ingest.run(settings, store, catalog, "r2")
    assert (report["new_objects"], report["ingested"], report["retired_images"]) == (1, 1, 1)
    rows = catalog.query("SELECT source_etag, status, status_reason FROM images ORDER BY status")
    etag1, etag2 = hashlib.md5(first).hexdigest(), hashlib.md5(second).hexdigest()
    assert rows == [
        {"source_etag": etag2, "status": "active", "status_reason": None},
        {"source_etag": etag1, "status": "retired", "status_reason": "superseded"},
    ]
    ledger = {r["etag"]: r["status"] for r in catalog.query("SELECT * FROM source_objects")}
    assert ledger == {etag1: "superseded", etag2: "ingested"}

    store.put(key, first)  # the old version comes back: its (superseded) record must not hide it
    report = ingest.run(settings, store, catalog, "r3")
    assert (report["new_objects"], report["images"]) == (1, 1)
    active = catalog.query("SELECT source_etag FROM images WHERE status = 'active'")
    assert active == [{"source_etag": etag1}]
    assert catalog.scalar("SELECT count(*) FROM images") == 2  # revived, not duplicated


def test_a_current_duplicate_inherits_the_image_of_a_superseded_source(ready, pg_url) -> None:
    settings, store, catalog = ready(database_url=pg_url)
    shared = dicom(pattern(40))
    store.put("training/brain_mri/A/x.dcm", shared)
    store.put("training/retinal_oct/B/x.dcm", shared)  # same pixels, another class: a label conflict
    report = ingest.run(settings, store, catalog, "r1")
    assert (report["ingested"], report["duplicate"], report["label_conflicts"]) == (1, 1, 1)
    owner = catalog.query("SELECT image_id, source_key FROM images")[0]
    heir_key = ({"training/brain_mri/A/x.dcm", "training/retinal_oct/B/x.dcm"} - {owner["source_key"]}).pop()

    store.put(owner["source_key"], dicom(pattern(41)))
    report = ingest.run(settings, store, catalog, "r2")
    assert (report["inherited_images"], report["retired_images"]) == (1, 0)
    row = catalog.query("SELECT * FROM images WHERE image_id = :i", i=owner["image_id"])[0]
    assert (row["source_key"], row["status"], row["label"]) == (heir_key, "active", heir_key.split("/")[1])
    assert catalog.query("SELECT * FROM duplicates") == []
    statuses = {(r["source_key"], r["status"]) for r in catalog.query("SELECT * FROM source_objects")}
    assert (heir_key, "ingested") in statuses
    assert catalog.scalar("SELECT count(*) FROM images WHERE status = 'active'") == 2


def test_concurrent_batches_with_identical_content_store_it_once(ready, monkeypatch, catalog_kind) -> None:
    """Both batches write their shards before either commits: the one committing second finds its
    copy stored meanwhile, records a duplicate and writes its shard again without those pixels."""
    settings, store, catalog = ready(catalog=catalog_kind, ingest_processes=1)
    body = dicom(pattern(50))
    keys = [f"training/brain_mri/P{n}/x.dcm" for n in range(2)]
    for key in keys:
        store.put(key, body)
    store.put("training/brain_mri/P9/other.dcm", dicom(pattern(51)))
    batches = [[store.head(keys[0])], [store.head(keys[1]), store.head("training/brain_mri/P9/other.dcm")]]
    ingest.start_run(catalog, "parallel", "training/")
    results: list[dict] = []
    barrier, single_done, written, real_write = (
        threading.Barrier(2),
        threading.Event(),
        set(),
        ingest.write_shard,
    )

    def write_then_wait(store, key, rows, pixels):
        uri = real_write(store, key, rows, pixels)
        if threading.get_ident() not in written:  # its first shard: wait until both batches wrote theirs
            written.add(threading.get_ident())
            barrier.wait(timeout=60)
            if len(rows) == 2:  # the mixed batch commits second
                single_done.wait(timeout=60)
        return uri

    monkeypatch.setattr(ingest, "write_shard", write_then_wait)

    def one(objects: list[ObjectInfo]) -> None:
        results.append(ingest.ingest_objects(settings, store, catalog, "parallel", objects, "training/"))
        single_done.set()

    threads = [threading.Thread(target=one, args=(b,)) for b in batches]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    monkeypatch.undo()
    report = ingest.finish_run(store, catalog, "parallel", 3, 3, results)
    assert (report["ingested"], report["duplicate"]) == (2, 1)
    assert catalog.scalar("SELECT count(*) FROM images") == 2
    assert catalog.scalar("SELECT count(*) FROM duplicates") == 1
    ingest.sweep_orphans(settings.model_copy(update={"orphan_grace_hours": 0}), store, catalog)
    kept = [ingest.load_shard(store, store.uri(o.key))[1] for o in store.list("curated/")]
    assert sorted(i for ids in kept for i in ids) == sorted(
        r["image_id"] for r in catalog.query("SELECT image_id FROM images")
    )


def test_retrying_a_committed_batch_changes_nothing(ready) -> None:
    settings, store, catalog = ready(catalog="sqlite")  # the embedded default
    for n in range(3):
        store.put(f"training/liver_ct/P{n}/a.dcm", dicom(pattern(60 + n), modality="CT"))
    store.put("training/liver_ct/P9/bad.dcm", b"garbage" * 40)
    listing = ingest.open_run(store, catalog, "retry", "training/", settings)
    new, listed = listing.new, listing.listed
    first = ingest.ingest_objects(settings, store, catalog, "retry", new, "training/")
    before = snapshot(store, catalog)
    time.sleep(1.1)  # CURRENT_TIMESTAMP has one-second resolution: a rewritten row must show
    second = ingest.ingest_objects(settings, store, catalog, "retry", new, "training/")
    assert first == second and (first["ingested"], first["quarantined"]) == (3, 1)
    assert snapshot(store, catalog) == before
    assert ingest.finish_run(store, catalog, "retry", len(new), listed, [second])["status"] == "succeeded"


def test_object_deleted_after_listing_is_accounted(ready, pg_url) -> None:
    settings, store, catalog = ready(database_url=pg_url)
    store.put("training/brain_mri/P1/a.dcm", dicom(pattern(70)))
    listing = ingest.open_run(store, catalog, "gone", "training/", settings)
    new, listed = listing.new, listing.listed
    store._client.delete_object(Bucket=store.bucket, Key="training/brain_mri/P1/a.dcm")
    result = ingest.ingest_objects(settings, store, catalog, "gone", new, "training/")
    assert ingest.finish_run(store, catalog, "gone", len(new), listed, [result])["quarantined"] == 1
    assert catalog.scalar("SELECT detail FROM quarantine") == "object was deleted after it was listed"


def test_a_missing_batch_fails_the_accounting(ready, pg_url) -> None:
    settings, store, catalog = ready(database_url=pg_url)
    for n in range(4):
        store.put(f"training/brain_mri/P{n}/a.dcm", dicom(pattern(80 + n)))
    listing = ingest.open_run(store, catalog, "partial", "training/", settings)
    new, listed = listing.new, listing.listed
    done = ingest.ingest_objects(settings, store, catalog, "partial", new[:2], "training/")
    with pytest.raises(Exception, match="accounting broken"):
        ingest.finish_run(store, catalog, "partial", len(new), listed, [done])
    assert catalog.scalar("SELECT status FROM ingest_runs WHERE run_id = 'partial'") == "failed"
