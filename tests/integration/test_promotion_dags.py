"""The promotion wiring as Airflow parses it: evaluation does not hang on every training succeeding, and
the champion DAG changes the champion by hand with typed Params and the champion asset event."""

from __future__ import annotations

from pathlib import Path

import pytest
from airflow.dag_processing.dagbag import DagBag

pytestmark = pytest.mark.integration
DAGS = Path(__file__).resolve().parents[2] / "dags"


@pytest.fixture(scope="module")
def dags():
    bag = DagBag(dag_folder=str(DAGS))
    assert bag.import_errors == {}
    return bag.dags


def test_a_failed_training_does_not_cancel_the_other_evaluations_nor_promotion(dags):
    dag = dags["mmpipe_retrain"]
    evaluate, promote = dag.get_task("evaluate"), dag.get_task("promote")
    # Runs once training is done, whatever its outcome; mapped over the candidates, so a failed
    # training leaves its own evaluation to skip itself rather than failing the others' expansion.
    assert evaluate.trigger_rule == "all_done"
    assert {"train", "candidates", "prepare_dataset"} <= evaluate.upstream_task_ids
    assert [t.task_id for t in evaluate.iter_mapped_dependencies()] == ["candidates"]
    # A skipped evaluation (failed candidate) lets promotion run; a failed one still stops it.
    assert promote.trigger_rule == "none_failed"
    assert [a.name for a in promote.outlets] == ["mmpipe_champion"]


def test_the_champion_dag_rolls_back_or_forces_with_a_reason_and_emits_the_asset(dags):
    dag = dags["mmpipe_champion"]
    assert not dag.timetable.can_be_scheduled  # triggered by a person only
    params = dag.params
    assert params.get_param("action").schema["enum"] == ["rollback", "promote"]
    assert params["force"] is False and params["model_version"] is None and params["reason"] == ""
    change = dag.get_task("change_champion")
    assert [a.name for a in change.outlets] == ["mmpipe_champion"]
    assert dag.get_task("report").upstream_task_ids == {"change_champion"}
    # The scoring DAG listens to that asset: a rollback or forced champion rescoring needs no other wiring.
    assert "mmpipe_champion" in {a.name for a in dags["mmpipe_score"].timetable.asset_condition.objects}
