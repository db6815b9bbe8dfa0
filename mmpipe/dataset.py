"""Validation gates and training-ready datasets: GX suites, splits, frozen snapshots, plans, lineage.

Batch validation keeps good data. An image failing a per-image rule, or whose identical copies
disagree on label or patient (``duplicate_conflict``), is excluded alone, with the rule's name as
its reason; nothing is deleted. A batch fails (all its images excluded, the task fails visibly)
only when a rule's failing share passes its threshold, or a batch rule (class collapse) fails.
Each validation also re-evaluates what earlier validations excluded, with today's labels and
settings: images that pass now re-enter training, recorded in ``readmissions``. The dataset suite
runs again before every plan, against the frozen test snapshot. Lineage runs plan -> validations
-> ingest runs -> source objects, and names the images re-admitted since their ingest.
"""

from __future__ import annotations

import json
import logging
from collections import Counter, defaultdict
from typing import Any

import pandas as pd
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from mmpipe import balance, ingest, splits
from mmpipe.catalog import Catalog
from mmpipe.config import Settings
from mmpipe.errors import ConfigError, MmpipeError
from mmpipe.labels import MEMBER_SEPARATOR
from mmpipe.store import Store
from mmpipe.validate import BATCH_COLUMNS, IMAGE_RULES, BatchRules, Check, ValidationReport

log = logging.getLogger(__name__)

DUPLICATE_CONFLICT, BATCH_FAILED = "duplicate_conflict", "batch_failed"
#: Example keys per rule in reports and ``mmpipe validate``.
EXAMPLES = 3


class ValidationFailed(MmpipeError):
    """A critical expectation failed: the batch is kept out of training (nothing deleted)."""

    def __init__(self, message: str, summary: dict[str, Any] | None = None):
        super().__init__(message)
        self.summary = summary or {}


_IMAGE_SQL = (
    "SELECT i.image_id, i.label, i.orig_rows, i.orig_cols, i.bits_stored, i.bits_allocated, i.float_pixels, "
    "i.photometric, i.pixel_std, i.patient_key, i.modality, i.source_key, i.member_path, i.status, "
    "i.status_reason, i.ingest_run_id FROM images i "
)
#: The current copies (source not superseded) recorded as duplicates of the given images.
_COPIES_SQL = (
    "SELECT d.duplicate_of, d.label, d.patient_key, d.source_key, d.member_path FROM duplicates d "
    "JOIN source_objects s ON s.source_key = d.source_key AND s.etag = d.source_etag "
    "WHERE s.status <> 'superseded' AND d.duplicate_of IN ({in})"
)
_JUDGE = sa.text("UPDATE images SET status = :status, status_reason = :reason WHERE image_id = :image_id")
#: A run's accounting after validation: images that may train and images kept out.
_ACCOUNT = sa.text(
    "UPDATE ingest_runs SET "
    "images_active = (SELECT count(*) FROM images i WHERE i.ingest_run_id = :r AND i.status = 'active'), "
    "images_excluded = (SELECT count(*) FROM images i WHERE i.ingest_run_id = :r AND i.status = 'excluded') "
    "WHERE run_id = :r"
)
_READMIT = sa.text(
    "INSERT INTO readmissions (image_id, readmitted_by, ingest_run_id, reason) VALUES (:i, :by, :run, :reason) "
    "ON CONFLICT (image_id, readmitted_by) DO NOTHING"
)


def batch_rules(settings: Settings) -> BatchRules:
    """The batch rules from ``MMPIPE_VALIDATION_*`` and the classes; a bad setting is a one-line error."""
    try:
        return BatchRules(
            classes=settings.classes,
            mostly=settings.validation_mostly,
            rule_mostly=dict(settings.validation_rule_mostly),
            max_class_share=settings.validation_max_class_share,
        )
    except ValueError as exc:
        raise ConfigError(f"invalid validation settings (MMPIPE_VALIDATION_*): {exc}") from None


def run_images(catalog: Catalog, run_id: str) -> list[dict[str, Any]]:
    """The run's images (not retired), as the batch suite's rows plus their source and status."""
    return catalog.query(
        _IMAGE_SQL + "WHERE i.ingest_run_id = :r AND i.status <> 'retired' ORDER BY i.image_id", r=run_id
    )


def batch_rows(images: list[dict[str, Any]]) -> pd.DataFrame:
    """The batch suite's frame; ``float_pixels`` is a boolean whether the database stores 0/1 or not."""
    frame = pd.DataFrame(images, columns=list(BATCH_COLUMNS))
    frame["float_pixels"] = frame["float_pixels"].fillna(False).astype(bool)
    return frame


def duplicate_conflicts(images: list[dict[str, Any]], copies: list[dict[str, Any]]) -> dict[str, str]:
    """{image_id: why} for images whose identical copies disagree on label or patient.

    A copy with the same label and patient is a harmless re-send; one that disagrees means one of
    them is wrong, and nothing says which, so every copy stays out of training until a manifest or
    a header rule makes them agree.
    """
    labels: dict[str, set[str]] = defaultdict(set)
    patients: dict[str, set[str]] = defaultdict(set)
    for image in images:
        labels[image["image_id"]].add(image["label"])
        patients[image["image_id"]].add(image["patient_key"])
    for copy in copies:
        image_id = copy["duplicate_of"]
        if image_id in labels:
            labels[image_id].update([copy["label"]] if copy["label"] else [])
            patients[image_id].update([copy["patient_key"]] if copy["patient_key"] else [])
    found = {}
    for image_id, seen in labels.items():
        why = []
        if len(seen) > 1:
            why.append("labels differ: " + ", ".join(sorted(seen)))
        if len(patients[image_id]) > 1:
            why.append(f"{len(patients[image_id])} patients")
        if why:
            found[image_id] = "; ".join(why)
    return found


def _key(row: dict[str, Any]) -> str:
    return row["source_key"] + (MEMBER_SEPARATOR + row["member_path"] if row["member_path"] else "")


def _verdicts(
    images: list[dict[str, Any]], report: ValidationReport, conflicts: dict[str, str], batch_failed: bool
) -> dict[str, list[str]]:
    """{image_id: reasons to keep it out of training}; no reason means it may train."""
    reasons: dict[str, list[str]] = {i["image_id"]: [] for i in images}
    for rule in IMAGE_RULES:
        for image_id in report.image_failures.get(rule, []):
            reasons[image_id].append(rule)
    for image_id in conflicts.keys() & reasons.keys():
        reasons[image_id].append(DUPLICATE_CONFLICT)
    if batch_failed:
        for why in reasons.values():
            why[:] = why or [BATCH_FAILED]
    return reasons


def _judge(
    conn: Connection, images: list[dict[str, Any]], reasons: dict[str, list[str]], by: str
) -> list[dict[str, Any]]:
    """Write each image's status and reason; images excluded before and usable now are re-admitted
    (recorded against the run ``by`` whose validation re-evaluated them). Returns the re-admissions."""
    changed, readmitted = [], []
    for image in images:
        why = ",".join(reasons[image["image_id"]]) or None
        status = "excluded" if why else "active"
        if (image["status"], image["status_reason"]) != (status, why):
            changed.append({"image_id": image["image_id"], "status": status, "reason": why})
        if image["status"] == "excluded" and status == "active":
            readmitted.append(
                {"image_id": image["image_id"], "ingest_run_id": image["ingest_run_id"],
                 "reason": image["status_reason"] or "", "key": _key(image)}
            )  # fmt: skip
    if changed:
        conn.execute(_JUDGE, changed)
    if readmitted:
        rows = [
            {"i": r["image_id"], "by": by, "run": r["ingest_run_id"], "reason": r["reason"]}
            for r in readmitted
        ]
        conn.execute(_READMIT, rows)
    conn.execute(_ACCOUNT, [{"r": r} for r in sorted({i["ingest_run_id"] for i in images})])
    return readmitted


def _copies(catalog: Catalog, image_ids: list[str]) -> list[dict[str, Any]]:
    return catalog.query_in(_COPIES_SQL, image_ids)


def rule_table(
    report: ValidationReport, keys: dict[str, str], conflicts: dict[str, str]
) -> list[dict[str, Any]]:
    """One row per rule: failing images, share, threshold, verdict and a few example keys."""
    rows = []
    for check in report.checks:
        failing = int(check.detail.get("unexpected_count") or 0)
        share = check.detail.get("unexpected_percent")
        ids = report.image_failures.get(check.name) or check.detail.get("unexpected_image_ids") or []
        rows.append(
            {
                "rule": check.name,
                "scope": check.scope,
                "severity": check.severity,
                "failing": failing,
                "share": None if share is None else round(share / 100, 4),
                "threshold": check.threshold,
                "verdict": _verdict(check, failing),
                "examples": [keys[i] for i in ids[:EXAMPLES] if i in keys],
            }
        )
    rows.append(
        {
            "rule": DUPLICATE_CONFLICT,
            "scope": "image",
            "severity": "critical",
            "failing": len(conflicts),
            "share": None,
            "threshold": None,
            "verdict": "copies excluded" if conflicts else "pass",
            "examples": [keys[i] for i in list(conflicts)[:EXAMPLES] if i in keys],
        }
    )
    return rows


def _verdict(check: Check, failing: int) -> str:
    if not check.success:
        return "batch failed" if check.severity == "critical" else "warning"
    return "images excluded" if check.scope == "image" and failing else "pass"


def _validate_run(
    settings: Settings, store: Store, catalog: Catalog, run_id: str, rules: BatchRules, by: str
) -> dict[str, Any] | None:
    """Validate one ingest run's images and write every verdict; the summary, or None without images.

    Originals from earlier runs that this run brought a disagreeing copy of are excluded too.
    """
    from mmpipe.validate import validate_batch

    images = run_images(catalog, run_id)
    if not images:
        return None
    prefix = (
        catalog.scalar("SELECT prefix FROM ingest_runs WHERE run_id = :r", r=run_id) or ingest.TRAINING_PREFIX
    )
    report = validate_batch(batch_rows(images), rules, run_name=run_id, asset=prefix)
    record = _record_validation(store, catalog, f"ingest:{run_id}", report)
    originals = catalog.query(
        _IMAGE_SQL + "WHERE i.ingest_run_id <> :r AND i.status = 'active' "
        "AND i.image_id IN (SELECT d.duplicate_of FROM duplicates d WHERE d.run_id = :r)",
        r=run_id,
    )
    copies = _copies(catalog, [i["image_id"] for i in images + originals])
    conflicts = duplicate_conflicts(images + originals, copies)
    reasons = _verdicts(images, report, conflicts, batch_failed=not report.success)
    reasons |= {o["image_id"]: [DUPLICATE_CONFLICT] for o in originals if o["image_id"] in conflicts}
    with catalog.begin() as conn:
        readmitted = _judge(conn, images + [o for o in originals if o["image_id"] in conflicts], reasons, by)
    keys = {i["image_id"]: _key(i) for i in images + originals}
    copy_keys: dict[str, list[str]] = defaultdict(list)
    for copy in copies:
        copy_keys[copy["duplicate_of"]].append(_key(copy))
    verdicts = [w for i in images for w in reasons[i["image_id"]]]
    summary = {
        "run_id": run_id,
        **{k: v for k, v in record.items() if k != "subject"},
        "critical_failures": [c.name for c in report.failures()],
        "warnings": [c.name for c in report.failures("warning")],
        "images": len(images),
        "images_active": sum(not reasons[i["image_id"]] for i in images),
        "images_excluded": sum(bool(reasons[i["image_id"]]) for i in images),
        "excluded_by_reason": dict(Counter(verdicts)),
        "rules": rule_table(report, keys, conflicts),
        "duplicate_conflicts": [
            {"image_id": i, "why": why, "keys": [keys[i], *copy_keys[i]]}
            for i, why in sorted(conflicts.items())
        ],
        "class_counts": dict(Counter(i["label"] for i in images)),
        "readmitted": readmitted,
    }
    return summary


def small(summary: dict[str, Any]) -> dict[str, Any]:
    """The summary with its per-image lists counted (they stay in the report at ``report_uri``): what
    an Airflow task returns, as XCom carries small JSON."""
    return {k: len(v) if k in ("readmitted", "duplicate_conflicts") else v for k, v in summary.items()}


def _publish(store: Store, catalog: Catalog, summary: dict[str, Any]) -> None:
    """The validation report beside the run's ingest report, linked from the run."""
    uri = store.put_json(f"reports/ingest/{ingest.run_slug(summary['run_id'])}/validation.json", summary)
    catalog.execute(
        "UPDATE ingest_runs SET validation_report_uri = :u WHERE run_id = :r",
        {"u": uri, "r": summary["run_id"]},
    )
    summary["report_uri"] = uri


def _reevaluate(
    settings: Settings, store: Store, catalog: Catalog, rules: BatchRules, by: str
) -> list[dict[str, Any]]:
    """Re-evaluate what earlier validations excluded, with today's labels and settings.

    A batch that failed is validated again whole (it may pass now); an image excluded alone from a
    batch that passed is judged again by the per-image rules and its copies. What passes re-enters
    training. Returns the re-admissions.
    """
    from mmpipe.validate import validate_batch

    failed = catalog.query(
        "SELECT subject FROM validations WHERE suite = 'batch' AND NOT success ORDER BY subject"
    )
    readmitted = []
    for run_id in (r["subject"].removeprefix("ingest:") for r in failed):
        if run_id != by:
            summary = _validate_run(settings, store, catalog, run_id, rules, by)
            if summary:
                _publish(store, catalog, summary)
                readmitted += summary["readmitted"]
    excluded = catalog.query(
        _IMAGE_SQL + f"WHERE i.status = 'excluded' AND i.ingest_run_id <> :r AND {splits.VALIDATED}", r=by
    )
    if excluded:
        report = validate_batch(batch_rows(excluded), rules, docs=False)
        conflicts = duplicate_conflicts(excluded, _copies(catalog, [i["image_id"] for i in excluded]))
        with catalog.begin() as conn:
            readmitted += _judge(conn, excluded, _verdicts(excluded, report, conflicts, False), by)
    if readmitted:
        log.info("%d image(s) excluded earlier re-admitted by the validation of %s", len(readmitted), by)
    return readmitted


def validate_ingest(settings: Settings, store: Store, catalog: Catalog, run_id: str) -> dict[str, Any]:
    """GX batch suite over the run's images, then a re-evaluation of earlier exclusions.

    Images failing a per-image rule or in a duplicate conflict are excluded alone; a failing batch
    rule or a rule's share past its threshold excludes the batch and raises :class:`ValidationFailed`
    (after re-evaluating the earlier exclusions). Results go to the catalog, the Data Docs site and a
    validation report (linked from the ingest run); a rerun re-validates and records again.
    """
    rules = batch_rules(settings)
    summary = _validate_run(settings, store, catalog, run_id, rules, run_id) or {
        "run_id": run_id, "images": 0, "success": True, "skipped": "no new images", "readmitted": [],
    }  # fmt: skip
    summary["readmitted"] += _reevaluate(settings, store, catalog, rules, run_id)
    if summary["images"]:
        _publish(store, catalog, summary)
    if not summary["success"]:
        raise ValidationFailed(
            f"batch {run_id} failed critical rule(s) ({', '.join(summary['critical_failures'])}); its "
            f"{summary['images_excluded']} images are excluded from training (nothing deleted). "
            f"Report: {summary['report_uri']}; Data Docs: {summary['docs_uri']}",
            summary,
        )
    return summary


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
        run_name=run_id,
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
    readmitted = catalog.query_in(
        "SELECT DISTINCT readmitted_by FROM readmissions WHERE image_id IN ({in})", sorted(used)
    )
    return {
        "ingest_run": runs,
        "batch_validation": sorted(r["validation_id"] for r in batch),
        "dataset_validation": [dataset_validation],
        "readmitted_by": sorted(r["readmitted_by"] for r in readmitted),
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
        "SELECT run_id, prefix, status, images, images_active, images_excluded, report_uri, validation_report_uri, "
        "finished_at FROM ingest_runs "
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
    readmissions = catalog.query_in(
        "SELECT image_id, readmitted_by, ingest_run_id, reason, created_at FROM readmissions WHERE image_id IN ({in})",
        sorted(used),
    )
    return {
        "dataset_version": dataset_version,
        "plan_uri": found[0]["plan_uri"],
        "test_snapshot": found[0]["test_snapshot"],
        "validations": sorted(validations, key=lambda v: v["validation_id"]),
        "ingest_runs": sorted(ingest_runs, key=lambda r: r["run_id"]),
        "source_objects": sorted(sources.values(), key=lambda s: (s["source_key"], s["etag"])),
        "readmissions": sorted(readmissions, key=lambda r: (r["image_id"], r["readmitted_by"])),
    }
