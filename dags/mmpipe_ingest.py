"""
### mmpipe_ingest — new studies in the image store become curated, validated training images

Lists objects under `prefix` (default `training/<class>/...`) that the catalog has not seen by
key + ETag, fans out one mapped task per batch (download, expand archives, decode DICOM/PNG/JPEG,
pseudonymise, write shards to `curated/`), proves that every listed object ended ingested,
duplicate or quarantined, then runs the Great Expectations batch suite: images failing a
per-image rule are excluded alone; a rule failing more than its threshold (or class collapse)
fails `validate` and excludes the batch; nothing is deleted. `validate` also re-evaluates what
earlier runs excluded (a fixed manifest or setting re-admits what passes now).
`sweep` then deletes curated shards and quarantine records no catalog row references, once
older than `orphan_grace_hours` (left by batches killed before their commit). A rerun with
nothing new does nothing.
"""

from __future__ import annotations

from airflow.sdk import dag, task
from mmpipe_airflow.dag_defaults import CURATED, batch_params, dag_defaults


@dag(
    dag_id="mmpipe_ingest",
    schedule="0 1 * * *",
    **dag_defaults(__doc__, "ingest", retries=2, retry_minutes=2),
    params=batch_params("training/", 200, "ingest from"),
)
def mmpipe_ingest():
    @task
    def list_new(params=None, run_id=None) -> dict:
        from mmpipe import pipeline

        return pipeline.ingest_list(run_id, params["prefix"], params["batch_size"])

    @task
    def batch_uris(listing: dict) -> list[str]:
        return listing["batch_uris"]

    @task(max_active_tis_per_dagrun=2)
    def ingest_batch(batch_uri: str, run_id=None) -> dict:
        from mmpipe import pipeline

        return pipeline.ingest_batch(run_id, batch_uri)

    @task(trigger_rule="all_done")
    def finish(listing: dict, results: list, run_id=None) -> dict:
        from mmpipe import pipeline

        return pipeline.ingest_finish(run_id, listing, list(results or []))

    @task(outlets=[CURATED], retries=0)
    def validate(report: dict, run_id=None) -> dict:
        from mmpipe import pipeline

        return pipeline.validate_ingest(run_id)

    @task(trigger_rule="all_done")
    def sweep() -> dict:
        from mmpipe import pipeline

        return pipeline.ingest_sweep()

    listing = list_new()
    results = ingest_batch.expand(batch_uri=batch_uris(listing))
    report = finish(listing, results)
    validate(report)
    report >> sweep()


mmpipe_ingest()
