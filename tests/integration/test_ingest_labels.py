"""Labels end to end: manifests uploaded beside the data, header rules, the prefix, wrong labels,
and unlabelled objects taken up again once a manifest labels them."""

from __future__ import annotations

import io
import json
import zipfile

import pytest

from mmpipe import ingest
from tests.dicom_factory import dicom_bytes

pytestmark = pytest.mark.integration

EXPORT = "exports/2026-11/"
RULES = [
    {"modality": "CT", "body_part": "ABDOMEN|LIVER", "label": "liver_ct"},
    {"modality": "MR", "study_description": "brain|head", "label": "brain_mri"},
]


def dicom(seed: int, modality: str = "MR", body_part: str = "", description: str = "") -> bytes:
    return dicom_bytes(
        seed,
        Modality=modality,
        PatientID=f"PID{seed:04d}",
        BodyPartExamined=body_part,
        StudyDescription=description,
    )


def archive(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for name, body in members.items():
            zf.writestr(name, body)
    return buffer.getvalue()


def labels_of(catalog) -> dict[tuple[str, str], tuple[str, str]]:
    rows = catalog.query(
        "SELECT source_key, member_path, label, label_source FROM images WHERE status = 'active'"
    )
    return {
        (r["source_key"].removeprefix(EXPORT), r["member_path"]): (r["label"], r["label_source"])
        for r in rows
    }


def image_ids(catalog) -> dict[str, str]:
    return {r["source_key"]: r["image_id"] for r in catalog.query("SELECT source_key, image_id FROM images")}


def quarantined(catalog) -> dict[tuple[str, str], tuple[str, str]]:
    rows = catalog.query("SELECT source_key, member_path, reason, detail FROM quarantine")
    return {
        (r["source_key"].removeprefix(EXPORT), r["member_path"]): (r["reason"], r["detail"]) for r in rows
    }


def test_manifests_rules_and_prefix_label_an_export(ready, pg_url) -> None:
    settings, store, catalog = ready(database_url=pg_url, label_rules=RULES)
    objects = {
        "P1/img.dcm": dicom(1),
        "P2/a.dcm": dicom(2),
        "P2/sub/b.png.dcm": dicom(3),
        "P3.zip": archive({"A/one.dcm": dicom(4), "A/two.dcm": dicom(5)}),
        "P4/x.dcm": dicom(6),
        "P5/y.dcm": dicom(7),
        "P6/ct.dcm": dicom(8, "CT", "ABDOMEN"),
        "P7/mr.dcm": dicom(9, "MR", description="MRI HEAD WITHOUT CONTRAST"),
        "P8/z.dcm": dicom(10, "MR", description="MRI KNEE"),
        "broken/w.dcm": dicom(11),
    }
    for key, body in objects.items():
        store.put(EXPORT + key, body)
    store.put(
        EXPORT + "labels.csv",
        b"path,label\nP1/img.dcm,brain_mri\nP2/,lung_ct\nP3.zip,chest_xray\nP3.zip!A/two.dcm,retinal_oct\n"
        b"P4/x.dcm,brain-mri\n",
    )
    store.put(EXPORT + "P5/labels.json", json.dumps({"y.dcm": "liver_ct"}).encode())
    store.put(EXPORT + "broken/labels.csv", b"file,class\nw.dcm,brain_mri\n")
    # the prefix gives brain_mri, but a manifest is more explicit and wins
    store.put("training/brain_mri/Q1/a.dcm", dicom(12))
    store.put("training/brain_mri/Q1/labels.json", b'{"a.dcm": "lung_ct"}')

    report = ingest.run(settings, store, catalog, "labels", prefix=EXPORT)

    assert report["listed"] == len(objects)  # manifests are control files, not data
    assert (report["label_manifests"], [m["key"] for m in report["invalid_label_manifests"]]) == (
        2,
        [EXPORT + "broken/labels.csv"],
    )
    assert "'path' and 'label'" in report["invalid_label_manifests"][0]["detail"]
    assert labels_of(catalog) == {
        ("P1/img.dcm", ""): ("brain_mri", "manifest"),
        ("P2/a.dcm", ""): ("lung_ct", "manifest"),
        ("P2/sub/b.png.dcm", ""): ("lung_ct", "manifest"),
        ("P3.zip", "A/one.dcm"): ("chest_xray", "manifest"),
        ("P3.zip", "A/two.dcm"): ("retinal_oct", "manifest"),
        ("P5/y.dcm", ""): ("liver_ct", "manifest"),
        ("P6/ct.dcm", ""): ("liver_ct", "header_rule"),
        ("P7/mr.dcm", ""): ("brain_mri", "header_rule"),
    }
    assert {k: reason for k, (reason, _) in quarantined(catalog).items()} == {
        ("P4/x.dcm", ""): "unlabelled",
        ("P8/z.dcm", ""): "unlabelled",
        ("broken/w.dcm", ""): "unlabelled",
    }
    assert "'brain-mri', not a configured class" in quarantined(catalog)[("P4/x.dcm", "")][1]
    assert report["label_sources"] == {"manifest": 6, "header_rule": 2}

    training = ingest.run(settings, store, catalog, "prefix-vs-manifest")
    assert training["listed"] == 1
    assert catalog.scalar("SELECT label FROM images WHERE source_key LIKE 'training/%'") == "lung_ct"


def test_unlabelled_objects_are_taken_up_when_a_manifest_arrives(ready, pg_url) -> None:
    settings, store, catalog = ready(database_url=pg_url)
    store.put(EXPORT + "P1/a.dcm", dicom(21))
    store.put(EXPORT + "P2.zip", archive({"x.dcm": dicom(22), "y.dcm": dicom(23)}))
    first = ingest.run(settings, store, catalog, "r1", prefix=EXPORT)
    assert (first["quarantined"], first["quarantine_reasons"]) == (2, {"unlabelled": 3})

    quiet = ingest.run(settings, store, catalog, "r2", prefix=EXPORT)
    assert quiet["new_objects"] == 0  # still no label: nothing is redone

    store.put(EXPORT + "labels.csv", b"path,label\nP1/a.dcm,brain_mri\nP2.zip!x.dcm,lung_ct\n")
    third = ingest.run(settings, store, catalog, "r3", prefix=EXPORT)
    assert (third["new_objects"], third["ingested"], third["images"]) == (2, 2, 2)
    assert labels_of(catalog) == {
        ("P1/a.dcm", ""): ("brain_mri", "manifest"),
        ("P2.zip", "x.dcm"): ("lung_ct", "manifest"),
    }
    # the old unlabelled rows are replaced, not left beside the new outcome
    assert list(quarantined(catalog)) == [("P2.zip", "y.dcm")]
    statuses = {r["source_key"]: r["status"] for r in catalog.query("SELECT * FROM source_objects")}
    assert statuses == {EXPORT + "P1/a.dcm": "ingested", EXPORT + "P2.zip": "ingested"}

    last = ingest.run(settings, store, catalog, "r4", prefix=EXPORT)
    assert last["new_objects"] == 0  # y.dcm is still unlabelled: not redone again and again


def test_deleted_manifest_stops_labelling(ready, pg_url) -> None:
    settings, store, catalog = ready(database_url=pg_url)
    store.put(EXPORT + "labels.csv", b"path,label\nP1/,brain_mri\n")
    store.put(EXPORT + "P1/a.dcm", dicom(31))
    ingest.run(settings, store, catalog, "r1", prefix=EXPORT)
    store._client.delete_object(Bucket=store.bucket, Key=EXPORT + "labels.csv")
    store.put(EXPORT + "P1/b.dcm", dicom(32))
    report = ingest.run(settings, store, catalog, "r2", prefix=EXPORT)
    # the new object is unlabelled, and so is the one the manifest labelled: its label is withdrawn
    assert (report["new_objects"], report["label_manifests"]) == (2, 0)
    assert (report["quarantine_reasons"], report["retired_images"]) == ({"unlabelled": 2}, 1)
    assert catalog.scalar("SELECT count(*) FROM label_manifests") == 0
    assert labels_of(catalog) == {}


def test_a_corrected_manifest_relabels_only_what_it_changes(ready, pg_url) -> None:
    settings, store, catalog = ready(database_url=pg_url)
    store.put(EXPORT + "labels.csv", b"path,label\nP1/a.dcm,brain_mri\nP2/,lung_ct\n")
    store.put(EXPORT + "P1/a.dcm", dicom(41))
    store.put(EXPORT + "P2/b.dcm", dicom(42))
    store.put(EXPORT + "P3/c.dcm", dicom(43, "CT", "LIVER"))  # a header rule labels it
    settings = settings.model_copy(update={"label_rules": RULES})
    first = ingest.run(settings, store, catalog, "r1", prefix=EXPORT)
    ids = image_ids(catalog)

    store.put(EXPORT + "labels.csv", b"path,label\nP1/a.dcm,chest_xray\nP2/,lung_ct\n")
    second = ingest.run(settings, store, catalog, "r2", prefix=EXPORT)

    assert (first["images"], second["new_objects"], second["ingested"]) == (3, 1, 1)
    assert labels_of(catalog) == {
        ("P1/a.dcm", ""): ("chest_xray", "manifest"),
        ("P2/b.dcm", ""): ("lung_ct", "manifest"),
        ("P3/c.dcm", ""): ("liver_ct", "header_rule"),
    }
    assert image_ids(catalog) == ids  # same pixels, same images: only labels changed
    assert catalog.scalar("SELECT count(*) FROM duplicates") == 0
    assert ingest.run(settings, store, catalog, "r3", prefix=EXPORT)["new_objects"] == 0


def test_changed_header_rules_requeue_what_rules_decide(ready, pg_url) -> None:
    settings, store, catalog = ready(database_url=pg_url, label_rules=RULES[:1])
    store.put(EXPORT + "A/ct.dcm", dicom(51, "CT", "ABDOMEN"))  # liver_ct by rule 1
    store.put(EXPORT + "B/mr.dcm", dicom(52, "MR", description="HEAD routine"))  # no rule yet
    store.put("training/chest_xray/C/x.dcm", dicom(53, "CR"))  # the folder decides, not rules
    ingest.run(settings, store, catalog, "r1", prefix=EXPORT)
    ingest.run(settings, store, catalog, "t1")
    assert ingest.run(settings, store, catalog, "r2", prefix=EXPORT)["new_objects"] == 0

    fixed = settings.model_copy(
        update={"label_rules": [{"modality": "CT", "body_part": "ABDOMEN", "label": "lung_ct"}, RULES[1]]}
    )
    report = ingest.run(fixed, store, catalog, "r3", prefix=EXPORT)
    assert (report["new_objects"], report["ingested"], report["quarantined"]) == (2, 2, 0)
    assert labels_of(catalog) == {
        ("A/ct.dcm", ""): ("lung_ct", "header_rule"),
        ("B/mr.dcm", ""): ("brain_mri", "header_rule"),
        ("training/chest_xray/C/x.dcm", ""): ("chest_xray", "prefix"),
    }
    assert ingest.run(fixed, store, catalog, "t2")["new_objects"] == 0
    assert ingest.run(fixed, store, catalog, "r4", prefix=EXPORT)["new_objects"] == 0
