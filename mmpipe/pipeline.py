"""Stage entry points shared by the CLI and the Airflow tasks.

Each function builds its own settings, store and catalog (tasks run in separate processes and
pods), does one idempotent step, and returns small JSON-able values (URIs, counts), never data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from mmpipe import dataset, evaluate, ingest, promote, score
from mmpipe.candidate import Candidate
from mmpipe.catalog import Catalog, open_catalog
from mmpipe.config import Settings, get_settings
from mmpipe.errors import ConfigError
from mmpipe.store import ObjectInfo, Store, open_store


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


def candidates(
    specs: Sequence[dict[str, Any]] | None = None, backbones: Sequence[str] = (), **shared: Any
) -> list[dict[str, Any]]:
    """Candidate dicts for dynamic mapping, validated up front: each of ``specs`` (or one per backbone)
    over the ``shared`` options (None = the recipe's default). Unknown options, duplicate names and
    an ``init='champion'`` without a champion of that backbone fail here, before any training."""
    from mmpipe.train import champion_checkpoint

    shared = {k: v for k, v in shared.items() if v is not None}
    chosen = [
        Candidate.from_dict({**shared, **spec}) for spec in (specs or [{"backbone": b} for b in backbones])
    ]
    if not chosen:
        raise ConfigError("no candidates: give candidates or backbones")
    names = [c.name for c in chosen]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"candidate name(s) {twice} used twice: give each candidate its own name")
    if any(c.init == "champion" for c in chosen):
        _, _, catalog = connect()
        for c in chosen:
            if c.init == "champion":
                champion_checkpoint(catalog, c.backbone)
    return [c.to_dict() for c in chosen]


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


# --- score ------------------------------------------------------------------------------------


def score_list(run_id: str, prefix: str = score.INCOMING_PREFIX, batch_size: int = 100) -> list[str]:
    """Manifests of objects not yet scored by the current champion, one per mapped task."""
    _, store, catalog = connect()
    version, card_uri = score.current_champion(catalog)
    todo = score.list_unscored(store, catalog, prefix, version)
    slug = ingest.run_slug(run_id)
    return [
        store.put_json(
            f"results/score/{slug}/batches/{n:05d}.json",
            {
                "model_version": version,
                "card_uri": card_uri,
                "objects": [asdict(o) for o in batch],
            },
        )
        for n, batch in enumerate(ingest.batches(todo, batch_size))
    ]


def score_batch(run_id: str, batch_uri: str) -> dict[str, Any]:
    settings, store, catalog = connect()
    batch = store.get_json(store.key_of(batch_uri))
    objects = [ObjectInfo(**o) for o in batch["objects"]]
    return score.score_objects(
        settings, store, catalog, objects, batch["model_version"], batch["card_uri"], run_id
    )
