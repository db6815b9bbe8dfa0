"""``mmpipe bench ingest|train``: mmpipe's paths against a naive baseline, measured in one process.

``bench train``: per candidate of the demo's retrain, training images/s through ``mmpipe train``'s
own epoch loop (plan shards read once, per-class augmentation and the card's preprocessing in its
loader) against a bare PyTorch loop over preprocessed in-memory tensors, same model, batch, input
size and frozen share; ``--amp`` adds the figures under bf16 autocast. The rest of this docstring is
``bench ingest``.


Both sides get the same synthetic DICOM objects, each in a fresh bucket of one throw-away embedded
store (SeaweedFS) on this machine. The naive loop is what a first script does: list, then for each
object get -> ``dcmread`` -> ``pixel_array`` -> min-max scale -> resize -> put one file per image.
mmpipe's side is the real :func:`mmpipe.ingest.run` (catalog on the embedded SQLite default), whose
figure includes everything the naive loop skips (pseudonyms, dedupe, quarantine, catalog rows).
A second run with nothing new measures the cost of an idle nightly run. The last line printed is
one JSON object with the figures.
"""

from __future__ import annotations

import gc
import io
import json
import logging
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

from mmpipe import dataset, decoding, embedded, ingest, modelcard, pipeline, synth, train
from mmpipe.balance import augmenter
from mmpipe.candidate import Candidate
from mmpipe.candidate import defaults as candidate_defaults
from mmpipe.catalog import open_catalog, upgrade
from mmpipe.config import Settings, get_settings
from mmpipe.errors import ConfigError, MmpipeError
from mmpipe.models import create_model, freeze, set_train_mode
from mmpipe.progress import progress
from mmpipe.store import Store, open_store

SOURCE_SIZE = 64  # side of the synthetic DICOM images
CANONICAL_SIZE = 64  # side both sides resize to
PREFIX = ingest.TRAINING_PREFIX


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


def _settings(home: Path, endpoint: str) -> Settings:
    return get_settings(
        home=home,
        s3_endpoint_url=endpoint,
        s3_bucket=f"bench-{uuid.uuid4().hex[:12]}",
        s3_access_key_id="bench",
        s3_secret_access_key="bench-secret",
        database_url=f"sqlite:///{home / 'catalog.db'}",
        pseudonym_salt="bench-salt-not-secret",
        image_size=CANONICAL_SIZE,
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


def run(
    what: str, objects: int = 2000, images: int = 200, epochs: int = 4, amp: bool = False,
    backbones: tuple[str, ...] = (),
) -> dict[str, Any]:  # fmt: skip
    """Run benchmark ``what`` (ingest, train), print its figures and a final JSON line, return the figures."""
    if what not in ("ingest", "train"):
        raise ConfigError(f"unknown benchmark {what!r}; available: ingest, train")
    for noisy in ("mmpipe.ingest", "mmpipe.dataset", "mmpipe.validate", "great_expectations"):
        logging.getLogger(noisy).setLevel(logging.WARNING)  # per-batch progress would drown the figures
    with tempfile.TemporaryDirectory(prefix="mmpipe-bench-") as tmp:
        if what == "ingest":
            figures = bench_ingest(objects, Path(tmp))
        else:
            figures = bench_train(images, epochs, Path(tmp), amp, backbones)
    print(json.dumps(figures))
    return figures
