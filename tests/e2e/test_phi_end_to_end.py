"""No PHI anywhere a nightly loop writes: real `dag.test()` runs of ingest, retrain and scoring on a
tiny synthetic corpus (real SeaweedFS, PostgreSQL catalog), then every place they wrote is searched
for the corpus's identifying header values.

Searched: every table of the catalog (ingest, training, scoring), every object mmpipe wrote to the
store (shards, quarantine records, reports and Data Docs, plans, model cards and weights, scoring
results), every table of Airflow's metadata database (XCom values, rendered task fields, task
instances), Airflow's log folder, and everything the runs printed or logged (task logs under
``dag.test()``), captured at the file-descriptor level so the training subprocess is included.

Looked for: PatientName (and its components), PatientID, PatientBirthDate, Study/Series/SOP
Instance UIDs, AccessionNumber, StudyDate and InstitutionName, as :mod:`mmpipe.synth` writes them.
"""

from __future__ import annotations

import io
import logging
import re
import subprocess
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pydicom
import pytest
import sqlalchemy as sa

from mmpipe.synth import generate, unlabelled_key
from tests.conftest import AIRFLOW_HOME, export_env

pytestmark = pytest.mark.e2e
DAGS = Path(__file__).resolve().parents[2] / "dags"
KEYWORDS = (
    "PatientName", "PatientID", "PatientBirthDate", "StudyInstanceUID", "SeriesInstanceUID",
    "SOPInstanceUID", "AccessionNumber", "StudyDate", "InstitutionName",
)  # fmt: skip
STORE_PREFIXES = ("curated/", "quarantine/", "reports/", "results/", "plans/", "models/")


def dicoms(body: bytes) -> list[pydicom.Dataset]:
    if body[:2] == b"PK":
        with zipfile.ZipFile(io.BytesIO(body)) as archive:
            return [d for name in archive.namelist() for d in dicoms(archive.read(name))]
    if body[128:132] != b"DICM":
        return []
    return [pydicom.dcmread(io.BytesIO(body), stop_before_pixels=True)]


def phi_values(bodies: list[bytes]) -> dict[str, set[str]]:
    """{keyword: values} of every DICOM input, PatientName also by its components."""
    found: dict[str, set[str]] = {k: set() for k in KEYWORDS}
    for ds in (d for body in bodies for d in dicoms(body)):
        for keyword in KEYWORDS:
            value = str(ds.get(keyword, "") or "").strip()
            parts = {value, value.replace("^", " ")} | (
                set(value.split("^")) if keyword == "PatientName" else set()
            )
            found[keyword] |= {p for p in parts if len(p) >= 6}
    return found


def pattern(value: str) -> re.Pattern[bytes]:
    """Digits (dates) only where no other digit or a decimal point adjoins: 20190312 is not 0.20190312."""
    escaped = re.escape(value.encode())
    if value.isdigit():
        return re.compile(rb"(?<![\d.])" + escaped + rb"(?!\d)")
    return re.compile(escaped, re.IGNORECASE)


def hits(blob: bytes | str, patterns: dict[str, re.Pattern[bytes]]) -> set[str]:
    data = blob.encode(errors="replace") if isinstance(blob, str) else blob
    return {value for value, regex in patterns.items() if regex.search(data)}


def scan_database(
    engine: sa.Engine, patterns: dict[str, re.Pattern[bytes]], where: str
) -> dict[str, set[str]]:
    found = {}
    with engine.connect() as conn:
        for table in sa.inspect(engine).get_table_names():
            for row in conn.execute(sa.text(f'SELECT * FROM "{table}"')).mappings():
                for column, value in row.items():
                    if value is not None and (
                        hit := hits(value if isinstance(value, bytes) else str(value), patterns)
                    ):
                        found.setdefault(f"{where}:{table}.{column}", set()).update(hit)
    return found


@pytest.fixture(scope="module")
def airflow_db() -> None:
    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], check=True, capture_output=True)


def test_no_phi_anywhere_a_nightly_loop_writes(airflow_db, ready, monkeypatch, capfd, caplog) -> None:
    from airflow.dag_processing.dagbag import DagBag

    # One epoch of tinycnn cannot clear a gate that asks for a full point over the thumbnail baseline:
    # the champion is forced through the mmpipe_champion DAG, whose records are scanned too.
    settings, store, catalog = ready(image_size=48, min_train_per_class=2, promotion_baseline_margin=1.0)
    export_env(monkeypatch, settings)
    training = {"training/" + o.key: o.body for o in generate(150, size=48, seed=3, archive_fraction=0.2)}
    incoming = {
        "incoming/" + unlabelled_key(o.key): o.body
        for o in generate(12, size=48, seed=4, archive_fraction=0.5)
    }
    dicom = next(body for key, body in training.items() if key.endswith(".dcm"))
    label = next(key for key, body in training.items() if body is dicom).split("/")[1]
    training[f"training/{label}/XBROKEN/cut.dcm"] = dicom[:-500]  # quarantined, with its PHI
    incoming["incoming/XBROKEN/cut.dcm"] = dicom[:-500]  # unreadable when scored
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda item: store.put(*item), {**training, **incoming}.items()))
    values = phi_values(list(training.values()) + list(incoming.values()))
    assert all(values[k] for k in KEYWORDS), {k: len(v) for k, v in values.items()}  # the corpus has them all
    patterns = {value: pattern(value) for found in values.values() for value in found}
    plain = [body for key, body in training.items() if key.endswith(".dcm")]
    seen = set().union(*(hits(body, patterns) for body in plain))
    assert all(values[k] & seen for k in KEYWORDS)  # the search finds every kind in a raw input

    caplog.set_level(logging.DEBUG)
    dags = DagBag(dag_folder=str(DAGS)).dags
    assert dags["mmpipe_ingest"].test().state == "success"
    conf = {"backbones": ["tinycnn"], "init": "random", "epochs": 1, "image_size": 32, "batch_size": 32}
    assert dags["mmpipe_retrain"].test(run_conf=conf).state == "success"
    challenger = catalog.scalar("SELECT challenger FROM promotions")
    force = {"action": "promote", "model_version": challenger, "force": True, "reason": "phi test"}
    assert dags["mmpipe_champion"].test(run_conf=force).state == "success"
    assert dags["mmpipe_score"].test().state == "success"
    assert catalog.scalar("SELECT count(*) FROM predictions") > 0  # scoring really ran

    found = scan_database(catalog.engine, patterns, "catalog")
    written = [o.key for prefix in STORE_PREFIXES for o in store.list(prefix)]
    assert {k.split("/", 1)[0] + "/" for k in written} == set(STORE_PREFIXES)  # every kind was written
    for key in written:
        if hit := hits(store.get(key), patterns):
            found[f"store:{key}"] = hit
    airflow = sa.create_engine(f"sqlite:///{AIRFLOW_HOME / 'airflow.db'}")
    assert airflow.connect().execute(sa.text("SELECT count(*) FROM xcom")).scalar() > 0
    found |= scan_database(airflow, patterns, "airflow")
    for path in (AIRFLOW_HOME / "logs").rglob("*"):
        if path.is_file() and (hit := hits(path.read_bytes(), patterns)):
            found[f"airflow log {path}"] = hit
    out, err = capfd.readouterr()
    logged = "\n".join(r.getMessage() for r in caplog.records)
    missing = [
        line for line in ("ingest run", "tinycnn-random epoch", "scored") if line not in logged + out + err
    ]
    assert not missing, missing  # the task logs, training's included, were really captured
    for name, text in (("stdout", out), ("stderr", err), ("logging", logged)):
        if hit := hits(text, patterns):
            found[name] = hit
    assert found == {}
