"""
### mmpipe_score — tag incoming studies with the champion's predicted modality

Runs hourly and whenever a new champion is promoted. Lists objects under `prefix` (default
`incoming/`) not yet scored by the model (default: the champion; objects modified before the
model's watermark are not even looked up), fans out one mapped task per batch and reconciles the
run: every listed object ends `tagged` (`mmpipe-modality`, `mmpipe-review` with
`mmpipe-review-reason`, ...), `unreadable` (`mmpipe-status=unreadable`, `mmpipe-reason`),
`unknown` (`mmpipe-status=unknown`: out of distribution), `skipped` (already scored) or `failed`
(no room for a tag beside the object's own, or a fault the next run retries). Foreign tags are
never removed; a new champion replaces only mmpipe's tags. Evidence per object (probabilities,
reasons) is a JSON sidecar under `results/<model_version>/`. Objects' bytes are never modified.

Params: `model_version` (empty: the champion), `modified_from` / `modified_to` (ISO LastModified
range, empty = open), `force` (rescore objects this model already scored).
"""

from __future__ import annotations

from airflow.sdk import AssetOrTimeSchedule, CronTriggerTimetable, Param, dag, task
from airflow.sdk.exceptions import AirflowSkipException
from mmpipe_airflow.dag_defaults import CHAMPION, batch_params, dag_defaults
from mmpipe_airflow.reports import report_task


@dag(
    dag_id="mmpipe_score",
    schedule=AssetOrTimeSchedule(
        timetable=CronTriggerTimetable("30 * * * *", timezone="UTC"), assets=[CHAMPION]
    ),
    **dag_defaults(__doc__, "scoring", retries=2, retry_minutes=2),
    params={
        **batch_params("incoming/", 100, "score"),
        "model_version": Param("", type="string", description="Model to score with (empty: the champion)"),
        "modified_from": Param("", type="string", description="Only objects modified at or after (ISO)"),
        "modified_to": Param("", type="string", description="Only objects modified before (ISO)"),
        "force": Param(False, type="boolean", description="Rescore objects this model already scored"),
    },
)
def mmpipe_score():
    @task
    def list_unscored(params=None, run_id=None) -> list[str]:
        from mmpipe import pipeline
        from mmpipe.score import NothingToScore

        options = {k: params[k] for k in ("model_version", "modified_from", "modified_to", "force")}
        try:
            return pipeline.score_list(run_id, params["prefix"], params["batch_size"], **options)
        except NothingToScore as nothing:  # no champion yet: an hourly run has nothing to do
            raise AirflowSkipException(str(nothing)) from None

    @task(max_active_tis_per_dagrun=2)
    def score_batch(batch_uri: str, run_id=None) -> dict:
        from mmpipe import pipeline

        return pipeline.score_batch(run_id, batch_uri)

    @task(trigger_rule="all_done")
    def summary(results: list, run_id=None) -> dict:
        """Reconcile the run (runs after failed batches too: their objects count as not reached)."""
        from mmpipe import pipeline
        from mmpipe.score import NothingToScore

        try:
            return pipeline.score_finish(run_id)
        except NothingToScore as nothing:  # listing skipped (no champion) or failed: nothing to reconcile
            raise AirflowSkipException(str(nothing)) from None

    summary(score_batch.expand(batch_uri=list_unscored()))
    report_task()


mmpipe_score()
