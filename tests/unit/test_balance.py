"""Rebalancing, augmentation policies, loss weights and plan versioning, on in-memory rows."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest
import torch

from mmpipe import balance
from mmpipe.config import CLASSES
from mmpipe.errors import ConfigError, MmpipeError

#: Image counts skewed like the paper's Table I (chest X-ray most common, retinal OCT rarest).
SKEW = {"brain_mri": 250, "chest_xray": 300, "retinal_oct": 60, "lung_ct": 200, "liver_ct": 140}


def rows(counts: dict[str, int] = SKEW, val_per_class: int = 4, test_per_class: int = 3) -> list[dict]:
    out = []
    for label, n in counts.items():
        for split, k in (("train", n), ("val", val_per_class), ("test", test_per_class)):
            for i in range(k):
                out.append(
                    {
                        "image_id": f"{label}-{split}-{i:04d}",
                        "label": label,
                        "split": split,
                        "shard_uri": f"s3://b/curated/{label}.npz",
                        "shard_index": i,
                        "patient_key": f"{label}-{split}-pt{i // 2}",
                    }
                )
    return out


def plan(**options) -> dict:
    return balance.build_plan(rows(), classes=CLASSES, test_snapshot="test-v1", **options)


@pytest.mark.parametrize("target", ["median", "max", "min", 180, "150"])
def test_every_class_ends_within_five_percent_of_the_target(target):
    p = plan(target=target)
    counts = p["class_counts_after"]
    goal = {"median": 200, "max": 300, "min": 60, 180: 180, "150": 150}[target]
    assert set(counts) == set(CLASSES)
    for label, n in counts.items():
        assert abs(n - goal) <= 0.05 * goal, (label, n, goal)
    assert max(counts.values()) <= 1.05 * min(counts.values())


def test_minorities_are_augmented_and_majorities_subsampled():
    p = plan(target="median")
    s = p["sampling"]
    by_class = {c: [e for e in p["train"] if e["label"] == c] for c in CLASSES}
    # retinal OCT (60 < 200): every original once, the rest augmented repeats of originals
    oct_ = by_class["retinal_oct"]
    originals = {e["image_id"] for e in oct_ if not e["augment"]}
    assert len(originals) == 60 and s["retinal_oct"] == {
        "available": 60, "originals": 60, "augmented": 140, "left_out": 0, "augmentation": [],
    }  # fmt: skip
    assert {e["image_id"] for e in oct_ if e["augment"]} <= originals
    # chest X-ray (300 > 200): a subset, nothing augmented, no image twice
    chest = by_class["chest_xray"]
    assert not any(e["augment"] for e in chest)
    assert len({e["image_id"] for e in chest}) == 200 and s["chest_xray"]["left_out"] == 100
    # repeats are spread evenly over the originals (each 2 or 3 times in all)
    uses = Counter(e["image_id"] for e in oct_)
    assert set(uses.values()) <= {3, 4}


def test_target_none_keeps_counts_and_weights_correct_the_imbalance():
    p = plan(target="none")
    assert p["class_counts_after"] == SKEW
    assert not any(e["augment"] for e in p["train"])
    weights = dict(zip(CLASSES, p["loss_weights"], strict=True))
    assert weights["retinal_oct"] == max(weights.values()) and weights["chest_xray"] == min(weights.values())
    assert np.mean(p["loss_weights"]) == pytest.approx(1.0)
    # weight x count is the same for every class: each contributes equally to a weighted loss
    products = [weights[c] * SKEW[c] for c in CLASSES]
    assert max(products) == pytest.approx(min(products))


def test_balanced_plan_has_near_uniform_loss_weights():
    assert plan(target="median")["loss_weights"] == pytest.approx([1.0] * 5)


def test_per_class_targets_override_the_common_one():
    p = plan(target="median", class_targets={"retinal_oct": 90})
    assert p["class_counts_after"]["retinal_oct"] == 90
    assert p["class_counts_after"]["brain_mri"] == 200
    with pytest.raises(ConfigError, match="per-class targets"):
        plan(class_targets={"knee_mri": 10})
    with pytest.raises(ConfigError, match="per-class targets"):
        plan(class_targets={"lung_ct": 0})


def test_same_inputs_and_seed_give_the_same_plan_and_version():
    shuffled = rows()
    random.Random(4).shuffle(shuffled)
    a = plan(seed=3)
    b = balance.build_plan(shuffled, classes=CLASSES, test_snapshot="test-v1", seed=3)
    assert a == b
    assert a["dataset_version"] == b["dataset_version"]


@pytest.mark.parametrize(
    "change",
    [
        {"seed": 1},
        {"target": "max"},
        {"policies": {"chest_xray": ["hflip", "rotate:10"]}},
        {"clahe": {"clip_limit": 2.0, "tiles": 8}},
        {"channel_mode": "viridis"},
        {"class_targets": {"retinal_oct": 90}},
    ],
)
def test_any_change_of_policy_preprocessing_or_seed_gives_a_new_version(change):
    assert plan(**change)["dataset_version"] != plan()["dataset_version"]


def test_a_new_member_gives_a_new_version_and_test_rows_are_ignored():
    base = rows()
    more = [*base, {**base[0], "image_id": "brain_mri-train-9999"}]
    extra_test = [*base, {**base[0], "image_id": "brain_mri-test-9999", "split": "test"}]
    v = balance.build_plan(base, classes=CLASSES, test_snapshot="t")["dataset_version"]
    assert balance.build_plan(more, classes=CLASSES, test_snapshot="t")["dataset_version"] != v
    assert balance.build_plan(extra_test, classes=CLASSES, test_snapshot="t")["dataset_version"] == v


def test_plan_names_members_policies_and_preprocessing():
    p = plan(
        policies={"chest_xray": ["hflip:0.3"]}, clahe={"clip_limit": 3, "tiles": 4}, channel_mode="inferno"
    )
    assert {e["image_id"].split("-")[1] for e in p["train"]} == {"train"}
    assert {e["image_id"].split("-")[1] for e in p["val"]} == {"val"} and len(p["val"]) == 20
    assert p["policies"] == {
        "brain_mri": ["hflip:0.5"],
        "chest_xray": ["hflip:0.3"],
        "retinal_oct": [],
        "lung_ct": ["hflip:0.5", "vflip:0.5", "rotate:30,60", "zoom:1.25"],
        "liver_ct": ["hflip:0.5", "vflip:0.5"],
    }
    assert p["preprocessing"] == {"clahe": {"clip_limit": 3.0, "tiles": 4}, "channel_mode": "inferno"}
    assert p["test_snapshot"] == "test-v1"


def test_equivalent_policy_spellings_hash_alike():
    a = plan(policies={"lung_ct": ["rotate", "zoom"]})
    b = plan(policies={"lung_ct": ["rotate:30,60", "zoom:1.25"]})
    assert a["dataset_version"] == b["dataset_version"]


@pytest.mark.parametrize(
    ("policies", "message"),
    [
        ({"lung_ct": ["shear"]}, "unknown augmentation op"),
        ({"lung_ct": ["rotate:abc"]}, "must be numbers"),
        ({"lung_ct": ["rotate:200"]}, "out of range"),
        ({"lung_ct": ["hflip:1.5"]}, "out of range"),
        ({"lung_ct": ["zoom:0.5"]}, "out of range"),
        ({"knee_mri": ["hflip"]}, "unknown class"),
    ],
)
def test_bad_policies_are_rejected_clearly(policies, message):
    with pytest.raises(ConfigError, match=message):
        plan(policies=policies)


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"target": "mean"}, ConfigError, "unknown balance target"),
        ({"target": 0}, ConfigError, "positive count"),
        ({"channel_mode": "jet"}, ConfigError, "channel mode"),
        ({"clahe": {"clip_limit": 0, "tiles": 8}}, ConfigError, "CLAHE"),
    ],
)
def test_bad_options_are_rejected_clearly(options, error, message):
    with pytest.raises(error, match=message):
        plan(**options)


def test_a_class_without_training_images_or_an_empty_val_split_fails_clearly():
    no_oct = [r for r in rows() if not (r["label"] == "retinal_oct" and r["split"] == "train")]
    with pytest.raises(MmpipeError, match="retinal_oct"):
        balance.build_plan(no_oct, classes=CLASSES, test_snapshot="t")
    with pytest.raises(MmpipeError, match="validation split is empty"):
        balance.build_plan([r for r in rows() if r["split"] != "val"], classes=CLASSES, test_snapshot="t")


# --- augmentation -------------------------------------------------------------------------------


def images(n: int = 6, size: int = 48) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(0).integers(0, 256, (n, size, size)).astype(np.uint8))


def transforms(policies: dict | None = None) -> dict:
    return {c: balance.augmenter(ops) for c, ops in balance.resolve_policies(CLASSES, policies).items()}


def test_augmentation_is_deterministic_given_seed_epoch_and_position():
    x = images()
    entries = [{"label": "lung_ct", "augment": True}] * len(x)
    positions = list(range(len(x)))
    first = balance.augment_batch(x, entries, positions, transforms(), seed=7, epoch=2)
    torch.manual_seed(12345)  # whatever else used the global RNG in between
    torch.rand(100)
    again = balance.augment_batch(x, entries, positions, transforms(), seed=7, epoch=2)
    assert torch.equal(first, again)
    assert not torch.equal(first, balance.augment_batch(x, entries, positions, transforms(), seed=8, epoch=2))
    assert not torch.equal(first, balance.augment_batch(x, entries, positions, transforms(), seed=7, epoch=3))


def test_a_sample_is_augmented_the_same_whatever_batch_it_lands_in():
    x = images()
    entries = [{"label": "lung_ct", "augment": True}] * len(x)
    whole = balance.augment_batch(x, entries, [10, 11, 12, 13, 14, 15], transforms(), seed=0, epoch=0)
    order = [4, 1, 5]
    part = balance.augment_batch(
        x[order], [entries[i] for i in order], [14, 11, 15], transforms(), seed=0, epoch=0
    )
    assert torch.equal(part, whole[order])


def test_only_augmented_entries_change_and_empty_policies_are_identity():
    x = images()
    entries = [
        {"label": "lung_ct", "augment": False},
        {"label": "retinal_oct", "augment": True},  # Table I: no augmentation for OCT
        *[{"label": "lung_ct", "augment": True}] * 4,
    ]
    out = balance.augment_batch(x, entries, list(range(6)), transforms(), seed=0, epoch=0)
    assert torch.equal(out[:2], x[:2])
    assert any(not torch.equal(out[i], x[i]) for i in range(2, 6))
    assert out.dtype == torch.uint8 and out.shape == x.shape


def test_flip_policy_produces_exact_flips():
    x = images(1)
    entry = [{"label": "brain_mri", "augment": True}]
    seen = {
        bytes(balance.augment_batch(x, entry, [p], transforms({"brain_mri": ["hflip:1"]}), 0, 0).numpy())
        for p in range(3)
    }
    assert seen == {bytes(torch.flip(x, dims=[-1]).numpy())}


def test_rotation_uses_the_configured_angles_only():
    x = images(1)
    entry = [{"label": "lung_ct", "augment": True}]
    policy = transforms({"lung_ct": ["rotate:90"]})
    seen = {bytes(balance.augment_batch(x, entry, [p], policy, 0, 0).numpy()) for p in range(12)}
    assert seen == {bytes(torch.rot90(x, k, dims=(-2, -1)).numpy()) for k in (1, -1)}  # +-90, exactly


def test_zoom_enlarges_about_the_centre():
    x = torch.zeros(1, 48, 48, dtype=torch.uint8)
    x[:, 20:28, 20:28] = 255  # a centred square
    entry = [{"label": "lung_ct", "augment": True}]
    out = balance.augment_batch(x, entry, [0], transforms({"lung_ct": ["zoom:2"]}), 0, 0)
    assert int((out > 0).sum()) > int((x > 0).sum()) and out[0, 24, 24] == 255


def test_clahe_op_enhances_a_low_contrast_image():
    flat = torch.from_numpy((100 + np.random.default_rng(1).integers(0, 8, (1, 48, 48))).astype(np.uint8))
    t = {"chest_xray": balance.augmenter(["clahe:3"])}
    outs = [
        balance.augment_batch(flat, [{"label": "chest_xray", "augment": True}], [p], t, 0, 0)
        for p in range(8)
    ]
    enhanced = [o for o in outs if not torch.equal(o, flat)]
    assert 0 < len(enhanced) < 8  # applied to about half the copies
    assert all(o.float().std() > 2 * flat.float().std() for o in enhanced)


# --- losses -------------------------------------------------------------------------------------


def test_focal_loss_with_gamma_zero_is_weighted_cross_entropy():
    torch.manual_seed(0)
    logits, target = torch.randn(16, 5), torch.randint(0, 5, (16,))
    weight = torch.tensor([0.5, 1.0, 2.0, 1.0, 0.5])
    assert balance.focal_loss(logits, target, 0.0) == pytest.approx(
        torch.nn.functional.cross_entropy(logits, target).item(), rel=1e-5
    )
    assert balance.focal_loss(logits, target, 0.0, weight) == pytest.approx(
        torch.nn.functional.cross_entropy(logits, target, weight=weight).item(), rel=1e-5
    )


def test_focal_loss_down_weights_easy_examples():
    target = torch.tensor([0, 0])
    easy, hard = torch.tensor([[6.0, 0, 0, 0, 0]]), torch.tensor([[0.5, 0, 0, 0, 0]])
    ce = torch.nn.functional.cross_entropy
    ratio_focal = balance.focal_loss(easy, target[:1], 2.0) / balance.focal_loss(hard, target[:1], 2.0)
    ratio_ce = ce(easy, target[:1]) / ce(hard, target[:1])
    assert ratio_focal < ratio_ce / 10
    logits = torch.randn(8, 5, requires_grad=True)
    balance.focal_loss(logits, torch.randint(0, 5, (8,)), 2.0).backward()
    assert torch.isfinite(logits.grad).all()
