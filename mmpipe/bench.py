"""``mmpipe bench ingest|score|train|synth``: mmpipe's paths against naive baselines, measured in one process.

``bench train``: per candidate of the demo's retrain, training images/s through ``mmpipe train``'s
own epoch loop (plan shards read once, per-class augmentation and the card's preprocessing in its
loader) against a bare PyTorch loop over preprocessed in-memory tensors, same model, batch, input
size and frozen share; ``--amp`` adds the figures under bf16 autocast.

``bench synth``: the thumbnail baselines per synthetic difficulty, and what a split by image instead
of by patient adds.

``bench ingest``: both sides get the same synthetic DICOM objects, each in a fresh bucket of one throw-away embedded
store (SeaweedFS) on this machine. The naive loop is what a first script does: list, then for each
object get -> ``dcmread`` -> ``pixel_array`` -> min-max scale -> resize -> put one file per image.
mmpipe's side is the real :func:`mmpipe.ingest.run` (catalog on the embedded SQLite default), whose
figure includes everything the naive loop skips (pseudonyms, dedupe, quarantine, catalog rows).
A second run with nothing new measures the cost of an idle nightly run. The last line printed is
one JSON object with the figures.

``bench score`` scores uncompressed synthetic DICOM at the demo size with a resnet18 champion
(random weights: speed only) three ways: mmpipe's :func:`mmpipe.score.run`; the model's bare forward
pass on ready tensors (same threads, same batch); and the naive loop (per object: get, ``dcmread``,
scale, predict one image, put tags). It also states what finding the unscored objects costs at
100,000 already-scored objects (synthetic catalog rows), with and without the watermark.
"""

from __future__ import annotations

import gc
import io
import json
import logging
import os
import resource
import tempfile
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import torch
from PIL import Image
from sklearn.ensemble import RandomForestClassifier
from sklearn.metrics import f1_score
from sklearn.model_selection import GroupShuffleSplit, ShuffleSplit
from sklearn.neighbors import KNeighborsClassifier

from mmpipe import baselines, dataset, decoding, embedded, ingest, modelcard, pipeline, synth, train
from mmpipe.balance import augmenter
from mmpipe.candidate import Candidate
from mmpipe.candidate import defaults as candidate_defaults
from mmpipe.catalog import open_catalog, upgrade
from mmpipe.config import CLASSES, Settings, get_settings
from mmpipe.errors import ConfigError, MmpipeError
from mmpipe.imaging import Limits, decode_image
from mmpipe.models import create_model, freeze, set_train_mode
from mmpipe.progress import progress
from mmpipe.store import Store, open_store

SOURCE_SIZE = 64  # side of the synthetic DICOM images
CANONICAL_SIZE = 64  # side both sides resize to
PREFIX = ingest.TRAINING_PREFIX
SYNTH_SOURCE_SIZE, SYNTH_SIZE = 128, 64  # bench synth: the demo's generated and curated sides


def naive_ingest(store: Store, prefix: str, size: int) -> int:
    """The baseline: one object at a time, one output file per image."""
    done = 0
    for obj in progress(store.list(prefix), desc="naive loop", unit="obj"):
        ds = pydicom.dcmread(io.BytesIO(store.get(obj.key)))
        pixels = ds.pixel_array.astype(np.float32)
        lo, hi = float(pixels.min()), float(pixels.max())
        scaled = ((pixels - lo) * (255.0 / max(hi - lo, 1e-6))).astype(np.uint8)
        resized = np.asarray(Image.fromarray(scaled).resize((size, size), Image.Resampling.BILINEAR))
        buffer = io.BytesIO()
        np.save(buffer, resized)
        store.put(f"naive/{obj.key}.npy", buffer.getvalue())
        done += 1
    return done


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """``fn()`` and its wall time, started from a collected heap: a nightly run starts in a fresh
    process, so the previous section's garbage is not this section's cost."""
    gc.collect()
    started = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - started


def _settings(home: Path, endpoint: str, **overrides: Any) -> Settings:
    return get_settings(
        home=home,
        s3_endpoint_url=endpoint,
        s3_bucket=f"bench-{uuid.uuid4().hex[:12]}",
        s3_access_key_id="bench",
        s3_secret_access_key="bench-secret",
        database_url=f"sqlite:///{home / 'catalog.db'}",
        pseudonym_salt="bench-salt-not-secret",
        image_size=CANONICAL_SIZE,
        **overrides,
    )


def bench_ingest(objects: int, workdir: Path) -> dict[str, Any]:
    if objects < 1:
        raise ConfigError(f"--objects must be at least 1, got {objects}")
    server = embedded.start(workdir / "store")
    try:
        print(f"generating {objects} synthetic DICOM objects ({SOURCE_SIZE} px)...", flush=True)
        corpus = list(synth.generate(objects, size=SOURCE_SIZE, formats={"dicom": 1.0}, archive_fraction=0))
        sides = {}
        for side in ("naive", "mmpipe"):
            settings = _settings(workdir / side, server.endpoint)
            store = open_store(settings)
            store.ensure_bucket()
            with ThreadPoolExecutor(8) as pool:
                list(pool.map(lambda o, s=store: s.put(PREFIX + o.key, o.body), corpus))
            sides[side] = (settings, store)

        _, naive_store = sides["naive"]
        done, naive_s = _timed(lambda: naive_ingest(naive_store, PREFIX, CANONICAL_SIZE))
        print(f"naive sequential loop: {done} objects in {naive_s:.1f} s = {done / naive_s:.1f} objects/s")

        settings, store = sides["mmpipe"]
        catalog = open_catalog(settings)
        upgrade(catalog)
        first, mmpipe_s = _timed(lambda: ingest.run(settings, store, catalog, "bench-first"))
        if first["images"] != objects:
            raise MmpipeError(f"bench corpus not fully ingested: {json.dumps(first)}")
        print(
            f"mmpipe ingest ({decoding.decode_processes(settings)} decode processes): {first['new_objects']} "
            f"objects in {mmpipe_s:.1f} s = {objects / mmpipe_s:.1f} objects/s"
        )
        rerun, rerun_s = _timed(lambda: ingest.run(settings, store, catalog, "bench-rerun"))
        print(f"rerun with nothing new: {rerun['new_objects']} objects in {rerun_s:.2f} s")
        catalog.dispose()
    finally:
        embedded.stop(server)
    mmpipe_rate, naive_rate = objects / mmpipe_s, done / naive_s
    return {
        "bench": "ingest",
        "objects": objects,
        "mmpipe_per_s": round(mmpipe_rate, 2),
        "naive_per_s": round(naive_rate, 2),
        "speedup": round(mmpipe_rate / naive_rate, 2),
        "rerun_fraction": round(rerun_s / mmpipe_s, 4),
    }


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
    _, seconds = _timed(lambda: gradcam.heatmaps(scorer.model, scorer.card, images, classes))
    return len(images) / seconds


def naive_score(store: Store, scorer: Any, prefix: str, size: int) -> int:
    """The baseline: per object, get -> dcmread -> scale -> resize -> predict one image -> put tags."""
    from mmpipe import modelcard

    done = 0
    for obj in progress(store.list(prefix), desc="naive loop", unit="obj"):
        pixels = pydicom.dcmread(io.BytesIO(store.get(obj.key))).pixel_array.astype(np.float32)
        lo, hi = float(pixels.min()), float(pixels.max())
        scaled = ((pixels - lo) * (255.0 / max(hi - lo, 1e-6))).astype(np.uint8)
        resized = np.asarray(Image.fromarray(scaled).resize((size, size), Image.Resampling.BILINEAR))
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
        (todo, skipped), seconds = _timed(lambda m=mark: score.select_unscored(catalog, listed, "bench-1", m))
        if (len(todo), skipped) != (100, history):
            raise MmpipeError(f"listing-cost check found {len(todo)} new, {skipped} skipped")
        figures[name] = seconds
    return figures


def bench_score(objects: int, workdir: Path) -> dict[str, Any]:
    from mmpipe import score

    if objects < 1:
        raise ConfigError(f"--objects must be at least 1, got {objects}")
    server = embedded.start(workdir / "store")
    try:
        print(f"generating {objects} uncompressed synthetic DICOM objects ({SOURCE_SIZE} px)...", flush=True)
        corpus = score_corpus(objects, SOURCE_SIZE)
        sides = {}
        for side in ("naive", "mmpipe"):
            # Random weights are never confident and contradict every header: here, as under a good
            # champion, nothing is flagged for review (each flagged image costs a Grad-CAM, measured apart).
            settings = _settings(
                workdir / side, server.endpoint, low_confidence=0.0, label_rules=NEUTRAL_RULES
            )
            store = open_store(settings)
            store.ensure_bucket()
            with ThreadPoolExecutor(8) as pool:
                list(
                    pool.map(
                        lambda a, s=store: s.put(f"{score.INCOMING_PREFIX}{a[0]:06d}.dcm", a[1]),
                        enumerate(corpus),
                    )
                )
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
        summary, mmpipe_s = _timed(lambda: score.run(settings, store, catalog, "bench-score"))
        cpu = {k: round(1000 * (v - before[k]) / objects, 2) for k, v in cpu_seconds(server.pid).items()}
        if summary["tagged"] + summary["unknown"] != objects:
            raise MmpipeError(f"bench corpus not fully scored: {json.dumps(summary)}")
        print(f"mmpipe score: {objects} objects in {mmpipe_s:.1f} s = {objects / mmpipe_s:.1f} images/s")
        print(f"CPU per object: scoring process {cpu['scoring']:.2f} ms (the model alone: {1000 / forward:.2f} ms), "
              f"decode and writer processes {cpu['helpers']:.2f} ms, store server {cpu['store']:.2f} ms, "
              f"on {os.cpu_count()} cores")  # fmt: skip
        _, naive_store, _ = sides["naive"]
        done, naive_s = _timed(
            lambda: naive_score(naive_store, scorer, score.INCOMING_PREFIX, CANONICAL_SIZE)
        )
        print(f"naive loop: {done} objects in {naive_s:.1f} s = {done / naive_s:.1f} images/s")
        rerun, rerun_s = _timed(lambda: score.run(settings, store, catalog, "bench-rerun"))
        print(f"rerun with nothing new: {rerun['skipped']} skipped in {rerun_s:.2f} s")
        listed, list_s = _timed(lambda: store.list(score.INCOMING_PREFIX))
        store_100k = list_s / len(listed) * SCORED_HISTORY
        print(
            f"store listing: {len(listed)} keys in {list_s:.2f} s (~{store_100k:.1f} s per {SCORED_HISTORY} keys)"
        )
        cost = listing_cost(sides["naive"][2], SCORED_HISTORY)
        print(f"finding 100 new among {SCORED_HISTORY} already-scored objects (catalog side, listing given): "
              f"{cost['watermark']:.2f} s with the watermark, {cost['no_watermark']:.2f} s without")  # fmt: skip
        for _, _, cat in sides.values():
            cat.dispose()
    finally:
        embedded.stop(server)
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
        "gradcam_per_s": round(cams, 2),
        "store_listing_100k_s": round(store_100k, 2),
        "listing_100k_watermark_s": round(cost["watermark"], 3),
        "listing_100k_no_watermark_s": round(cost["no_watermark"], 3),
    }


# --- bench train ----------------------------------------------------------------------------------


def demo_candidates() -> list[Candidate]:
    """The candidates the demo's retrain trains (its profile's Params, as the DAG reads them)."""
    from mmpipe.demo import PROFILES

    conf = dict(PROFILES["demo"].retrain_conf)
    specs, backbones = conf.pop("candidates", None), conf.pop("backbones", ())
    shared = {k: v for k, v in conf.items() if k in candidate_defaults()}
    return [Candidate.from_dict(c) for c in pipeline.candidates(specs, backbones, **shared)]


def _bench_model(candidate: Candidate, classes: int, device: torch.device) -> torch.nn.Module:
    """The candidate's network with its frozen share, seeded: init does not change the speed of a step."""
    recipe, _ = train.effective_recipe(candidate)
    torch.manual_seed(0)
    model = create_model(candidate.backbone, classes)
    freeze(model, recipe.freeze_ratio)
    return set_train_mode(model.to(device, memory_format=torch.channels_last))


def bench_candidate(
    settings: Settings, plan: dict, data: train.TrainingData, candidate: Candidate, epochs: int,
    amp: torch.dtype | None,
) -> dict[str, Any]:  # fmt: skip
    """``mmpipe train``'s epoch loop (augmentation and preprocessing in its loader) against a bare loop
    over preprocessed in-memory tensors of the same shape, same model, batch and frozen share;
    epochs alternate between the two so both see the same machine load."""
    recipe, _ = train.effective_recipe(candidate)
    device = modelcard.resolve_device(settings.device)
    classes = plan["classes"]
    card = train.training_card(plan, "", candidate, "bench", "bench", None, [], int(data.images.shape[-1]))
    transforms = {c: augmenter(plan["policies"].get(c, ())) for c in classes}
    loss_fn = train.criterion(plan, recipe, device)
    n, size, batch = len(data.entries), card.image_size, recipe.batch_size
    generator = torch.Generator().manual_seed(0)
    tensors = [
        (
            torch.randn(min(batch, n - start), 3, size, size, generator=generator).contiguous(
                memory_format=torch.channels_last
            ),
            torch.randint(0, len(classes), (min(batch, n - start),), generator=generator),
        )
        for start in range(0, n, batch)
    ]
    sides = {side: _bench_model(candidate, len(classes), device) for side in ("pipeline", "bare")}
    optimizers = {side: train.make_optimizer(recipe, model, recipe.lr) for side, model in sides.items()}
    for side, model in sides.items():  # first steps allocate: not part of either figure
        train.run_epoch(model, optimizers[side], loss_fn, tensors[:2], device, amp)
    model, optimizer = sides["bare"], optimizers["bare"]

    def bare_epoch() -> None:
        for inputs, target in tensors:
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                loss = loss_fn(model(inputs.to(device)), target.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        float(loss.detach())  # wait for the device

    batches = train.PlanBatches(data, card, transforms, plan["seed"], recipe.seed, batch)
    loader = train.TrainLoader(batches, settings.train_loader_workers, device)

    def pipeline_epoch(epoch: int) -> None:
        train.run_epoch(sides["pipeline"], optimizers["pipeline"], loss_fn, loader.epoch(epoch), device, amp)

    # Adjacent epochs of the two sides form a pair; on a shared machine the load drifts between
    # pairs more than within one, so the ratio is the median of the pairs' ratios.
    pairs = [(_timed(lambda e=epoch: pipeline_epoch(e))[1], _timed(bare_epoch)[1]) for epoch in range(epochs)]
    pipeline_rate = n * epochs / sum(p for p, _ in pairs)
    bare_rate = n * epochs / sum(b for _, b in pairs)
    ratio = float(np.median([b / p for p, b in pairs]))
    print(
        f"{candidate.name} ({candidate.backbone}, {size} px, batch {batch}, frozen {recipe.freeze_ratio}, "
        f"amp {candidate.amp if amp is None else 'bf16'}): mmpipe train {pipeline_rate:.1f} images/s, "
        f"bare loop {bare_rate:.1f} images/s, ratio {ratio:.2f} (per epoch pair: "
        f"{', '.join(f'{b / p:.2f}' for p, b in pairs)})",
        flush=True,
    )
    return {
        "backbone": candidate.backbone,
        "candidate": candidate.name,
        "pipeline_per_s": round(pipeline_rate, 2),
        "bare_per_s": round(bare_rate, 2),
        "ratio": round(ratio, 3),
    }


def bench_train(
    images: int, epochs: int, workdir: Path, amp: bool, backbones: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Per demo candidate: training images/s through mmpipe train's data path vs a bare loop; with
    ``amp``, the same again under bf16 autocast (the gain it gives is the ``bf16_gain`` field)."""
    from mmpipe.demo import PROFILES

    if images < 50 or epochs < 1:
        raise ConfigError(f"--images must be at least 50 and --epochs at least 1, got {images}, {epochs}")
    canonical = PROFILES["demo"].canonical_size
    server = embedded.start(workdir / "store")
    try:
        settings = _settings(workdir / "train", server.endpoint).model_copy(update={"image_size": canonical})
        store = open_store(settings)
        store.ensure_bucket()
        catalog = open_catalog(settings)
        upgrade(catalog)
        print(f"generating, ingesting and planning {images} synthetic images ({canonical} px curated)...")
        for obj in synth.generate(images, size=max(128, canonical), seed=0, archive_fraction=0):
            store.put(PREFIX + obj.key, obj.body)
        ingest.run(settings, store, catalog, "bench-train")
        dataset.validate_ingest(settings, store, catalog, "bench-train")
        plan_uri = dataset.prepare_dataset(settings, store, catalog, "bench-train")["plan_uri"]
        plan = store.get_json(store.key_of(plan_uri))
        data, load_s = _timed(lambda: train.load_data(store, plan))
        print(f"plan: {len(data.entries)} training images; shards read once in {load_s:.2f} s")
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, loader workers "
              f"{settings.train_loader_workers}; this machine may be shared: compare the ratios")  # fmt: skip
        results = []
        chosen = [c for c in demo_candidates() if not backbones or c.backbone in backbones]
        if not chosen:
            raise ConfigError(f"the demo trains no candidate of {', '.join(backbones)}")
        for candidate in chosen:
            figures = bench_candidate(settings, plan, data, candidate, epochs, train.amp_dtype(candidate))
            if amp:
                bf16 = bench_candidate(settings, plan, data, candidate, epochs, torch.bfloat16)
                figures |= {
                    "bf16_pipeline_per_s": bf16["pipeline_per_s"],
                    "bf16_bare_per_s": bf16["bare_per_s"],
                    "bf16_gain": round(bf16["pipeline_per_s"] / figures["pipeline_per_s"], 3),
                }
            results.append(figures)
        catalog.dispose()
    finally:
        embedded.stop(server)
    return {"bench": "train", "results": results, "min_ratio": min(r["ratio"] for r in results)}


def run(what: str, **options: Any) -> dict[str, Any]:
    """Run benchmark ``what`` with its options (see the CLI), print its figures and a final JSON line."""
    benches: dict[str, Callable[..., dict[str, Any]]] = {
        "ingest": bench_ingest,
        "score": bench_score,
        "train": bench_train,
        "synth": lambda images, workdir: bench_synth(images, SYNTH_SOURCE_SIZE, SYNTH_SIZE, seed=0),
    }
    if what not in benches:
        raise ConfigError(f"unknown benchmark {what!r}; available: {', '.join(benches)}")
    for noisy in ("mmpipe.ingest", "mmpipe.score", "mmpipe.decoding", "mmpipe.dataset", "mmpipe.validate",
                  "great_expectations"):  # fmt: skip
        logging.getLogger(noisy).setLevel(logging.WARNING)  # per-batch progress would drown the figures
    with tempfile.TemporaryDirectory(prefix="mmpipe-bench-") as tmp:
        figures = benches[what](workdir=Path(tmp), **options)
    print(json.dumps(figures))
    return figures


# --------------------------------------------------------------------------- bench synth


def decode_corpus(objects: list[synth.SynthObject], size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Canonical uint8 images (N, size, size), class indices and patient ids, decoded as ingest does."""
    limits = Limits(2**30, 10_000, 2**31, 8192 * 8192, 2048)
    pixels, labels, patients = [], [], []
    for obj in objects:
        leaves, rejected = decoding.expand(obj.key, obj.body, limits)
        if rejected:
            raise MmpipeError(f"synthetic archive rejected: {rejected}")
        for leaf in leaves:
            pixels.append(decode_image(leaf.body, leaf.path or obj.key, size, limits, leaf.kind).pixels)
            labels.append(CLASSES.index(obj.label))
            patients.append(obj.patient_id)
    return np.stack(pixels), np.array(labels), np.array(patients)


def _random_forest(train: np.ndarray, labels: np.ndarray, test: np.ndarray, n_classes: int) -> np.ndarray:
    model = RandomForestClassifier(300, min_samples_leaf=2, random_state=0, n_jobs=1).fit(train, labels)
    probs = np.zeros((len(test), n_classes))
    probs[:, model.classes_] = model.predict_proba(test)
    return probs


def thumbnail_scores(
    images: np.ndarray, labels: np.ndarray, train: np.ndarray, test: np.ndarray
) -> dict[str, float]:
    """Test macro-F1 of the thumbnail baselines: the gate's linear model on 16x16, a random forest on 4x4."""
    n = len(CLASSES)
    linear = baselines.thumbnail_linear(images[train], labels[train], images[test], n)
    small = baselines.thumbnails(images, 4)
    forest = _random_forest(small[train], labels[train], small[test], n)
    return {
        "linear_16": round(f1_score(labels[test], linear.argmax(1), average="macro"), 4),
        "rf_4": round(f1_score(labels[test], forest.argmax(1), average="macro"), 4),
    }


def _nearest_neighbour(train: np.ndarray, labels: np.ndarray, test: np.ndarray, n_classes: int) -> np.ndarray:
    thumbs = baselines.thumbnails(np.concatenate([train, test]))
    model = KNeighborsClassifier(1).fit(thumbs[: len(train)], labels)
    probs = np.zeros((len(test), n_classes))
    probs[:, model.classes_] = model.predict_proba(thumbs[len(train) :])
    return probs


SPLIT_MODELS = {"linear_16": baselines.thumbnail_linear, "knn_16": _nearest_neighbour}


def split_inflation(
    images: np.ndarray, labels: np.ndarray, patients: np.ndarray, repeats: int = 5
) -> dict[str, dict[str, float]]:
    """Mean test macro-F1 of thumbnail models (16x16 linear, 16x16 nearest neighbour) when 30% of the
    *images* are held out, and when 30% of the *patients* are: the difference is what a split by
    image would wrongly add (a patient's other images sit in training)."""
    scores = {(m, s): [] for m in SPLIT_MODELS for s in ("image_split", "patient_split")}
    for seed in range(repeats):
        splits = {
            "image_split": next(ShuffleSplit(1, test_size=0.3, random_state=seed).split(images)),
            "patient_split": next(
                GroupShuffleSplit(1, test_size=0.3, random_state=seed).split(images, groups=patients)
            ),
        }
        for (model, split), values in scores.items():
            fit, test = splits[split]
            probs = SPLIT_MODELS[model](images[fit], labels[fit], images[test], len(CLASSES))
            values.append(f1_score(labels[test], probs.argmax(1), average="macro"))
    out = {}
    for model in SPLIT_MODELS:
        image, patient = (
            round(float(np.mean(scores[model, s])), 4) for s in ("image_split", "patient_split")
        )
        out[model] = {"image_split": image, "patient_split": patient, "inflation": round(image - patient, 4)}
    return out


def bench_synth(images: int, source_size: int, size: int, seed: int) -> dict[str, Any]:
    """Thumbnail baselines per difficulty on a patient-level split, and the image-split inflation.

    A benchmark on which a linear model over 16x16 thumbnails is nearly as good as a fine-tuned CNN
    cannot tell backbones apart; the hard difficulty exists to keep that baseline low.
    """
    if images < 50:
        raise ConfigError(f"--images must be at least 50 (a 30% patient split per class), got {images}")
    results = {}
    for difficulty in synth.DIFFICULTIES:
        started = time.perf_counter()
        objects = list(synth.generate(images, size=source_size, seed=seed, difficulty=difficulty))
        pixels, labels, patients = decode_corpus(objects, size)
        train, test = next(
            GroupShuffleSplit(1, test_size=0.3, random_state=seed).split(pixels, groups=patients)
        )
        scores = thumbnail_scores(pixels, labels, train, test)
        inflation = split_inflation(pixels, labels, patients)
        print(
            f"{difficulty:>9}: {len(pixels)} images of {len(set(patients))} patients "
            f"({time.perf_counter() - started:.0f} s); patient-level split, test macro-F1: "
            f"linear 16x16 {scores['linear_16']:.3f}, random forest 4x4 {scores['rf_4']:.3f}",
            flush=True,
        )
        for model, figures in inflation.items():
            print(
                f"{'':>11}{model}: split by image {figures['image_split']:.3f}, by patient "
                f"{figures['patient_split']:.3f} (inflation {figures['inflation']:+.3f})",
                flush=True,
            )
        results[difficulty] = scores | {"split": inflation}
    return {"bench": "synth", "images": images, "size": size, "results": results}
