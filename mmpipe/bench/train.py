"""``mmpipe bench train``: per candidate of the demo's retrain, training images/s through ``mmpipe
train``'s own epoch loop (plan shards read once, per-class augmentation and the card's preprocessing
in its loader) against a bare PyTorch loop over preprocessed in-memory tensors, same model, batch,
input size and frozen share; ``--amp`` adds the figures under bf16 autocast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmpipe import dataset, ingest, modelcard, pipeline, synth, train
from mmpipe.balance import augmenter
from mmpipe.bench.common import bench_settings, throwaway_store, timed
from mmpipe.candidate import Candidate
from mmpipe.candidate import defaults as candidate_defaults
from mmpipe.catalog import open_catalog, upgrade
from mmpipe.config import Settings
from mmpipe.errors import ConfigError
from mmpipe.models import create_model, freeze, set_train_mode
from mmpipe.store import open_store


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
    pairs = [(timed(lambda e=epoch: pipeline_epoch(e))[1], timed(bare_epoch)[1]) for epoch in range(epochs)]
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


def bench(
    images: int, epochs: int, workdir: Path, amp: bool, backbones: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Per demo candidate: training images/s through mmpipe train's data path vs a bare loop; with
    ``amp``, the same again under bf16 autocast (the gain it gives is the ``bf16_gain`` field)."""
    from mmpipe.demo import PROFILES

    if images < 50 or epochs < 1:
        raise ConfigError(f"--images must be at least 50 and --epochs at least 1, got {images}, {epochs}")
    canonical = PROFILES["demo"].canonical_size
    with throwaway_store(workdir) as server:
        settings = bench_settings(workdir / "train", server.endpoint).model_copy(
            update={"image_size": canonical}
        )
        store = open_store(settings)
        store.ensure_bucket()
        catalog = open_catalog(settings)
        upgrade(catalog)
        print(f"generating, ingesting and planning {images} synthetic images ({canonical} px curated)...")
        for obj in synth.generate(images, size=max(128, canonical), seed=0, archive_fraction=0):
            store.put(ingest.TRAINING_PREFIX + obj.key, obj.body)
        ingest.run(settings, store, catalog, "bench-train")
        dataset.validate_ingest(settings, store, catalog, "bench-train")
        plan_uri = dataset.prepare_dataset(settings, store, catalog, "bench-train")["plan_uri"]
        plan = store.get_json(store.key_of(plan_uri))
        data, load_s = timed(lambda: train.load_data(store, plan))
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
    return {"bench": "train", "results": results, "min_ratio": min(r["ratio"] for r in results)}
