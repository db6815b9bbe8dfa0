"""Grad-CAM points at the evidence: a CNN whose class score is the brightness it sees lights up the
bright patch, and a vision transformer gets no map."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from mmpipe import gradcam, modelcard
from mmpipe.models import create_model


class Brightness(torch.nn.Module):
    """One 1x1 convolution summing the channels, pooled: class 0's logit is the image's brightness."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 1, 1, bias=False)
        torch.nn.init.ones_(self.conv.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        score = torch.relu(self.conv(x)).mean((2, 3))
        return torch.cat([score, -score], 1)


def card(size: int) -> modelcard.ModelCard:
    return modelcard.ModelCard(
        model_version="m", backbone="x", classes=("bright", "dark"), canonical_size=size, image_size=size,
        channel_mode="replicate", mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), init="random",
        weights_fingerprint=None, freeze_ratio=0.0, dataset_version="d", plan_uri="", training_run_id="r",
        best_val_macro_f1=0.0,
    )  # fmt: skip


def test_the_map_lights_up_the_evidence_and_overlays_as_png() -> None:
    image = np.zeros((32, 32), np.uint8)
    image[2:10, 20:30] = 255
    heat = gradcam.heatmaps(Brightness().eval(), card(32), image[None], np.array([0]))[0]
    assert heat.shape == (32, 32) and heat.max() == 1.0
    assert heat[2:10, 20:30].mean() > 0.9 and heat[16:, :16].mean() < 0.05
    png = gradcam.overlay_png(image, heat)
    assert Image.open(io.BytesIO(png)).size == (32, 32)


def test_a_vision_transformer_gets_no_map() -> None:
    assert gradcam.last_conv(create_model("vit_tiny", 5)) is None
    assert gradcam.last_conv(create_model("tinycnn", 5)) is not None
