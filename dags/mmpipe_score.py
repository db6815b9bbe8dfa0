"""
### mmpipe_score — tag incoming studies with the champion's predicted modality

Runs hourly and whenever a new champion is promoted. Lists objects under `prefix` (default
`incoming/`) not yet scored by the current champion, fans out one mapped task per batch, and
writes S3 object tags (`mmpipe-modality`, `mmpipe-confidence`, `mmpipe-review`, `mmpipe-model`) —
the objects' bytes are never modified — plus one prediction row per image in the catalog.
Low-confidence or inconsistent archives are tagged `mmpipe-review=yes` for a human.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import Asset, AssetOrTimeSchedule, CronTriggerTimetable, Param, dag, task

CHAMPION = Asset(name="mmpipe_champion", uri="mmpipe://champion-model")


@dag(
    dag_id="mmpipe_score",
    schedule=AssetOrTimeSchedule(
        timetable=CronTriggerTimetable("30 * * * *", timezone="UTC"), assets=[CHAMPION]
    ),
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    doc_md=__doc__,
    tags=["mmpipe", "scoring"],
    default_args={"retries": 2, "retry_delay": timedelta(minutes=2), "owner": "mmpipe"},
    params={
        "prefix": Param("incoming/", type="string", description="Store prefix to score"),
        "batch_size": Param(
            100, type="integer", minimum=1, maximum=5000, description="Objects per mapped task"
        ),
    },
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


mmpipe_score()
