"""Ingest's pure parts: archive expansion under one budget, per-image rows, keys and patterns."""

from __future__ import annotations

import io
import os
import sqlite3
import zipfile

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.uid import SecondaryCaptureImageStorage

from mmpipe import decoding
from mmpipe.config import CLASSES, get_settings
from mmpipe.decoding import decode_processes, expand, process_object
from mmpipe.imaging import Limits
from mmpipe.ingest import batch_id, like_prefix, run_slug
from mmpipe.labels import Labeler, Manifest
from mmpipe.store import ObjectInfo
from tests.dicom_factory import dicom_bytes

LIMITS = Limits(
    max_object_bytes=2**20,
    max_archive_members=10,
    max_archive_bytes=2**20,
    max_image_pixels=512 * 512,
    max_frames=8,
)
SALT = b"unit-salt"


def make_zip(members: list[tuple[str, bytes]], stored: bool = False) -> bytes:
    buffer = io.BytesIO()
    method = zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED
    with zipfile.ZipFile(buffer, "w", compression=method) as archive:
        for name, body in members:
            archive.writestr(name, body)
    return buffer.getvalue()


def dicom(seed: int, patient: str | None = "MRN-0042", accession: str = "") -> bytes:
    return dicom_bytes(
        seed,
        side=24,
        high=999,
        sop_class=SecondaryCaptureImageStorage,
        StudyInstanceUID="1.2.3.4",
        Modality="OT",
        PatientID=patient or "",
        AccessionNumber=accession,
    )


def png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (20, 20)).astype(np.uint8)).save(
        buffer, "PNG"
    )
    return buffer.getvalue()


def process(key: str, data: bytes, labeler: Labeler | None = None):
    obj = ObjectInfo(key, "etag", len(data))
    return process_object(obj, data, labeler=labeler or Labeler(CLASSES), salt=SALT, size=32, limits=LIMITS)


def test_plain_object_is_its_own_leaf() -> None:
    assert expand("a.dcm", b"payload", LIMITS) == ([("", b"payload", "unknown")], [])


def test_nested_archives_share_one_member_budget() -> None:
    inner = [make_zip([(f"m{i}.dcm", b"x%d" % i) for i in range(4)]) for _ in range(3)]
    outer = make_zip([(f"in{n}.zip", body) for n, body in enumerate(inner)])
    leaves, rejected = expand("k.zip", outer, LIMITS)  # 3 + 4 fit in 10, the next 4 do not
    assert [leaf.path for leaf in leaves] == [f"in0.zip!m{i}.dcm" for i in range(4)]
    assert [(r["member_path"], r["reason"]) for r in rejected] == [
        ("in1.zip", "too_large"),
        ("in2.zip", "too_large"),
    ]


def test_nested_archives_share_one_byte_budget() -> None:
    inner = make_zip([("big.bin", bytes(400_000))])
    outer = make_zip([("a.zip", inner), ("b.zip", inner), ("c.zip", inner)])
    leaves, rejected = expand("k.zip", outer, LIMITS)
    assert len(leaves) == 2 and [r["member_path"] for r in rejected] == ["c.zip"]


def test_archive_failing_midway_is_rejected_whole() -> None:
    data = bytearray(make_zip([("a.dcm", b"A" * 100), ("b.dcm", b"B" * 100)], stored=True))
    data[data.rindex(b"B" * 100) + 50] ^= 0xFF  # the second member's CRC no longer matches
    leaves, rejected = expand("k.zip", bytes(data), LIMITS)
    assert leaves == [] and [(r["member_path"], r["reason"]) for r in rejected] == [("", "corrupt")]


def test_depth_and_empty_archives_are_rejected_with_their_member_path() -> None:
    deep = make_zip([("l1.zip", make_zip([("l2.zip", make_zip([("x.dcm", b"x")]))])), ("ok.txt", b"t")])
    leaves, rejected = expand("k.zip", deep, LIMITS)
    assert [leaf.path for leaf in leaves] == ["ok.txt"]
    assert [(r["member_path"], r["reason"]) for r in rejected] == [("l1.zip!l2.zip", "unsafe_archive")]
    leaves, rejected = expand("k.zip", make_zip([("e.zip", make_zip([]))]), LIMITS)
    assert leaves == [] and rejected[0]["member_path"] == "e.zip" and rejected[0]["reason"] == "empty"


def test_rows_hold_pseudonyms_never_identifiers() -> None:
    outcome = process("training/brain_mri/E1/a.dcm", dicom(1))
    ((row, pixels),) = outcome.images
    assert "MRN-0042" not in repr(row) and "1.2.3.4" not in repr(row)
    assert row["patient_key"].startswith("p") and row["study_key"].startswith("s")
    assert (row["label"], row["label_source"], row["member_path"]) == ("brain_mri", "prefix", "")
    assert pixels.shape == (32, 32) and pixels.dtype == np.uint8
    again = process("training/brain_mri/E2/b.dcm", dicom(2))  # same patient elsewhere: same key
    assert again.images[0][0]["patient_key"] == row["patient_key"]


def test_images_without_patient_id_group_by_archive_folder() -> None:
    archive = make_zip([("A/1.png", png(1)), ("A/2.png", png(2)), ("B/3.png", png(3)), ("4.png", png(4))])
    outcome = process("training/retinal_oct/export.zip", archive)
    patients = {row["member_path"]: row["patient_key"] for row, _ in outcome.images}
    assert patients["A/1.png"] == patients["A/2.png"] != patients["B/3.png"] != patients["4.png"]
    other = process("training/retinal_oct/other.zip", make_zip([("A/1.png", png(5))]))
    assert other.images[0][0]["patient_key"] != patients["A/1.png"]  # another archive, another patient


def test_member_labels_from_a_manifest_and_unlabelled_members() -> None:
    labeler = Labeler(CLASSES, [Manifest("exp/labels.csv", {"P.zip!x.dcm": "lung_ct"})])
    outcome = process("exp/P.zip", make_zip([("x.dcm", dicom(3)), ("y.dcm", dicom(4))]), labeler)
    assert [(r["member_path"], r["label"], r["label_source"]) for r, _ in outcome.images] == [
        ("x.dcm", "lung_ct", "manifest")
    ]
    assert [(q["member_path"], q["reason"]) for q in outcome.quarantined] == [("y.dcm", "unlabelled")]


def test_identifiers_in_keys_are_counted() -> None:
    assert process("training/brain_mri/MRN-0042/a.dcm", dicom(5)).identifier_keys == 1
    assert process("training/brain_mri/E9/ACC-777.dcm", dicom(6, accession="ACC-777")).identifier_keys == 1
    assert process("training/brain_mri/E9/a.dcm", dicom(7)).identifier_keys == 0
    assert process("training/brain_mri/P1/a.dcm", dicom(8, patient="P1")).identifier_keys == 0  # too short


def test_like_prefix_matches_literally() -> None:
    db = sqlite3.connect(":memory:")
    keys = ["training/brain_mri/a", "training/brainXmri/a", "training/brain_mri%/b", "other/x"]
    db.execute("CREATE TABLE t (k TEXT)")
    db.executemany("INSERT INTO t VALUES (?)", [(k,) for k in keys])
    found = db.execute(
        "SELECT k FROM t WHERE k LIKE ? ESCAPE '\\' ORDER BY k", (like_prefix("training/brain_mri"),)
    )
    assert [k for (k,) in found] == ["training/brain_mri%/b", "training/brain_mri/a"]
    found = db.execute("SELECT k FROM t WHERE k LIKE ? ESCAPE '\\'", (like_prefix("training/brain_mri%"),))
    assert [k for (k,) in found] == ["training/brain_mri%/b"]


def test_batch_id_depends_on_contents_not_order() -> None:
    a, b = ObjectInfo("x", "1", 1), ObjectInfo("y", "2", 1)
    assert batch_id([a, b]) == batch_id([b, a]) != batch_id([a, ObjectInfo("y", "3", 1)])


@pytest.mark.parametrize(
    ("run_id", "slug"),
    [("scheduled__2026-11-23T02:00:00+00:00", "scheduled__2026-11-23T02-00-00-00-00"), ("a/../b", "a-..-b")],
)
def test_run_slug(run_id: str, slug: str) -> None:
    assert run_slug(run_id) == slug


@pytest.mark.parametrize("run_id", ["..", "", "/"])
def test_run_slug_is_never_a_dot_segment_or_empty(run_id: str) -> None:
    assert run_slug(run_id).startswith("run-") and run_slug(run_id) != run_slug(run_id + "x")


def test_decode_processes_default_to_one_more_than_the_cores() -> None:
    assert decode_processes(get_settings(ingest_processes=3)) == 3
    assert decode_processes(get_settings()) == (os.cpu_count() or 1) + 1


# --------------------------------------------------------------------------- bugs are not data faults


def test_a_bug_in_decoding_is_a_decoder_error_with_a_traceback_but_no_header_values(monkeypatch) -> None:
    """A regression raising with a header value in its message: recorded, not quarantined, no PHI."""

    def buggy(data, *args):
        ds = pydicom.dcmread(io.BytesIO(data))
        raise ValueError(f"cannot handle patient {ds.PatientID}")  # what a careless f-string does

    archive = make_zip([("good.png", png(1)), ("bad.dcm", dicom(2, patient="MRN-SECRET-77"))])
    real = decoding.decode_image
    monkeypatch.setattr(
        decoding, "decode_image", lambda data, *a: (buggy if b"DICM" in data else real)(data, *a)
    )
    outcome = process("training/brain_mri/E1/export.zip", archive)

    assert outcome.quarantined == [] and len(outcome.images) == 1  # the object is held back whole by ingest
    (error,) = outcome.errors
    assert (error["kind"], error["member_path"]) == ("decoder_error", "bad.dcm")
    assert error["error"].startswith("builtins.ValueError at test_ingest_unit.py:")
    assert "in buggy" in error["traceback"] and "raise ValueError" in error["traceback"]
    assert "MRN-SECRET-77" not in repr(error)


def test_a_labeling_bug_holds_the_object_back() -> None:
    class Exploding(Labeler):
        def resolve(self, *args, **kwargs):
            raise KeyError("unexpected")

    outcome = process("training/brain_mri/E1/a.dcm", dicom(1), Exploding(CLASSES))
    assert [e["kind"] for e in outcome.errors] == ["decoder_error"] and not outcome.quarantined
    assert "KeyError" in outcome.errors[0]["error"]
