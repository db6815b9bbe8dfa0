"""Rebalance and augment per modality: from usable images to a versioned training plan.

Following the paper, minority classes are brought up to the target count by augmented copies and
majority classes are subsampled, so classes reach about equal counts (per-class targets may
override). Augmentation policies are per class (defaults from the paper's Table I, rotations of
30/60 degrees from its text), applied on the fly by training, each augmented sample seeded from
(plan seed, epoch, plan position): every candidate of a plan sees the same augmented images. The
plan is deterministic: the same members, policies, preprocessing and seed give the same plan and
the same version hash.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from statistics import median
from typing import Any

import torch
import torch.nn.functional as F

from mmpipe.catalog import Catalog
from mmpipe.errors import ConfigError, MmpipeError
from mmpipe.store import Store

#: Table I of the paper (rotations of 30/60 degrees from its text). Op grammar: see :func:`parse_op`.
DEFAULT_POLICIES: dict[str, tuple[str, ...]] = {
    "brain_mri": ("hflip",),
    "chest_xray": ("hflip",),
    "retinal_oct": (),
    "lung_ct": ("hflip", "vflip", "rotate", "zoom"),
    "liver_ct": ("hflip", "vflip"),
}
#: Each op's arguments when none are given: flip probability, rotation angles (each drawn with
#: either sign), largest zoom factor, CLAHE clip limit (applied to half the augmented copies).
OP_DEFAULTS: dict[str, tuple[float, ...]] = {
    "hflip": (0.5,),
    "vflip": (0.5,),
    "rotate": (30.0, 60.0),
    "zoom": (1.25,),
    "clahe": (2.0,),
}
KNOWN_OPS = tuple(OP_DEFAULTS)
TARGETS = ("median", "max", "min", "none")


def parse_op(spec: str) -> tuple[str, tuple[float, ...]]:
    """``"name"`` or ``"name:a,b"`` -> (name, arguments), checked; e.g. ``"rotate:15,30"``, ``"zoom:1.1"``."""
    name, _, raw = str(spec).strip().partition(":")
    if name not in OP_DEFAULTS:
        raise ConfigError(f"unknown augmentation op {spec!r}; known: {', '.join(KNOWN_OPS)}")
    try:
        args = tuple(float(a) for a in raw.split(",")) if raw.strip() else OP_DEFAULTS[name]
    except ValueError:
        raise ConfigError(
            f"augmentation op {spec!r}: arguments must be numbers, e.g. 'rotate:15,30'"
        ) from None
    valid = {
        "hflip": len(args) == 1 and 0 <= args[0] <= 1,
        "vflip": len(args) == 1 and 0 <= args[0] <= 1,
        "rotate": len(args) >= 1 and all(0 < a <= 180 for a in args),
        "zoom": len(args) == 1 and 1 <= args[0] <= 4,
        "clahe": len(args) == 1 and args[0] > 0,
    }[name]
    if not valid:
        raise ConfigError(
            f"augmentation op {spec!r} out of range: flips take one probability in [0, 1], rotate angles in "
            "(0, 180], zoom one factor in [1, 4], clahe one clip limit > 0"
        )
    return name, args


def canonical_op(spec: str) -> str:
    """The op with its arguments spelled out, so equivalent policies hash alike."""
    name, args = parse_op(spec)
    return f"{name}:{','.join(f'{a:g}' for a in args)}"


def resolve_policies(classes: Sequence[str], overrides: Mapping[str, Sequence[str]] | None = None) -> dict:
    """Per-class canonical op lists: the paper's defaults, with whole-class ``overrides``."""
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(classes))
    if unknown:
        raise ConfigError(
            f"augmentation policy for unknown class(es) {unknown}; classes: {', '.join(classes)}"
        )
    return {c: [canonical_op(op) for op in overrides.get(c, DEFAULT_POLICIES.get(c, ()))] for c in classes}


@dataclass(frozen=True)
class Policy:
    """One class's augmentation policy, parsed once: what :func:`augment_batch` draws and applies."""

    ops: tuple[tuple[str, tuple[float, ...]], ...]


def augmenter(ops: Sequence[str]) -> Policy:
    """The parsed policy of one class (an empty policy leaves its images as they are)."""
    return Policy(tuple(parse_op(op) for op in ops))


@dataclass
class _Draws:
    """Per-sample parameters of a batch's augmented samples (index into the batch)."""

    hflip: list[int] = field(default_factory=list)
    vflip: list[int] = field(default_factory=list)
    warp: list[tuple[int, float, float]] = field(default_factory=list)  # (index, degrees, zoom)
    clahe: list[tuple[int, float]] = field(default_factory=list)  # (index, clip limit)


def _draw(policy: Policy, rng: random.Random, i: int, draws: _Draws) -> None:
    """One sample's parameters, one uniform per op in policy order."""
    degrees, zoom = 0.0, 1.0
    for name, args in policy.ops:
        u = rng.random()
        if name == "hflip" and u < args[0]:
            draws.hflip.append(i)
        elif name == "vflip" and u < args[0]:
            draws.vflip.append(i)
        elif name == "rotate":  # one of the configured angles, either sign
            choice = min(int(u * 2 * len(args)), 2 * len(args) - 1)
            degrees = args[choice // 2] * (1 if choice % 2 else -1)
        elif name == "zoom":
            zoom = 1.0 + u * (args[0] - 1.0)
        elif name == "clahe" and u < 0.5:
            draws.clahe.append((i, args[0]))
    if degrees or zoom != 1.0:
        draws.warp.append((i, degrees, zoom))


def _warp(images: torch.Tensor, degrees: torch.Tensor, zoom: torch.Tensor) -> torch.Tensor:
    """Rotate by ``degrees`` and zoom in by ``zoom`` about the centre, nearest neighbour, zero fill:
    uint8 (B, H, W) in one gather. Element-wise float64 arithmetic, so a sample's pixels do not
    depend on the other samples of the batch."""
    b, h, w = images.shape
    rad = torch.deg2rad(degrees.double()).view(-1, 1, 1)
    cos, sin = rad.cos() / zoom.view(-1, 1, 1), rad.sin() / zoom.view(-1, 1, 1)
    cy, cx = (h - 1) / 2, (w - 1) / 2
    dy = (torch.arange(h, dtype=torch.float64) - cy).view(1, -1, 1)
    dx = (torch.arange(w, dtype=torch.float64) - cx).view(1, 1, -1)
    sx = (cx + cos * dx + sin * dy).round()
    sy = (cy - sin * dx + cos * dy).round()
    inside = (sx >= 0) & (sx <= w - 1) & (sy >= 0) & (sy <= h - 1)
    index = (sy.clamp(0, h - 1) * w + sx.clamp(0, w - 1)).long().view(b, -1)
    out = images.reshape(b, -1).gather(1, index).view(b, h, w)
    return out * inside


def sample_seed(seed: int, epoch: int, position: int) -> int:
    """The RNG seed of one augmented sample: a pure function of the plan seed, epoch and plan position."""
    digest = hashlib.sha256(f"{seed}:{epoch}:{position}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def augment_batch(
    images: torch.Tensor, entries: Sequence[dict], positions: Sequence[int], policies: Mapping[str, Policy],
    seed: int, epoch: int,
) -> torch.Tensor:  # fmt: skip
    """Apply each augmented entry's class policy to its uint8 image (B, H, W), deterministically.

    Every sample draws its parameters from its own generator (:func:`sample_seed`), so the result
    depends neither on batch composition nor on the global RNG; the work is then batched (this runs
    beside the model on the same cores): flips, then rotation and zoom in one resampling, then CLAHE.
    """
    draws = _Draws()
    for i, (entry, position) in enumerate(zip(entries, positions, strict=True)):
        if entry["augment"]:
            _draw(policies[entry["label"]], random.Random(sample_seed(seed, epoch, position)), i, draws)
    out = images.clone()
    if draws.hflip:
        out[draws.hflip] = out[draws.hflip].flip(-1)
    if draws.vflip:
        out[draws.vflip] = out[draws.vflip].flip(-2)
    if draws.warp:
        index, degrees, zoom = zip(*draws.warp, strict=True)
        out[list(index)] = _warp(out[list(index)], torch.tensor(degrees), torch.tensor(zoom))
    if draws.clahe:
        from mmpipe.modelcard import clahe

        for i, clip_limit in draws.clahe:
            out[i] = clahe(out[i], clip_limit)
    return out


def target_count(counts: Mapping[str, int], target: str | int) -> int | None:
    """The common per-class count; None for ``"none"`` (every class keeps its count)."""
    if isinstance(target, int) and not isinstance(target, bool):
        if target < 1:
            raise ConfigError(f"balance target must be a positive count, got {target}")
        return target
    if target == "median":
        return int(median(counts.values()))
    if target == "max":
        return max(counts.values())
    if target == "min":
        return min(counts.values())
    if target == "none":
        return None
    raise ConfigError(f"unknown balance target {target!r}: use {', '.join(TARGETS)} or a positive integer")


def per_class_targets(
    counts: Mapping[str, int],
    classes: Sequence[str],
    target: str | int,
    overrides: Mapping[str, int] | None = None,
) -> dict[str, int]:
    """Each class's training count: the common target unless overridden per class."""
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(classes))
    if unknown or any(int(v) < 1 for v in overrides.values()):
        raise ConfigError(
            f"per-class targets must name configured classes with positive counts, got {overrides}"
        )
    goal = target_count({c: counts[c] for c in classes}, target)
    return {c: int(overrides.get(c, goal if goal is not None else counts[c])) for c in classes}


def balance(
    members: Sequence[dict], classes: Sequence[str], target: str | int, seed: int,
    overrides: Mapping[str, int] | None = None,
) -> list[dict]:  # fmt: skip
    """Subsample classes above their target and add augmented repeats to classes below it."""
    by_class: dict[str, list[dict]] = defaultdict(list)
    for m in sorted(members, key=lambda m: m["image_id"]):
        by_class[m["label"]].append(m)
    missing = [c for c in classes if not by_class[c]]
    if missing:
        raise MmpipeError(
            f"no training images for class(es) {', '.join(missing)}: ingest labelled studies first"
        )
    goals = per_class_targets({c: len(by_class[c]) for c in classes}, classes, target, overrides)
    plan: list[dict] = []
    for c in classes:
        rng = random.Random(f"{seed}:{c}")  # per class: another class's data never reshuffles this one
        originals, goal = by_class[c], goals[c]
        if len(originals) >= goal:
            plan.extend(_entry(m, augment=False) for m in sorted(rng.sample(originals, goal), key=_id))
        else:
            plan.extend(_entry(m, augment=False) for m in originals)
            extra = [originals[i % len(originals)] for i in range(goal - len(originals))]
            rng.shuffle(extra)
            plan.extend(_entry(m, augment=True) for m in extra)
    return plan


def _id(m: dict) -> str:
    return m["image_id"]


def _entry(m: dict, augment: bool) -> dict:
    return {
        "image_id": m["image_id"],
        "label": m["label"],
        "shard_uri": m["shard_uri"],
        "shard_index": m["shard_index"],
        "augment": augment,
    }


def loss_weights(counts: Mapping[str, int], classes: Sequence[str]) -> list[float]:
    """Inverse-frequency class weights (mean 1) of what training will see, for a weighted or focal loss."""
    inv = [1.0 / max(counts.get(c, 0), 1) for c in classes]
    scale = len(inv) / sum(inv)
    return [round(w * scale, 6) for w in inv]


def focal_loss(
    logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Focal loss (Lin et al.): cross-entropy scaled by (1 - p_true)^gamma, optionally class-weighted.

    ``gamma = 0`` is (weighted) cross-entropy; the mean is over the batch's class weights, as
    ``torch.nn.CrossEntropyLoss`` does, so both losses stay on the same scale.
    """
    log_p = F.log_softmax(logits.float(), dim=1).gather(1, target.view(-1, 1)).squeeze(1)
    loss = -((1 - log_p.exp()) ** gamma) * log_p
    if weight is None:
        return loss.mean()
    w = weight[target]
    return (loss * w).sum() / w.sum()


def build_plan(
    images: Sequence[dict],
    *,
    classes: Sequence[str],
    test_snapshot: str,
    seed: int = 0,
    target: str | int = "median",
    class_targets: Mapping[str, int] | None = None,
    policies: Mapping[str, Sequence[str]] | None = None,
    clahe: Mapping[str, float] | None = None,
    channel_mode: str = "replicate",
) -> dict[str, Any]:
    """The training plan: balanced train entries, all val entries, policies, preprocessing and version.

    ``images`` are train/val rows (test rows are ignored: the test side is the frozen snapshot);
    ``policies`` replace the defaults class by class; ``clahe`` ({clip_limit, tiles}) is the
    preprocessing every image gets at training and scoring time.
    """
    from mmpipe.modelcard import CHANNEL_MODES

    if channel_mode not in CHANNEL_MODES:
        raise ConfigError(f"unknown channel mode {channel_mode!r}; known: {', '.join(CHANNEL_MODES)}")
    if clahe is not None and (clahe.get("clip_limit", 0) <= 0 or int(clahe.get("tiles", 0)) < 1):
        raise ConfigError(f"CLAHE needs clip_limit > 0 and tiles >= 1, got {dict(clahe)}")
    if isinstance(target, str) and target.strip().isdigit():
        target = int(target)
    resolved = resolve_policies(classes, policies)
    train = [i for i in images if i["split"] == "train"]
    val = [_entry(i, augment=False) for i in sorted(images, key=_id) if i["split"] == "val"]
    if not val:
        raise MmpipeError("validation split is empty: more patients are needed before training")
    entries = balance(train, classes, target, seed, class_targets)
    before = Counter(i["label"] for i in train)
    after = Counter(e["label"] for e in entries)
    augmented = Counter(e["label"] for e in entries if e["augment"])
    body = {
        "classes": list(classes),
        "seed": seed,
        "target": target,
        "class_targets": dict(sorted((class_targets or {}).items())),
        "policies": resolved,
        "preprocessing": {
            "clahe": {"clip_limit": float(clahe["clip_limit"]), "tiles": int(clahe["tiles"])}
            if clahe
            else None,
            "channel_mode": channel_mode,
        },
        "test_snapshot": test_snapshot,
        "train": entries,
        "val": val,
    }
    version = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]
    return body | {
        "dataset_version": version,
        "class_counts_before": {c: before[c] for c in classes},
        "class_counts_after": {c: after[c] for c in classes},
        "sampling": {
            c: {
                "available": before[c],
                "originals": after[c] - augmented[c],
                "augmented": augmented[c],
                "left_out": before[c] - (after[c] - augmented[c]),
                "augmentation": resolved[c],
            }
            for c in classes
        },
        "val_counts": dict(Counter(e["label"] for e in val)),
        "loss_weights": loss_weights(after, classes),
    }


def save_plan(store: Store, catalog: Catalog, plan: dict[str, Any]) -> str:
    """Write the plan once to ``plans/`` (a version is immutable) and record it with its lineage."""
    key = f"plans/{plan['dataset_version']}.json"
    uri = store.uri(key) if store.head(key) else store.put_json(key, plan)
    row = {
        "dataset_version": plan["dataset_version"],
        "plan_uri": uri,
        "test_snapshot": plan["test_snapshot"],
        "seed": plan["seed"],
        "n_train": len(plan["train"]),
        "n_val": len(plan["val"]),
        "class_counts": json.dumps(plan["class_counts_after"], sort_keys=True),
    }
    lineage = [
        {"dataset_version": plan["dataset_version"], "kind": kind, "ref": ref}
        for kind, refs in plan.get("lineage", {}).items()
        for ref in refs
    ]
    with catalog.begin() as conn:
        catalog.upsert("dataset_versions", [row], ["dataset_version"], conn, update=False)
        catalog.upsert("dataset_lineage", lineage, ["dataset_version", "kind", "ref"], conn, update=False)
    return uri
