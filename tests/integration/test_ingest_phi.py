"""No PHI leaves ingest: every identifying header value of the inputs is searched for in every text
column of every catalog table, the curated shards, the quarantine records, the run reports and
the captured logs and warnings.

Inputs are synthetic studies with distinctive fake PHI, exported under opaque folder names (the
convention ingest documents: keys are stored verbatim, so exports must not put identifiers in them),
plus quarantined objects that carry PHI too (blank, truncated, unlabelled, an invalid birth date).
"""

from __future__ import annotations

import copy
import hashlib
import io
import logging
import warnings
import zipfile

import numpy as np
import pydicom
import pytest
import sqlalchemy as sa

from mmpipe import ingest, synth

pytestmark = pytest.mark.integration

PHI_KEYWORDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "AccessionNumber",
    "InstitutionName",
    "StudyDescription",
    "ReferringPhysicianName",
)
MIN_CHARS = 6  # shorter values ("M", "1") would match anything


def opaque(key: str) -> str:
    """``<label>/SYN-5-00003/0001.dcm`` -> ``training/<label>/X<hash>/0001.dcm`` (an export id, no MRN)."""
    label, rest = key.split("/", 1)
    folder, _, name = rest.rpartition("/")
    patient = folder or rest.rsplit(".", 1)[0]
    tag = "X" + hashlib.sha256(patient.encode()).hexdigest()[:10]
    return f"training/{label}/{tag}/{name}" if folder else f"training/{label}/{tag}.zip"


def extra_objects() -> dict[str, bytes]:
    """Objects that end quarantined while carrying PHI, and one labelled by a StudyDescription rule."""
    source = next(o for o in synth.generate(3, size=48, seed=11, formats={"dicom": 1}, archive_fraction=0))
    ds = pydicom.dcmread(io.BytesIO(source.body))
    out = {}

    def save(key: str, dataset: pydicom.Dataset) -> None:
        buffer = io.BytesIO()
        dataset.save_as(buffer)
        out[key] = buffer.getvalue()

    blank = copy.deepcopy(ds)
    blank.PixelData = np.full((blank.Rows, blank.Columns), 7, np.uint16).tobytes()
    blank.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    blank.PatientName, blank.PatientID = "DOE^JANEBLANKSLATE", "MRN-BLANK-777"
    save("training/lung_ct/XBLANK/blank.dcm", blank)
    odd = copy.deepcopy(ds)
    odd.PatientID, odd.AccessionNumber = "MRN-BADDATE-31", "ACC-BADDATE-31"
    odd.PatientBirthDate = "NOTADATE19XX"  # invalid DA: must not be echoed by a validation warning
    save("unsorted/XODD/odd.dcm", odd)
    ruled = copy.deepcopy(ds)
    ruled.PatientID, ruled.StudyDescription = "MRN-RULED-42", "RULEMATCH SECRET KNEE STUDY"
    save("unsorted/XRULE/ruled.dcm", ruled)
    unlabelled = copy.deepcopy(ds)
    unlabelled.PatientID, unlabelled.InstitutionName = "MRN-UNLABELLED-9", "ST ELSEWHERE INFIRMARY"
    save("training/not_a_class/XUNL/u.dcm", unlabelled)
    truncated = copy.deepcopy(ds)
    truncated.PatientID = "MRN-TRUNCATED-5"
    save("training/lung_ct/XTRUNC/t.dcm", truncated)
    out["training/lung_ct/XTRUNC/t.dcm"] = out["training/lung_ct/XTRUNC/t.dcm"][:-200]
    return out


def phi_values(bodies: list[bytes]) -> set[str]:
    """Identifying header values of every DICOM input (archive members included)."""
    values: set[str] = set()
    for body in bodies:
        if body[:2] == b"PK":
            with zipfile.ZipFile(io.BytesIO(body)) as archive:
                values |= phi_values([archive.read(n) for n in archive.namelist()])
            continue
        if body[128:132] != b"DICM":
            continue
        ds = pydicom.dcmread(io.BytesIO(body), stop_before_pixels=True, force=True)
        for keyword in PHI_KEYWORDS:
            raw = str(ds.get(keyword, "") or "").strip()
            for value in {raw, raw.replace("^", " ").strip(), *raw.split("^")}:
                if len(value) >= MIN_CHARS:
                    values.add(value)
    return values


def leaks(text: str | bytes, values: set[str]) -> set[str]:
    if isinstance(text, bytes):
        return {v for v in values if v.encode() in text}
    upper = text.upper()
    return {v for v in values if v.upper() in upper}


@pytest.mark.parametrize("processes", [1, 2], ids=["threads", "processes"])
def test_no_phi_in_catalog_shards_quarantine_reports_or_logs(
    ready, pg_url, caplog, capsys, processes
) -> None:
    settings, store, catalog = ready(
        database_url=pg_url,
        ingest_processes=processes,
        label_rules=[{"study_description": "rulematch", "label": "lung_ct"}],
    )
    inputs = {opaque(o.key): o.body for o in synth.generate(45, size=48, seed=5, archive_fraction=0.3)}
    inputs |= extra_objects()
    for key, body in inputs.items():
        store.put(key, body)
    values = phi_values(list(inputs.values()))
    assert {"SYNTHETIC GENERAL HOSPITAL", "MRN-BADDATE-31", "RULEMATCH SECRET KNEE STUDY"} <= values
    assert len(values) > 50

    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.INFO):
        warnings.simplefilter("always")
        for logger in ("mmpipe", "pydicom"):
            caplog.set_level(logging.DEBUG, logger=logger)
        training = ingest.run(settings, store, catalog, "phi-training")
        unsorted = ingest.run(settings, store, catalog, "phi-unsorted", prefix="unsorted/")

    assert training["images"] > 40 and training["quarantine_reasons"] == {
        "blank": 1,
        "corrupt": 1,
        "unlabelled": 1,
    }
    assert unsorted["label_sources"] == {"header_rule": 1} and unsorted["quarantine_reasons"] == {
        "unlabelled": 1
    }

    found: dict[str, set[str]] = {}
    inspector = sa.inspect(catalog.engine)
    tables = inspector.get_table_names()
    assert {"images", "source_objects", "quarantine", "duplicates", "ingest_runs", "label_manifests"} <= set(
        tables
    )
    for table in tables:
        for row in catalog.query(f"SELECT * FROM {table}"):
            for column, value in row.items():
                if isinstance(value, str) and (hit := leaks(value, values)):
                    found[f"{table}.{column}"] = hit
    written = [o.key for p in ("curated/", "quarantine/", "reports/") for o in store.list(p)]
    assert any(k.startswith("quarantine/") for k in written) and any(
        k.startswith("reports/") for k in written
    )
    shards = [k for k in written if k.startswith("curated/")]
    assert shards
    for key in written:
        if hit := leaks(store.get(key), values):
            found[key] = hit
    for key in shards:
        _, image_ids = ingest.load_shard(store, store.uri(key))
        if hit := leaks(" ".join(image_ids), values):
            found[key + ":image_ids"] = hit
    captured = capsys.readouterr()
    for name, text in (
        ("logs", "\n".join(r.getMessage() for r in caplog.records)),
        ("warnings", "\n".join(str(w.message) for w in caught)),
        ("stdout/stderr", captured.out + captured.err),
    ):
        if hit := leaks(text, values):
            found[name] = hit
    assert caplog.records  # the logs were really captured
    assert found == {}
