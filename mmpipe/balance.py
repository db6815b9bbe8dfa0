"""Rebalance and augment per modality: from usable images to a versioned training plan.

Following the paper, minority classes are brought up to the target count by augmented copies and
majority classes are subsampled, so classes reach about equal counts. Augmentation policies are per
class (defaults from the paper's Table I) and expressed with torchvision.transforms.v2. The plan is
deterministic: the same members, policies and seed give the same plan and the same version hash.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from statistics import median
from typing import Any

from mmpipe.catalog import Catalog
from mmpipe.errors import ConfigError, MmpipeError
from mmpipe.store import Store

#: Table I of the paper (rotations of 30/60 degrees from its text). Op names: see :func:`augmenter`.
DEFAULT_POLICIES: dict[str, tuple[str, ...]] = {
    "brain_mri": ("hflip",),
    "chest_xray": ("hflip",),
    "retinal_oct": (),
    "lung_ct": ("hflip", "vflip", "rotate", "zoom"),
    "liver_ct": ("hflip", "vflip"),
}
KNOWN_OPS = ("hflip", "vflip", "rotate", "zoom")


def augmenter(ops: Sequence[str]) -> Any:
    """A torchvision v2 transform for one class's policy (identity for an empty policy)."""
    from torchvision.transforms import v2

    unknown = set(ops) - set(KNOWN_OPS)
    if unknown:
        raise ConfigError(f"unknown augmentation op(s) {sorted(unknown)}; known: {', '.join(KNOWN_OPS)}")
    table = {
        "hflip": v2.RandomHorizontalFlip(p=0.5),
        "vflip": v2.RandomVerticalFlip(p=0.5),
        "rotate": v2.RandomChoice([v2.RandomRotation((a, a)) for a in (-60, -30, 30, 60)]),
        "zoom": v2.RandomAffine(degrees=0, scale=(1.0, 1.25)),
    }
    return v2.Compose([table[op] for op in ops]) if ops else v2.Identity()


def target_count(counts: Mapping[str, int], target: str | int) -> int:
    if isinstance(target, int):
        return target
    if target == "median":
        return int(median(counts.values()))
    if target == "max":
        return max(counts.values())
    raise ConfigError(f"unknown balance target {target!r}: use 'median', 'max' or an integer")


def balance(members: Sequence[dict], classes: Sequence[str], target: str | int, seed: int) -> list[dict]:
    """Subsample classes above the target and add augmented repeats to classes below it."""
    rng = random.Random(seed)
    by_class: dict[str, list[dict]] = defaultdict(list)
    for m in sorted(members, key=lambda m: m["image_id"]):
        by_class[m["label"]].append(m)
    missing = [c for c in classes if not by_class[c]]
    if missing:
        raise MmpipeError(f"no training images for class(es) {', '.join(missing)}: ingest labelled studies first")
    goal = target_count({c: len(by_class[c]) for c in classes}, target)
    plan: list[dict] = []
    for c in classes:
        originals = by_class[c]
        if len(originals) >= goal:
            chosen = rng.sample(originals, goal)
            plan.extend(_entry(m, augment=False) for m in chosen)
        else:
            plan.extend(_entry(m, augment=False) for m in originals)
            extra = [originals[i % len(originals)] for i in range(goal - len(originals))]
            rng.shuffle(extra)
            plan.extend(_entry(m, augment=True) for m in extra)
    return plan


def _entry(m: dict, augment: bool) -> dict:
    return {
        "image_id": m["image_id"],
        "label": m["label"],
        "shard_uri": m["shard_uri"],
        "shard_index": m["shard_index"],
        "augment": augment,
    }


def loss_weights(counts: Mapping[str, int], classes: Sequence[str]) -> list[float]:
    """Inverse-frequency class weights (mean 1), for an optional class-weighted loss."""
    inv = [1.0 / max(counts.get(c, 0), 1) for c in classes]
    scale = len(inv) / sum(inv)
    return [round(w * scale, 6) for w in inv]


def build_plan(
    images: Sequence[dict],
    *,
    classes: Sequence[str],
    test_snapshot: str,
    seed: int = 0,
    target: str | int = "median",
    policies: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, Any]:
    """The training plan: balanced train entries, all val entries, policies, weights and version."""
    policies = {c: tuple((policies or DEFAULT_POLICIES).get(c, ())) for c in classes}
    for ops in policies.values():
        augmenter(ops)  # validate op names early
    train = [i for i in images if i["split"] == "train"]
    val = [_entry(i, augment=False) for i in sorted(images, key=lambda i: i["image_id"]) if i["split"] == "val"]
    if not val:
        raise MmpipeError("validation split is empty: more patients are needed before training")
    entries = balance(train, classes, target, seed)
    before = Counter(i["label"] for i in train)
    body = {
        "classes": list(classes),
        "seed": seed,
        "target": target,
        "policies": {c: list(p) for c, p in policies.items()},
        "test_snapshot": test_snapshot,
        "train": entries,
        "val": val,
    }
    version = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]
    return body | {
        "dataset_version": version,
        "class_counts_before": {c: before[c] for c in classes},
        "class_counts_after": dict(Counter(e["label"] for e in entries)),
        "loss_weights": loss_weights(before, classes),
    }


def save_plan(store: Store, catalog: Catalog, plan: dict[str, Any]) -> str:
    """Write the plan to ``plans/`` and record its dataset version (idempotent)."""
    uri = store.put_json(f"plans/{plan['dataset_version']}.json", plan)
    row = {
        "dataset_version": plan["dataset_version"],
        "plan_uri": uri,
        "test_snapshot": plan["test_snapshot"],
        "seed": plan["seed"],
        "n_train": len(plan["train"]),
        "n_val": len(plan["val"]),
        "class_counts": json.dumps(plan["class_counts_after"], sort_keys=True),
    }
    catalog.upsert("dataset_versions", [row], ["dataset_version"], update=False)
    return uri
