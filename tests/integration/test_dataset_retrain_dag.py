"""The retrain DAG's dataset wiring, parsed by Airflow: plan options as typed Params, and the champion's
re-evaluation on a new snapshot as its own task that promotion waits for (and survives being skipped)."""

from __future__ import annotations

from pathlib import Path

import pytest
from airflow.dag_processing.dagbag import DagBag

DAGS = Path(__file__).resolve().parents[2] / "dags"


@pytest.fixture(scope="module")
def dag():
    bag = DagBag(dag_folder=str(DAGS / "mmpipe_retrain.py"))
    assert bag.import_errors == {}
    return bag.dags["mmpipe_retrain"]


def test_champion_is_re_evaluated_before_promotion_without_blocking_it(dag):
    champion, promote = dag.get_task("evaluate_champion"), dag.get_task("promote")
    assert champion.upstream_task_ids == {"prepare_dataset"}
    assert "evaluate_champion" in promote.upstream_task_ids and "evaluate" in promote.upstream_task_ids
    assert promote.trigger_rule == "none_failed"  # a skipped re-evaluation (nothing new) lets promotion run


def test_dataset_and_loss_options_are_typed_params(dag):
    params = dag.params
    assert params["freeze_test"] is None and params["balance_target"] is None  # None: from MMPIPE_* settings
    assert params.get_param("channel_mode").schema["enum"] == [None, "replicate", "viridis", "inferno"]
    assert params.get_param("focal_gamma").schema["minimum"] == 0
    assert params.get_param("weighted_loss").schema["type"] == "boolean"
