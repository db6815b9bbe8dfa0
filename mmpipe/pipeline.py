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
from mmpipe.candidate import Candidate
from mmpipe.catalog import Catalog, open_catalog
from mmpipe.config import Settings, get_settings
from mmpipe.errors import ConfigError, MmpipeError
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


def evaluate_candidate(run_id: str, candidate: str, snapshot: str) -> dict[str, Any] | None:
    """Evaluate what ``candidate`` trained in ``run_id``; None when its training did not succeed
    (recorded as failed, or never started), so one failed candidate leaves the others to compete."""
    settings, store, catalog = connect()
    found = catalog.query(
        "SELECT model_version FROM training_runs WHERE airflow_run_id = :r AND candidate = :c "
        "AND status = 'succeeded' AND model_version IS NOT NULL",
        r=run_id,
        c=candidate,
    )
    if not found:
        return None
    return evaluate.evaluate_model(settings, store, catalog, found[0]["model_version"], snapshot)


def promote_best(model_versions: Sequence[str], snapshot: str, run_id: str) -> dict[str, Any]:
    """The challenger chosen on validation among the succeeded candidates, judged on ``snapshot``."""
    return promote.promote_best(*connect(), model_versions, snapshot, run_id)


def change_champion(
    action: str,
    run_id: str,
    model_version: str | None = None,
    force: bool = False,
    reason: str | None = None,
    snapshot: str | None = None,
) -> dict[str, Any]:
    """A person's change of the champion: ``rollback`` (to ``model_version``, else to the champion the
    current one replaced), or ``promote`` ``model_version`` through the gate on ``snapshot`` (default: the
    newest frozen one), or past the gate with ``force`` and a ``reason``. Every change is in the alias history."""
    settings, store, catalog = connect()
    if action == "rollback":
        return promote.rollback(catalog, run_id, reason or "rollback requested", to=model_version)
    if action != "promote":
        raise MmpipeError(f"unknown champion action {action!r}: promote or rollback")
    if not model_version:
        raise MmpipeError("name the model version to promote")
    if force:
        return promote.force(catalog, model_version, run_id, reason or "")
    snapshot = snapshot or catalog.scalar(
        "SELECT name FROM test_snapshots ORDER BY created_at DESC, name DESC LIMIT 1"
    )
    if snapshot is None:
        raise MmpipeError("no frozen test snapshot to judge on: freeze one first")
    return promote.promote_best(settings, store, catalog, [model_version], snapshot, run_id)


def leaderboard(limit: int = 20) -> list[dict[str, Any]]:
    _, _, catalog = connect()
    return catalog.query(
        "SELECT candidate, backbone, init, airflow_run_id, model_version, val_macro_f1, test_snapshot, "
        "accuracy, macro_f1, macro_auc, ece_before, ece, latency_ms, majority_f1, thumbnail_f1, "
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
