"""``mmpipe bench synth``: the thumbnail baselines per synthetic difficulty, and what a split by
image instead of by patient adds.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.ensemble import RandomForestClassifier
from sklearn.metrics import f1_score
from sklearn.model_selection import GroupShuffleSplit, ShuffleSplit
from sklearn.neighbors import KNeighborsClassifier

from mmpipe import baselines, decoding, synth
from mmpipe.config import CLASSES
from mmpipe.errors import ConfigError, MmpipeError
from mmpipe.imaging import Limits, decode_image

SYNTH_SOURCE_SIZE, SYNTH_SIZE = 128, 64  # bench synth: the demo's generated and curated sides


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


def bench(
    images: int,
    workdir: Path | None = None,
    source_size: int = SYNTH_SOURCE_SIZE,
    size: int = SYNTH_SIZE,
    seed: int = 0,
) -> dict[str, Any]:
    """Thumbnail baselines per difficulty on a patient-level split, and the image-split inflation
    (``workdir`` unused: nothing is stored).

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
