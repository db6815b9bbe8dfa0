"""The store and the catalog as Airflow Connections, translated to mmpipe settings in one place.

``mmpipe_store`` is an AWS connection (login/password = access key id/secret, extra ``endpoint_url``
or ``service_config.s3.endpoint_url``, extra ``region_name``); ``mmpipe_catalog`` a Postgres
connection. Operators then rotate credentials in the UI or a secrets backend. mmpipe itself never
imports Airflow, so every task exports these as ``MMPIPE_*`` variables for its own process before it
runs (:func:`use_connections`, applied to every task through ``dag_defaults``); a local training
process inherits them. A connection that exists wins over the ``MMPIPE_*`` variable it replaces; one
that does not exist leaves the environment as it is (the CLI and the pods only ever read ``MMPIPE_*``).
"""

from __future__ import annotations

import os
from typing import Any

from airflow.sdk import BaseHook
from airflow.sdk.exceptions import AirflowNotFoundException

STORE_CONN_ID = "mmpipe_store"
CATALOG_CONN_ID = "mmpipe_catalog"


def _connection(conn_id: str) -> Any | None:
    try:
        return BaseHook.get_connection(conn_id)
    except AirflowNotFoundException:
        return None


def store_settings(conn: Any) -> dict[str, str]:
    from airflow.providers.amazon.aws.utils.connection_wrapper import AwsConnectionWrapper

    aws = AwsConnectionWrapper(conn)
    values = {
        "MMPIPE_S3_ENDPOINT_URL": aws.get_service_endpoint_url("s3"),
        "MMPIPE_S3_REGION": aws.region_name,
        "MMPIPE_S3_ACCESS_KEY_ID": aws.aws_access_key_id,
        "MMPIPE_S3_SECRET_ACCESS_KEY": aws.aws_secret_access_key,
    }
    return {k: v for k, v in values.items() if v}


def catalog_settings(conn: Any) -> dict[str, str]:
    from airflow.providers.postgres.hooks.postgres import PostgresHook

    hook = PostgresHook(postgres_conn_id=conn.conn_id, sqlalchemy_scheme="postgresql+psycopg2")
    return {"MMPIPE_DATABASE_URL": hook.sqlalchemy_url.render_as_string(hide_password=False)}


def connection_settings() -> dict[str, str]:
    """``MMPIPE_*`` values from whichever of the two connections exist."""
    values: dict[str, str] = {}
    if store := _connection(STORE_CONN_ID):
        values |= store_settings(store)
    if catalog := _connection(CATALOG_CONN_ID):
        values |= catalog_settings(catalog)
    return values


def use_connections(context: Any) -> None:
    """``pre_execute`` of every mmpipe task: the connections' settings become this process's ``MMPIPE_*``."""
    os.environ.update(connection_settings())
