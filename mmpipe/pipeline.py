"""Stage entry points shared by the CLI and the Airflow tasks.

Each function builds its own settings, store and catalog (tasks run in separate processes and
pods), does one idempotent step, and returns small JSON-able values (URIs, counts), never data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from mmpipe import dataset, evaluate, ingest, promote, score
from mmpipe.catalog import Catalog, open_catalog
from mmpipe.config import Settings, get_settings
from mmpipe.store import ObjectInfo, Store, open_store
from mmpipe.train import Candidate


def connect(settings: Settings | None = None) -> tuple[Settings, Store, Catalog]:
    settings = settings or get_settings()
    return settings, open_store(settings), open_catalog(settings)


# --- ingest -----------------------------------------------------------------------------------


def ingest_list(run_id: str, prefix: str = ingest.TRAINING_PREFIX, batch_size: int = 200) -> dict[str, Any]:
    """Record the run, find new objects and write one batch manifest per mapped task."""
    settings, store, catalog = connect()
    store.check()
    listing = ingest.open_run(store, catalog, run_id, prefix, settings)
    slug = ingest.run_slug(run_id)
    uris = [
        store.put_json(
            f"reports/ingest/{slug}/batches/{n:05d}.json",
            {"prefix": prefix, "objects": [asdict(o) for o in b]},
        )
        for n, b in enumerate(ingest.batches(listing.new, batch_size))
    ]
    return {"listed": listing.listed, "new_objects": len(listing.new), "batch_uris": uris}


def ingest_all(run_id: str, prefix: str = ingest.TRAINING_PREFIX, batch_size: int = 200) -> dict[str, Any]:
    """The whole ingest in this process (the CLI): one decode pool for every batch."""
    settings, store, catalog = connect()
    store.check()
    return ingest.run(settings, store, catalog, run_id, prefix, batch_size)


def ingest_batch(run_id: str, batch_uri: str) -> dict[str, int]:
    settings, store, catalog = connect()
    batch = store.get_json(store.key_of(batch_uri))
    objects = [ObjectInfo(**o) for o in batch["objects"]]
    return ingest.ingest_objects(settings, store, catalog, run_id, objects, batch["prefix"])


def ingest_finish(run_id: str, listing: dict[str, Any], results: Sequence[dict[str, int]]) -> dict[str, Any]:
    _, store, catalog = connect()
    return ingest.finish_run(store, catalog, run_id, listing["new_objects"], listing["listed"], results)


def ingest_sweep() -> dict[str, int]:
    return ingest.sweep_orphans(*connect())


# --- validate and dataset: see mmpipe.dataset -------------------------------------------------


def validate_ingest(run_id: str) -> dict[str, Any]:
    return dataset.small(dataset.validate_ingest(*connect(), run_id))


def prepare_dataset(run_id: str, **options: Any) -> dict[str, Any]:
    return dataset.prepare_dataset(*connect(), run_id, **options)


def candidates(backbones: Sequence[str], **options: Any) -> list[dict[str, Any]]:
    """Candidate dicts for dynamic mapping, validated up front (unknown backbone -> one clear error)."""
    out = []
    for name in backbones:
        data = {"name": name.replace("_", "-"), "backbone": name, **options}
        out.append(asdict(Candidate.from_dict(data)))
    return out


# --- train / evaluate / promote ---------------------------------------------------------------


def train(plan_uri: str, candidate: dict[str, Any], run_id: str) -> dict[str, str]:
    from mmpipe.train import train_candidate

    settings, store, catalog = connect()
    return train_candidate(settings, store, catalog, plan_uri, Candidate.from_dict(candidate), run_id)


def evaluate_model(model_version: str, snapshot: str) -> dict[str, Any]:
    settings, store, catalog = connect()
    return evaluate.evaluate_model(settings, store, catalog, model_version, snapshot)


def promote_best(model_versions: Sequence[str], snapshot: str, run_id: str) -> dict[str, Any]:
    """Make sure the champion is measured on the snapshot (a no-op when it is), then apply the gate."""
    settings, store, catalog = connect()
    evaluate.evaluate_champion(settings, store, catalog, snapshot, reason=f"before promotion in {run_id}")
    return promote.promote_best(catalog, model_versions, snapshot, run_id, settings.promotion_min_gain)


def leaderboard(limit: int = 20) -> list[dict[str, Any]]:
    _, _, catalog = connect()
    return catalog.query(
        "SELECT candidate, backbone, model_version, test_snapshot, accuracy, macro_f1, macro_auc, ece, "
        "is_champion, promoted FROM leaderboard ORDER BY created_at DESC, macro_f1 DESC LIMIT :n",
        n=limit,
    )


# --- score: see mmpipe.score ------------------------------------------------------------------


def score_list(
    run_id: str,
    prefix: str = score.INCOMING_PREFIX,
    batch_size: int = 100,
    model_version: str = "",
    modified_from: str = "",
    modified_to: str = "",
    force: bool = False,
) -> list[str]:
    """Record the run's listing and write one manifest per mapped task of objects to score."""
    settings, store, catalog = connect()
    version, card_uri = score.resolve_model(catalog, model_version)
    window = {"modified_from": modified_from, "modified_to": modified_to}
    listing = score.list_unscored(store, catalog, prefix, version, force=force, **window)
    listing = score.open_run(settings, catalog, run_id, version, prefix, listing, force=force, **window)
    slug = ingest.run_slug(run_id)
    return [
        store.put_json(
            f"results/score/{slug}/batches/{n:05d}.json",
            {"model_version": version, "card_uri": card_uri, "objects": [asdict(o) for o in batch]},
        )
        for n, batch in enumerate(ingest.batches(listing.todo, batch_size))
    ]


def score_batch(run_id: str, batch_uri: str) -> dict[str, Any]:
    settings, store, catalog = connect()
    batch = store.get_json(store.key_of(batch_uri))
    objects = [ObjectInfo(**o) for o in batch["objects"]]
    return score.score_objects(
        settings, store, catalog, objects, batch["model_version"], batch["card_uri"], run_id
    )


def score_all(run_id: str, target: str, model_version: str = "", **options: Any) -> dict[str, Any]:
    """A whole scoring run in this process (the CLI): ``target`` is a prefix or an s3:// URI."""
    settings, store, catalog = connect()
    store.check()
    prefix = store.key_of(target) if target.startswith("s3://") else target
    return score.run(settings, store, catalog, run_id, prefix, model_version=model_version, **options)


def score_local(path: Path, out: Path, model_version: str = "") -> dict[str, Any]:
    """Score local files into ``out``; nothing is written to the store or the catalog."""
    return score.run_local(*connect(), path, out, model_version)


def score_finish(run_id: str) -> dict[str, Any]:
    """Reconcile the run: listed = tagged + unreadable + unknown + skipped + failed."""
    return score.finish_run(connect()[2], run_id)
