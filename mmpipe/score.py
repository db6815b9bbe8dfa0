"""Score incoming studies with a model and tag them in the image store: every object gets a fate.

Fates (``scored_objects.fate``; a run's ``score_runs`` row reconciles
listed = tagged + unreadable + unknown + skipped + failed):

- ``tagged``: ``mmpipe-modality=<class>``, ``mmpipe-review=yes|no`` (yes always with
  ``mmpipe-review-reason``), confidence, model, image count;
- ``unreadable``: ``mmpipe-status=unreadable`` and ``mmpipe-reason=<reason>`` (truncated, no pixels, ...);
- ``unknown``: ``mmpipe-status=unknown``: every image out of distribution (:mod:`mmpipe.openset`);
- ``skipped``: already scored by this model in its current version (key, ETag, LastModified);
- ``failed``: not tagged, with a reason: ``tag_limit`` (the object's foreign tags leave no room,
  :mod:`mmpipe.tagging`), or a transient fault (store error, decoder bug, tag write) that leaves the
  object for the next run.

Objects are fetched and decoded by ingest's decode processes (:class:`mmpipe.decoding.Fetcher`: a
crashing or hanging decoder costs its object only), a bounded window ahead of inference; tags and
sidecars are written by threads behind it, so fetch, decode, inference and writes overlap and memory
stays bounded whatever the batch size. The objects' bytes are never rewritten; a new model replaces
mmpipe's own tags only. One JSON sidecar per object under ``results/<model_version>/`` holds every
image's probabilities, the reasons and the tags that did not fit.
"""

from __future__ import annotations

import io
import logging
import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import sqlalchemy as sa
import torch
from sqlalchemy.engine import Connection

from mmpipe import decoding, gradcam, modelcard, openset, tagging
from mmpipe.catalog import Catalog, select_in
from mmpipe.config import Settings
from mmpipe.decoding import PROCESS_CHUNK, DecodeContext, Fetcher, Outcome
from mmpipe.errors import MmpipeError, StoreError
from mmpipe.imaging import Limits
from mmpipe.ingest import abandon_stale_runs, process_owner, serialised, utc_now
from mmpipe.labels import HeaderRule, Label, Labeler
from mmpipe.progress import progress
from mmpipe.promote import champion
from mmpipe.store import Fetched, NotFound, ObjectInfo, Store

log = logging.getLogger(__name__)

INCOMING_PREFIX = "incoming/"
RESULTS_PREFIX = "results/"
TAG_PREFIX = tagging.TAG_PREFIX
MEMBER_KEY = ["source_key", "source_etag", "member_path", "model_version"]
OBJECT_KEY = ["model_version", "source_key"]
TAGGED, UNREADABLE, UNKNOWN, SKIPPED, FAILED = "tagged", "unreadable", "unknown", "skipped", "failed"
FATES = (TAGGED, UNREADABLE, UNKNOWN, SKIPPED, FAILED)
TAG_LIMIT, TAG_WRITE_FAILED, DELETED = "tag_limit", "tag_write_failed", "deleted_since_listing"
#: Reduced precision is used only where the card records at least this agreement with float32.
PRECISION_AGREEMENT_MIN = 0.995
INFER_BATCH = 64  # images per forward pass
WRITE_PROCESSES = 2  # processes writing sidecars and tags
WRITE_THREADS = 4  # requests in flight per writer process (network-bound)
#: Decode and writer processes run this much below the scoring process's CPU priority: the model is
#: the bottleneck, and helpers that preempt its thread on a shared core cost more than they add.
HELPER_NICE = 19
FLUSH_OBJECTS = 200  # catalog rows written every this many objects
#: An upload may appear in a listing with a LastModified this much older than the listing itself
#: (S3 stamps the start of a large upload): the watermark stays this far behind the listing.
WATERMARK_MARGIN = timedelta(hours=1)
HEARTBEAT = sa.text("UPDATE score_runs SET heartbeat_at = :now WHERE run_id = :r")
LAPSED_CLAIMS = sa.text(
    "DELETE FROM score_claims WHERE run_id NOT IN (SELECT run_id FROM score_runs WHERE status = 'running')"
)
CLAIMS = (
    "SELECT c.model_version, c.source_key, c.run_id, r.status FROM score_claims c "
    "LEFT JOIN score_runs r ON r.run_id = c.run_id WHERE c.source_key IN ({in})"
)
SCORED = (
    "SELECT model_version, source_key, source_etag, source_modified, settled, run_id FROM scored_objects "
    "WHERE source_key IN ({in})"
)


# --------------------------------------------------------------------------- which model


class NothingToScore(MmpipeError):
    """No model to score with yet (no champion), or no listed run to reconcile: a run with nothing to
    do, which the scoring DAG skips rather than retries."""


def current_champion(catalog: Catalog) -> tuple[str, str]:
    version = champion(catalog)
    if version is None:
        raise NothingToScore("no champion model yet: run the retrain DAG (or `mmpipe promote`) first")
    return version, card_uri_of(catalog, version)


def resolve_model(catalog: Catalog, model_version: str = "") -> tuple[str, str]:
    """``model_version`` and its card, or the champion's when it is empty."""
    if not model_version:
        return current_champion(catalog)
    return model_version, card_uri_of(catalog, model_version)


def card_uri_of(catalog: Catalog, model_version: str) -> str:
    card_uri = catalog.scalar("SELECT card_uri FROM models WHERE model_version = :m", m=model_version)
    if card_uri is None:
        raise MmpipeError(f"unknown model version {model_version!r}: see `mmpipe leaderboard`")
    return card_uri


# --------------------------------------------------------------------------- what to score


def _time(value: str) -> datetime:
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def now_iso() -> str:
    return datetime.now(UTC).isoformat()


@dataclass
class Listing:
    """What one run must score: ``todo``; ``skipped`` listed objects already scored by this model."""

    listed: int
    todo: list[ObjectInfo]
    skipped: int
    listed_at: str
    watermark: str | None  # the model's watermark this listing used (None: every object looked up)


def watermark(catalog: Catalog, model_version: str, prefix: str) -> str | None:
    """The newest watermark of a finished run of this model over ``prefix`` or a prefix containing it."""
    rows = catalog.query(
        "SELECT prefix, watermark FROM score_runs WHERE model_version = :m AND status = 'finished' "
        "AND watermark IS NOT NULL",
        m=model_version,
    )
    found = [r["watermark"] for r in rows if prefix.startswith(r["prefix"])]
    return max(found, key=_time) if found else None


def in_range(obj: ObjectInfo, modified_from: str, modified_to: str) -> bool:
    """LastModified within [from, to); an empty bound is open."""
    when = _time(obj.modified) if (modified_from or modified_to) else None
    return (not modified_from or when >= _time(modified_from)) and (
        not modified_to or when < _time(modified_to)
    )


def select_unscored(
    catalog: Catalog,
    listed: Sequence[ObjectInfo],
    model_version: str,
    mark: str | None,
    force: bool = False,
) -> tuple[list[ObjectInfo], int]:
    """(objects to score, how many are already scored). Objects modified before the watermark are
    settled without a catalog read; the others are looked up by key in ``scored_objects`` (an
    object is done when its row is settled and names its current ETag and LastModified)."""
    if force:
        return list(listed), 0
    cut = _time(mark) if mark else None
    fresh = [o for o in listed if cut is None or _time(o.modified) >= cut]
    done = {
        (r["source_key"], r["source_etag"], r["source_modified"])
        for r in catalog.query_in(
            "SELECT model_version, source_key, source_etag, source_modified, settled FROM scored_objects "
            "WHERE source_key IN ({in})",
            [o.key for o in fresh],
        )
        if r["model_version"] == model_version and r["settled"]
    }
    todo = [o for o in fresh if (o.key, o.etag, o.modified) not in done]
    return todo, len(listed) - len(todo)


def list_unscored(
    store: Store,
    catalog: Catalog,
    prefix: str,
    model_version: str,
    *,
    modified_from: str = "",
    modified_to: str = "",
    force: bool = False,
) -> Listing:
    listed_at = now_iso()
    listed = [o for o in store.list(prefix) if in_range(o, modified_from, modified_to)]
    mark = None if force else watermark(catalog, model_version, prefix)
    todo, skipped = select_unscored(catalog, listed, model_version, mark, force)
    return Listing(len(listed), todo, skipped, listed_at, mark)


# --------------------------------------------------------------------------- runs


def open_run(
    settings: Settings,
    catalog: Catalog,
    run_id: str,
    model_version: str,
    prefix: str,
    listing: Listing,
    *,
    modified_from: str = "",
    modified_to: str = "",
    force: bool = False,
    owner: str | None = None,
) -> Listing:
    """Record the run's listing (by ``owner``, a process running it whole: see
    :func:`mmpipe.ingest.process_owner`) and claim its objects, after marking killed runs abandoned.

    Idempotent: a retried listing task rewrites both. Returns the listing without the objects a
    concurrent run of this model has claimed, or scored since this one listed them: they count as
    skipped (``claimed_elsewhere``), so two runs at once score and account each object once."""
    abandon_stale_runs(settings, catalog, current=run_id, table="score_runs")
    run = {
        "run_id": run_id,
        "model_version": model_version,
        "prefix": prefix,
        "modified_from": modified_from,
        "modified_to": modified_to,
        "forced": force,
        "status": "running",
        "listed": listing.listed,
        "listed_at": listing.listed_at,
        "heartbeat_at": utc_now(),
        "owner": owner,
    }

    def work(conn: Connection) -> list[ObjectInfo]:
        serialised(conn)
        conn.execute(LAPSED_CLAIMS)
        keys = [o.key for o in listing.todo]
        claims = {
            r["source_key"]: r
            for r in select_in(conn, CLAIMS, keys)
            if r["model_version"] == model_version and r["run_id"] != run_id and r["status"] == "running"
        }
        scored = {
            (r["source_key"], r["source_etag"], r["source_modified"])
            for r in select_in(conn, SCORED, keys)
            if r["model_version"] == model_version and r["settled"] and r["run_id"] != run_id
        }
        mine = [
            o
            for o in listing.todo
            if o.key not in claims and (force or (o.key, o.etag, o.modified) not in scored)
        ]
        elsewhere = len(listing.todo) - len(mine)
        row = run | {"skipped": listing.skipped + elsewhere, "claimed_elsewhere": elsewhere}
        catalog.upsert("score_runs", [row], ["run_id"], conn)
        claimed = [{"model_version": model_version, "source_key": o.key, "run_id": run_id} for o in mine]
        catalog.upsert("score_claims", claimed, ["model_version", "source_key"], conn)
        return mine

    mine = catalog.transaction(work)
    if len(mine) < len(listing.todo):
        log.info("scoring run %s: %d objects left to a concurrent run", run_id, len(listing.todo) - len(mine))
    skipped = listing.skipped + len(listing.todo) - len(mine)
    return Listing(listing.listed, mine, skipped, listing.listed_at, listing.watermark)


def finish_run(catalog: Catalog, run_id: str) -> dict[str, Any]:
    """Reconcile the run from the catalog and record it: every listed object has exactly one fate.

    Objects to score that have no fate (a batch task that died) are ``not_reached``; the run is then
    ``incomplete``. The model's watermark moves only after a complete run over an open range that
    left nothing to a concurrent run, to before the oldest object it left unsettled. The run's
    claims are released.
    """
    run = catalog.query("SELECT * FROM score_runs WHERE run_id = :r", r=run_id)
    if not run:
        raise NothingToScore(f"no scoring run {run_id!r} was listed")
    run = run[0]
    counts = dict.fromkeys((TAGGED, UNREADABLE, UNKNOWN, FAILED), 0)
    for row in catalog.query(
        "SELECT fate, count(*) AS n FROM scored_objects WHERE run_id = :r GROUP BY fate", r=run_id
    ):
        counts[row["fate"]] = int(row["n"])
    not_reached = run["listed"] - run["skipped"] - sum(counts.values())
    complete = not_reached == 0
    mark = None
    if complete and not (run["modified_from"] or run["modified_to"] or run["claimed_elsewhere"]):
        oldest_open = catalog.scalar(
            "SELECT min(source_modified) FROM scored_objects WHERE run_id = :r AND settled = FALSE", r=run_id
        )
        limit = _time(run["listed_at"]) - WATERMARK_MARGIN
        mark = min(limit, _time(oldest_open)) if oldest_open else limit
        previous = watermark(catalog, run["model_version"], run["prefix"])
        if previous and not oldest_open:
            mark = max(mark, _time(previous))
    summary = counts | {
        "not_reached": max(not_reached, 0),
        "status": "finished" if complete else "incomplete",
        "watermark": mark.isoformat() if mark else None,
    }
    catalog.execute("DELETE FROM score_claims WHERE run_id = :r", {"r": run_id})
    catalog.execute(
        "UPDATE score_runs SET tagged = :tagged, unreadable = :unreadable, unknown = :unknown, "
        "failed = :failed, not_reached = :not_reached, status = :status, watermark = :watermark, "
        "finished_at = CURRENT_TIMESTAMP WHERE run_id = :run_id",
        summary | {"run_id": run_id},
    )
    result = {"run_id": run_id, "model_version": run["model_version"], "listed": run["listed"]}
    result |= {SKIPPED: run["skipped"]} | summary
    log.info(
        "scoring run %s: %d listed = %d tagged + %d unreadable + %d unknown + %d skipped + %d failed%s",
        run_id, run["listed"], counts[TAGGED], counts[UNREADABLE], counts[UNKNOWN], run["skipped"],
        counts[FAILED], f" + {not_reached} not reached" if not_reached else "",
    )  # fmt: skip
    return result


# --------------------------------------------------------------------------- the model


def inference_dtype(card: modelcard.ModelCard, device: torch.device) -> torch.dtype | None:
    """The reduced precision to autocast to, if the hardware has it and the card records (measured on
    the frozen test snapshot at promotion) at least PRECISION_AGREEMENT_MIN agreement with float32."""
    agreement = card.precision_agreement or {}

    def agrees(name: str) -> bool:
        return agreement.get(name, 0.0) >= PRECISION_AGREEMENT_MIN

    if device.type == "cuda":
        if agrees("bfloat16") and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float16 if agrees("float16") else None
    if agrees("bfloat16") and torch.backends.mkldnn.is_available() and cpu_has_bf16():
        return torch.bfloat16
    return None


def cpu_has_bf16() -> bool:
    """The CPU computes bf16 natively (AVX512-BF16/AMX); emulated bf16 is slower than float32."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity, where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def torch_threads(settings: Settings) -> int:
    """This task's share of the machine for torch (see ``Settings.score_threads``)."""
    return settings.score_threads or max(1, usable_cpus() // 2)


@dataclass
class Scorer:
    """A loaded model ready to score: channels_last, and reduced precision only where the card allows."""

    model: torch.nn.Module
    card: modelcard.ModelCard
    model_version: str
    autocast: torch.dtype | None
    rules: tuple[HeaderRule, ...]  # of the header check (mmpipe.openset.header_rules)
    features: openset.FeatureStats | None = None  # the feature check, once fitted for this model

    @classmethod
    def load(
        cls,
        settings: Settings,
        store: Store,
        model_version: str,
        card_uri: str,
        fit: bool = True,
        card: modelcard.ModelCard | None = None,
    ) -> Scorer:
        """The model, with its feature check (fitted and kept first if ``fit`` and it is missing: the
        first tasks scoring with a new model fit it, each the same, later ones read it). ``card``:
        the model's card, if already read."""
        torch.set_num_threads(torch_threads(settings))
        device = modelcard.resolve_device(settings.device)
        model, card = modelcard.load(store, card_uri, device, card)  # channels_last, eval
        rules = openset.header_rules(settings.label_rules, card.classes)
        scorer = cls(model, card, model_version, inference_dtype(card, device), rules)
        key = feature_stats_key(model_version)
        if store.head(key) is not None:
            with np.load(io.BytesIO(store.get(key))) as arrays:
                scorer.features = openset.FeatureStats.from_npz(arrays)
        elif fit:
            fit_feature_check(store, scorer)
        return scorer

    def forward(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(logits (N, C), penultimate features (N, D): what the classifier head receives)."""
        from mmpipe.models import _classifier

        captured: list[np.ndarray] = []
        _, head = _classifier(self.model)
        hook = head.register_forward_pre_hook(
            lambda _m, inputs: captured.append(inputs[0].float().flatten(1).cpu().numpy())
        )
        try:
            logits = modelcard.logits(self.model, self.card, pixels, INFER_BATCH, self.autocast)
        finally:
            hook.remove()
        return logits, np.concatenate(captured) if captured else np.zeros((0, 0), np.float32)

    def logits(self, pixels: np.ndarray) -> np.ndarray:
        return self.forward(pixels)[0]

    def far(self, features: np.ndarray) -> np.ndarray | None:
        """Which images' features lie beyond the feature threshold (None: no feature check)."""
        if self.features is None:
            return None
        return self.features.distance(features) > self.features.threshold


def feature_stats_key(model_version: str) -> str:
    return f"{RESULTS_PREFIX}{model_version}/openset-features.npz"


def fit_feature_check(store: Store, scorer: Scorer) -> bool:
    """Fit the model's feature check once (:class:`mmpipe.openset.FeatureStats`: class means on its
    training split, threshold on its validation split, read from its plan) and keep it in the store.

    False when the plan's images cannot be read: scoring then relies on the energy check alone.
    """
    from mmpipe.ingest import load_pixels

    if scorer.features is not None:
        return True
    try:
        plan = store.get_json(store.key_of(scorer.card.plan_uri))
        entries = {e["image_id"]: e for e in plan["train"] + plan["val"]}
        pixels = load_pixels(store, list(entries.values()))
    except (MmpipeError, KeyError, ValueError) as exc:
        log.warning(
            "no feature check for %s: its plan's images cannot be read (%s)", scorer.model_version, exc
        )
        return False
    classes = scorer.card.classes

    def split(name: str) -> tuple[np.ndarray, np.ndarray]:
        ids = list(dict.fromkeys(e["image_id"] for e in plan[name]))
        labels = np.array([classes.index(entries[i]["label"]) for i in ids])
        return scorer.forward(np.stack([pixels[i] for i in ids]))[1], labels

    (train, labels), (val, _) = split("train"), split("val")
    scorer.features = openset.fit_features(train, labels, val, len(classes))
    save_feature_check(store, scorer.model_version, scorer.features)
    return True


def save_feature_check(store: Store, model_version: str, stats: openset.FeatureStats) -> str:
    buffer = io.BytesIO()
    np.savez(buffer, **stats.to_npz())
    return store.put(feature_stats_key(model_version), buffer.getvalue())


def decode_context(settings: Settings, card: modelcard.ModelCard) -> DecodeContext:
    """Ingest's decode context for scoring: the card's canonical size, no label needed, and a salt of
    this process only: scoring keeps no pseudonym."""
    return DecodeContext(
        labeler=Labeler(card.classes, fallback=Label("", "none")),
        salt=os.urandom(16),
        size=card.canonical_size,
        limits=Limits.from_settings(settings),
    )


# --------------------------------------------------------------------------- one object's verdict


@dataclass
class Verdict:
    """What scoring decided for one object, before its tags are written."""

    obj: ObjectInfo
    fate: str
    reason: str = ""
    settled: bool = True
    assessment: openset.Assessment | None = None
    members: list[str] = field(default_factory=list)  # member path of each image
    failures: list[dict[str, str]] = field(default_factory=list)  # members that could not be used
    overlays: dict[int, bytes] = field(default_factory=dict)  # image index -> Grad-CAM overlay PNG
    tag_count: int | None = None  # tags the object carried when read (None: not known)

    def tags(self, model_version: str) -> dict[str, str]:
        """mmpipe's tags for this object, most essential first (see :mod:`mmpipe.tagging`)."""
        p, a = TAG_PREFIX, self.assessment
        if self.fate == UNREADABLE:
            return {f"{p}status": UNREADABLE, f"{p}reason": self.reason, f"{p}model": model_version}
        if a is None:
            return {}
        review = {f"{p}review": "yes" if a.review else "no"}
        if a.review:
            review[f"{p}review-reason"] = "+".join(a.reasons)
        if self.fate == UNKNOWN:
            return {f"{p}status": UNKNOWN, **review, f"{p}model": model_version}
        return {
            f"{p}modality": a.modality or "",
            **review,
            f"{p}confidence": f"{a.confidence:.3f}",
            f"{p}model": model_version,
            f"{p}images": str(len(a.probs)),
        }


def verdict_of(
    outcome: Outcome,
    logits: np.ndarray,
    far: np.ndarray | None,
    scorer: Scorer,
    low_confidence: float,
    max_colourfulness: float,
) -> Verdict:
    """One decoded object's verdict: failed (a fault: taken again next run), unreadable or assessed.
    ``far`` (the feature check) and colour beyond ``max_colourfulness`` put an image out of distribution."""
    failures = [
        {"member_path": q["member_path"], "reason": q["reason"], "detail": q["detail"]}
        for q in outcome.quarantined
    ]
    if outcome.errors:
        kind = outcome.errors[0]["kind"]
        return Verdict(outcome.obj, FAILED, kind, settled=False, failures=failures)
    if not outcome.images:
        reason = failures[0]["reason"] if failures else "no_image"
        return Verdict(outcome.obj, UNREADABLE, reason, failures=failures, tag_count=outcome.tag_count)
    card = scorer.card
    headers = [(row["modality"], row["body_part"]) for row, _ in outcome.images]
    colourful = np.array([row["colourfulness"] > max_colourfulness for row, _ in outcome.images])
    far = colourful if far is None else far | colourful
    assessment = openset.assess(
        logits, card.classes, card.temperature, card.ood_threshold, low_confidence, headers, scorer.rules, far
    )
    members = [row["member_path"] for row, _ in outcome.images]
    fate = UNKNOWN if assessment.unknown else TAGGED
    return Verdict(
        outcome.obj,
        fate,
        assessment=assessment,
        members=members,
        failures=failures,
        tag_count=outcome.tag_count,
    )


# --------------------------------------------------------------------------- writing one object


def sidecar_key(model_version: str, source_key: str) -> str:
    return f"{RESULTS_PREFIX}{model_version}/{source_key}.json"


def overlay_key(model_version: str, source_key: str, image: int) -> str:
    return f"{RESULTS_PREFIX}{model_version}/{source_key}.gradcam/{image:04d}.png"


def sidecar(
    verdict: Verdict,
    card: modelcard.ModelCard,
    plan: tagging.TagPlan | None,
    overlays: dict[int, str] | None = None,
) -> dict[str, Any]:
    """The object's evidence for a reviewer: every image's probabilities, the reasons, all tags, and
    the Grad-CAM overlay of each flagged image (``overlays``: image index -> URI)."""
    a = verdict.assessment
    images = []
    if a is not None:
        for n, member in enumerate(verdict.members):
            images.append(
                {
                    "member_path": member,
                    "probabilities": {
                        c: round(float(v), 5) for c, v in zip(card.classes, a.probs[n], strict=True)
                    },
                    "energy": round(float(a.energies[n]), 4),
                    "out_of_distribution": bool(a.ood[n]),
                    "gradcam": (overlays or {}).get(n),
                }
            )
    return {
        "source_key": verdict.obj.key,
        "source_etag": verdict.obj.etag,
        "source_modified": verdict.obj.modified,
        "model_version": card.model_version,
        "fate": verdict.fate,
        "reason": verdict.reason,
        "modality": a.modality if a else None,
        "confidence": round(a.confidence, 5) if a else None,
        "review_reasons": a.reasons if a else [],
        "ood_threshold": card.ood_threshold,
        "temperature": card.temperature,
        "images": images,
        "unusable_members": verdict.failures,
        "tags_written": plan.written if plan else {},
        "tags_left_out": plan.left_out if plan else {},
    }


Written = tuple[Verdict, tagging.TagPlan | None, str | None]


def write_object(store: Store, card: modelcard.ModelCard, verdict: Verdict) -> Written:
    """Sidecar, then tags (so a tag never points at missing evidence). A store fault fails the object
    (taken again next run); an object with no room for even one tag fails with ``tag_limit``.

    The foreign tags to keep are read only if the object had tags when it was fetched: S3 offers no
    conditional tag write, so a tag another system adds between that fetch and this write (seconds,
    rather than the milliseconds between a read and a write of the tags) is lost either way."""
    if verdict.fate == FAILED:
        return verdict, None, None
    ours = verdict.tags(card.model_version)
    try:
        foreign = store.get_tags(verdict.obj.key) if verdict.tag_count != 0 else {}
        plan = tagging.plan_tags(foreign, ours)
        if not plan.fits:
            verdict.fate, verdict.reason = FAILED, TAG_LIMIT
        overlays = {
            n: store.put(overlay_key(card.model_version, verdict.obj.key, n), png, "image/png")
            for n, png in verdict.overlays.items()
        }
        doc = sidecar(verdict, card, plan, overlays)
        uri = store.put_json(sidecar_key(card.model_version, verdict.obj.key), doc)
        if plan.fits:
            store.set_tags(verdict.obj.key, plan.tags)
    except NotFound:
        verdict.fate, verdict.reason = FAILED, DELETED
        return verdict, None, None
    except StoreError as exc:
        log.warning("tags of one object not written (%s); it is taken again next run", type(exc).__name__)
        verdict.fate, verdict.reason, verdict.settled = FAILED, TAG_WRITE_FAILED, False
        return verdict, None, None
    return verdict, plan, uri


#: A writer process's own store client (see :class:`Writer`).
_writer_store: Store | None = None


def _writer_start(store: Store, parent: int) -> None:
    global _writer_store
    decoding.quiet_child(parent, HELPER_NICE)
    _writer_store = store


def _write_many(card: modelcard.ModelCard, verdicts: list[Verdict]) -> list[Written]:
    if _writer_store is None:
        raise RuntimeError("writer process used before _writer_start")
    with ThreadPoolExecutor(WRITE_THREADS) as pool:
        return list(pool.map(lambda v: write_object(_writer_store, card, v), verdicts))


class Writer:
    """Writes sidecars and tags behind inference: WRITE_PROCESSES forked processes (requests cost
    client CPU that would otherwise hold the scoring process's GIL), each with WRITE_THREADS
    threads; threads of this process where fork is unavailable. Started before any decode process
    or inference thread exists, so nothing is held locked in them."""

    def __init__(self, settings: Settings, store: Store, card: modelcard.ModelCard, dry: bool = False):
        self.card, self.store, self.dry = card, store, dry
        if dry:  # a local run: nothing is written anywhere
            self.pool = None
        elif decoding.decode_processes(settings) > 1:
            self.pool: Any = ProcessPoolExecutor(
                WRITE_PROCESSES,
                mp_context=multiprocessing.get_context("fork"),
                initializer=_writer_start,
                initargs=(store, os.getpid()),  # its writes open a connection per process (DirectHttp)
            )
            self.pool.submit(int).result()  # fork now, while this process is single-threaded
        else:
            self.pool = ThreadPoolExecutor(WRITE_THREADS)

    def submit(self, verdicts: list[Verdict]) -> Future[list[Written]]:
        if self.pool is None:
            done: Future[list[Written]] = Future()
            done.set_result([(v, None, None) for v in verdicts])
            return done
        if isinstance(self.pool, ThreadPoolExecutor):
            return self.pool.submit(lambda: [write_object(self.store, self.card, v) for v in verdicts])
        return self.pool.submit(_write_many, self.card, verdicts)

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)


def catalog_rows(
    verdict: Verdict,
    plan: tagging.TagPlan | None,
    uri: str | None,
    model_version: str,
    run_id: str,
    classes: Sequence[str],
) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """(scored_objects row, predictions rows, score_failures rows) of one written object."""
    obj, a = verdict.obj, verdict.assessment
    base = {"source_key": obj.key, "source_etag": obj.etag, "source_modified": obj.modified,
            "model_version": model_version, "run_id": run_id}  # fmt: skip
    scored = base | {
        "fate": verdict.fate,
        "reason": verdict.reason,
        "settled": verdict.settled,
        "modality": a.modality if a else None,
        "confidence": a.confidence if a else None,
        "review_reasons": ",".join(a.reasons) if a else "",
        "images": len(verdict.members),
        "tags_written": len(plan.written) if plan else 0,
        "tags_left_out": len(plan.left_out) if plan else 0,
        "sidecar_uri": uri,
    }
    predictions = []
    if a is not None:
        for member, p in zip(verdict.members, a.probs, strict=True):
            top = int(p.argmax())
            probs = ", ".join(f'"{c}": {v:.5f}' for c, v in zip(classes, p, strict=True))
            predictions.append(base | {"member_path": member, "predicted": classes[top], "confidence": float(p[top]),
                                       "probs_json": "{" + probs + "}", "needs_review": a.review})  # fmt: skip
    failures = [base | f for f in verdict.failures]
    return scored, predictions, failures


# --------------------------------------------------------------------------- local files


class LocalFiles:
    """Files under a local folder as decode processes read objects: ``fetch(key)``, ``list()``."""

    def __init__(self, root: Path):
        self.root = root

    def list(self) -> list[ObjectInfo]:
        files = [self.root] if self.root.is_file() else sorted(p for p in self.root.rglob("*") if p.is_file())
        base = self.root.parent if self.root.is_file() else self.root
        return [
            ObjectInfo(
                p.relative_to(base).as_posix(),
                "",
                p.stat().st_size,
                datetime.fromtimestamp(p.stat().st_mtime, UTC).isoformat(),
            )
            for p in files
        ]

    def fetch(self, key: str) -> Fetched:
        base = self.root.parent if self.root.is_file() else self.root
        try:
            return Fetched((base / key).read_bytes(), 0)
        except FileNotFoundError:
            raise NotFound(f"{key} was deleted after it was listed") from None


# --------------------------------------------------------------------------- the pipeline


class Results:
    """Catalog rows of written objects, flushed every FLUSH_OBJECTS objects; counts by fate."""

    def __init__(
        self,
        catalog: Catalog | None,
        card: modelcard.ModelCard,
        model_version: str,
        run_id: str,
        on_object: Callable[[dict], None] | None,
    ):
        self.catalog, self.card, self.model_version = catalog, card, model_version
        self.run_id, self.on_object = run_id, on_object
        self.documents: list[dict[str, Any]] = []  # sidecars of a local run (nothing is written)
        self.scored: list[dict] = []
        self.predictions: list[dict] = []
        self.failures: list[dict] = []
        self.counts: dict[str, int] = dict.fromkeys((TAGGED, UNREADABLE, UNKNOWN, FAILED), 0)
        self.images = self.review = 0

    def add(self, written: Written) -> None:
        verdict, plan, uri = written
        scored, predictions, failures = catalog_rows(
            verdict, plan, uri, self.model_version, self.run_id, self.card.classes
        )
        self.counts[verdict.fate] += 1
        self.images += len(predictions)
        self.review += bool(verdict.assessment and verdict.assessment.review)
        if self.on_object is not None:
            self.on_object(scored)
        if self.catalog is None:
            self.documents.append(sidecar(verdict, self.card, plan))
            return
        self.scored.append(scored)
        self.predictions += predictions
        self.failures += failures
        if len(self.scored) >= FLUSH_OBJECTS:
            self.flush()

    def flush(self) -> None:
        if self.catalog is None or not self.scored:
            return
        rows = (self.scored, self.predictions, self.failures)

        def write(conn: Any) -> None:
            self.catalog.upsert("scored_objects", rows[0], OBJECT_KEY, conn)
            self.catalog.upsert("predictions", rows[1], MEMBER_KEY, conn)
            self.catalog.upsert("score_failures", rows[2], MEMBER_KEY, conn)
            conn.execute(HEARTBEAT, {"r": self.run_id, "now": utc_now()})  # alive (see open_run)

        self.catalog.transaction(write)
        self.scored, self.predictions, self.failures = [], [], []

    def summary(self, objects: int) -> dict[str, Any]:
        return {"objects": objects, **self.counts, "images": self.images, "review": self.review}


def explain(scorer: Scorer, verdicts: Sequence[Verdict], outcomes: Sequence[Outcome]) -> None:
    """Grad-CAM overlays for the images of review-flagged objects (CNN champions only)."""
    wanted = [
        (v, n, px)
        for v, o in zip(verdicts, outcomes, strict=True)
        if v.assessment is not None and v.assessment.review
        for n, (_, px) in enumerate(o.images)
    ]
    if not wanted or gradcam.last_conv(scorer.model) is None:
        return
    pixels = np.stack([px for _, _, px in wanted])
    classes = np.array([v.assessment.probs[n].argmax() for v, n, _ in wanted])
    maps = gradcam.heatmaps(scorer.model, scorer.card, pixels, classes)
    for (verdict, n, px), heat in zip(wanted, maps, strict=True):
        verdict.overlays[n] = gradcam.overlay_png(px, heat)


def decoded(fetcher: Fetcher, objects: Sequence[ObjectInfo], window: int) -> Iterator[Outcome]:
    """Outcomes in order, with at most ``window`` chunks submitted ahead (bounded memory). The first
    ``window`` chunks are submitted at once, so they decode while the caller loads its model."""
    pending, source = deque(), iter(objects)

    def refill() -> None:
        while len(pending) < window and (group := list(islice(source, PROCESS_CHUNK))):
            pending.extend(fetcher.submit(group))

    def outcomes() -> Iterator[Outcome]:
        while pending:
            chunk = pending.popleft()
            done = fetcher.results(chunk)
            refill()
            yield from done

    refill()
    return outcomes()


def score_objects(
    settings: Settings,
    store: Store,
    catalog: Catalog | None,
    objects: Sequence[ObjectInfo],
    model_version: str,
    card_uri: str,
    run_id: str,
    on_object: Callable[[dict], None] | None = None,
    local: LocalFiles | None = None,
) -> dict[str, Any]:
    """Score ``objects``: decode ahead in ingest's decode processes, infer in batches of INFER_BATCH
    images, write sidecars and tags behind (:class:`Writer`), record a fate for every object.
    Decoding starts from the card alone, while the model loads.

    ``local``: the objects are files there; nothing is written to the store or the catalog (the
    sidecars stay in the returned ``documents``)."""
    card = modelcard.read_card(store, card_uri)
    results = Results(None if local else catalog, card, model_version, run_id, on_object)
    if not objects:
        return results.summary(0)
    context = decode_context(settings, card)
    with (
        Writer(settings, store, card, dry=local is not None) as writer,
        Fetcher(settings, local or store, context, len(objects), HELPER_NICE) as fetcher,
    ):
        # two inference batches ahead: the decode processes keep working while the model runs
        window = max(2 * fetcher.processes, 2 * INFER_BATCH // PROCESS_CHUNK)
        outcomes = decoded(fetcher, objects, window)
        scorer = Scorer.load(settings, store, model_version, card_uri, fit=local is None, card=card)
        writes: deque[Future[list[Written]]] = deque()
        ready: list[Outcome] = []
        images = 0

        def infer() -> None:
            pixels = [px for o in ready for _, px in o.images]
            logits, features = scorer.forward(np.stack(pixels)) if pixels else (np.zeros((0, 0)),) * 2
            far = scorer.far(features) if pixels else None
            verdicts, start = [], 0
            for outcome in ready:
                end = start + len(outcome.images)
                mine = far[start:end] if far is not None else None
                verdicts.append(
                    verdict_of(
                        outcome,
                        logits[start:end],
                        mine,
                        scorer,
                        settings.low_confidence,
                        settings.max_colourfulness,
                    )
                )
                start = end
            if not writer.dry:
                explain(scorer, verdicts, ready)
            half = max(1, -(-len(verdicts) // WRITE_PROCESSES))  # one share per writer process
            writes.extend(writer.submit(verdicts[i : i + half]) for i in range(0, len(verdicts), half))
            ready.clear()
            while len(writes) > 2 * WRITE_PROCESSES:
                for written in writes.popleft().result():
                    results.add(written)

        for outcome in outcomes:
            ready.append(outcome)
            images += len(outcome.images)
            if images >= INFER_BATCH:
                infer()
                images = 0
        infer()
        while writes:
            for written in writes.popleft().result():
                results.add(written)
    results.flush()
    summary = results.summary(len(objects)) | ({"documents": results.documents} if local else {})
    log.info(
        "scored %d objects: %s",
        len(objects),
        ", ".join(f"{k} {summary[k]}" for k in (*results.counts, "review")),
    )
    return summary


def run(
    settings: Settings,
    store: Store,
    catalog: Catalog,
    run_id: str,
    prefix: str = INCOMING_PREFIX,
    *,
    model_version: str = "",
    modified_from: str = "",
    modified_to: str = "",
    force: bool = False,
) -> dict[str, Any]:
    """A whole scoring run in this process (the CLI); the DAG runs the same steps as mapped tasks."""
    version, card_uri = resolve_model(catalog, model_version)
    window = {"modified_from": modified_from, "modified_to": modified_to}
    listing = list_unscored(store, catalog, prefix, version, force=force, **window)
    listing = open_run(
        settings, catalog, run_id, version, prefix, listing, force=force, owner=process_owner(), **window
    )
    try:
        with progress(desc="score", total=len(listing.todo), unit="obj") as bar:
            score_objects(
                settings, store, catalog, listing.todo, version, card_uri, run_id, lambda _: bar.update(1)
            )
    except Exception:  # the run ends incomplete, its claims released: the next run takes the rest
        try:
            finish_run(catalog, run_id)
        except MmpipeError as exc:  # the catalog is down too: the next run marks this one abandoned
            log.warning("scoring run %s not reconciled: %s", run_id, exc)
        raise
    return finish_run(catalog, run_id)


def run_local(
    settings: Settings, store: Store, catalog: Catalog, path: Path, out: Path, model_version: str = ""
) -> dict[str, Any]:
    """Score local files (a file or a folder) and write ``out`` (.csv: one row per file; .json: the
    sidecars); the store and the catalog are only read (the model)."""
    import csv
    import json

    files = LocalFiles(path)
    objects = files.list()
    version, card_uri = resolve_model(catalog, model_version)
    rows: list[dict[str, Any]] = []
    with progress(desc="score", total=len(objects), unit="file") as bar:

        def record(row: dict[str, Any]) -> None:
            rows.append(row)
            bar.update(1)

        summary = score_objects(settings, store, None, objects, version, card_uri, "local", record, files)
    documents = summary.pop("documents", [])
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".json":
        out.write_text(json.dumps(documents, indent=2, default=str))
    else:
        columns = ["source_key", "fate", "reason", "modality", "confidence", "review_reasons", "images"]
        with out.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
    counts = {fate: summary.get(fate, 0) for fate in (TAGGED, UNREADABLE, UNKNOWN, FAILED)}
    return {
        "model_version": version,
        "listed": len(objects),
        **counts,
        "review": summary["review"],
        "out": str(out),
    }
