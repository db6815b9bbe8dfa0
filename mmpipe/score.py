"""Score incoming studies with the champion and tag them in the image store.

Tags are S3 object tags (the original bytes are never rewritten); one prediction row per image to
the catalog. Idempotent per (object, ETag, model version): an object already scored by this
champion is skipped, and a new champion rescores everything once. Low-confidence results are
flagged for human review.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from mmpipe import modelcard
from mmpipe.catalog import Catalog
from mmpipe.config import Settings
from mmpipe.decoding import expand, fetch_listed
from mmpipe.errors import MmpipeError
from mmpipe.imaging import Limits, Rejected, decode_image
from mmpipe.promote import champion
from mmpipe.store import ObjectInfo, Store

log = logging.getLogger(__name__)

INCOMING_PREFIX = "incoming/"
TAG_PREFIX = "mmpipe-"
MEMBER_KEY = ["source_key", "source_etag", "member_path", "model_version"]


def current_champion(catalog: Catalog) -> tuple[str, str]:
    version = champion(catalog)
    if version is None:
        raise MmpipeError("no champion model yet: run the retrain DAG (or `mmpipe promote`) first")
    card_uri = catalog.scalar("SELECT card_uri FROM models WHERE model_version = :m", m=version)
    return version, card_uri


def list_unscored(store: Store, catalog: Catalog, prefix: str, model_version: str) -> list[ObjectInfo]:
    """Objects this model has not scored in their current version (key, ETag and LastModified: an
    identical re-upload keeps the ETag but loses its tags, so it is scored and tagged again)."""
    done = {
        (r["source_key"], r["source_etag"], r["source_modified"])
        for table in ("predictions", "score_failures")
        for r in catalog.query(
            f"SELECT DISTINCT source_key, source_etag, source_modified FROM {table} WHERE model_version = :m",
            m=model_version,
        )
    }
    return [o for o in store.list(prefix) if (o.key, o.etag, o.modified) not in done]


def decode_members(data: bytes, name: str, size: int, limits: Limits) -> tuple[list, list]:
    """All images in an object, archives expanded as ingest expands them:
    ([(path, pixels)], [(path, reason, detail)])."""
    leaves, rejected = expand(name, data, limits)
    images, failures = [], [(r["member_path"], r["reason"], r["detail"]) for r in rejected]
    for path, body, kind in leaves:
        try:
            images.append((path, decode_image(body, path or name, size, limits, kind).pixels))
        except Rejected as exc:
            failures.append((path, str(exc.reason), exc.detail))
    return images, failures


def summarise(probs: np.ndarray, classes: Sequence[str], threshold: float) -> dict[str, str]:
    """Object-level tags from its images' probabilities: the class with the highest mean probability."""
    mean = probs.mean(0)
    top = int(mean.argmax())
    review = bool((probs.max(1) < threshold).any() or (probs.argmax(1) != top).any())
    return {
        f"{TAG_PREFIX}modality": classes[top],
        f"{TAG_PREFIX}confidence": f"{mean[top]:.3f}",
        f"{TAG_PREFIX}images": str(len(probs)),
        f"{TAG_PREFIX}review": "yes" if review else "no",
    }


def _fetch(store: Store, limits: Limits, card: modelcard.ModelCard, obj: ObjectInfo) -> tuple:
    try:
        return obj, *decode_members(fetch_listed(store, obj, limits), obj.key, card.canonical_size, limits)
    except Rejected as exc:
        return obj, [], [("", str(exc.reason), exc.detail)]


def score_objects(
    settings: Settings,
    store: Store,
    catalog: Catalog,
    objects: Sequence[ObjectInfo],
    model_version: str,
    card_uri: str,
    run_id: str,
) -> dict[str, Any]:
    """Decode a batch of objects, predict all their images in one pass, write tags and rows."""
    model, card = modelcard.load(store, card_uri, modelcard.resolve_device(settings.device))
    with ThreadPoolExecutor(settings.ingest_workers) as pool:
        limits = Limits.from_settings(settings)
        fetched = list(pool.map(lambda o: _fetch(store, limits, card, o), objects))
    stacked = [px for _, images, _ in fetched for _, px in images]
    probs = modelcard.predict(model, card, np.stack(stacked)) if stacked else np.zeros((0, len(card.classes)))
    predictions, failures, tagged, cursor = [], [], {}, 0
    for obj, images, failed in fetched:
        base = {
            "source_key": obj.key,
            "source_etag": obj.etag,
            "source_modified": obj.modified,
            "model_version": model_version,
            "run_id": run_id,
        }
        failures += [base | {"member_path": p, "reason": r, "detail": d} for p, r, d in failed]
        if not images:
            continue
        mine = probs[cursor : cursor + len(images)]
        cursor += len(images)
        for (path, _), p in zip(images, mine, strict=True):
            top = int(p.argmax())
            predictions.append(
                base
                | {
                    "member_path": path,
                    "predicted": card.classes[top],
                    "confidence": float(p[top]),
                    "probs_json": "{"
                    + ", ".join(f'"{c}": {v:.5f}' for c, v in zip(card.classes, p, strict=True))
                    + "}",
                    "needs_review": bool(p[top] < settings.low_confidence),
                }
            )
        tags = summarise(mine, card.classes, settings.low_confidence) | {f"{TAG_PREFIX}model": model_version}
        store.put_tags(obj.key, tags)
        tagged[obj.key] = tags
    with catalog.begin() as conn:
        catalog.upsert("predictions", predictions, MEMBER_KEY, conn)
        catalog.upsert("score_failures", failures, MEMBER_KEY, conn)
    review = sum(1 for t in tagged.values() if t[f"{TAG_PREFIX}review"] == "yes")
    log.info(
        "scored %d objects (%d images), %d flagged for review, %d unusable members",
        len(tagged),
        len(predictions),
        review,
        len(failures),
    )
    return {
        "objects": len(objects),
        "tagged": len(tagged),
        "images": len(predictions),
        "review": review,
        "failures": len(failures),
    }
