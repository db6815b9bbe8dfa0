"""What every mmpipe DAG shares: schedule anchor, ownership, retry policy, assets, batch Params, and
the store and catalog from Airflow connections (:mod:`mmpipe_airflow.connections`)."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from airflow.sdk import Asset, Param

from mmpipe_airflow.connections import use_connections

if TYPE_CHECKING:
    from mmpipe.config import Settings

START_DATE = datetime(2026, 1, 1)
CURATED = Asset(name="mmpipe_curated_images", uri="mmpipe://curated-images")
CHAMPION = Asset(name="mmpipe_champion", uri="mmpipe://champion-model")
RETRAIN_CRON = "0 2 * * *"


def dag_defaults(doc: str, tag: str, retries: int, retry_minutes: int) -> dict[str, Any]:
    """No catchup and one run at a time: every stage is incremental, so a late run covers the gap."""
    return {
        "start_date": START_DATE,
        "catchup": False,
        "max_active_runs": 1,
        "doc_md": doc,
        "tags": ["mmpipe", tag],
        "default_args": {
            "retries": retries,
            "retry_delay": timedelta(minutes=retry_minutes),
            "owner": "mmpipe",
            "pre_execute": use_connections,
        },
    }


def batch_params(prefix: str, batch_size: int, what: str) -> dict[str, Param]:
    """The Params of a DAG that fans out over batches of store objects under a prefix."""
    return {
        "prefix": Param(prefix, type="string", description=f"Store prefix to {what}"),
        "batch_size": Param(
            batch_size, type="integer", minimum=1, maximum=5000, description="Objects per mapped task"
        ),
    }


def retrain_schedule(settings: Settings) -> str | Asset:
    """``MMPIPE_RETRAIN_SCHEDULE``: the nightly cron, or a run whenever ingest's validate task publishes
    new curated images (the ``mmpipe_curated_images`` asset event)."""
    return CURATED if settings.retrain_schedule == "asset" else RETRAIN_CRON
