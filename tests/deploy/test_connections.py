"""The store and the catalog from Airflow Connections, in a real DAG run (`dag.test()`).

The ``MMPIPE_*`` variables point at nothing (an unreachable store and database): the run can only
succeed if every task reads ``mmpipe_store`` (an AWS connection, endpoint in extra) and
``mmpipe_catalog`` (a Postgres connection), defined the way Airflow reads them from the environment
or a secrets backend. The same run writes its report page, and the report task pushes the UI link.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import pytest
import sqlalchemy as sa

from mmpipe.report import page_key
from mmpipe.synth import generate
from tests.conftest import export_env

pytestmark = pytest.mark.e2e
DAGS = Path(__file__).resolve().parents[2] / "dags"


@pytest.fixture(scope="module")
def airflow_db() -> None:
    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], check=True, capture_output=True)


def connections(monkeypatch, s3_endpoint: str, pg_url: str) -> None:
    db = sa.engine.make_url(pg_url)
    store = {"conn_type": "aws", "login": "test", "password": "test-secret",
             "extra": {"endpoint_url": s3_endpoint, "region_name": "us-east-1"}}  # fmt: skip
    catalog = {
        "conn_type": "postgres",
        "host": db.host,
        "port": db.port,
        "login": db.username,
        "schema": db.database,
    }
    monkeypatch.setenv("AIRFLOW_CONN_MMPIPE_STORE", json.dumps(store))
    monkeypatch.setenv("AIRFLOW_CONN_MMPIPE_CATALOG", json.dumps(catalog))


def test_tasks_take_store_and_catalog_from_airflow_connections(
    airflow_db, ready, pg_url, s3_endpoint, monkeypatch
) -> None:
    from airflow.dag_processing.dagbag import DagBag
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    settings, store, catalog = ready(database_url=pg_url)
    for obj in generate(12, size=64, seed=3):
        store.put("training/" + obj.key, obj.body)
    export_env(monkeypatch, settings)
    monkeypatch.setenv("MMPIPE_S3_ENDPOINT_URL", "http://127.0.0.1:9")  # the connections must win
    monkeypatch.setenv("MMPIPE_DATABASE_URL", "postgresql://nobody@127.0.0.1:9/nothing")
    connections(monkeypatch, s3_endpoint, pg_url)

    dag = DagBag(dag_folder=str(DAGS / "mmpipe_ingest.py")).dags["mmpipe_ingest"]
    run = dag.test()
    assert run.state == "success"
    assert os.environ["MMPIPE_S3_ENDPOINT_URL"] == s3_endpoint  # what the tasks exported for themselves
    ingest_run = catalog.query("SELECT * FROM ingest_runs")[0]
    assert (ingest_run["run_id"], ingest_run["status"]) == (run.run_id, "succeeded")
    assert catalog.scalar("SELECT count(*) FROM images WHERE status = 'active'") == 12

    page = store.get(page_key(run.run_id)).decode()
    assert "12 of 12 new objects accounted for" in page and "Data Docs" in page
    query = XComModel.get_many(
        run_id=run.run_id, key="_link_RunReportLink", dag_ids="mmpipe_ingest", task_ids="report"
    )
    with create_session() as session:
        link = session.scalars(query).first()
        assert link is not None
        assert (
            XComModel.deserialize_value(link) == f"/mmpipe/reports/mmpipe_ingest/{quote(run.run_id, safe='')}"
        )


def test_every_task_of_every_dag_exports_the_connections() -> None:
    """In a real deployment each task is its own process: each must run the hook, mapped ones included."""
    from airflow.dag_processing.dagbag import DagBag
    from mmpipe_airflow.connections import use_connections

    bag = DagBag(dag_folder=str(DAGS))
    assert bag.import_errors == {}
    for dag in bag.dags.values():
        for task in dag.tasks:
            hook = (
                task.partial_kwargs.get("pre_execute")
                if hasattr(task, "partial_kwargs")
                else task._pre_execute_hook
            )
            assert hook is use_connections, f"{dag.dag_id}.{task.task_id}"


def test_connection_fields_map_to_settings(monkeypatch) -> None:
    from mmpipe_airflow.connections import connection_settings

    monkeypatch.delenv("AIRFLOW_CONN_MMPIPE_CATALOG", raising=False)
    monkeypatch.delenv("AIRFLOW_CONN_MMPIPE_STORE", raising=False)
    assert connection_settings() == {}  # no connection: MMPIPE_* stay as they are
    store = {"conn_type": "aws", "login": "AKIA", "password": "s3cr3t",
             "extra": {"service_config": {"s3": {"endpoint_url": "https://minio.hospital:9000"}}, "region_name": "eu-west-1"}}  # fmt: skip
    catalog = {"conn_type": "postgres", "host": "db.hospital", "port": 5433, "login": "mmpipe", "password": "p@ss/word",
               "schema": "catalog", "extra": {"sqlalchemy_query": {"sslmode": "verify-full"}}}  # fmt: skip
    monkeypatch.setenv("AIRFLOW_CONN_MMPIPE_STORE", json.dumps(store))
    monkeypatch.setenv("AIRFLOW_CONN_MMPIPE_CATALOG", json.dumps(catalog))
    values = connection_settings()
    assert values["MMPIPE_S3_ENDPOINT_URL"] == "https://minio.hospital:9000"
    assert (values["MMPIPE_S3_ACCESS_KEY_ID"], values["MMPIPE_S3_SECRET_ACCESS_KEY"]) == ("AKIA", "s3cr3t")
    assert values["MMPIPE_S3_REGION"] == "eu-west-1"
    url = sa.engine.make_url(values["MMPIPE_DATABASE_URL"])
    assert (url.drivername, url.host, url.port, url.database) == (
        "postgresql+psycopg2",
        "db.hospital",
        5433,
        "catalog",
    )
    assert (url.username, url.password, url.query.get("sslmode")) == ("mmpipe", "p@ss/word", "verify-full")
