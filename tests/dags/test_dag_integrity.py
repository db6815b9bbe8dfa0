"""DAG files are thin, importable wiring: no import errors, no DB or network at parse time."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from airflow.dag_processing.dagbag import DagBag

DAGS = Path(__file__).resolve().parents[2] / "dags"
EXPECTED = {"mmpipe_champion", "mmpipe_ingest", "mmpipe_retrain", "mmpipe_score"}


@pytest.fixture(scope="module")
def dagbag() -> DagBag:
    return DagBag(dag_folder=str(DAGS))


def test_no_import_errors(dagbag: DagBag) -> None:
    assert dagbag.import_errors == {}
    assert set(dagbag.dag_ids) == EXPECTED


@pytest.mark.parametrize("dag_id", sorted(EXPECTED))
def test_every_dag_has_tags_retries_docs(dagbag: DagBag, dag_id: str) -> None:
    dag = dagbag.dags[dag_id]
    assert "mmpipe" in dag.tags
    assert dag.doc_md and len(dag.doc_md) > 200
    assert dag.max_active_runs == 1
    for task in dag.tasks:
        assert task.retries is not None
    assert any(t.retries > 0 for t in dag.tasks)


def test_parse_touches_no_network_or_database(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Parse with every socket refused and an unreachable store/DB configured: parsing must still succeed."""
    monkeypatch.setenv("MMPIPE_DATABASE_URL", "postgresql://nobody@192.0.2.1:5432/none")
    monkeypatch.setenv("MMPIPE_S3_ENDPOINT_URL", "http://192.0.2.1:9")
    attempts: list[object] = []

    def refuse(self: socket.socket, address: object) -> None:
        attempts.append(address)
        raise OSError("network access at DAG parse time")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    bag = DagBag(dag_folder=str(DAGS))
    assert bag.import_errors == {}
    assert set(bag.dag_ids) == EXPECTED
    assert attempts == []


def test_retrain_params_are_typed_for_the_ui(dagbag: DagBag) -> None:
    params = dagbag.dags["mmpipe_retrain"].params
    assert {"backbones", "epochs", "freeze_ratio", "init", "channel_mode", "freeze_test"} <= set(
        params.keys()
    )
    schema = params.get_param("init").schema
    assert schema.get("enum") == ["pretrained", "random", "champion"]
