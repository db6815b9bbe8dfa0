"""Run reports: one self-contained page per run, built from what the catalog and the store hold.

The catalog here is real (SQLite via the shared fixtures, PostgreSQL in the DAG test) and holds rows
for every kind of work a run does, plus what other stages are adding while this is written: a new
table with a run column, a new column on predictions, a new field and plot in an evaluation report.
The page must show all of it without knowing about it.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from mmpipe import report
from tests.conftest import export_env

pytestmark = pytest.mark.integration
RUN = "manual__2026-11-27T02:00:00+00:00"
DAGS = Path(__file__).resolve().parents[2] / "dags"


def png(color: str) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(out, format="PNG")
    return out.getvalue()


def insert(catalog, table: str, *rows: dict) -> None:
    cols = list(rows[0])
    catalog.execute(
        f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join(':' + c for c in cols)})", list(rows)
    )


@pytest.fixture
def recorded_run(ready):
    """A run that ingested, validated, trained two candidates, promoted one and scored, all recorded."""
    settings, store, catalog = ready()
    docs = store.put("reports/validation/ingest-x/datadocs/index.html", b"<html>docs</html>", "text/html")
    plots, calibration_png = (
        store.put("reports/evaluations/m1/plots.png", png("red")),
        store.put("reports/evaluations/m1/calibration.png", png("blue")),
    )
    metrics = store.put_json(
        "reports/evaluations/m1/metrics.json",
        {"plots": plots, "calibration": {"temperature": 1.7, "diagram": calibration_png}, "baselines": [
            {"name": "majority", "macro_f1": 0.07}, {"name": "linear-thumbnails", "macro_f1": 0.41}]},
    )  # fmt: skip
    insert(catalog, "ingest_runs", {"run_id": RUN, "prefix": "training/", "status": "succeeded", "listed": 5,
                                    "ingested": 3, "duplicates": 0, "quarantined": 2, "images": 3})  # fmt: skip
    insert(catalog, "quarantine", *[
        {"source_key": f"training/x/{n}.dcm", "source_etag": "e", "member_path": "", "reason": reason,
         "detail": f"because {n}", "run_id": RUN, "record_uri": "s3://b/q.json"}
        for n, reason in enumerate(["truncated", "unsupported_transfer_syntax"])
    ])  # fmt: skip
    insert(catalog, "validations", {"validation_id": "batch:x", "subject": f"ingest:{RUN}", "suite": "batch",
                                    "success": True, "n_critical": 0, "n_warnings": 1,
                                    "results_json": json.dumps({"checks": [{"name": "rows_in_range", "success": True}]}),
                                    "docs_uri": docs})  # fmt: skip
    insert(catalog, "training_runs", *[
        {"training_run_id": f"t{n}", "airflow_run_id": RUN, "candidate": name, "backbone": name,
         "candidate_json": json.dumps({"epochs": 2}), "dataset_version": "d1", "status": "succeeded",
         "model_version": f"m{n}"} for n, name in ((1, "resnet18"), (2, "tinycnn"))
    ])  # fmt: skip
    insert(catalog, "models", *[{"model_version": f"m{n}", "training_run_id": f"t{n}", "backbone": "b",
                                 "checkpoint_uri": "s3://b/c", "card_uri": "s3://b/card"} for n in (1, 2)])  # fmt: skip
    insert(catalog, "evaluations", *[
        {"model_version": f"m{n}", "test_snapshot": "test-v1", "n_images": 30, "accuracy": f1, "macro_precision": f1,
         "macro_recall": f1, "macro_f1": f1, "macro_specificity": f1, "macro_auc": f1, "ece": 0.05,
         "per_class_json": "{}", "confusion_json": "[]", "report_uri": metrics if n == 1 else None}
        for n, f1 in ((1, 0.91), (2, 0.62))
    ])  # fmt: skip
    insert(catalog, "epoch_metrics", *[
        {"training_run_id": t, "epoch": e, "lr": 1e-3, "train_loss": 1.0 / e, "val_loss": 1.1 / e,
         "val_accuracy": 0.5 + e / 10, "val_macro_f1": 0.4 + e / 10, "seconds": 1.0}
        for t in ("t1", "t2") for e in (1, 2)
    ])  # fmt: skip
    insert(catalog, "promotions", {"promotion_id": "p1", "airflow_run_id": RUN, "challenger": "m1",
                                   "test_snapshot": "test-v1", "challenger_f1": 0.91, "decision": "promoted",
                                   "reason": "macro-F1 0.910 beats no champion"})  # fmt: skip
    # What the scoring and reliability engineers are adding right now, unknown to the renderer:
    catalog.execute("ALTER TABLE predictions ADD COLUMN fate TEXT")
    catalog.execute(
        "CREATE TABLE store_errors (run_id TEXT NOT NULL, source_key TEXT NOT NULL, error TEXT NOT NULL)"
    )
    insert(catalog, "predictions", *[
        {"source_key": f"incoming/{n}.dcm", "source_etag": "e", "member_path": "", "model_version": "m1",
         "predicted": "lung_ct", "confidence": 0.3 + n / 10, "probs_json": "[]", "needs_review": n == 0,
         "run_id": RUN, "fate": "unknown" if n == 0 else "class"} for n in range(3)
    ])  # fmt: skip
    insert(catalog, "score_failures", {"source_key": "incoming/bad.zip", "source_etag": "e", "member_path": "",
                                       "model_version": "m1", "reason": "corrupt_archive", "detail": "bad CRC",
                                       "run_id": RUN})  # fmt: skip
    insert(
        catalog, "store_errors", {"run_id": RUN, "source_key": "incoming/slow.dcm", "error": "503 SlowDown"}
    )
    return settings, store, catalog


def test_page_shows_every_kind_of_work_and_what_others_add(recorded_run):
    _, store, catalog = recorded_run
    written = report.write_run_report(
        store, catalog, RUN, "mmpipe_demo", {"train_0": "success", "promote": "failed"}
    )
    assert written.key == report.page_key(RUN) and written.uri == store.uri(written.key)
    page = store.get(written.key).decode()
    # The summary answers "what happened" first.
    for line in ("Ingest succeeded: 5 listed, 3 ingested, 0 duplicates, 2 quarantined.",
                 "Validation (batch suite): passed.", "Training: 2 of 2 candidates succeeded.",
                 "Promotion: promoted m1: macro-F1 0.910 beats no champion.",
                 "Scoring: 3 images scored (1 flagged for review), 1 not scored.",
                 "Airflow tasks not done: promote."):  # fmt: skip
        assert f"<li>{line}</li>" in page, line
    assert "truncated" in page and "unsupported_transfer_syntax" in page and "because 1" in page
    assert page.index(">m1<") < page.index(">m2<")  # leaderboard best first
    assert "corrupt_archive" in page and "bad CRC" in page
    # Unknown to the renderer: a new table, a new column, new report fields and a new plot.
    assert "store_errors" in page and "503 SlowDown" in page
    assert re.search(r"<th>fate</th>.*<td>unknown</td>", page, re.S)
    assert "temperature" in page and "linear-thumbnails" in page
    embedded = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(embedded) == 3  # training curves, plots.png, calibration.png: nothing fetched at view time
    assert "http://" not in page.replace('href="http', "").split("<style>")[0]  # no external resources
    # Data Docs linked relative to the page's key, so it resolves wherever reports/ is served or mirrored.
    (href,) = re.findall(r'href="([^"]+)">Data Docs', page)
    assert href == "../validation/ingest-x/datadocs/index.html"
    assert "reports/validation/ingest-x/datadocs/index.html" in written.links


def test_sections_without_data_are_left_out(ready):
    _, store, catalog = ready()
    insert(catalog, "score_failures", {"source_key": "incoming/a.png", "source_etag": "e", "member_path": "",
                                       "model_version": "m1", "reason": "unreadable", "detail": "x", "run_id": RUN})  # fmt: skip
    page = store.get(report.write_run_report(store, catalog, RUN).key).decode()
    assert "<h2>Scoring</h2>" in page
    for absent in ("<h2>Ingest</h2>", "<h2>Retrain</h2>", "<h2>Validation</h2>", "<h2>Airflow tasks</h2>"):
        assert absent not in page


def test_cli_writes_the_page_and_a_local_mirror_of_what_it_links(recorded_run, monkeypatch, tmp_path):
    settings, _, _ = recorded_run
    export_env(monkeypatch, settings)
    env = dict(__import__("os").environ)

    def mmpipe(*args):
        return subprocess.run(
            [sys.executable, "-m", "mmpipe", *args], env=env, capture_output=True, text=True, timeout=120
        )

    out = mmpipe("report", RUN, "--json")
    assert out.returncode == 0, out.stderr
    local = Path(json.loads(out.stdout)["file"])
    href = re.findall(r'href="([^"]+)">Data Docs', local.read_text())[0]
    assert (local.parent / href).read_text() == "<html>docs</html>"
    missing = mmpipe("report", "no-such-run")
    assert missing.returncode == 2 and "nothing recorded for run 'no-such-run'" in missing.stderr


@pytest.fixture(scope="module")
def airflow_db() -> None:
    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], check=True, capture_output=True)


@pytest.mark.e2e
def test_a_failed_run_still_gets_its_page_and_stays_failed(airflow_db, ready, pg_url, monkeypatch):
    """Scoring with a model that does not exist fails; the report task still runs, says so, and keeps
    the run failed. With no champion at all, an hourly run has nothing to do: it skips, quickly."""
    from airflow.dag_processing.dagbag import DagBag

    settings, store, _ = ready(database_url=pg_url)
    export_env(monkeypatch, settings)
    dag = DagBag(dag_folder=str(DAGS / "mmpipe_score.py")).dags["mmpipe_score"]
    for task in dag.tasks:
        task.retries = 0  # fail now, not after the DAG's retry delays
    run = dag.test(run_conf={"model_version": "no-such-model"})
    assert run.state == "failed"
    states = {ti.task_id: ti.state for ti in run.get_task_instances()}
    assert states["list_unscored"] == "failed" and states["report"] == "failed", states
    page = store.get(report.page_key(run.run_id)).decode()
    assert "Airflow tasks not done: list_unscored, score_batch." in page, states

    run = dag.test(run_conf={"model_version": ""})  # (dag.test keeps the last run_conf otherwise)
    states = {ti.task_id: ti.state for ti in run.get_task_instances()}
    assert run.state == "success" and states["list_unscored"] == states["summary"] == "skipped", states
    assert states["report"] == "success"


def test_every_dag_ends_in_its_report_task():
    """Every DAG run writes its page: the report task is each DAG's only leaf, after everything else."""
    from airflow.dag_processing.dagbag import DagBag
    from mmpipe_airflow.reports import RunReportOperator

    bag = DagBag(dag_folder=str(DAGS))
    assert bag.import_errors == {} and bag.dags
    for dag in bag.dags.values():
        (leaf,) = dag.leaves
        assert isinstance(leaf, RunReportOperator), dag.dag_id
        assert leaf.trigger_rule == "all_done" and leaf.retries == 0
        assert leaf.get_flat_relative_ids(upstream=True) == set(dag.task_ids) - {leaf.task_id}
