"""Validation gates and training-ready datasets: GX suites, splits, frozen snapshots, plans, lineage.

A batch failing a critical expectation is excluded from training (its images marked, nothing
deleted) and the task fails visibly; only images of batches that passed are usable. The dataset
suite runs again before every plan, against the frozen test snapshot. Lineage runs plan ->
validations -> ingest runs -> source objects, all recorded in the catalog.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from typing import Any

import pandas as pd
import sqlalchemy as sa

from mmpipe import balance, ingest, splits
from mmpipe.catalog import Catalog
from mmpipe.config import Settings
from mmpipe.errors import MmpipeError
from mmpipe.store import Store
from mmpipe.validate import BATCH_COLUMNS

log = logging.getLogger(__name__)


class ValidationFailed(MmpipeError):
    """A critical expectation failed: the batch is kept out of training (nothing deleted)."""


_BATCH_SQL = (
    "i.image_id, i.label, i.orig_rows, i.orig_cols, i.bits_stored, i.pixel_std, i.image_id AS content_hash, "
    "i.patient_key, i.modality"
)


EXCLUDE = sa.text(
    "UPDATE images SET status = 'excluded', status_reason = :why WHERE ingest_run_id = :r AND status = 'active'"
)
READMIT = sa.text(
    "UPDATE images SET status = 'active', status_reason = NULL "
    "WHERE ingest_run_id = :r AND status = 'excluded' AND status_reason LIKE 'validation: %'"
)
EXCLUDED = sa.text("SELECT count(*) FROM images WHERE ingest_run_id = :r AND status = 'excluded'")


def batch_rows(catalog: Catalog, run_id: str) -> pd.DataFrame:
    """The run's images plus every duplicate member it brought, as the batch suite's rows.

    Ingest stores identical pixels once and records the repeat (with its own label and patient) in
    ``duplicates``; the repeat comes back here as a row sharing the original's content hash, next to
    the original, so the suite sees the duplicate even when the original came in an earlier run.
    """
    rows = catalog.query(
        f"SELECT {_BATCH_SQL} FROM images i WHERE i.ingest_run_id = :r AND i.status <> 'retired'", r=run_id
    )
    dups = catalog.query(
        f"SELECT d.source_key, d.source_etag, d.member_path, d.label AS dup_label, d.patient_key AS dup_patient, "
        f"{_BATCH_SQL} FROM duplicates d JOIN images i ON i.image_id = d.duplicate_of "
        "WHERE d.run_id = :r AND i.status <> 'retired' ORDER BY d.source_key, d.member_path",
        r=run_id,
    )
    seen = {r["image_id"] for r in rows}
    for d in dups:
        original = {k: d[k] for k in BATCH_COLUMNS}
        if original["image_id"] not in seen:  # the original arrived in an earlier run
            rows.append(original)
            seen.add(original["image_id"])
        member = hashlib.sha256(f"{d['source_key']}\0{d['source_etag']}\0{d['member_path']}".encode())
        rows.append(
            original
            | {
                "image_id": f"duplicate-{member.hexdigest()[:16]}",
                "label": d["dup_label"] or original["label"],
                "patient_key": d["dup_patient"] or original["patient_key"],
            }
        )
    return pd.DataFrame(rows, columns=list(BATCH_COLUMNS))


def validate_ingest(settings: Settings, store: Store, catalog: Catalog, run_id: str) -> dict[str, Any]:
    """GX batch suite over the run's new images; on critical failure exclude the batch and raise.

    Results go to the catalog, the Data Docs site and a validation report (linked from the ingest run)
    to ``reports/``; a rerun re-validates and records again.
    """
    from mmpipe.validate import BatchRules, validate_batch

    frame = batch_rows(catalog, run_id)
    if frame.empty:
        return {"run_id": run_id, "images": 0, "success": True, "skipped": "no new images"}
    report = validate_batch(frame, BatchRules(classes=settings.classes))
    record = _record_validation(store, catalog, f"ingest:{run_id}", report)
    failures = [c.name for c in report.failures()]
    with catalog.begin() as conn:
        if failures:
            conn.execute(EXCLUDE, {"r": run_id, "why": "validation: " + ", ".join(failures)})
        else:  # a rerun that passes (say, after a rules fix) readmits what an earlier run excluded
            conn.execute(READMIT, {"r": run_id})
        excluded = conn.execute(EXCLUDED, {"r": run_id}).scalar()
    summary = {
        "run_id": run_id,
        "validation_id": record["validation_id"],
        "success": report.success,
        "critical_failures": failures,
        "warnings": [c.name for c in report.failures("warning")],
        "images": int((~frame["image_id"].str.startswith("duplicate-")).sum()),
        "images_excluded": excluded,
        "failed_image_ids": report.failed_image_ids,
        "class_counts": dict(Counter(frame["label"])),
        "docs_uri": record["docs_uri"],
    }
    report_uri = store.put_json(f"reports/ingest/{ingest.run_slug(run_id)}/validation.json", summary)
    catalog.execute(
        "UPDATE ingest_runs SET validation_report_uri = :u WHERE run_id = :r", {"u": report_uri, "r": run_id}
    )
    if failures:
        raise ValidationFailed(
            f"batch {run_id} failed critical expectations ({', '.join(failures)}); its {excluded} images are "
            f"excluded from training (nothing deleted). Report: {report_uri}; Data Docs: {record['docs_uri']}"
        )
    return record | {"report_uri": report_uri, "warnings": summary["warnings"]}


def _record_validation(store: Store, catalog: Catalog, subject: str, report: Any) -> dict[str, Any]:
    slug = ingest.run_slug(subject)
    docs_uri = None
    for path, body in report.docs.items():
        content_type = "text/html" if path.endswith(".html") else "application/octet-stream"
        uri = store.put(f"reports/validation/{slug}/datadocs/{path}", body, content_type)
        if path == "index.html":
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


def dataset_rows(usable: list[dict], frozen: list[dict]) -> pd.DataFrame:
    """Train/val images as assigned today plus the frozen snapshot as the test side.

    An image of the snapshot found in train or val today (its patient's assignment was altered) is
    kept on both sides under distinct ids, so the suite reports the patient as leaking.
    """
    frozen_ids = {m["image_id"] for m in frozen}
    rows = [
        {
            "image_id": i["image_id"] + (f"@{i['split']}" if i["image_id"] in frozen_ids else ""),
            **_dataset_fields(i),
        }
        for i in usable
        if i["split"] != "test"
    ]
    rows += [{"image_id": m["image_id"], **_dataset_fields(m | {"split": "test"})} for m in frozen]
    return pd.DataFrame(rows, columns=["image_id", "label", "patient_key", "split"])


def _dataset_fields(i: dict) -> dict:
    return {"label": i["label"], "patient_key": i["patient_key"], "split": i["split"]}


def prepare_dataset(
    settings: Settings,
    store: Store,
    catalog: Catalog,
    run_id: str,
    *,
    freeze_test: str | None = None,
    seed: int = 0,
    target: str | int | None = None,
    min_per_class: int | None = None,
) -> dict[str, Any]:
    """Splits, the frozen test snapshot (the first is frozen automatically), the dataset suite, a plan.

    ``target`` and ``min_per_class`` default to the settings; policies, per-class targets, CLAHE and
    the channel mode always come from the settings. Returns small JSON-able values for XCom.
    """
    from mmpipe.validate import validate_dataset

    splits.record_splits(catalog, splits.Ratios.of(settings))
    pending = splits.pending_validation(catalog)
    hint = f"; ingest runs awaiting validation: {', '.join(pending)}" if pending else ""
    if pending:
        log.warning("%d ingest run(s) not validated yet; their images wait outside the plan", len(pending))
    frozen_now = None
    try:
        requested = f"requested by {run_id}"
        if freeze_test and catalog.scalar(
            "SELECT reason FROM test_snapshots WHERE name = :n", n=freeze_test
        ) == requested:  # fmt: skip
            frozen_now = freeze_test  # this run froze it before a retry
        elif freeze_test:
            frozen_now = splits.freeze_test(catalog, store, freeze_test, requested)["name"]
        snapshot = splits.current_snapshot(catalog)
        if snapshot is None:
            snapshot = frozen_now = splits.freeze_test(
                catalog, store, "test-v1", f"initial snapshot, {run_id}"
            )["name"]
    except MmpipeError as exc:
        raise MmpipeError(f"{exc}{hint}") from None
    frozen = splits.snapshot_images(catalog, snapshot)
    frozen_ids = {m["image_id"] for m in frozen}
    usable = splits.usable_images(catalog)
    report = validate_dataset(
        dataset_rows(usable, frozen),
        settings.classes,
        min_per_class=min_per_class or settings.min_train_per_class,
    )
    record = _record_validation(store, catalog, f"dataset:{run_id}", report)
    if not report.success:
        raise ValidationFailed(
            f"dataset checks failed ({', '.join(c.name for c in report.failures())}); no plan written. "
            f"Data Docs: {record['docs_uri']}{hint}"
        )
    members = [i for i in usable if i["split"] in ("train", "val") and i["image_id"] not in frozen_ids]
    clahe = (
        {"clip_limit": settings.clahe_clip_limit, "tiles": settings.clahe_tiles}
        if settings.clahe_clip_limit is not None
        else None
    )
    plan = balance.build_plan(
        members,
        classes=settings.classes,
        test_snapshot=snapshot,
        seed=seed,
        target=target if target is not None else settings.balance_target,
        class_targets=settings.balance_class_targets,
        policies=settings.augment_policies,
        clahe=clahe,
        channel_mode=settings.channel_mode,
    )
    plan["lineage"] = _lineage_refs(catalog, plan, members, record["validation_id"])
    uri = balance.save_plan(store, catalog, plan)
    return {
        "plan_uri": uri,
        "dataset_version": plan["dataset_version"],
        "test_snapshot": snapshot,
        "frozen_now": frozen_now,
        "class_counts": plan["class_counts_after"],
        "validation": record["validation_id"],
        "docs_uri": record["docs_uri"],
        "pending_validation": pending,
    }


def _lineage_refs(catalog: Catalog, plan: dict, members: list[dict], dataset_validation: str) -> dict:
    used = {e["image_id"] for e in plan["train"] + plan["val"]}
    runs = sorted({m["ingest_run_id"] for m in members if m["image_id"] in used})
    batch = catalog.query_in(
        "SELECT validation_id FROM validations WHERE suite = 'batch' AND subject IN ({in})",
        [f"ingest:{r}" for r in runs],
    )
    return {
        "ingest_run": runs,
        "batch_validation": sorted(r["validation_id"] for r in batch),
        "dataset_validation": [dataset_validation],
    }


def freeze_test(
    settings: Settings, store: Store, catalog: Catalog, name: str, reason: str
) -> dict[str, Any]:  # fmt: skip
    """Freeze a new test snapshot and re-evaluate the champion on it (both recorded)."""
    from mmpipe import evaluate

    splits.record_splits(catalog, splits.Ratios.of(settings))
    snapshot = splits.freeze_test(catalog, store, name, reason)
    champion = evaluate.evaluate_champion(
        settings, store, catalog, name, reason=f"snapshot {name} frozen: {reason}"
    )
    return snapshot | {"champion_evaluation": champion}


def lineage(store: Store, catalog: Catalog, dataset_version: str) -> dict[str, Any]:
    """Plan -> validations -> ingest runs -> source objects of one dataset version."""
    found = catalog.query("SELECT * FROM dataset_versions WHERE dataset_version = :v", v=dataset_version)
    if not found:
        raise MmpipeError(
            f"dataset version {dataset_version!r} not found; list them in the dataset_versions table"
        )
    refs: dict[str, list[str]] = {}
    for r in catalog.query(
        "SELECT kind, ref FROM dataset_lineage WHERE dataset_version = :v ORDER BY kind, ref",
        v=dataset_version,
    ):
        refs.setdefault(r["kind"], []).append(r["ref"])
    validations = catalog.query_in(
        "SELECT validation_id, subject, suite, success, n_critical, n_warnings, docs_uri, created_at "
        "FROM validations WHERE validation_id IN ({in})",
        refs.get("batch_validation", []) + refs.get("dataset_validation", []),
    )
    ingest_runs = catalog.query_in(
        "SELECT run_id, prefix, status, images, report_uri, validation_report_uri, finished_at FROM ingest_runs "
        "WHERE run_id IN ({in})",
        refs.get("ingest_run", []),
    )
    plan = store.get_json(store.key_of(found[0]["plan_uri"]))
    used = Counter(e["image_id"] for e in plan["train"] + plan["val"])
    sources: dict[tuple[str, str], dict[str, Any]] = {}
    images = catalog.query_in(
        "SELECT source_key, source_etag, ingest_run_id FROM images WHERE image_id IN ({in})", sorted(used)
    )
    for image in images:
        source = sources.setdefault(
            (image["source_key"], image["source_etag"]),
            {"source_key": image["source_key"], "etag": image["source_etag"], "ingest_run_id": image["ingest_run_id"],
             "images": 0},
        )  # fmt: skip
        source["images"] += 1
    return {
        "dataset_version": dataset_version,
        "plan_uri": found[0]["plan_uri"],
        "test_snapshot": found[0]["test_snapshot"],
        "validations": sorted(validations, key=lambda v: v["validation_id"]),
        "ingest_runs": sorted(ingest_runs, key=lambda r: r["run_id"]),
        "source_objects": sorted(sources.values(), key=lambda s: (s["source_key"], s["etag"])),
    }
