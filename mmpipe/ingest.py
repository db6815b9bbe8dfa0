"""Ingest: new objects in the store become curated, pseudonymised image shards plus catalog rows.

Ledger. ``source_objects`` holds one row per (key, ETag) ever processed. A run processes only
listed objects whose (key, ETag) is not recorded, so a rerun with nothing new lists, compares and
writes nothing but its run report. A changed ETag supersedes the key's older rows; the images the
old version produced and the new one does not are retired, unless a recorded duplicate from a
current source holds the same pixels, which then takes the image over.

Labels follow their sources. A run whose label manifests, classes or header rules differ from
those of the last successful run over the prefix (hashes in ``label_state``) queues again every
recorded object with a member whose label that changes: relabelled, newly labelled, or withdrawn
(its image retired, the member quarantined ``unlabelled``). Pixels are unchanged, so image ids are
too. Frozen test snapshots keep the labels they were frozen with: correcting those is a new freeze.

Parallelism. :mod:`mmpipe.decoding` fetches and decodes; in one process, :func:`run` decodes the
next batch while recording the last.

Crash safety. A batch writes its shards (keys derived from the batch's contents) and quarantine
records first, then commits all its rows in one transaction, serialised with concurrent batches
(dedupe is re-checked inside it). A batch killed at any point leaves at most unreferenced objects;
a retry or a later run redoes exactly the unrecorded objects, and UPSERTs make a repeat harmless.
Catalog transactions whose connection drops are run again (:meth:`Catalog.transaction`).

Concurrent runs. Before decoding, a batch claims its objects (``ingest_claims``); an object
another running run has claimed, or recorded since this run listed it, is left to that run
(``claimed_elsewhere``). Two runs over one prefix (a nightly run and a backfill) thus never decode,
shard or record an object twice. A run heartbeats as it goes; one left ``running`` by a killed
process is marked ``abandoned`` (its claims lapse) by the next run or the sweep.

Faults are not verdicts (:mod:`mmpipe.decoding`): an object with a store error (after the store's
retries) or a decoder error (a bug) is not recorded, so the next run takes it again; it is listed
in ``ingest_errors`` and the report. A batch where more than ``decoder_error_max_share`` of the
objects hit a decoder error fails. Access denied fails the run.

Accounting. Every new object ends ``ingested`` (it produced at least one new image),
``duplicate`` (only images already stored), ``quarantined`` (nothing usable; one row per
unusable member, reason from :class:`mmpipe.imaging.Reason`), or unrecorded: ``store_errors``,
``decoder_errors``, ``claimed_elsewhere``. :func:`finish_run` fails the run unless
``new_objects`` equals their sum. Label manifests (:mod:`mmpipe.labels`) are control files, not
data: they live in ``label_manifests`` and the report lists them apart.

PHI convention. Identifiers leave ingest only as salted HMACs (patient, study); no header text
is stored except coded technical values (Modality, BodyPartExamined, photometric, transfer syntax),
and nothing read from a header is logged. Object keys and archive member paths are stored as they
are: they are the address of the untouched original that quarantine records and scoring tags point
back to. Exports must therefore name folders with opaque export ids or UIDs, never names or MRNs;
ingest counts (``identifier_keys``, never the values) objects whose key or member path contains
their own header's PatientID or AccessionNumber, so such an export is noticed.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import socket
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from mmpipe.catalog import Catalog, select_in
from mmpipe.config import Settings
from mmpipe.decoding import DECODER_ERROR, STORE_ERROR, Chunk, DecodeContext, Fetcher, Outcome
from mmpipe.errors import ConfigError, MmpipeError
from mmpipe.imaging import Limits, Reason, Rejected
from mmpipe.labels import (
    TRAINING_PREFIX,
    Labeler,
    Manifest,
    ManifestError,
    is_manifest,
    parse_manifest,
    parse_rules,
)
from mmpipe.progress import progress
from mmpipe.store import ObjectInfo, Store

log = logging.getLogger(__name__)

CURATED_PREFIX, QUARANTINE_PREFIX = "curated/", "quarantine/"
MAX_MANIFEST_BYTES = 64 * 2**20
_LOCK = 727_272  # PostgreSQL advisory lock serialising batch claims and commits
HEARTBEAT_SECONDS = 60
REPORTED_ERRORS = 50  # error entries (with tracebacks) a run report lists; the catalog keeps all
#: Accounting: what each new object of a run ended as (recorded, or left for another run).
FATES = ("ingested", "duplicate", "quarantined", "store_errors", "decoder_errors", "claimed_elsewhere")

SUPERSEDE_SOURCES = sa.text(
    "UPDATE source_objects SET status = 'superseded' WHERE source_key = :k AND etag <> :e"
)
QUARANTINED_MEMBERS = "SELECT source_key, source_etag, member_path FROM quarantine WHERE source_key IN ({in})"
QUEUE_AGAIN = "UPDATE source_objects SET status = 'queued' WHERE source_key = :k AND etag = :e"
FORGET_QUARANTINE = sa.text(
    "DELETE FROM quarantine WHERE source_key = :k AND source_etag = :e AND member_path = :m"
)
FORGET_DUPLICATES = sa.text("DELETE FROM duplicates WHERE source_key = :k AND source_etag = :e")
RETIRE = sa.text("UPDATE images SET status = 'retired', status_reason = 'superseded' WHERE image_id = :i")
#: What a duplicate row records about its copy, and so what an heir hands to the image it inherits.
DUPLICATE_FIELDS = (
    "source_key", "source_etag", "member_path", "frame", "label", "label_source", "patient_key", "study_key",
)  # fmt: skip
HEIRS = (
    "SELECT d.duplicate_of, " + ", ".join(f"d.{c}" for c in DUPLICATE_FIELDS) + " FROM duplicates d "
    "JOIN source_objects s ON s.source_key = d.source_key AND s.etag = d.source_etag "
    "WHERE d.duplicate_of IN ({in}) AND s.status <> 'superseded' AND d.label IS NOT NULL "
    "ORDER BY d.source_key, d.member_path"
)
INHERIT = sa.text(
    "UPDATE images SET " + ", ".join(f"{c} = :{c}" for c in DUPLICATE_FIELDS) + " WHERE image_id = :image_id"
)
HEIR_PROMOTED = sa.text(
    "UPDATE source_objects SET status = 'ingested' WHERE source_key = :source_key AND etag = :source_etag"
)
FORGET_HEIR = sa.text(
    "DELETE FROM duplicates WHERE source_key = :source_key AND source_etag = :source_etag "
    "AND member_path = :member_path"
)


def run_slug(run_id: str) -> str:
    """An Airflow run id (``scheduled__2026-11-23T02:00:00+00:00``) as a safe key segment."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", run_id).strip("-")[:120]
    return slug if slug.strip(".") else "run-" + hashlib.sha256(run_id.encode()).hexdigest()[:12]


def like_prefix(prefix: str) -> str:
    """A LIKE pattern matching keys under ``prefix`` literally (use with ``ESCAPE '\\'``)."""
    return re.sub(r"([\\%_])", r"\\\1", prefix) + "%"


# --------------------------------------------------------------------------- listing and labels


def refresh_manifests(store: Store, catalog: Catalog, prefix: str, found: Sequence[ObjectInfo]) -> None:
    """Mirror the label manifests under ``prefix`` into ``label_manifests``, reading only changed ones."""
    known = {
        r["manifest_key"]: r["etag"]
        for r in catalog.query(
            "SELECT manifest_key, etag FROM label_manifests WHERE manifest_key LIKE :p ESCAPE '\\'",
            p=like_prefix(prefix),
        )
    }
    current = {o.key for o in found}
    rows = []
    for obj in found:
        if known.get(obj.key) == obj.etag:
            continue
        row = {
            "manifest_key": obj.key,
            "etag": obj.etag,
            "status": "ok",
            "detail": None,
            "entries_json": "{}",
        }
        try:
            if obj.size > MAX_MANIFEST_BYTES:
                raise ManifestError(f"{obj.size} bytes > {MAX_MANIFEST_BYTES}")
            row["entries_json"] = json.dumps(parse_manifest(obj.key, store.get(obj.key)), sort_keys=True)
        except ManifestError as exc:
            row |= {"status": "invalid", "detail": str(exc)}
            log.warning("label manifest %s is unusable (%s); its entries are ignored", obj.key, exc)
        rows.append(row)
    gone = [{"k": k} for k in known if k not in current]

    def mirror(conn: Connection) -> None:
        if gone:
            conn.execute(sa.text("DELETE FROM label_manifests WHERE manifest_key = :k"), gone)
        catalog.upsert("label_manifests", rows, ["manifest_key"], conn)

    catalog.transaction(mirror)


def load_labeler(settings: Settings, catalog: Catalog, prefix: str) -> Labeler:
    """The labeler for objects under ``prefix``: its recorded manifests plus the configured rules."""
    classes = settings.classes
    rules = parse_rules(settings.label_rules, classes)
    manifests = [
        Manifest(r["manifest_key"], json.loads(r["entries_json"]))
        for r in catalog.query(
            "SELECT manifest_key, entries_json FROM label_manifests WHERE status = 'ok' "
            "AND manifest_key LIKE :p ESCAPE '\\'",
            p=like_prefix(prefix),
        )
    ]
    return Labeler(classes, manifests, rules)


@dataclass(frozen=True)
class Labeling:
    """Hashes of what labels are resolved with: classes and header rules, and the label manifests."""

    rules: str
    manifests: str

    @classmethod
    def of(cls, settings: Settings, manifests: Sequence[ObjectInfo]) -> Labeling:
        def digest(value: Any) -> str:
            return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:32]

        rules = digest([list(settings.classes), list(settings.label_rules)])
        return cls(rules, digest(sorted((o.key, o.etag) for o in manifests)))

    @classmethod
    def recorded(cls, catalog: Catalog, prefix: str) -> Labeling | None:
        """What the last successful run over ``prefix`` resolved its labels with, if any run did."""
        rows = catalog.query("SELECT rules_hash, manifests_hash FROM label_state WHERE prefix = :p", p=prefix)
        return cls(rows[0]["rules_hash"], rows[0]["manifests_hash"]) if rows else None


LABELLED = (
    "SELECT x.source_key, x.source_etag, x.member_path, {label} FROM {table} x JOIN source_objects s "
    "ON s.source_key = x.source_key AND s.etag = x.source_etag "
    "WHERE s.status <> 'superseded' AND x.source_key LIKE :p ESCAPE '\\' {where}"
)


def _stale_labels(
    catalog: Catalog, prefix: str, labeler: Labeler, rules_changed: bool
) -> set[tuple[str, str]]:
    """Current (key, ETag)s with an image, duplicate or unlabelled member whose label would now differ."""
    columns = "x.label, x.label_source"
    rows = [
        *catalog.query(
            LABELLED.format(label=columns, table="images", where="AND x.status <> 'retired'"),
            p=like_prefix(prefix),
        ),
        *catalog.query(LABELLED.format(label=columns, table="duplicates", where=""), p=like_prefix(prefix)),
        *catalog.query(
            LABELLED.format(
                label="NULL AS label, NULL AS label_source", table="quarantine", where="AND x.reason = :r"
            ),
            p=like_prefix(prefix),
            r=str(Reason.UNLABELLED),
        ),
    ]
    return {(r["source_key"], r["source_etag"]) for r in rows if _label_changes(labeler, r, rules_changed)}


def _label_changes(labeler: Labeler, row: dict[str, Any], rules_changed: bool) -> bool:
    """Whether resolving ``row``'s member today could give another label than the stored one."""
    try:
        now = labeler.explicit(row["source_key"], row["member_path"])
    except Rejected:  # a manifest now names an unknown class: unlabelled from now on
        return row["label"] is not None
    if now is not None:
        return (now.name, now.source) != (row["label"], row["label_source"])
    # no manifest or folder speaks: header rules decide (if they changed), or it stays unlabelled
    return row["label_source"] in ("manifest", "prefix") or rules_changed


@dataclass(frozen=True)
class Listing:
    new: list[ObjectInfo]  # to process now
    listed: int  # data objects under the prefix
    labeler: Labeler
    labeling: Labeling


def open_run(
    store: Store, catalog: Catalog, run_id: str, prefix: str, settings: Settings, owner: str | None = None
) -> Listing:
    """List what to process under ``prefix`` and record the run as started (by ``owner``, a process
    that runs it whole: see :func:`process_owner`), after marking killed runs abandoned."""
    listing = _list_new(store, catalog, prefix, settings)
    abandon_stale_runs(settings, catalog, current=run_id)
    start_run(catalog, run_id, prefix, listing.labeling, owner)
    return listing


def _list_new(store: Store, catalog: Catalog, prefix: str, settings: Settings) -> Listing:
    """Data objects under ``prefix`` to process now, and how many data objects are listed in all.

    New means: (key, ETag) not recorded, or queued: recorded with a member whose label the current
    manifests, classes or header rules change (looked for only when their hashes differ from those
    of the last successful run, and queued now), or released from quarantine (:func:`release_quarantine`).
    Label manifests are refreshed on the way and are not data objects.
    An empty prefix is a configuration mistake (wrong bucket or prefix), not a quiet night: it
    fails with the fix.
    """
    names = settings.label_manifest_names
    listed = store.list(prefix)
    data = [o for o in listed if not is_manifest(o.key, names)]
    if not data:
        raise MmpipeError(
            f"nothing to ingest: {store.uri(prefix)} is empty. Upload studies as {prefix}<class>/..., "
            "or check MMPIPE_S3_BUCKET / the prefix"
        )
    manifests = [o for o in listed if is_manifest(o.key, names)]
    refresh_manifests(store, catalog, prefix, manifests)
    labeler = load_labeler(settings, catalog, prefix)  # after the manifest refresh
    labeling, last = Labeling.of(settings, manifests), Labeling.recorded(catalog, prefix)
    again = set()
    if labeling != last:
        again = _stale_labels(
            catalog, prefix, labeler, rules_changed=last is not None and last.rules != labeling.rules
        )
        if again:  # queued: recorded, yet to be processed again (what claims of concurrent runs check)
            catalog.execute(QUEUE_AGAIN, [{"k": k, "e": e} for k, e in sorted(again)])
    seen = {
        (r["source_key"], r["etag"])
        for r in catalog.query(
            "SELECT source_key, etag FROM source_objects WHERE status NOT IN ('superseded', 'queued') "
            "AND source_key LIKE :p ESCAPE '\\'",
            p=like_prefix(prefix),
        )
    }
    new = [o for o in data if (o.key, o.etag) not in seen]
    log.info(
        "ingest listing %s: %d data objects, %d label manifests, %d to process (%d for a changed label)",
        prefix, len(data), len(manifests), len(new), sum(1 for o in new if (o.key, o.etag) in again),
    )  # fmt: skip
    return Listing(new, len(data), labeler, labeling)


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


def load_pixels(store: Store, entries: Sequence[dict]) -> dict[str, np.ndarray]:
    """Curated pixels for the entries (``image_id``, ``shard_uri``), reading each shard once."""
    by_shard: dict[str, set[str]] = defaultdict(set)
    for e in entries:
        by_shard[e["shard_uri"]].add(e["image_id"])
    pixels: dict[str, np.ndarray] = {}
    for shard_uri, wanted in by_shard.items():
        array, ids = load_shard(store, shard_uri)
        for index, image_id in enumerate(ids):
            if image_id in wanted:
                pixels[image_id] = array[index]
    missing = {e["image_id"] for e in entries} - set(pixels)
    if missing:
        raise ConfigError(
            f"{len(missing)} plan images missing from curated shards (e.g. {sorted(missing)[0]})"
        )
    return pixels


def load_shard(store: Store, shard_uri: str) -> tuple[np.ndarray, list[str]]:
    with np.load(io.BytesIO(store.get(store.key_of(shard_uri)))) as shard:
        return shard["pixels"], [str(x) for x in shard["image_ids"]]


# --------------------------------------------------------------------------- one batch


def _progress(what: str, done: int, total: int, started: float) -> None:
    rate = done / max(time.monotonic() - started, 1e-6)
    log.info(
        "ingest %s: %d/%d objects, %.1f objects/s, ETA %.0fs", what, done, total, rate, (total - done) / rate
    )


def _context(
    settings: Settings, catalog: Catalog, prefix: str, labeler: Labeler | None = None
) -> DecodeContext:
    return DecodeContext(
        labeler=labeler or load_labeler(settings, catalog, prefix),
        salt=settings.salt(),
        size=settings.image_size,
        limits=Limits.from_settings(settings),
    )


@dataclass
class Submitted:
    """A batch in flight: the chunks of the objects it claimed, and how many it left to other runs."""

    chunks: list[Chunk]
    elsewhere: int


def submit_claimed(
    catalog: Catalog, run_id: str, fetcher: Fetcher, objects: Sequence[ObjectInfo]
) -> Submitted:
    mine, elsewhere = claim(catalog, run_id, objects)
    return Submitted(fetcher.submit(mine), elsewhere)


def _record_batch(
    settings: Settings,
    store: Store,
    catalog: Catalog,
    run_id: str,
    fetcher: Fetcher,
    batch: Submitted,
    bar: Any = None,
) -> dict[str, int]:
    objects = [o for chunk in batch.chunks for o in chunk.objects]
    started, outcomes, mark = time.monotonic(), [], 0
    alive = Heartbeat(catalog, run_id)
    for chunk in batch.chunks:
        outcomes += fetcher.results(chunk)
        alive()
        if bar is not None:
            bar.update(len(chunk.objects))
        if len(outcomes) >= mark or len(outcomes) == len(objects):
            _progress("batch", len(outcomes), len(objects), started)
            mark = len(outcomes) + max(1, len(objects) // 10)
    if bar is not None:
        bar.update(batch.elsewhere)
    if not objects:  # every object was claimed by a concurrent run
        return {"objects": batch.elsewhere, "claimed_elsewhere": batch.elsewhere}
    result = record_outcomes(settings, store, catalog, run_id, batch_id(objects), outcomes)
    return result | {"objects": result["objects"] + batch.elsewhere, "claimed_elsewhere": batch.elsewhere}


def ingest_objects(
    settings: Settings,
    store: Store,
    catalog: Catalog,
    run_id: str,
    objects: Sequence[ObjectInfo],
    prefix: str,
) -> dict[str, int]:
    """Ingest one batch (a DAG task): claim, bounded parallel fetch+decode, shards, then one catalog
    transaction; the task fails if too many objects hit a decoder error (after recording the rest)."""
    with Fetcher(settings, store, _context(settings, catalog, prefix), len(objects)) as fetcher:
        batch = submit_claimed(catalog, run_id, fetcher, objects)
        result = _record_batch(settings, store, catalog, run_id, fetcher, batch)
    buggy = decoder_error_excess(settings, [result])
    if buggy:
        raise MmpipeError(buggy)
    return result


def decoder_error_excess(settings: Settings, results: Sequence[dict[str, int]]) -> str | None:
    """Why the run must fail, if a batch had more decoder errors than ``decoder_error_max_share``: a
    regression in mmpipe's decoding is seen, not buried in a quarantine."""
    share = settings.decoder_error_max_share
    worst = max(results, key=lambda r: r.get("decoder_errors", 0) / max(r["objects"], 1), default=None)
    if worst is None or worst.get("decoder_errors", 0) <= share * worst["objects"]:
        return None
    return (
        f"{worst['decoder_errors']} of {worst['objects']} objects of an ingest batch hit an unexpected exception "
        f"in mmpipe's decoding (more than decoder_error_max_share {share:.0%}): a bug, not bad data, so "
        "nothing was quarantined; tracebacks are in the run report and table ingest_errors. Fix it and rerun"
    )


# --------------------------------------------------------------------------- claims and liveness

HEARTBEAT = "UPDATE ingest_runs SET heartbeat_at = :now WHERE run_id = :r"
RECORDED = "SELECT source_key, etag, status, run_id FROM source_objects WHERE source_key IN ({in})"
CLAIMS = (
    "SELECT c.source_key, c.etag, c.run_id, r.status FROM ingest_claims c "
    "LEFT JOIN ingest_runs r ON r.run_id = c.run_id WHERE c.source_key IN ({in})"
)
RELEASE_CLAIMS = sa.text("DELETE FROM ingest_claims WHERE source_key = :k AND etag = :e AND run_id = :r")


def utc_now() -> datetime:
    """UTC wall time of this host, naive (as TIMESTAMP columns hold it) for heartbeats."""
    return datetime.now(UTC).replace(tzinfo=None)


def serialised(conn: Connection) -> None:
    """PostgreSQL: one batch claims or commits at a time (on SQLite the transaction's first write
    takes the database write lock for the rest of it)."""
    if conn.dialect.name == "postgresql":
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:n)"), {"n": _LOCK})


def claim(catalog: Catalog, run_id: str, objects: Sequence[ObjectInfo]) -> tuple[list[ObjectInfo], int]:
    """The batch's objects this run decodes now, and how many it leaves to concurrent runs: those
    another running run has claimed, or has recorded since this run listed them."""
    keys = sorted({o.key for o in objects})

    def work(conn: Connection) -> list[ObjectInfo]:
        serialised(conn)
        conn.execute(sa.text(HEARTBEAT), {"r": run_id, "now": utc_now()})  # also SQLite's write lock
        recorded = {(r["source_key"], r["etag"]): r for r in select_in(conn, RECORDED, keys)}
        claims = {(r["source_key"], r["etag"]): r for r in select_in(conn, CLAIMS, keys)}
        mine = [
            o
            for o in objects
            if _claimable(run_id, recorded.get((o.key, o.etag)), claims.get((o.key, o.etag)))
        ]
        rows = [
            {"source_key": o.key, "etag": o.etag, "run_id": run_id, "claimed_at": utc_now()} for o in mine
        ]
        catalog.upsert("ingest_claims", rows, ["source_key", "etag"], conn)
        return mine

    mine = catalog.transaction(work) if objects else []
    if len(mine) < len(objects):
        log.info(
            "ingest %s: %d of %d objects left to a concurrent run",
            run_id,
            len(objects) - len(mine),
            len(objects),
        )
    return mine, len(objects) - len(mine)


def _claimable(run_id: str, recorded: dict[str, Any] | None, claimed: dict[str, Any] | None) -> bool:
    if recorded and recorded["status"] not in ("queued", "superseded") and recorded["run_id"] != run_id:
        return False  # recorded by another run since this one listed it
    return not (claimed and claimed["run_id"] != run_id and claimed["status"] == "running")


class Heartbeat:
    """Marks a run alive, at most every HEARTBEAT_SECONDS: what tells a slow run from a killed one."""

    def __init__(self, catalog: Catalog, run_id: str):
        self.catalog, self.run_id, self.last = catalog, run_id, time.monotonic()

    def __call__(self) -> None:
        if time.monotonic() - self.last >= HEARTBEAT_SECONDS:
            self.catalog.execute(HEARTBEAT, {"r": self.run_id, "now": utc_now()})
            self.last = time.monotonic()


def process_owner(pid: int | None = None) -> str:
    """``host:pid:start``: names a process, even after its pid is reused (start time from /proc)."""
    pid = pid or os.getpid()
    return f"{socket.gethostname()}:{pid}:{_started(pid)}"


def _started(pid: int) -> str:
    """The process's start time in clock ticks since boot ("" without /proc), or "gone"."""
    try:
        stat = open(f"/proc/{pid}/stat").read()  # noqa: SIM115 (one read)
    except FileNotFoundError:
        return "gone"
    except OSError:
        return ""
    fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)"; comm may hold spaces
    return "gone" if fields[0] in ("Z", "X") else fields[19]


def _owner_gone(owner: str | None) -> bool:
    """Whether ``owner`` names a process of this host that no longer runs."""
    if not owner or owner.count(":") < 2:
        return False
    host, pid, started = owner.rsplit(":", 2)
    if host != socket.gethostname() or not pid.isdigit():
        return False
    if started:
        return _started(int(pid)) != started
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def abandon_stale_runs(
    settings: Settings, catalog: Catalog, current: str | None = None, table: str = "ingest_runs"
) -> list[str]:
    """Mark ``abandoned`` the runs (of ``table``: ingest_runs or score_runs) still ``running`` whose
    process is gone (this host) or that have not heartbeat for ``abandon_after_hours``; their claims
    lapse with them."""
    if table not in ("ingest_runs", "score_runs"):
        raise ValueError(f"no runs table {table!r}")
    cutoff = utc_now() - timedelta(hours=settings.abandon_after_hours)
    stale = [
        r["run_id"]
        for r in catalog.query(f"SELECT run_id, owner, heartbeat_at FROM {table} WHERE status = 'running'")
        if r["run_id"] != current and (_owner_gone(r["owner"]) or _timestamp(r["heartbeat_at"]) < cutoff)
    ]
    if stale:
        catalog.execute(
            f"UPDATE {table} SET status = 'abandoned', finished_at = CURRENT_TIMESTAMP "
            "WHERE run_id = :r AND status = 'running'",
            [{"r": r} for r in stale],
        )
        log.warning("marked %d %s abandoned (their process is gone or silent): %s", len(stale), table, stale)
    return stale


def _timestamp(value: Any) -> datetime:
    """A TIMESTAMP as read back (SQLite: text); None (never heartbeat, from before 008) is long ago."""
    if value is None:
        return datetime.min
    return datetime.fromisoformat(value) if isinstance(value, str) else value


def _stored_labels(conn: Connection, image_ids: Iterable[str], batch_keys: set[str]) -> dict[str, str]:
    """{image_id: label} of stored images among ``image_ids``, except those the batch's own keys own."""
    rows = select_in(
        conn,
        "SELECT image_id, source_key, label FROM images WHERE status <> 'retired' AND image_id IN ({in})",
        image_ids,
    )
    return {r["image_id"]: r["label"] for r in rows if r["source_key"] not in batch_keys}


def _duplicate(row: dict[str, Any], of: str) -> dict[str, Any]:
    return {k: row[k] for k in DUPLICATE_FIELDS} | {"duplicate_of": of}


def _retire_or_inherit(conn: Connection, batch_keys: set[str], produced: set[str]) -> tuple[int, int]:
    """Images the batch's keys owned but no longer produce: a current duplicate inherits each, else retired."""
    owned = select_in(
        conn, "SELECT image_id FROM images WHERE status <> 'retired' AND source_key IN ({in})", batch_keys
    )
    lost = sorted({r["image_id"] for r in owned} - produced)
    heirs: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in select_in(conn, HEIRS, lost):
        heirs[row.pop("duplicate_of")].append(row)
    retired = inherited = 0
    for image_id in lost:
        heir = next((h for h in heirs[image_id] if h["source_key"] not in batch_keys), None)
        if heir is None:
            conn.execute(RETIRE, {"i": image_id})
            retired += 1
            continue
        conn.execute(INHERIT, heir | {"image_id": image_id})
        conn.execute(FORGET_HEIR, heir)
        conn.execute(HEIR_PROMOTED, heir)
        inherited += 1
    return retired, inherited


def record_outcomes(
    settings: Settings, store: Store, catalog: Catalog, run_id: str, batch: str, outcomes: list[Outcome]
) -> dict[str, int]:
    """Write shards and quarantine records, then commit every row of the batch in one transaction.

    Outcomes with errors are held back: only their errors are recorded (``ingest_errors``).
    """
    held = [o for o in outcomes if o.errors]
    outcomes = [o for o in outcomes if not o.errors]
    kinds = Counter(o.errors[0]["kind"] for o in held)
    if not outcomes:
        catalog.transaction(lambda conn: _settle_claims(catalog, conn, run_id, held, []))
        return {
            "objects": len(held),
            "store_errors": kinds[STORE_ERROR],
            "decoder_errors": kinds[DECODER_ERROR],
        }
    slug = run_slug(run_id)
    batch_keys = {o.obj.key for o in outcomes}
    candidates = [(row, px) for o in outcomes for row, px in o.images]
    stored = catalog.transaction(
        lambda conn: _stored_labels(conn, {row["image_id"] for row, _ in candidates}, batch_keys)
    )
    fresh: dict[str, dict[str, Any]] = {}
    pixels: dict[str, np.ndarray] = {}
    duplicates: list[dict[str, Any]] = []
    for row, px in candidates:
        if row["image_id"] in stored or row["image_id"] in fresh:
            duplicates.append(_duplicate(row, row["image_id"]))
        else:
            fresh[row["image_id"]], pixels[row["image_id"]] = row, px

    _write_shards(settings, store, run_id, f"{CURATED_PREFIX}{slug}/{batch}", fresh, pixels)

    quarantine_rows = _write_quarantine_records(store, settings.ingest_workers, slug, run_id, outcomes)
    versions = [{"k": o.obj.key, "e": o.obj.etag} for o in outcomes]

    def commit(conn: Connection) -> tuple[int, int, list[dict[str, Any]]]:
        # Run again if the connection drops: it changes fresh, duplicates and stored only as a rerun would.
        serialised(conn)
        conn.execute(SUPERSEDE_SOURCES, versions)
        _forget_stale_quarantine(conn, versions, quarantine_rows)
        conn.execute(FORGET_DUPLICATES, versions)
        late = _stored_labels(conn, list(fresh), batch_keys)  # committed meanwhile by a concurrent batch
        for image_id, label in late.items():
            duplicates.append(_duplicate(fresh.pop(image_id), image_id))
            stored[image_id] = label
        if late:  # our shards hold pixels now stored elsewhere: write them again without those (rare)
            digest = hashlib.sha256(" ".join(sorted(fresh)).encode()).hexdigest()[:8]
            _write_shards(settings, store, run_id, f"{CURATED_PREFIX}{slug}/{batch}-{digest}", fresh, pixels)
        retired, inherited = _retire_or_inherit(conn, batch_keys, set(fresh))
        _keep_exclusions(conn, fresh)
        catalog.upsert("images", list(fresh.values()), ["image_id"], conn)
        member_key = ["source_key", "source_etag", "member_path"]
        catalog.upsert("duplicates", [d | {"run_id": run_id} for d in duplicates], member_key, conn)
        catalog.upsert("quarantine", quarantine_rows, member_key, conn)
        sources = _source_rows(outcomes, fresh.values(), duplicates, run_id)
        catalog.upsert("source_objects", sources, ["source_key", "etag"], conn)
        _settle_claims(catalog, conn, run_id, held, outcomes)
        return retired, inherited, sources

    retired, inherited, sources = catalog.transaction(commit)
    labels = {**stored, **{i: r["label"] for i, r in fresh.items()}}
    conflicts = sum(1 for d in duplicates if d["label"] != labels.get(d["duplicate_of"], d["label"]))
    counts = Counter(s["status"] for s in sources)
    result = {
        "objects": len(outcomes) + len(held),
        "ingested": counts["ingested"],
        "duplicate": counts["duplicate"],
        "quarantined": counts["quarantined"],
        "store_errors": kinds[STORE_ERROR],
        "decoder_errors": kinds[DECODER_ERROR],
        "images": len(fresh),
        "duplicate_images": len(duplicates),
        "quarantined_members": len(quarantine_rows),
        "label_conflicts": conflicts,
        "retired_images": retired,
        "inherited_images": inherited,
        "identifier_keys": sum(o.identifier_keys for o in outcomes),
    }
    log.info("ingest batch %s: %s", batch, json.dumps(result, sort_keys=True))
    if conflicts:
        log.warning("%d duplicate images carry a different label than the stored copy", conflicts)
    if result["identifier_keys"]:
        log.warning(
            "%d images come from keys or member paths containing their own PatientID or AccessionNumber; "
            "keys are stored verbatim: export under opaque folder names",
            result["identifier_keys"],
        )
    return result


def _write_shards(
    settings: Settings,
    store: Store,
    run_id: str,
    stem: str,
    fresh: dict[str, dict[str, Any]],
    pixels: dict[str, np.ndarray],
) -> None:
    """Write the fresh images' pixels as shards ``<stem>-NNN.npz`` and point their rows at them."""
    items = list(fresh)
    for n, start in enumerate(range(0, len(items), settings.shard_size)):
        chunk = items[start : start + settings.shard_size]
        uri = write_shard(store, f"{stem}-{n:03d}.npz", [fresh[i] for i in chunk], [pixels[i] for i in chunk])
        for index, image_id in enumerate(chunk):
            fresh[image_id] |= {"shard_uri": uri, "shard_index": index, "ingest_run_id": run_id}
            fresh[image_id] |= {"status": "active", "status_reason": None}


def _settle_claims(
    catalog: Catalog, conn: Connection, run_id: str, held: list[Outcome], recorded: list[Outcome]
) -> None:
    """Record the held outcomes' errors, release the batch's claims, and heartbeat."""
    rows = [
        {"run_id": run_id, "source_key": o.obj.key, "source_etag": o.obj.etag} | error
        for o in held
        for error in {e["member_path"]: e for e in o.errors}.values()
    ]
    catalog.upsert("ingest_errors", rows, ["run_id", "source_key", "source_etag", "member_path"], conn)
    conn.execute(RELEASE_CLAIMS, [{"k": o.obj.key, "e": o.obj.etag, "r": run_id} for o in held + recorded])
    conn.execute(sa.text(HEARTBEAT), {"r": run_id, "now": utc_now()})
    for o in held:
        log.warning("ingest %s: %s left for the next run: %s", run_id, o.obj.key, o.errors[0]["error"])


def _keep_exclusions(conn: Connection, fresh: dict[str, dict[str, Any]]) -> None:
    """A stored image produced again (its object relabelled) stays excluded with its reason until the
    validation of this run judges it again: what passes then is recorded as a re-admission."""
    excluded = "SELECT image_id, status_reason FROM images WHERE status = 'excluded' AND image_id IN ({in})"
    for row in select_in(conn, excluded, list(fresh)):
        fresh[row["image_id"]] |= {"status": "excluded", "status_reason": row["status_reason"]}


def _forget_stale_quarantine(
    conn: Connection, versions: list[dict[str, str]], rows: list[dict[str, Any]]
) -> None:
    """Drop quarantine rows this batch no longer produces (e.g. now labelled), keeping the rest as
    they were: a retried batch must leave its records, timestamps included, untouched."""
    kept = {(q["source_key"], q["source_etag"], q["member_path"]) for q in rows}
    batch = {(v["k"], v["e"]) for v in versions}
    stale = [
        {"k": r["source_key"], "e": r["source_etag"], "m": r["member_path"]}
        for r in select_in(conn, QUARANTINED_MEMBERS, sorted(k for k, _ in batch))
        if (r["source_key"], r["source_etag"]) in batch
        and (r["source_key"], r["source_etag"], r["member_path"]) not in kept
    ]
    if stale:
        conn.execute(FORGET_QUARANTINE, stale)


def _write_quarantine_records(
    store: Store, workers: int, slug: str, run_id: str, outcomes: list[Outcome]
) -> list[dict[str, Any]]:
    records = []
    for outcome in outcomes:
        for q in outcome.quarantined:
            record = {"source_key": outcome.obj.key, "source_etag": outcome.obj.etag, **q, "run_id": run_id}
            digest = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]
            records.append((f"{QUARANTINE_PREFIX}{slug}/{digest}.json", record))
    put: Callable[[tuple[str, dict]], str] = lambda item: store.put_json(*item)  # noqa: E731
    with ThreadPoolExecutor(workers) as pool:
        uris = list(pool.map(put, records))
    return [record | {"record_uri": uri} for (_, record), uri in zip(records, uris, strict=True)]


def _source_rows(
    outcomes: list[Outcome], fresh: Iterable[dict[str, Any]], duplicates: list[dict[str, Any]], run_id: str
) -> list[dict[str, Any]]:
    new_keys = Counter(r["source_key"] for r in fresh)
    dup_keys = Counter(d["source_key"] for d in duplicates)

    def status(key: str) -> str:
        return "ingested" if new_keys[key] else "duplicate" if dup_keys[key] else "quarantined"

    return [
        {
            "source_key": o.obj.key,
            "etag": o.obj.etag,
            "size_bytes": o.obj.size,
            "run_id": run_id,
            "status": status(o.obj.key),
            "n_images": len(o.images),
            "n_quarantined": len(o.quarantined),
        }
        for o in outcomes
    ]


# --------------------------------------------------------------------------- runs


def sweep_orphans(settings: Settings, store: Store, catalog: Catalog) -> dict[str, int]:
    """Delete curated shards and quarantine records that no catalog row references, once older than
    ``orphan_grace_hours``.

    Both are written before the batch's rows commit, so a batch killed in between leaves objects
    nobody references; a retry of the same batch rewrites the same keys, a later run writes others.
    Shards of retired images stay: frozen snapshots and old plans may still read them.
    """
    abandon_stale_runs(settings, catalog)
    abandon_stale_runs(settings, catalog, table="score_runs")
    catalog.execute(  # claims of runs no longer running bind nobody
        "DELETE FROM ingest_claims WHERE run_id NOT IN (SELECT run_id FROM ingest_runs WHERE status = 'running')"
    )
    referenced = {r["uri"] for r in catalog.query("SELECT DISTINCT shard_uri AS uri FROM images")}
    referenced |= {r["uri"] for r in catalog.query("SELECT record_uri AS uri FROM quarantine")}
    cutoff = datetime.now(UTC) - timedelta(hours=settings.orphan_grace_hours)
    listed = {prefix: store.list(prefix) for prefix in (CURATED_PREFIX, QUARANTINE_PREFIX)}
    orphans = [
        o
        for o in listed[CURATED_PREFIX] + listed[QUARANTINE_PREFIX]
        if store.uri(o.key) not in referenced and datetime.fromisoformat(o.modified) <= cutoff
    ]
    store.delete([o.key for o in orphans])
    result = {
        "shards": len(listed[CURATED_PREFIX]),
        "quarantine_records": len(listed[QUARANTINE_PREFIX]),
        "orphans_deleted": len(orphans),
        "bytes_freed": sum(o.size for o in orphans),
    }
    log.info("sweep: %s", json.dumps(result, sort_keys=True))
    return result


def start_run(
    catalog: Catalog, run_id: str, prefix: str, labeling: Labeling | None = None, owner: str | None = None
) -> None:
    row = {"run_id": run_id, "prefix": prefix, "status": "running", "heartbeat_at": utc_now(), "owner": owner}
    if labeling:
        row |= {"rules_hash": labeling.rules, "manifests_hash": labeling.manifests}
    catalog.upsert("ingest_runs", [row], ["run_id"])


def finish_run(
    store: Store,
    catalog: Catalog,
    run_id: str,
    new_objects: int,
    listed: int,
    results: Sequence[dict[str, int]],
    failure: str | None = None,
) -> dict[str, Any]:
    """Sum batch results, prove the accounting, publish the run report and close the run (failed,
    after the report, when the accounting does not hold or ``failure`` says why)."""
    totals: Counter[str] = Counter()
    for result in results:
        totals.update(result)
    accounted = sum(totals[fate] for fate in FATES)
    run = catalog.query(
        "SELECT prefix, rules_hash, manifests_hash FROM ingest_runs WHERE run_id = :r", r=run_id
    )
    prefix = run[0]["prefix"] if run else TRAINING_PREFIX
    manifests = catalog.query(
        "SELECT manifest_key, status, detail FROM label_manifests WHERE manifest_key LIKE :p ESCAPE '\\' "
        "ORDER BY manifest_key",
        p=like_prefix(prefix),
    )

    def counts(sql: str) -> dict[str, int]:
        return {r["k"]: r["n"] for r in catalog.query(sql, r=run_id)}

    report = {
        "run_id": run_id,
        "prefix": prefix,
        "listed": listed,
        "already_seen": listed - new_objects,
        "new_objects": new_objects,
        "accounted": accounted,
        **{k: totals[k] for k in ("ingested", "duplicate", "quarantined", "images", "duplicate_images")},
        **{k: totals[k] for k in ("quarantined_members", "label_conflicts", "retired_images")},
        **{k: totals[k] for k in ("inherited_images", "identifier_keys")},
        **{k: totals[k] for k in ("store_errors", "decoder_errors", "claimed_elsewhere")},
        "quarantine_reasons": counts(
            "SELECT reason AS k, count(*) AS n FROM quarantine WHERE run_id = :r GROUP BY reason"
        ),
        "classes": counts(
            "SELECT label AS k, count(*) AS n FROM images WHERE ingest_run_id = :r GROUP BY label"
        ),
        "label_sources": counts(
            "SELECT label_source AS k, count(*) AS n FROM images WHERE ingest_run_id = :r GROUP BY label_source"
        ),
        "label_manifests": sum(1 for m in manifests if m["status"] == "ok"),
        "invalid_label_manifests": [
            {"key": m["manifest_key"], "detail": m["detail"]} for m in manifests if m["status"] != "ok"
        ],
        "errors": catalog.query(
            "SELECT kind, source_key, member_path, error, traceback FROM ingest_errors WHERE run_id = :r "
            f"ORDER BY kind, source_key, member_path LIMIT {REPORTED_ERRORS}",
            r=run_id,
        ),
    }
    if accounted != new_objects:
        failure = (
            f"ingest accounting broken for run {run_id}: {new_objects} new objects but {accounted} accounted "
            "for (a batch failed?)"
        )
    status = "failed" if failure else "succeeded"
    report |= {"status": status, "failure": failure}
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
        **{k: totals[k] for k in ("store_errors", "decoder_errors", "claimed_elsewhere")},
    }
    catalog.execute(
        "UPDATE ingest_runs SET status = :status, listed = :listed, ingested = :ingested, duplicates = :duplicates, "
        "quarantined = :quarantined, images = :images, report_uri = :report_uri, finished_at = CURRENT_TIMESTAMP, "
        "store_errors = :store_errors, decoder_errors = :decoder_errors, claimed_elsewhere = :claimed_elsewhere "
        "WHERE run_id = :r",
        row,
    )
    log.info(
        "ingest run %s %s: %d new of %d listed -> %d ingested, %d duplicate, %d quarantined (%d images); "
        "left for the next run: %d store errors, %d decoder errors; %d claimed by a concurrent run",
        run_id, status, new_objects, listed, totals["ingested"], totals["duplicate"], totals["quarantined"],
        totals["images"], totals["store_errors"], totals["decoder_errors"], totals["claimed_elsewhere"],
    )  # fmt: skip
    if status == "succeeded" and run and run[0]["rules_hash"]:  # labels now reflect this run's labeling
        state = {"prefix": prefix, "run_id": run_id}
        catalog.upsert(
            "label_state", [state | {k: run[0][k] for k in ("rules_hash", "manifests_hash")}], ["prefix"]
        )
    if failure:
        raise MmpipeError(f"{failure}; report: {report['report_uri']}")
    return report


def run(
    settings: Settings,
    store: Store,
    catalog: Catalog,
    run_id: str,
    prefix: str = TRAINING_PREFIX,
    batch_size: int = 200,
) -> dict[str, Any]:
    """The whole ingest in one process (the CLI); the DAG runs the same steps as mapped tasks.

    One fetcher serves every batch, and the next batch is decoding while one is recorded (at most
    two batches of outcomes are held in memory). A run that raises is marked failed on its way out.
    """
    listing = open_run(store, catalog, run_id, prefix, settings, owner=process_owner())
    try:
        context = _context(settings, catalog, prefix, listing.labeler)
        results = _ingest_all(settings, store, catalog, run_id, listing.new, context, batch_size)
    except BaseException:
        with contextlib.suppress(Exception):  # the catalog itself may be what failed
            catalog.execute(
                "UPDATE ingest_runs SET status = 'failed', finished_at = CURRENT_TIMESTAMP "
                "WHERE run_id = :r AND status = 'running'",
                {"r": run_id},
            )
        raise
    failure = decoder_error_excess(settings, results)
    return finish_run(store, catalog, run_id, len(listing.new), listing.listed, results, failure)


def _ingest_all(
    settings: Settings,
    store: Store,
    catalog: Catalog,
    run_id: str,
    new: list[ObjectInfo],
    context: DecodeContext,
    batch_size: int,
) -> list[dict[str, int]]:
    if not new:  # an idle night starts no decode process
        return []
    started, results = time.monotonic(), []
    pending: deque[Submitted] = deque()
    with (
        Fetcher(settings, store, context, len(new)) as fetcher,
        progress(desc="ingest", total=len(new), unit="obj") as bar,
    ):

        def record_oldest() -> None:
            results.append(_record_batch(settings, store, catalog, run_id, fetcher, pending.popleft(), bar))
            _progress("run", sum(r["objects"] for r in results), len(new), started)

        for batch in batches(new, batch_size):
            pending.append(submit_claimed(catalog, run_id, fetcher, batch))
            if len(pending) == 2:
                record_oldest()
        while pending:
            record_oldest()
    return results


# --------------------------------------------------------------------------- quarantine release


def release_quarantine(catalog: Catalog, reason: str, run_id: str | None = None) -> dict[str, Any]:
    """Re-queue quarantined objects after a fix (a decoder bug that quarantined good data, a limit
    raised): their source rows become ``queued``, so the next run over their prefix processes them
    again and replaces their quarantine rows. Only what run ``run_id`` quarantined, if given; the
    release is recorded in ``quarantine_releases`` with ``reason``."""
    if not reason.strip():
        raise ConfigError("a quarantine release needs --reason: say what was fixed")
    members = catalog.query(
        "SELECT q.source_key, q.source_etag, q.member_path, q.reason FROM quarantine q JOIN source_objects s "
        "ON s.source_key = q.source_key AND s.etag = q.source_etag WHERE s.status NOT IN ('superseded', 'queued') "
        + ("AND q.run_id = :r " if run_id else "")
        + "ORDER BY q.source_key, q.member_path",
        r=run_id,
    )
    objects = sorted({(m["source_key"], m["source_etag"]) for m in members})
    by_reason: dict[str, dict[str, int]] = {}
    for reason_name in sorted({m["reason"] for m in members}):
        mine = [m for m in members if m["reason"] == reason_name]
        by_reason[reason_name] = {
            "objects": len({(m["source_key"], m["source_etag"]) for m in mine}),
            "members": len(mine),
        }
    digest = hashlib.sha256(json.dumps([reason, run_id, objects]).encode()).hexdigest()[:8]
    release = {
        "release_id": f"release-{utc_now():%Y%m%dT%H%M%S}-{digest}",
        "reason": reason,
        "run_filter": run_id,
        "objects": len(objects),
        "members": len(members),
    }
    if objects:

        def work(conn: Connection) -> None:
            conn.execute(sa.text(QUEUE_AGAIN), [{"k": k, "e": e} for k, e in objects])
            catalog.upsert(
                "quarantine_releases", [release | {"members_json": json.dumps(members)}], ["release_id"], conn
            )

        catalog.transaction(work)
        log.info("released %d quarantined objects (%s): %s", len(objects), release["release_id"], reason)
    return release | {"by_reason": by_reason}
