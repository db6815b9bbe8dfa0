"""`mmpipe score` as a user runs it: a prefix or an s3:// URI tags the store and ends with a table of
fates; a local folder writes a results file and changes nothing in the store."""

from __future__ import annotations

import csv
import json

import pytest

from mmpipe import cli
from tests.conftest import export_env
from tests.dicom_factory import dicom_bytes
from tests.integration.test_score import register

pytestmark = pytest.mark.integration


def test_score_a_uri_then_a_local_folder(ready, monkeypatch, tmp_path, capsys) -> None:
    settings, store, catalog = ready(ingest_processes=2)
    export_env(monkeypatch, settings)
    register(store, catalog, "tiny-1")
    for n in range(3):
        store.put(f"incoming/ward/P{n}.dcm", dicom_bytes(n, Modality="CT"))
    store.put("incoming/ward/cut.dcm", dicom_bytes(9, Modality="CT")[:200])

    assert cli.main(["score", store.uri("incoming/ward/"), "--run-id", "cli-1"]) == 0
    text = capsys.readouterr().out
    assert "fates:" in text and "unreadable" in text
    assert store.get_tags("incoming/ward/cut.dcm")["mmpipe-status"] == "unreadable"
    assert cli.main(["--json", "score", "incoming/ward/", "--run-id", "cli-2"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert (again["listed"], again["skipped"]) == (4, 4)
    assert cli.main(["--json", "score", "incoming/", "--force", "--run-id", "cli-3"]) == 0
    assert json.loads(capsys.readouterr().out)["tagged"] == 3

    folder = tmp_path / "drop"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "a.dcm").write_bytes(dicom_bytes(1, Modality="MR"))
    (folder / "notes.dcm").write_bytes(b"no image here")
    before = {o.key: (o.etag, store.get_tags(o.key)) for o in store.list("")}
    out = tmp_path / "scores.csv"
    assert cli.main(["--json", "score", str(folder), "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["listed"], summary["tagged"], summary["unreadable"]) == (2, 1, 1)
    rows = {r["source_key"]: r for r in csv.DictReader(out.open())}
    assert rows["notes.dcm"]["fate"] == "unreadable" and rows["sub/a.dcm"]["modality"]
    assert {o.key: (o.etag, store.get_tags(o.key)) for o in store.list("")} == before  # nothing written
    assert catalog.scalar("SELECT count(*) FROM scored_objects WHERE run_id = 'local'") == 0
