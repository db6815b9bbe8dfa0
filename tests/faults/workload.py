"""What the fault suite runs and what it checks after every fault: a small hospital corpus ingested
into the real store and catalog, and the recovery figures of the run after the fault.

:func:`recovery` measures, after the rerun, what docs/reliability.md tabulates: exact accounting,
pixel copies kept twice, orphans, quarantines a transient fault caused, and whether the catalog is
the one a clean run of the same corpus produces (order aside: which copy of a re-sent image owns
it may differ). :func:`score_recovery` does the same for scoring, on the same corpus under
``incoming/``: every object's fate accounted once, its tags those of a clean run (mmpipe's from one
model, the hospital's kept), no transient fault turned into a verdict.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmpipe import ingest, score, synth
from mmpipe.catalog import Catalog
from mmpipe.config import Settings
from mmpipe.errors import StoreError
from mmpipe.store import Store

PREFIX = "training/"
SCORE_PREFIX = score.INCOMING_PREFIX


def corpus(prefix: str = PREFIX) -> dict[str, bytes]:
    """40 synthetic images (DICOM, PNG, JPEG, zip archives), a re-sent copy and two broken objects."""
    objects = {prefix + o.key: o.body for o in synth.generate(40, size=48, seed=7, archive_fraction=0.25)}
    first_dicom = next(k for k in sorted(objects) if k.endswith(".dcm"))
    label = first_dicom.split("/")[1]
    objects[f"{prefix}{label}/RESENT/copy.dcm"] = objects[first_dicom]  # duplicate pixels, another key
    objects[f"{prefix}{label}/BROKEN/truncated.dcm"] = objects[first_dicom][:-300]
    objects[f"{prefix}{label}/BROKEN/notes.txt"] = b"not an image, a note" * 20
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


def in_background(action: Callable[[], dict]) -> tuple[threading.Thread, dict]:
    """The faulted run in a thread; its figures land in the dict (see :func:`first_run`)."""
    out: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: out.update(first_run(action)), daemon=True)
    thread.start()
    return thread, out


def wait_for(condition: Callable[[], bool], timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the run never got there"
        time.sleep(0.02)


CHILD_SETUP = """
import json, pathlib, sys, time
from mmpipe.catalog import open_catalog
from mmpipe.config import get_settings
from mmpipe.store import open_store
settings = get_settings(**json.loads(sys.argv[1]))
run_id, extra, sync = sys.argv[2], json.loads(sys.argv[3]), sys.argv[4:]
store, catalog = open_store(settings), open_catalog(settings)
if sync:  # start when told: runs started together really overlap
    (pathlib.Path(sync[0]) / run_id).touch()
    while not (pathlib.Path(sync[0]) / "go").exists():
        time.sleep(0.01)
"""


def start_run(settings: Settings, run_id: str, work: str, extra: dict, *sync: Path) -> subprocess.Popen:
    """A run in a process of its own, as the CLI runs it: ``work`` is Python that sees ``settings``,
    ``store``, ``catalog``, ``run_id`` and ``extra``; with ``sync`` (a folder) it starts on ``go``."""
    return subprocess.Popen(
        [
            sys.executable,
            "-c",
            CHILD_SETUP + work,
            child_settings(settings),
            run_id,
            json.dumps(extra),
            *map(str, sync),
        ],
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def child_settings(settings: Settings) -> str:
    """``settings`` as the JSON a child process builds its own from (``get_settings(**json)``)."""
    values = {}
    for name, value in settings.model_dump().items():
        if value is not None:
            value = value.get_secret_value() if hasattr(value, "get_secret_value") else value
            values[name] = str(value) if isinstance(value, Path) else value
    return json.dumps(values)


def first_run(action: Any) -> dict[str, Any]:
    """Run the faulted run; its outcome as figures (it may fail: what matters is the rerun)."""
    try:
        report = action()
    except Exception as exc:
        return {"first_run": f"failed: {type(exc).__name__}", "first_error": str(exc)[:300]}
    left = report.get("store_errors", 0) + report.get("decoder_errors", 0)
    return {"first_run": report["status"], "left_for_rerun": left}


# --------------------------------------------------------------------------- scoring


def foreign_tags(keys: list[str]) -> dict[str, dict[str, str]]:
    """The hospital's own tags on some objects: two on three of them, 8 on one (room for 2 of mmpipe's)
    and 10 on one (no room: failed, tag_limit, settled)."""
    keys = sorted(keys)
    counts = {keys[0]: 2, keys[5]: 2, keys[9]: 2, keys[13]: 8, keys[17]: 10}
    return {key: {f"hospital-{i}": f"v{i}" for i in range(n)} for key, n in counts.items()}


def fates(store: Store, catalog: Catalog, model_version: str) -> dict[str, tuple]:
    """Each object's scoring outcome: (fate, reason, settled, modality, review reasons, its tags but
    mmpipe-confidence): what a rerun must make equal to a clean run's."""
    rows = catalog.query(
        "SELECT source_key, fate, reason, settled, modality, review_reasons FROM scored_objects "
        "WHERE model_version = :m",
        m=model_version,
    )
    tags = {r["source_key"]: store.get_tags(r["source_key"]) for r in rows}
    return {
        r["source_key"]: (
            *(r[c] for c in ("fate", "reason", "settled", "modality", "review_reasons")),
            tuple(sorted((k, v) for k, v in tags[r["source_key"]].items() if k != "mmpipe-confidence")),
        )
        for r in rows
    }


def tags_consistent(store: Store, key: str, models: list[str], foreign: dict) -> bool:
    """The object keeps exactly the hospital's tags, and mmpipe's are exactly what one of ``models``
    wrote (its sidecar's ``tags_written``), or none."""
    tags = store.get_tags(key)
    ours = {k: v for k, v in tags.items() if k.startswith(score.TAG_PREFIX)}
    if {k: v for k, v in tags.items() if k not in ours} != foreign.get(key, {}):
        return False
    return not ours or any(
        store.get_json(score.sidecar_key(m, key))["tags_written"] == ours
        for m in models
        if store.head(score.sidecar_key(m, key)) is not None
    )


def score_recovery(
    store: Store, catalog: Catalog, model_version: str, reference: dict[str, tuple], foreign: dict
) -> dict[str, Any]:
    """The figures after the rerun: every listed object has one fate row (none for unlisted keys), no
    duplicate prediction row, nothing left unsettled, no verdict a clean run would not give, each
    object's tags a clean run's (mmpipe's from this one model, the sidecar's, the hospital's kept)."""
    listed = {o.key for o in store.list(SCORE_PREFIX)}
    mine = fates(store, catalog, model_version)
    predictions = catalog.query("SELECT source_key, member_path, model_version FROM predictions")
    members = Counter((p["source_key"], p["member_path"], p["model_version"]) for p in predictions)
    differ = {k for k in listed if mine.get(k) != reference.get(k)}
    return {
        "listed": len(listed),
        "fates": dict(Counter(v[0] for k, v in mine.items() if k in listed)),
        "accounted": len(listed & set(mine)),
        "fate_rows_not_listed": len(set(mine) - listed),
        "duplicate_rows": sum(n - 1 for n in members.values()),
        "stray_predictions": sum(1 for key, _, m in members if m != model_version or key not in listed),
        "unsettled": sum(1 for k, v in mine.items() if not v[2]),
        "fault_verdicts": sum(1 for k in differ if mine.get(k, ("",))[0] == score.UNREADABLE),
        "differ_from_clean_run": sorted(differ),
        "tags_inconsistent": sum(not tags_consistent(store, k, [model_version], foreign) for k in listed),
        "same_as_clean_run": not differ,
        "runs_left_running": catalog.scalar("SELECT count(*) FROM score_runs WHERE status = 'running'"),
        "claims_left": catalog.scalar("SELECT count(*) FROM score_claims"),
    }


def assert_score_recovered(figures: dict[str, Any]) -> None:
    """What every fault during scoring must leave after its rerun."""
    problems = {
        "accounting": figures["accounted"] != figures["listed"] or not figures["rerun_reconciled"],
        "fate_rows_not_listed": figures["fate_rows_not_listed"],
        "duplicate_rows": figures["duplicate_rows"],
        "stray_predictions": figures["stray_predictions"],
        "unsettled": figures["unsettled"],
        "fault_verdicts": figures["fault_verdicts"],
        "tags_inconsistent": figures["tags_inconsistent"],
        "not_the_clean_run": not figures["same_as_clean_run"],
        "runs_left_running": figures["runs_left_running"],
        "claims_left": figures["claims_left"],
    }
    assert not any(problems.values()), json.dumps(figures, indent=1, default=str)


def serves(store: Store, prefix: str) -> bool:
    """The store answers reads of every object under ``prefix`` (a restarted SeaweedFS opens its S3
    port before its volumes: 500 InternalError meanwhile)."""
    try:
        return all(store.get(o.key) for o in store.list(prefix))
    except StoreError:
        return False


def terminate_backends(
    pg_admin: Any, database: str, thread: threading.Thread, progress: Callable[[], int], busy_only: bool
) -> int:
    """``pg_terminate_backend`` on the run's connections to ``database`` while ``thread`` runs, once
    each time ``progress()`` moves (one kill per commit or flush: each must be survived on its own),
    3 times; ``busy_only``: only connections active or in a transaction. The number of backends killed."""
    import sqlalchemy as sa

    busy = " AND state IN ('active', 'idle in transaction')" if busy_only else ""
    query = sa.text(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :d "
        f"AND pid <> pg_backend_pid(){busy}"
    )
    terminated, last = 0, -1
    with pg_admin.connect() as admin:
        while thread.is_alive() and terminated < 3:
            if progress() != last and (killed := admin.execute(query, {"d": database}).fetchall()):
                terminated, last = terminated + len(killed), progress()
            time.sleep(0.01)
    return terminated
