"""Stage entry points shared by the CLI and the Airflow tasks.

Each function builds its own settings, store and catalog (tasks run in separate processes and
pods), does one idempotent step, and returns small JSON-able values (URIs, counts), never data.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import pandas as pd
import sqlalchemy as sa

from mmpipe import balance, evaluate, ingest, promote, score, splits
from mmpipe.catalog import Catalog, open_catalog
from mmpipe.config import Settings, get_settings
from mmpipe.errors import MmpipeError
from mmpipe.store import ObjectInfo, Store, open_store
from mmpipe.train import Candidate


class ValidationFailed(MmpipeError):
    """A critical expectation failed: the batch is kept out of training (nothing deleted)."""


def connect(settings: Settings | None = None) -> tuple[Settings, Store, Catalog]:
    settings = settings or get_settings()
    return settings, open_store(settings), open_catalog(settings)


# --- ingest -----------------------------------------------------------------------------------


def ingest_list(run_id: str, prefix: str = ingest.TRAINING_PREFIX, batch_size: int = 200) -> dict[str, Any]:
    """Record the run, find new objects and write one batch manifest per mapped task."""
    _, store, catalog = connect()
    ingest.start_run(catalog, run_id, prefix)
    new, listed = ingest.list_new(store, catalog, prefix)
    slug = ingest.run_slug(run_id)
    uris = [
        store.put_json(f"reports/ingest/{slug}/batches/{n:05d}.json", {"prefix": prefix, "objects": [asdict(o) for o in b]})
        for n, b in enumerate(ingest.batches(new, batch_size))
    ]
    return {"listed": listed, "new_objects": len(new), "batch_uris": uris}


def ingest_batch(run_id: str, batch_uri: str) -> dict[str, int]:
    settings, store, catalog = connect()
    batch = store.get_json(store.key_of(batch_uri))
    objects = [ObjectInfo(**o) for o in batch["objects"]]
    return ingest.ingest_objects(settings, store, catalog, run_id, objects, batch["prefix"])


def ingest_finish(run_id: str, listing: dict[str, Any], results: Sequence[dict[str, int]]) -> dict[str, Any]:
    _, store, catalog = connect()
    return ingest.finish_run(store, catalog, run_id, listing["new_objects"], listing["listed"], results)


# --- validate ---------------------------------------------------------------------------------


def _rules(settings: Settings) -> Any:
    from mmpipe.validate import BatchRules

    return BatchRules(classes=settings.classes)


def validate_ingest(run_id: str) -> dict[str, Any]:
    """GX batch suite over the run's new images; on critical failure exclude the batch and raise."""
    from mmpipe.validate import validate_batch

    settings, store, catalog = connect()
    rows = catalog.query(
        "SELECT image_id, label, orig_rows, orig_cols, bits_stored, pixel_mean, pixel_std, image_id AS content_hash, "
        "patient_key, modality FROM images WHERE ingest_run_id = :r AND status <> 'retired'",
        r=run_id,
    )
    if not rows:
        return {"run_id": run_id, "images": 0, "success": True, "skipped": "no new images"}
    report = validate_batch(pd.DataFrame(rows), _rules(settings))
    record = _record_validation(store, catalog, f"ingest:{run_id}", report)
    if not report.success:
        with catalog.begin() as conn:
            conn.execute(
                sa.text(
                    "UPDATE images SET status = 'excluded', status_reason = :why "
                    "WHERE ingest_run_id = :r AND status = 'active'"
                ),
                {"r": run_id, "why": "validation: " + ", ".join(c.name for c in report.failures())},
            )
        raise ValidationFailed(
            f"batch {run_id} failed critical expectations ({', '.join(c.name for c in report.failures())}); "
            f"its images are excluded from training. Data Docs: {record['docs_uri']}"
        )
    return record


def _record_validation(store: Store, catalog: Catalog, subject: str, report: Any) -> dict[str, Any]:
    slug = ingest.run_slug(subject)
    docs_uri = None
    for path, body in report.docs.items():
        content_type = "text/html" if path.endswith(".html") else "application/octet-stream"
        uri = store.put(f"reports/validation/{slug}/datadocs/{path}", body, content_type)
        if path.endswith("index.html"):
            docs_uri = uri
    result = report.to_json()
    row = {
        "validation_id": f"{report.suite}:{slug}",
        "subject": subject,
        "suite": report.suite,
        "success": report.success,
        "n_critical": len(report.failures("critical")),
        "n_warnings": len(report.failures("warning")),
        "results_json": json.dumps(result, sort_keys=True, default=str),
        "docs_uri": docs_uri,
    }
    catalog.upsert("validations", [row], ["validation_id"])
    return {k: v for k, v in row.items() if k != "results_json"}


# --- dataset ----------------------------------------------------------------------------------


def prepare_dataset(
    run_id: str, *, freeze_test: str | None = None, seed: int = 0, target: str | int = "median", min_per_class: int = 5
) -> dict[str, Any]:
    """Splits, the frozen test snapshot (the first one is frozen automatically), a validated plan."""
    from mmpipe.validate import validate_dataset

    settings, store, catalog = connect()
    splits.record_splits(catalog)
    if freeze_test:
        splits.freeze_test(catalog, store, freeze_test, reason=f"requested by {run_id}")
    snapshot = splits.current_snapshot(catalog)
    if snapshot is None:
        snapshot = splits.freeze_test(catalog, store, "test-v1", reason=f"initial snapshot, {run_id}")["name"]
    frozen = {r["image_id"] for r in splits.snapshot_images(catalog, snapshot)}
    # Training sees train/val patients only; the test side of the checks is the frozen snapshot.
    images = [i for i in splits.usable_images(catalog) if i["split"] != "test" or i["image_id"] in frozen]
    frame = pd.DataFrame(images).assign(content_hash=lambda d: d["image_id"])
    report = validate_dataset(frame, settings.classes, min_per_class=min_per_class)
    record = _record_validation(store, catalog, f"dataset:{run_id}", report)
    if not report.success:
        raise ValidationFailed(
            f"dataset checks failed ({', '.join(c.name for c in report.failures())}); Data Docs: {record['docs_uri']}"
        )
    plan = balance.build_plan(
        [i for i in images if i["split"] != "test"], classes=settings.classes, test_snapshot=snapshot, seed=seed,
        target=target,
    )  # fmt: skip
    uri = balance.save_plan(store, catalog, plan)
    return {"plan_uri": uri, "dataset_version": plan["dataset_version"], "test_snapshot": snapshot,
            "class_counts": plan["class_counts_after"], "validation": record["validation_id"]}  # fmt: skip


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
    """Evaluate the champion on the snapshot if it has not been yet, then apply the gate."""
    settings, store, catalog = connect()
    current = promote.champion(catalog)
    if current and not catalog.scalar(
        "SELECT 1 FROM evaluations WHERE model_version = :m AND test_snapshot = :s", m=current, s=snapshot
    ):
        evaluate.evaluate_model(settings, store, catalog, current, snapshot)
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
            {"model_version": version, "card_uri": card_uri, "objects": [asdict(o) for o in todo[i : i + batch_size]]},
        )
        for n, i in enumerate(range(0, len(todo), batch_size))
    ]


def score_batch(run_id: str, batch_uri: str) -> dict[str, Any]:
    settings, store, catalog = connect()
    batch = store.get_json(store.key_of(batch_uri))
    objects = [ObjectInfo(**o) for o in batch["objects"]]
    return score.score_objects(settings, store, catalog, objects, batch["model_version"], batch["card_uri"], run_id)
