"""What the fault suite runs and what it checks after every fault: a small hospital corpus ingested
into the real store and catalog, and the recovery figures of the run after the fault.

:func:`recovery` measures, after the rerun, what docs/reliability.md tabulates: exact accounting,
pixel copies kept twice, orphans, quarantines a transient fault caused, and whether the catalog is
the one a clean run of the same corpus produces (order aside: which copy of a re-sent image owns
it may differ). Scoring brings its own corpus and recovery figures (scoring fates) to the same faults.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any

from mmpipe import ingest, synth
from mmpipe.catalog import Catalog
from mmpipe.config import Settings
from mmpipe.store import Store

PREFIX = "training/"


def corpus() -> dict[str, bytes]:
    """40 synthetic images (DICOM, PNG, JPEG, zip archives), a re-sent copy and two broken objects."""
    objects = {PREFIX + o.key: o.body for o in synth.generate(40, size=48, seed=7, archive_fraction=0.25)}
    first_dicom = next(k for k in sorted(objects) if k.endswith(".dcm"))
    label = first_dicom.split("/")[1]
    objects[f"{PREFIX}{label}/RESENT/copy.dcm"] = objects[first_dicom]  # duplicate pixels, another key
    objects[f"{PREFIX}{label}/BROKEN/truncated.dcm"] = objects[first_dicom][:-300]
    objects[f"{PREFIX}{label}/BROKEN/notes.txt"] = b"not an image, a note" * 20
    return objects


@dataclass(frozen=True)
class Signature:
    """A catalog's outcome, independent of processing order (which copy owns an image may differ)."""

    images: dict[str, tuple]  # image_id -> (label, patient_key, study_key, status)
    producers: dict[str, tuple[str, ...]]  # image_id -> every source key that produced it
    quarantine: frozenset[tuple[str, str, str]]  # (key, member, reason)
    sources: frozenset[str]


def signature(catalog: Catalog) -> Signature:
    producers: dict[str, set[str]] = defaultdict(set)
    images = {}
    for r in catalog.query("SELECT image_id, source_key, label, patient_key, study_key, status FROM images"):
        images[r["image_id"]] = (r["label"], r["patient_key"], r["study_key"], r["status"])
        producers[r["image_id"]].add(r["source_key"])
    for r in catalog.query("SELECT duplicate_of, source_key FROM duplicates"):
        producers[r["duplicate_of"]].add(r["source_key"])
    quarantine = catalog.query("SELECT source_key, member_path, reason FROM quarantine")
    return Signature(
        images,
        {k: tuple(sorted(v)) for k, v in producers.items()},
        frozenset((q["source_key"], q["member_path"], q["reason"]) for q in quarantine),
        frozenset(r["source_key"] for r in catalog.query("SELECT source_key FROM source_objects")),
    )


def recovery(settings: Settings, store: Store, catalog: Catalog, reference: Signature) -> dict[str, Any]:
    """The figures after the rerun (and a sweep with no grace, as a day later would run it)."""
    listed = {o.key for o in store.list(PREFIX)}
    statuses = Counter(
        r["status"] for r in catalog.query("SELECT status FROM source_objects WHERE status <> 'superseded'")
    )
    swept = ingest.sweep_orphans(settings.model_copy(update={"orphan_grace_hours": 0}), store, catalog)
    referenced = {r["u"] for r in catalog.query("SELECT DISTINCT shard_uri AS u FROM images")}
    referenced |= {r["u"] for r in catalog.query("SELECT record_uri AS u FROM quarantine")}
    kept = [
        store.uri(o.key) for p in (ingest.CURATED_PREFIX, ingest.QUARANTINE_PREFIX) for o in store.list(p)
    ]
    copies = Counter(
        image_id for uri in kept if uri.endswith(".npz") for image_id in ingest.load_shard(store, uri)[1]
    )
    mine = signature(catalog)
    return {
        "listed": len(listed),
        "ingested": statuses["ingested"],
        "duplicate": statuses["duplicate"],
        "quarantined": statuses["quarantined"],
        "accounted": sum(statuses.values()),
        "recorded_not_listed": len(mine.sources - listed),
        "extra_pixel_copies": sum(n - 1 for n in copies.values()),
        "images_without_pixels": len(set(mine.images) - set(copies)),
        "orphans_swept": swept["orphans_deleted"],
        "orphans_left": len(set(kept) - referenced),
        "transient_quarantines": len(mine.quarantine - reference.quarantine),
        "missing_quarantines": len(reference.quarantine - mine.quarantine),
        "same_as_clean_run": mine == reference,
        "runs_left_running": catalog.scalar("SELECT count(*) FROM ingest_runs WHERE status = 'running'"),
        "claims_left": catalog.scalar("SELECT count(*) FROM ingest_claims"),
    }


def assert_recovered(figures: dict[str, Any]) -> None:
    """What every fault must leave after its rerun."""
    problems = {
        "accounting": figures["accounted"] != figures["listed"],
        "recorded_not_listed": figures["recorded_not_listed"],
        "extra_pixel_copies": figures["extra_pixel_copies"],
        "images_without_pixels": figures["images_without_pixels"],
        "orphans_left": figures["orphans_left"],
        "transient_quarantines": figures["transient_quarantines"],
        "missing_quarantines": figures["missing_quarantines"],
        "not_the_clean_run": not figures["same_as_clean_run"],
        "runs_left_running": figures["runs_left_running"],
        "claims_left": figures["claims_left"],
    }
    assert not any(problems.values()), json.dumps(figures, indent=1, default=str)


def first_run(action: Any) -> dict[str, Any]:
    """Run the faulted run; its outcome as figures (it may fail: what matters is the rerun)."""
    try:
        report = action()
    except Exception as exc:
        return {"first_run": f"failed: {type(exc).__name__}", "first_error": str(exc)[:300]}
    left = report.get("store_errors", 0) + report.get("decoder_errors", 0)
    return {"first_run": report["status"], "left_for_rerun": left}
