"""The model card's input transform: CLAHE, channel modes, resizing, and the card that replays them."""

from __future__ import annotations

import json
from dataclasses import asdict, replace

import numpy as np
import pytest
import torch
from matplotlib import colormaps

from mmpipe import modelcard
from mmpipe.config import CLASSES
from mmpipe.models import IMAGENET_MEAN, IMAGENET_STD, create_model

RNG = np.random.default_rng(0)


def card(**overrides) -> modelcard.ModelCard:
    values = {
        "model_version": "tinycnn-abc", "backbone": "tinycnn", "classes": CLASSES, "canonical_size": 48,
        "image_size": 32, "channel_mode": "replicate", "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
        "init": "random", "weights_fingerprint": None, "freeze_ratio": 0.0, "dataset_version": "d" * 16,
        "plan_uri": "s3://b/plans/d.json", "training_run_id": "run.tinycnn", "best_val_macro_f1": 0.5,
    }  # fmt: skip
    return modelcard.ModelCard(**(values | overrides))


def low_contrast(shape=(2, 48, 48)) -> torch.Tensor:
    return torch.from_numpy((100 + RNG.integers(0, 10, shape)).astype(np.uint8))


# --- CLAHE --------------------------------------------------------------------------------------


def test_clahe_with_one_tile_and_no_clipping_is_histogram_equalisation():
    image = torch.from_numpy(RNG.integers(40, 120, (37, 53)).astype(np.uint8))
    v = image.numpy()
    cdf = np.bincount(v.ravel(), minlength=256).cumsum()
    expected = np.rint(cdf[v] * 255 / v.size).astype(np.uint8)
    assert np.array_equal(modelcard.clahe(image, clip_limit=1e6, tiles=1).numpy(), expected)


def test_clahe_raises_local_contrast_and_the_clip_limit_bounds_it():
    x = low_contrast()
    mild, strong = modelcard.clahe(x, 1.5), modelcard.clahe(x, 8.0)
    assert x.float().std() < mild.float().std() < strong.float().std()
    assert mild.dtype == torch.uint8 and mild.shape == x.shape


def test_clahe_adapts_per_region():
    """A dark half and a bright half, each low-contrast: both get stretched (a global map could not)."""
    left = 20 + RNG.integers(0, 6, (64, 32))
    right = 200 + RNG.integers(0, 6, (64, 32))
    out = modelcard.clahe(torch.from_numpy(np.hstack([left, right]).astype(np.uint8)), 4.0, 4).float()
    assert out[:, :24].std() > 3 * left.std() and out[:, 40:].std() > 3 * right.std()


def test_clahe_has_no_seams_and_keeps_constant_images_constant():
    ramp = torch.arange(64, dtype=torch.uint8).repeat(64, 1) + 60
    out = modelcard.clahe(ramp, 2.0, 4).int()
    assert (out[:, 1:] - out[:, :-1]).min() >= 0  # a monotone ramp stays monotone across tile borders
    flat = modelcard.clahe(torch.full((3, 32, 32), 77, dtype=torch.uint8))
    assert flat.unique().numel() == 1


@pytest.mark.parametrize(
    ("images", "kwargs"),
    [(torch.zeros(4, 4), {}), (torch.zeros(4, dtype=torch.uint8), {}), (low_contrast(), {"clip_limit": 0})],
)
def test_clahe_rejects_bad_input_clearly(images, kwargs):
    with pytest.raises(ValueError, match="clahe"):
        modelcard.clahe(images, **kwargs)


# --- preprocess ---------------------------------------------------------------------------------


def test_replicate_gives_three_equal_normalised_channels_channels_last():
    x = low_contrast((3, 48, 48))
    out = modelcard.preprocess(x, 32, "replicate", (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert out.shape == (3, 3, 32, 32) and out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 1], out[:, 2])
    same = modelcard.preprocess(x, 48, "replicate", (0.5,) * 3, (0.25,) * 3)
    assert torch.allclose(same[:, 0], (x.float() / 255 - 0.5) / 0.25)


@pytest.mark.parametrize("mode", ["viridis", "inferno"])
def test_colormaps_map_intensity_through_the_matplotlib_lut(mode):
    x = torch.tensor([[0, 128, 255]], dtype=torch.uint8).repeat(3, 1).unsqueeze(0)
    out = modelcard.preprocess(x, 3, mode, (0.0,) * 3, (1.0,) * 3)
    lut = colormaps[mode](np.array([0, 128, 255]) / 255)[:, :3]
    assert np.allclose(out[0, :, 1, :].numpy().T, lut, atol=1e-6)
    assert not np.allclose(out[0, 0], out[0, 1])  # really three different channels


def test_unknown_channel_mode_fails_clearly():
    with pytest.raises(ValueError, match="unknown channel mode"):
        modelcard.preprocess(low_contrast(), 32, "jet", (0.5,) * 3, (0.25,) * 3)


def test_preprocess_applies_clahe_before_the_channel_mode():
    x = low_contrast()
    enhanced = modelcard.preprocess(
        x, 32, "viridis", IMAGENET_MEAN, IMAGENET_STD, clahe_clip_limit=3.0, clahe_tiles=4
    )
    manual = modelcard.preprocess(modelcard.clahe(x, 3.0, 4), 32, "viridis", IMAGENET_MEAN, IMAGENET_STD)
    plain = modelcard.preprocess(x, 32, "viridis", IMAGENET_MEAN, IMAGENET_STD)
    assert torch.equal(enhanced, manual) and not torch.allclose(enhanced, plain)


# --- the card -----------------------------------------------------------------------------------


def test_card_round_trips_through_json():
    c = card(clahe_clip_limit=2.5, clahe_tiles=6, channel_mode="inferno")
    assert modelcard.ModelCard.from_json(json.loads(json.dumps(c.to_json()))) == c


def test_cards_written_before_clahe_existed_still_load_without_it():
    old = {k: v for k, v in asdict(card()).items() if not k.startswith("clahe")}
    loaded = modelcard.ModelCard.from_json(json.loads(json.dumps(old)))
    assert loaded.clahe_clip_limit is None


def test_predict_replays_exactly_the_cards_transform():
    torch.manual_seed(0)
    model = create_model("tinycnn", len(CLASSES)).eval()
    images = low_contrast((5, 48, 48)).numpy()
    with_clahe = card(clahe_clip_limit=3.0, clahe_tiles=4, channel_mode="viridis")
    probs = modelcard.predict(model, with_clahe, images, batch_size=2)
    with torch.inference_mode():
        x = modelcard.preprocess(torch.from_numpy(images), 32, "viridis", IMAGENET_MEAN, IMAGENET_STD, 3.0, 4)
        expected = torch.softmax(model(x), dim=1).numpy()
    assert probs.shape == (5, len(CLASSES)) and np.allclose(probs, expected, atol=1e-6)
    without = modelcard.predict(model, replace(with_clahe, clahe_clip_limit=None), images)
    assert not np.allclose(probs, without, atol=1e-4)
