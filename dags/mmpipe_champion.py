"""
### mmpipe_champion — roll back or promote the champion by hand, on the record

Triggered by a person (no schedule). Every change goes through the same locked transaction as the
nightly promotion and is appended to `alias_history` (from, to, run, reason, time).

- `action = rollback`: the champion goes back to the model it replaced, or to `model_version` (a
  former champion). `reason` is recorded.
- `action = promote`: `model_version` is judged by the promotion gate against the champion on
  `snapshot` (null = the newest frozen one); with `force = true` it becomes champion without the gate,
  and `reason` is then required.

A change emits the `mmpipe_champion` asset event, so `mmpipe_score` rescores with the new champion;
a gate that keeps the champion skips the task (no event). CLI: `mmpipe promote --rollback [--to V]`,
`mmpipe promote --force V --reason TEXT`.
"""

from __future__ import annotations

from airflow.sdk import Param, dag, task
from airflow.sdk.exceptions import AirflowSkipException
from mmpipe_airflow.dag_defaults import CHAMPION, dag_defaults
from mmpipe_airflow.reports import report_task


@dag(
    dag_id="mmpipe_champion",
    schedule=None,
    **dag_defaults(__doc__, "promotion", retries=1, retry_minutes=1),
    params={
        "action": Param("rollback", enum=["rollback", "promote"], description="Roll back, or promote a model"),
        "model_version": Param(None, type=["null", "string"],
                               description="promote: the model; rollback: the former champion (null = previous)"),
        "force": Param(False, type="boolean", description="promote without the gate (needs a reason)"),
        "reason": Param("", type="string", description="Why: recorded in the alias history"),
        "snapshot": Param(None, type=["null", "string"],
                          description="Test snapshot the gate judges on (null = the newest)"),
    },
)  # fmt: skip
def mmpipe_champion():
    @task(outlets=[CHAMPION])
    def change_champion(params=None, run_id=None) -> dict:
        from mmpipe import pipeline

        result = pipeline.change_champion(
            params["action"],
            run_id,
            params["model_version"],
            params["force"],
            params["reason"],
            params["snapshot"],
        )
        if result.get("decision") == "kept_champion":
            raise AirflowSkipException(result["reason"])  # no champion asset event
        return result

    change_champion()
    report_task()


mmpipe_champion()
