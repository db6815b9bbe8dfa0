"""The whole nightly loop through real Airflow DAG runs (`dag.test()`), the real embedded S3
endpoint and a real PostgreSQL catalog, on a tiny synthetic corpus."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from mmpipe.config import CLASSES
from mmpipe.synth import generate
from tests.conftest import export_env

pytestmark = pytest.mark.e2e
DAGS = Path(__file__).resolve().parents[2] / "dags"


@pytest.fixture(scope="module")
def airflow_db() -> None:
    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], check=True, capture_output=True)


def _upload(store, prefix: str, objects, strip_label: bool = False) -> list[str]:
    def put(obj):
        key = prefix + (obj.key.split("/", 1)[1] if strip_label else obj.key)
        store.put(key, obj.body)
        return key

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(put, objects))


def test_ingest_retrain_score_through_airflow(airflow_db, ready, pg_url, monkeypatch) -> None:
    from airflow.dag_processing.dagbag import DagBag

    # Two epochs on 260 images cannot clear a gate that asks for a full point over the thumbnail
    # baseline: the retrain run keeps (no) champion, and a person promotes on the record instead.
    settings, store, catalog = ready(database_url=pg_url, image_size=48, promotion_baseline_margin=1.0)
    export_env(monkeypatch, settings)
    _upload(store, "training/", generate(260, size=64, seed=1))
    incoming = _upload(
        store, "incoming/", generate(24, size=64, seed=2, archive_fraction=0.5), strip_label=True
    )
    dags = DagBag(dag_folder=str(DAGS)).dags

    run = dags["mmpipe_ingest"].test()
    assert run.state == "success"
    ingest_run = catalog.query("SELECT * FROM ingest_runs")[0]
    assert ingest_run["status"] == "succeeded"
    objects = catalog.scalar("SELECT count(*) FROM source_objects")
    assert ingest_run["listed"] == objects == len(list(store.list("training/")))
    assert ingest_run["ingested"] + ingest_run["duplicates"] + ingest_run["quarantined"] == objects
    assert catalog.scalar("SELECT count(*) FROM images WHERE status = 'active'") == 260
    validation = catalog.query("SELECT success, docs_uri FROM validations WHERE suite = 'batch'")[0]
    assert validation["success"] and store.head(store.key_of(validation["docs_uri"])) is not None

    conf = {
        "backbones": ["tinycnn", "resnet18"],
        "init": "random",
        "epochs": 2,
        "image_size": 48,
        "batch_size": 32,
    }
    run = dags["mmpipe_retrain"].test(run_conf=conf)
    assert run.state == "success"
    board = catalog.query("SELECT * FROM leaderboard")
    assert {r["backbone"] for r in board} == {"tinycnn", "resnet18"}
    assert all(r["test_snapshot"] == "test-v1" and 0 <= r["accuracy"] <= 1 for r in board)
    assert all(r["thumbnail_f1"] is not None and r["majority_f1"] is not None for r in board)
    assert catalog.scalar("SELECT count(*) FROM epoch_metrics") >= 2
    (decision,) = catalog.query("SELECT * FROM promotions")
    chosen = max(board, key=lambda r: (r["val_macro_f1"], r["model_version"]))  # on validation, not test
    assert decision["challenger"] == chosen["model_version"] and decision["selected_by"] == "best_val_f1"
    assert decision["decision"] == "kept_champion" and "thumbnail baseline" in decision["reason"]
    assert catalog.scalar("SELECT model_version FROM model_aliases WHERE alias = 'champion'") is None

    force = {"action": "promote", "model_version": chosen["model_version"], "force": True, "reason": "e2e"}
    assert dags["mmpipe_champion"].test(run_conf=force).state == "success"
    champion = catalog.scalar("SELECT model_version FROM model_aliases WHERE alias = 'champion'")
    assert champion == chosen["model_version"]
    assert catalog.query("SELECT action, reason FROM alias_history") == [{"action": "force", "reason": "e2e"}]

    run = dags["mmpipe_score"].test()
    assert run.state == "success"
    fates = {key: store.get_tags(key) for key in incoming}
    for tags in fates.values():
        assert tags["mmpipe-model"] == champion
        assert tags["mmpipe-review"] in ("yes", "no")
        if tags.get("mmpipe-status") == "unknown":  # out of distribution for a 2-epoch model: for review
            assert tags["mmpipe-review"] == "yes" and "out_of_distribution" in tags["mmpipe-review-reason"]
        else:
            assert tags["mmpipe-modality"] in CLASSES and 0 < float(tags["mmpipe-confidence"]) <= 1
    assert sum("mmpipe-modality" in tags for tags in fates.values()) >= len(incoming) // 2
    assert catalog.scalar("SELECT count(*) FROM predictions") == 24

    # Reruns are no-ops: nothing new to ingest, nothing unscored for this champion.
    assert dags["mmpipe_ingest"].test().state == "success"
    assert catalog.scalar("SELECT count(*) FROM images") == 260
    assert dags["mmpipe_score"].test().state == "success"
    assert catalog.scalar("SELECT count(*) FROM predictions") == 24
