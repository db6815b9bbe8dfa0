"""MMPIPE_RETRAIN_SCHEDULE chooses how mmpipe_retrain starts: the nightly cron, or data-aware scheduling on
the asset that ingest's validate task publishes. Parsed by Airflow as the DAG processor parses it;
the chain itself (ingest's event queued for retrain) runs in the UI test against a real scheduler."""

from __future__ import annotations

from pathlib import Path

import pytest
from airflow.dag_processing.dagbag import DagBag
from airflow.serialization.serialized_objects import DagSerialization

DAGS = Path(__file__).resolve().parents[2] / "dags"


def parsed(monkeypatch, dag_file: str, dag_id: str, **env: str):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    bag = DagBag(dag_folder=str(DAGS / dag_file))
    assert bag.import_errors == {}
    return DagSerialization.from_dict(DagSerialization.to_dict(bag.dags[dag_id]))


@pytest.mark.parametrize("value", [None, "cron"])
def test_retrain_runs_nightly_by_default(monkeypatch, value):
    env = {"MMPIPE_RETRAIN_SCHEDULE": value} if value else {}
    monkeypatch.delenv("MMPIPE_RETRAIN_SCHEDULE", raising=False)
    dag = parsed(monkeypatch, "mmpipe_retrain.py", "mmpipe_retrain", **env)
    assert dag.timetable.summary == "0 2 * * *"
    assert not dag.timetable.asset_condition


def test_retrain_runs_on_ingests_curated_images_when_asked(monkeypatch):
    retrain = parsed(monkeypatch, "mmpipe_retrain.py", "mmpipe_retrain", MMPIPE_RETRAIN_SCHEDULE="asset")
    ingest = parsed(monkeypatch, "mmpipe_ingest.py", "mmpipe_ingest")
    (published,) = ingest.get_task("validate").outlets
    assert [a.name for _, a in retrain.timetable.asset_condition.iter_assets()] == [published.name]
    assert published.name == "mmpipe_curated_images"


def test_an_unknown_schedule_is_a_clear_parse_error(monkeypatch):
    monkeypatch.setenv("MMPIPE_RETRAIN_SCHEDULE", "hourly")
    bag = DagBag(dag_folder=str(DAGS / "mmpipe_retrain.py"))
    assert "MMPIPE_RETRAIN_SCHEDULE" in next(iter(bag.import_errors.values()))
