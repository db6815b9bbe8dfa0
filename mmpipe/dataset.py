"""Validation gates and training-ready datasets: GX suites, splits, frozen snapshots, plans.

A batch failing a critical expectation is excluded from training (its images marked, nothing
deleted) and the task fails visibly; the dataset suite runs again before every plan.
"""

from __future__ import annotations

import json
from typing import Any

import pandas as pd
import sqlalchemy as sa

from mmpipe import balance, ingest, splits
from mmpipe.catalog import Catalog
from mmpipe.config import Settings
from mmpipe.errors import MmpipeError
from mmpipe.store import Store


class ValidationFailed(MmpipeError):
    """A critical expectation failed: the batch is kept out of training (nothing deleted)."""


def _rules(settings: Settings) -> Any:
    from mmpipe.validate import BatchRules

    return BatchRules(classes=settings.classes)


def validate_ingest(settings: Settings, store: Store, catalog: Catalog, run_id: str) -> dict[str, Any]:
    """GX batch suite over the run's new images; on critical failure exclude the batch and raise."""
    from mmpipe.validate import validate_batch

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


def prepare_dataset(
    settings: Settings,
    store: Store,
    catalog: Catalog,
    run_id: str, *, freeze_test: str | None = None, seed: int = 0, target: str | int = "median", min_per_class: int = 5
) -> dict[str, Any]:
    """Splits, the frozen test snapshot (the first one is frozen automatically), a validated plan."""
    from mmpipe.validate import validate_dataset

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
