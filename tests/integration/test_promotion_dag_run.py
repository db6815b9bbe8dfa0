"""A real retrain DAG run (`dag.test()`) where one candidate's training fails: it is recorded as failed,
the other candidate is still evaluated and judged, and the run ends failed so the failure is seen.

ResNet-18 is asked for with pretrained weights that were never registered, which fails inside
`mmpipe train` as an out-of-memory pod would; TinyCNN's weights are registered. Real SeaweedFS,
PostgreSQL and Airflow; one epoch at 32 px.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mmpipe import dataset, ingest
from mmpipe.models import export_reference_weights
from mmpipe.synth import generate
from mmpipe.weights import import_weights
from tests.conftest import export_env

pytestmark = pytest.mark.integration
DAGS = Path(__file__).resolve().parents[2] / "dags"


@pytest.fixture(scope="module")
def airflow_db() -> None:
    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], check=True, capture_output=True)


def test_one_failed_candidate_does_not_cancel_the_others(airflow_db, ready, monkeypatch, tmp_path) -> None:
    from airflow.dag_processing.dagbag import DagBag

    settings, store, catalog = ready(image_size=48, min_train_per_class=2)
    export_env(monkeypatch, settings)
    for obj in generate(150, size=48, seed=3, archive_fraction=0):
        store.put(f"training/{obj.key}", obj.body)
    export_reference_weights("tinycnn", tmp_path / "tinycnn.safetensors")
    import_weights(store, "tinycnn", tmp_path / "tinycnn.safetensors")
    ingest.run(settings, store, catalog, "ingest__1")
    dataset.validate_ingest(settings, store, catalog, "ingest__1")

    retrain = DagBag(dag_folder=str(DAGS / "mmpipe_retrain.py")).dags["mmpipe_retrain"]
    for task in retrain.tasks:
        task.retries = 0  # the failure is permanent: no need to wait five minutes for a retry
    conf = {"backbones": ["tinycnn", "resnet18"], "init": "pretrained", "epochs": 1, "image_size": 32}
    run = retrain.test(run_conf=conf)
    assert run.state == "failed"  # the report task carries the failed training into the run's verdict

    runs = {r["candidate"]: r for r in catalog.query("SELECT * FROM training_runs")}
    assert runs["resnet18"]["status"] == "failed" and runs["tinycnn"]["status"] == "succeeded"
    evaluated = [r["model_version"] for r in catalog.query("SELECT model_version FROM evaluations")]
    assert evaluated == [runs["tinycnn"]["model_version"]]
    (decision,) = catalog.query("SELECT * FROM promotions")
    assert decision["challenger"] == runs["tinycnn"]["model_version"]
    assert decision["selected_by"] == "best_val_f1" and decision["checks_json"]
