"""Ingest: new objects in the store become curated, pseudonymised image shards plus catalog rows.

Incremental by (key, ETag): a rerun with nothing new lists, compares and writes nothing. Each
batch is one transaction after its shards are written under a key derived from the batch's
contents, so a killed task retried later rewrites the same shard and UPSERTs the same rows: no
duplicates. Every listed object ends as ingested, duplicate or quarantined (with a reason).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import sqlalchemy as sa

from mmpipe.archives import iter_members
from mmpipe.catalog import Catalog
from mmpipe.config import Settings
from mmpipe.imaging import Limits, Reason, Rejected, decode_image, sniff
from mmpipe.pseudonym import fallback_patient, pseudonym
from mmpipe.store import ObjectInfo, Store

log = logging.getLogger(__name__)

SUPERSEDE_IMAGES = sa.text(
    "UPDATE images SET status = 'retired', status_reason = 'superseded' "
    "WHERE source_key = :k AND source_etag <> :e AND status <> 'retired'"
)
SUPERSEDE_SOURCES = sa.text(
    "UPDATE source_objects SET status = 'superseded' WHERE source_key = :k AND etag <> :e"
)

TRAINING_PREFIX = "training/"
MAX_ARCHIVE_DEPTH = 2
ARCHIVE_KINDS = ("zip", "tar")


def run_slug(run_id: str) -> str:
    """An Airflow run id (``scheduled__2026-11-23T02:00:00+00:00``) as a safe key segment."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", run_id).strip("-")[:120]


def label_from_key(key: str, prefix: str, classes: Sequence[str]) -> str | None:
    """``training/<class>/...`` -> class, when the folder names a configured class."""
    rest = key[len(prefix) :] if key.startswith(prefix) else key
    head = rest.split("/", 1)[0]
    return head if head in classes and "/" in rest else None


@dataclass
class Outcome:
    """What one source object produced: image rows with pixels, and quarantined members."""

    obj: ObjectInfo
    images: list[tuple[dict[str, Any], np.ndarray]] = field(default_factory=list)
    quarantined: list[dict[str, str]] = field(default_factory=list)


def process_object(
    obj: ObjectInfo, data: bytes, *, label: str | None, salt: bytes, size: int, limits: Limits
) -> Outcome:
    """Decode one object (expanding archives) into pseudonymised image rows. Pure: no I/O."""
    outcome = Outcome(obj)
    members: list[tuple[str, bytes, int]] = [("", data, 0)]
    while members:
        path, body, depth = members.pop(0)
        try:
            kind = sniff(body, path or obj.key)
            if kind in ARCHIVE_KINDS:
                if depth >= MAX_ARCHIVE_DEPTH:
                    raise Rejected(Reason.UNSAFE_ARCHIVE, f"archives nested deeper than {MAX_ARCHIVE_DEPTH}")
                members.extend(
                    (f"{path}!{name}" if path else name, member, depth + 1)
                    for name, member in iter_members(body, path or obj.key, limits)
                )
                continue
            if label is None:
                raise Rejected(Reason.UNLABELLED, "no class folder under training/ for this object")
            decoded = decode_image(body, path or obj.key, size, limits)
        except Rejected as exc:
            outcome.quarantined.append({"member_path": path, "reason": str(exc.reason), "detail": exc.detail})
            continue
        pixels = decoded.pixels
        patient = decoded.patient_id or fallback_patient(obj.key)
        study = decoded.study_uid or f"{patient}/{obj.key}"
        row = {
            "image_id": hashlib.sha256(pixels.tobytes()).hexdigest()[:32],
            "source_key": obj.key,
            "source_etag": obj.etag,
            "member_path": path,
            "frame": decoded.frame,
            "label": label,
            "label_source": "prefix",
            "modality": decoded.modality,
            "patient_key": pseudonym(salt, "patient", patient),
            "study_key": pseudonym(salt, "study", study),
            "orig_rows": decoded.orig_rows,
            "orig_cols": decoded.orig_cols,
            "bits_stored": decoded.bits_stored,
            "pixel_mean": float(pixels.mean()),
            "pixel_std": float(pixels.std()),
        }
        outcome.images.append((row, pixels))
    if not outcome.images and not outcome.quarantined:
        outcome.quarantined.append(
            {"member_path": "", "reason": str(Reason.EMPTY), "detail": "archive had no files"}
        )
    return outcome


def list_new(store: Store, catalog: Catalog, prefix: str) -> tuple[list[ObjectInfo], int]:
    """Objects under ``prefix`` whose (key, ETag) the catalog has not recorded; also the listed total."""
    listed = list(store.list(prefix))
    seen = {
        (r["source_key"], r["etag"])
        for r in catalog.query(
            "SELECT source_key, etag FROM source_objects WHERE source_key LIKE :p",
            p=prefix.replace("%", r"\%") + "%",
        )
    }
    return [o for o in listed if (o.key, o.etag) not in seen], len(listed)


def batches(objects: Sequence[ObjectInfo], batch_size: int) -> list[list[ObjectInfo]]:
    return [list(objects[i : i + batch_size]) for i in range(0, len(objects), batch_size)]


def batch_id(objects: Iterable[ObjectInfo]) -> str:
    """Deterministic id of a batch's contents: retries of the same batch reuse its shard keys."""
    digest = hashlib.sha256("\n".join(sorted(f"{o.key}\x00{o.etag}" for o in objects)).encode())
    return digest.hexdigest()[:16]


def write_shard(store: Store, key: str, rows: list[dict[str, Any]], pixels: list[np.ndarray]) -> str:
    buffer = io.BytesIO()
    np.savez(buffer, pixels=np.stack(pixels), image_ids=np.array([r["image_id"] for r in rows]))
    return store.put(key, buffer.getvalue())


def load_shard(store: Store, shard_uri: str) -> tuple[np.ndarray, list[str]]:
    with np.load(io.BytesIO(store.get(store.key_of(shard_uri)))) as shard:
        return shard["pixels"], [str(x) for x in shard["image_ids"]]


def _fetch_and_process(
    store: Store, settings: Settings, salt: bytes, prefix: str, obj: ObjectInfo
) -> Outcome:
    limits = Limits.from_settings(settings)
    label = label_from_key(obj.key, prefix, settings.classes) if prefix.startswith(TRAINING_PREFIX) else None
    if obj.size > limits.max_object_bytes:
        outcome = Outcome(obj)
        detail = f"object is {obj.size} bytes; limit {limits.max_object_bytes}"
        outcome.quarantined.append({"member_path": "", "reason": str(Reason.TOO_LARGE), "detail": detail})
        return outcome
    if obj.size == 0:
        outcome = Outcome(obj)
        outcome.quarantined.append(
            {"member_path": "", "reason": str(Reason.EMPTY), "detail": "zero-byte object"}
        )
        return outcome
    return process_object(
        obj, store.get(obj.key), label=label, salt=salt, size=settings.image_size, limits=limits
    )


def ingest_objects(
    settings: Settings,
    store: Store,
    catalog: Catalog,
    run_id: str,
    objects: Sequence[ObjectInfo],
    prefix: str,
) -> dict[str, int]:
    """Ingest one batch: concurrent fetch+decode, shards, then one catalog transaction."""
    salt = settings.salt()
    started = time.monotonic()
    outcomes: list[Outcome] = []
    with ThreadPoolExecutor(settings.ingest_workers) as pool:
        futures = pool.map(lambda o: _fetch_and_process(store, settings, salt, prefix, o), objects)
        for done, outcome in enumerate(futures, 1):
            outcomes.append(outcome)
            _progress(done, len(objects), started)
    return record_outcomes(settings, store, catalog, run_id, batch_id(objects), outcomes)


def _progress(done: int, total: int, started: float) -> None:
    step = max(1, total // 10)
    if done % step and done != total:
        return
    rate = done / max(time.monotonic() - started, 1e-6)
    log.info("ingest: %d/%d objects, %.1f objects/s, ETA %.0fs", done, total, rate, (total - done) / rate)


def record_outcomes(
    settings: Settings, store: Store, catalog: Catalog, run_id: str, batch: str, outcomes: list[Outcome]
) -> dict[str, int]:
    slug = run_slug(run_id)
    candidates = [(row, px) for o in outcomes for row, px in o.images]
    existing = _known_ids(catalog, [row["image_id"] for row, _ in candidates])
    fresh: dict[str, tuple[dict[str, Any], np.ndarray]] = {}
    duplicates: list[dict[str, Any]] = []
    for row, px in candidates:
        first = existing.get(row["image_id"]) or (row["image_id"] if row["image_id"] in fresh else None)
        if first:
            duplicates.append(
                {k: row[k] for k in ("source_key", "source_etag", "member_path")} | {"duplicate_of": first}
            )
        else:
            fresh[row["image_id"]] = (row, px)

    image_rows: list[dict[str, Any]] = []
    items = list(fresh.values())
    for n, start in enumerate(range(0, len(items), settings.shard_size)):
        chunk = items[start : start + settings.shard_size]
        shard_uri = write_shard(
            store, f"curated/{slug}/{batch}-{n:03d}.npz", [r for r, _ in chunk], [p for _, p in chunk]
        )
        for index, (row, _) in enumerate(chunk):
            image_rows.append(
                row
                | {"shard_uri": shard_uri, "shard_index": index, "ingest_run_id": run_id}
                | {"status": "active", "status_reason": None}
            )

    quarantine_rows = []
    for outcome in outcomes:
        for q in outcome.quarantined:
            record = {"source_key": outcome.obj.key, "source_etag": outcome.obj.etag, **q, "run_id": run_id}
            digest = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]
            record["record_uri"] = store.put_json(f"quarantine/{slug}/{digest}.json", record)
            quarantine_rows.append(record)

    dup_keys = Counter(d["source_key"] for d in duplicates)
    new_keys = Counter(r["source_key"] for r in image_rows)
    sources = []
    for o in outcomes:
        status = "ingested" if new_keys[o.obj.key] else "duplicate" if dup_keys[o.obj.key] else "quarantined"
        sources.append(
            {
                "source_key": o.obj.key,
                "etag": o.obj.etag,
                "size_bytes": o.obj.size,
                "run_id": run_id,
                "status": status,
                "n_images": len(o.images),
                "n_quarantined": len(o.quarantined),
            }
        )
    member_key = ["source_key", "source_etag", "member_path"]
    with catalog.begin() as conn:
        for o in outcomes:  # a changed ETag supersedes the key's older versions
            conn.execute(SUPERSEDE_IMAGES, {"k": o.obj.key, "e": o.obj.etag})
            conn.execute(SUPERSEDE_SOURCES, {"k": o.obj.key, "e": o.obj.etag})
        # Rows whose content was only retired come back to life pointing at the new source.
        catalog.upsert("images", image_rows, ["image_id"], conn)
        catalog.upsert("duplicates", [d | {"run_id": run_id} for d in duplicates], member_key, conn)
        catalog.upsert("quarantine", quarantine_rows, member_key, conn)
        catalog.upsert("source_objects", sources, ["source_key", "etag"], conn)
    counts = Counter(s["status"] for s in sources)
    return {
        "objects": len(outcomes),
        "ingested": counts["ingested"],
        "duplicate": counts["duplicate"],
        "quarantined": counts["quarantined"],
        "images": len(image_rows),
        "duplicate_images": len(duplicates),
        "quarantined_members": len(quarantine_rows),
    }


def _known_ids(catalog: Catalog, ids: list[str]) -> dict[str, str]:
    found: dict[str, str] = {}
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        if not chunk:
            continue
        names = {f"i{n}": v for n, v in enumerate(chunk)}
        sql = f"SELECT image_id FROM images WHERE status <> 'retired' AND image_id IN ({', '.join(':' + k for k in names)})"
        found.update({r["image_id"]: r["image_id"] for r in catalog.query(sql, **names)})
    return found


def start_run(catalog: Catalog, run_id: str, prefix: str) -> None:
    row = {"run_id": run_id, "prefix": prefix, "status": "running"}
    catalog.upsert("ingest_runs", [row], ["run_id"])


def finish_run(
    store: Store,
    catalog: Catalog,
    run_id: str,
    new_objects: int,
    listed: int,
    results: Sequence[dict[str, int]],
) -> dict[str, Any]:
    """Sum batch results, prove the accounting, publish the run report and close the run."""
    totals = Counter()
    for result in results:
        totals.update(result)
    accounted = totals["ingested"] + totals["duplicate"] + totals["quarantined"]
    report = {
        "run_id": run_id,
        "listed": listed,
        "new_objects": new_objects,
        "accounted": accounted,
        **{k: totals[k] for k in ("ingested", "duplicate", "quarantined", "images", "duplicate_images")},
        "quarantined_members": totals["quarantined_members"],
        "quarantine_reasons": dict(
            (r["reason"], r["n"])
            for r in catalog.query(
                "SELECT reason, count(*) AS n FROM quarantine WHERE run_id = :r GROUP BY reason", r=run_id
            )
        ),
    }
    status = "succeeded" if accounted == new_objects else "failed"
    report["report_uri"] = store.put_json(f"reports/ingest/{run_slug(run_id)}/report.json", report)
    row = {
        "r": run_id,
        "status": status,
        "listed": new_objects,
        "ingested": totals["ingested"],
        "duplicates": totals["duplicate"],
        "quarantined": totals["quarantined"],
        "images": totals["images"],
        "report_uri": report["report_uri"],
    }
    catalog.execute(
        "UPDATE ingest_runs SET status = :status, listed = :listed, ingested = :ingested, duplicates = :duplicates, "
        "quarantined = :quarantined, images = :images, report_uri = :report_uri, finished_at = CURRENT_TIMESTAMP "
        "WHERE run_id = :r",
        row,
    )
    if status != "succeeded":
        raise RuntimeError(
            f"ingest accounting broken: {new_objects} new objects but {accounted} accounted for"
        )
    return report


def run(
    settings: Settings,
    store: Store,
    catalog: Catalog,
    run_id: str,
    prefix: str = TRAINING_PREFIX,
    batch_size: int = 200,
) -> dict[str, Any]:
    """The whole ingest in one process (the CLI); the DAG runs the same steps as mapped tasks."""
    start_run(catalog, run_id, prefix)
    new, listed = list_new(store, catalog, prefix)
    results = [ingest_objects(settings, store, catalog, run_id, b, prefix) for b in batches(new, batch_size)]
    return finish_run(store, catalog, run_id, len(new), listed, results)
