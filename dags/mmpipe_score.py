"""
### mmpipe_score — tag incoming studies with the champion's predicted modality

Runs hourly and whenever a new champion is promoted. Lists objects under `prefix` (default
`incoming/`) not yet scored by the current champion, fans out one mapped task per batch, and
writes S3 object tags (`mmpipe-modality`, `mmpipe-confidence`, `mmpipe-review`, `mmpipe-model`) —
the objects' bytes are never modified — plus one prediction row per image in the catalog.
Low-confidence or inconsistent archives are tagged `mmpipe-review=yes` for a human.
"""

from __future__ import annotations

from airflow.sdk import AssetOrTimeSchedule, CronTriggerTimetable, dag, task
from mmpipe_airflow.dag_defaults import CHAMPION, batch_params, dag_defaults
from mmpipe_airflow.reports import report_task


@dag(
    dag_id="mmpipe_score",
    schedule=AssetOrTimeSchedule(
        timetable=CronTriggerTimetable("30 * * * *", timezone="UTC"), assets=[CHAMPION]
    ),
    **dag_defaults(__doc__, "scoring", retries=2, retry_minutes=2),
    params=batch_params("incoming/", 100, "score"),
)
def mmpipe_score():
    @task
    def list_unscored(params=None, run_id=None) -> list[str]:
        from mmpipe import pipeline

        return pipeline.score_list(run_id, params["prefix"], params["batch_size"])

    @task(max_active_tis_per_dagrun=2)
    def score_batch(batch_uri: str, run_id=None) -> dict:
        from mmpipe import pipeline

        return pipeline.score_batch(run_id, batch_uri)

    @task
    def summary(results: list) -> dict:
        results = list(results or [])
        return {k: sum(r[k] for r in results) for k in ("objects", "tagged", "images", "review", "failures")}

    summary(score_batch.expand(batch_uri=list_unscored()))
    report_task()


mmpipe_score()
