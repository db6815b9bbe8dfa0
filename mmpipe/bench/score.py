"""``mmpipe bench score``: uncompressed synthetic DICOM at the demo size, scored with a resnet18
champion (random weights: speed only) three ways: mmpipe's :func:`mmpipe.score.run`; the model's
bare forward pass on ready tensors (same threads, same batch); and the naive loop (per object: get,
``dcmread``, scale, predict one image, put tags). It also states where the CPU goes and what finding
the unscored objects costs at 100,000 already-scored objects (synthetic catalog rows), with and
without the watermark.
"""

from __future__ import annotations

import json
import os
import resource
import time
from pathlib import Path
from typing import Any

import numpy as np

from mmpipe import synth
from mmpipe.bench.common import (
    CANONICAL_SIZE,
    SOURCE_SIZE,
    naive_pixels,
    seeded_sides,
    throwaway_store,
    timed,
)
from mmpipe.catalog import open_catalog, upgrade
from mmpipe.config import Settings
from mmpipe.errors import ConfigError, MmpipeError
from mmpipe.progress import progress
from mmpipe.store import Store

SCORE_BACKBONE = "resnet18"
#: Header rules under which every class admits every header (the header check flags nothing).
NEUTRAL_RULES = [{"study_description": ".*", "label": c} for c in synth.CLASSES]
SCORED_HISTORY = 100_000  # already-scored objects for the listing-cost figure


def score_corpus(objects: int, size: int) -> list[bytes]:
    """Uncompressed synthetic DICOM of the five classes, ``size`` px."""
    out = []
    for n in range(objects):
        label = synth.CLASSES[n % len(synth.CLASSES)]
        array, hints = synth.render(label, np.random.default_rng([7, n]), size)
        uid = f"1.2.826.0.1.3680043.8.498.{n + 1}"
        out.append(synth.dicom_bytes(array, label=label, patient_id=f"B{n}", study_uid=uid + ".1",
                                     series_uid=uid + ".2", sop_uid=uid + ".3", hints=hints | {"rle": False}))  # fmt: skip
    return out


def register_champion(settings: Settings, store: Store, catalog: Any) -> tuple[str, str]:
    from mmpipe import modelcard
    from mmpipe.models import create_model, get_spec

    spec = get_spec(SCORE_BACKBONE)
    card = modelcard.ModelCard(
        model_version="bench-1", backbone=SCORE_BACKBONE, classes=settings.classes,
        canonical_size=settings.image_size, image_size=settings.image_size, channel_mode="replicate",
        mean=spec.mean, std=spec.std, init="random", weights_fingerprint=None, freeze_ratio=0.0,
        dataset_version="bench", plan_uri="", training_run_id="bench", best_val_macro_f1=0.0,
    )  # fmt: skip
    _, card_uri = modelcard.save(
        store, "models/bench-1", create_model(SCORE_BACKBONE, len(card.classes)), card
    )
    catalog.upsert("models", [{"model_version": "bench-1", "training_run_id": "bench", "backbone": SCORE_BACKBONE,
                               "checkpoint_uri": "", "card_uri": card_uri}], ["model_version"])  # fmt: skip
    catalog.upsert("model_aliases", [{"alias": "champion", "model_version": "bench-1"}], ["alias"])
    return "bench-1", card_uri


def cpu_seconds(store_pid: int) -> dict[str, float]:
    """CPU seconds so far of this process, its ended child processes (decode and writer pools) and
    the store server (Linux /proc; 0 elsewhere): where a scoring run's CPU goes on a shared machine."""
    own, ended = os.times(), resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        fields = Path(f"/proc/{store_pid}/stat").read_text().rsplit(")", 1)[1].split()
        server = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
    except (OSError, IndexError, ValueError):
        server = 0.0
    return {"scoring": own.user + own.system, "helpers": ended.ru_utime + ended.ru_stime, "store": server}


def bare_forward(scorer: Any, images: int, size: int) -> float:
    """Images/s of the model alone on ready, preprocessed tensors (channels_last, scoring's batch)."""
    import torch

    from mmpipe import modelcard, score

    batch = torch.randint(0, 256, (score.INFER_BATCH, size, size), dtype=torch.uint8)
    x = modelcard.preprocess_for(scorer.card, batch)
    with (
        torch.inference_mode(),
        torch.autocast("cpu", dtype=scorer.autocast, enabled=scorer.autocast is not None),
    ):
        scorer.model(x)  # warm-up
        rounds = max(1, images // score.INFER_BATCH)
        started = time.perf_counter()
        for _ in range(rounds):
            scorer.model(x)
        return rounds * score.INFER_BATCH / (time.perf_counter() - started)


def gradcam_rate(scorer: Any, size: int) -> float:
    """Images/s of Grad-CAM maps (forward and backward at float32), what each flagged image costs."""
    from mmpipe import gradcam, score

    images = np.random.default_rng(0).integers(0, 256, (score.INFER_BATCH, size, size), dtype=np.uint8)
    classes = np.zeros(len(images), dtype=np.int64)
    _, seconds = timed(lambda: gradcam.heatmaps(scorer.model, scorer.card, images, classes))
    return len(images) / seconds


def naive_score(store: Store, scorer: Any, prefix: str, size: int) -> int:
    """The baseline: per object, get -> dcmread -> scale -> resize -> predict one image -> put tags."""
    from mmpipe import modelcard

    done = 0
    for obj in progress(store.list(prefix), desc="naive loop", unit="obj"):
        resized = naive_pixels(store.get(obj.key), size)
        probs = modelcard.predict(scorer.model, scorer.card, resized[None])[0]
        top = int(probs.argmax())
        store.put_tags(
            obj.key, {"naive-modality": scorer.card.classes[top], "naive-confidence": f"{probs[top]:.3f}"}
        )
        done += 1
    return done


def listing_cost(catalog: Any, history: int) -> dict[str, float]:
    """Seconds to find the unscored objects among ``history`` already-scored ones plus 100 new, with
    the watermark (only new objects are looked up) and without it (every listed key looked up)."""
    from mmpipe import score
    from mmpipe.store import ObjectInfo

    old = "2026-01-01T00:00:00.000Z"
    rows = [{"model_version": "bench-1", "source_key": f"hist/{n:07d}.dcm", "source_etag": "e", "source_modified": old,
             "fate": "tagged", "reason": "", "settled": True, "review_reasons": "", "images": 1, "tags_written": 6,
             "tags_left_out": 0, "run_id": "history"} for n in range(history)]  # fmt: skip
    for start in range(0, history, 10_000):
        catalog.upsert("scored_objects", rows[start : start + 10_000], score.OBJECT_KEY)
    listed = [ObjectInfo(r["source_key"], "e", 1, old) for r in rows]
    listed += [ObjectInfo(f"new/{n}.dcm", "e", 1, "2026-06-01T00:00:00.000Z") for n in range(100)]
    figures = {}
    for name, mark in (("watermark", "2026-03-01T00:00:00+00:00"), ("no_watermark", None)):
        (todo, skipped), seconds = timed(lambda m=mark: score.select_unscored(catalog, listed, "bench-1", m))
        if (len(todo), skipped) != (100, history):
            raise MmpipeError(f"listing-cost check found {len(todo)} new, {skipped} skipped")
        figures[name] = seconds
    return figures


def bench(objects: int, workdir: Path) -> dict[str, Any]:
    from mmpipe import score

    if objects < 1:
        raise ConfigError(f"--objects must be at least 1, got {objects}")
    with throwaway_store(workdir) as server:
        print(f"generating {objects} uncompressed synthetic DICOM objects ({SOURCE_SIZE} px)...", flush=True)
        corpus = score_corpus(objects, SOURCE_SIZE)
        # Random weights are never confident and contradict every header: here, as under a good
        # champion, nothing is flagged for review (each flagged image costs a Grad-CAM, measured apart).
        objects_in = {f"{score.INCOMING_PREFIX}{n:06d}.dcm": body for n, body in enumerate(corpus)}
        sides = {}
        for side, (settings, store) in seeded_sides(
            workdir, server.endpoint, objects_in, low_confidence=0.0, label_rules=NEUTRAL_RULES
        ).items():
            catalog = open_catalog(settings)
            upgrade(catalog)
            version, card_uri = register_champion(settings, store, catalog)
            sides[side] = (settings, store, catalog)
        settings, store, catalog = sides["mmpipe"]
        scorer = score.Scorer.load(settings, store, version, card_uri)
        forward = bare_forward(scorer, max(objects, 256), CANONICAL_SIZE)
        print(f"bare forward ({SCORE_BACKBONE}, {CANONICAL_SIZE} px, batch {score.INFER_BATCH}, "
              f"{score.torch_threads(settings)} torch threads): {forward:.1f} images/s")  # fmt: skip

        cams = gradcam_rate(scorer, CANONICAL_SIZE)
        print(f"Grad-CAM of a flagged image: {cams:.1f} images/s")
        before = cpu_seconds(server.pid)
        summary, mmpipe_s = timed(lambda: score.run(settings, store, catalog, "bench-score"))
        cpu = {k: round(1000 * (v - before[k]) / objects, 2) for k, v in cpu_seconds(server.pid).items()}
        if summary["tagged"] + summary["unknown"] != objects:
            raise MmpipeError(f"bench corpus not fully scored: {json.dumps(summary)}")
        print(f"mmpipe score: {objects} objects in {mmpipe_s:.1f} s = {objects / mmpipe_s:.1f} images/s")
        cores = score.usable_cpus()
        ceiling = cores * 1000 / sum(cpu.values())
        print(f"CPU per object: scoring process {cpu['scoring']:.2f} ms (the model alone: {1000 / forward:.2f} ms), "
              f"decode and writer processes {cpu['helpers']:.2f} ms, store server {cpu['store']:.2f} ms; "
              f"{cores} cores spending that much allow at most {ceiling:.1f} images/s "
              f"(vs_forward {ceiling / forward:.2f})")  # fmt: skip
        _, naive_store, _ = sides["naive"]
        done, naive_s = timed(lambda: naive_score(naive_store, scorer, score.INCOMING_PREFIX, CANONICAL_SIZE))
        print(f"naive loop: {done} objects in {naive_s:.1f} s = {done / naive_s:.1f} images/s; scoring at the "
              f"bare forward's speed would be {forward * naive_s / done:.2f}x it")  # fmt: skip
        rerun, rerun_s = timed(lambda: score.run(settings, store, catalog, "bench-rerun"))
        print(f"rerun with nothing new: {rerun['skipped']} skipped in {rerun_s:.2f} s")
        listed, list_s = timed(lambda: store.list(score.INCOMING_PREFIX))
        store_100k = list_s / len(listed) * SCORED_HISTORY
        print(
            f"store listing: {len(listed)} keys in {list_s:.2f} s (~{store_100k:.1f} s per {SCORED_HISTORY} keys)"
        )
        cost = listing_cost(sides["naive"][2], SCORED_HISTORY)
        print(f"finding 100 new among {SCORED_HISTORY} already-scored objects (catalog side, listing given): "
              f"{cost['watermark']:.2f} s with the watermark, {cost['no_watermark']:.2f} s without")  # fmt: skip
        for _, _, cat in sides.values():
            cat.dispose()
    rate, naive_rate = objects / mmpipe_s, done / naive_s
    return {
        "bench": "score",
        "objects": objects,
        "images_per_s": round(rate, 2),
        "bare_forward_per_s": round(forward, 2),
        "naive_per_s": round(naive_rate, 2),
        "vs_forward": round(rate / forward, 3),
        "vs_naive": round(rate / naive_rate, 2),
        "cpu_ms_per_object": cpu,
        "cpu_ceiling_per_s": round(ceiling, 2),
        "gradcam_per_s": round(cams, 2),
        "store_listing_100k_s": round(store_100k, 2),
        "listing_100k_watermark_s": round(cost["watermark"], 3),
        "listing_100k_no_watermark_s": round(cost["no_watermark"], 3),
    }
