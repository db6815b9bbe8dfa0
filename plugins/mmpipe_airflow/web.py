"""The Airflow UI side of run reports: a "Run report" tab on every DAG run, served by the API server.

The plugin mounts a small FastAPI app at ``/mmpipe``: ``/reports/{dag_id}/{run_id}`` redirects to the
run's page, ``/store/reports/...`` serves what the pages link to (Data Docs, JSON reports) from the
image store. Only keys under ``reports/`` are served, never studies or curated data, and only to a
user the auth manager lets read that DAG's runs (the UI's session cookie is enough, so the tab's
iframe just works). Store settings come from the ``mmpipe_store`` connection when it exists.
"""

from __future__ import annotations

import mimetypes
from typing import Any, ClassVar

from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity
from airflow.api_fastapi.core_api.security import requires_access_dag
from airflow.plugins_manager import AirflowPlugin
from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import RedirectResponse, Response

from mmpipe_airflow.reports import URL_PREFIX

app = FastAPI(title="mmpipe run reports")
CanReadRuns = Depends(requires_access_dag("GET", DagAccessEntity.RUN))
SERVED = "reports/"


@app.get("/reports/{dag_id}/{run_id:path}", dependencies=[CanReadRuns])
def run_report(dag_id: str, run_id: str, request: Request) -> RedirectResponse:
    from mmpipe.report import page_key

    return RedirectResponse(f"{request.scope.get('root_path', '')}/store/{page_key(run_id)}", status_code=307)


@app.get("/store/{key:path}", dependencies=[CanReadRuns])
def store_file(key: str) -> Response:
    from mmpipe.config import get_settings
    from mmpipe.errors import MmpipeError
    from mmpipe.store import open_store
    from mmpipe_airflow.connections import connection_settings

    if not key.startswith(SERVED) or ".." in key.split("/"):
        raise HTTPException(404, "only run reports are served here")
    fields = {k.removeprefix("MMPIPE_").lower(): v for k, v in connection_settings().items()}
    try:
        store = open_store(get_settings(**fields))
        body = store.get(key) if store.head(key) is not None else None
    except MmpipeError as exc:
        raise HTTPException(502, str(exc)) from None
    if body is None:
        raise HTTPException(404, f"{key} is not in the store yet: the run's report task writes it")
    return Response(body, media_type=mimetypes.guess_type(key)[0] or "application/octet-stream")


class MmpipeReportsPlugin(AirflowPlugin):
    name = "mmpipe_reports"
    fastapi_apps: ClassVar[list[dict[str, Any]]] = [
        {"app": app, "url_prefix": URL_PREFIX, "name": "mmpipe run reports"}
    ]
    external_views: ClassVar[list[dict[str, Any]]] = [
        {
            "name": "Run report",
            "href": URL_PREFIX + "/reports/{DAG_ID}/{RUN_ID}",
            "destination": "dag_run",
            "url_route": "mmpipe-run-report",
        }
    ]
