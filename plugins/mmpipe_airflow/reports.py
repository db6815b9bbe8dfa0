"""The last task of every mmpipe DAG: write the run's HTML page (``mmpipe.report``) and link it.

It runs whatever happened upstream (``all_done``), so a failed run still explains itself. Being the
DAG's only leaf, it also carries the run's verdict: it fails when another task failed, or Airflow
would call such a run a success. The UI links to the page from the task (an operator extra link)
and from every DAG run (the "Run report" tab, see :mod:`mmpipe_airflow.web`).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote, urlsplit

from airflow.sdk import BaseOperator, BaseOperatorLink
from airflow.sdk.definitions._internal.contextmanager import DagContext
from airflow.sdk.exceptions import AirflowException

#: Where the API server plugin serves reports (:mod:`mmpipe_airflow.web`).
URL_PREFIX = "/mmpipe"
NOT_DONE = ("failed", "upstream_failed")


def report_path(dag_id: str, run_id: str) -> str:
    """The run's page under the API server, below any ``[api] base_url`` path."""
    from airflow.configuration import conf

    base = urlsplit(conf.get("api", "base_url", fallback="") or "").path.rstrip("/")
    return f"{base}{URL_PREFIX}/reports/{quote(dag_id, safe='')}/{quote(run_id, safe='')}"


class RunReportLink(BaseOperatorLink):
    name = "Run report"

    def get_link(self, operator: Any, *, ti_key: Any) -> str:
        return report_path(ti_key.dag_id, ti_key.run_id)


class RunReportOperator(BaseOperator):
    """Write ``reports/runs/<run>.html`` from the catalog and the store; fail if another task failed."""

    operator_extra_links = (RunReportLink(),)
    ui_color = "#e8f0fe"

    def execute(self, context: Any) -> str:
        from mmpipe import pipeline, report

        ti, run_id = context["ti"], context["run_id"]
        states = dict(ti.get_task_states(dag_id=ti.dag_id, run_ids=[run_id]).get(run_id, {}))
        states.pop(self.task_id, None)
        _, store, catalog = pipeline.connect()
        written = report.write_run_report(store, catalog, run_id, ti.dag_id, states)
        self.log.info("Run report: %s (%s in the UI)", written.uri, report_path(ti.dag_id, run_id))
        failed = sorted(task for task, state in states.items() if state in NOT_DONE)
        if failed:
            raise AirflowException(f"tasks not done in this run: {', '.join(failed)}; see {written.uri}")
        return written.uri


def report_task(task_id: str = "report") -> RunReportOperator:
    """Add the report task to the DAG being defined, downstream of every task so far (call it last)."""
    dag = DagContext.get_current()
    if dag is None:
        raise RuntimeError("report_task() must be called inside a DAG definition")
    leaves = list(dag.leaves)
    task = RunReportOperator(task_id=task_id, trigger_rule="all_done", retries=0)
    for leaf in leaves:
        leaf >> task
    return task
