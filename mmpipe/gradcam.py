"""Grad-CAM overlays: where a CNN looked when it classified an image a human must review.

Grad-CAM (Selvaraju et al.) weighs the last convolution's feature maps by the mean gradient of the
predicted class's logit and keeps the positive part: a coarse map of the evidence for that class,
upsampled and laid over the image as a PNG the reviewer opens from the object's sidecar. Only for
CNNs (a vision transformer has no last convolution worth mapping) and only for flagged images, so
the gradients cost nothing on the confident majority.
"""

from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from mmpipe import modelcard

ALPHA = 0.45  # weight of the heat map over the image


def last_conv(model: torch.nn.Module) -> torch.nn.Module | None:
    """The model's last 2-D convolution, or None when it is not a CNN (a ViT's only one embeds patches)."""
    if any(type(m).__name__ in ("PatchEmbed", "VisionTransformer") for m in model.modules()):
        return None
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    return convs[-1] if convs else None


def heatmaps(
    model: torch.nn.Module, card: modelcard.ModelCard, images: np.ndarray, classes: np.ndarray
) -> np.ndarray | None:
    """Grad-CAM maps in [0, 1] (N, H, W) at the images' size for ``classes`` (N,), or None if not a CNN."""
    layer = last_conv(model)
    if layer is None or len(images) == 0:
        return None
    saved: dict[str, torch.Tensor] = {}

    def keep(_module: torch.nn.Module, _inputs: object, output: torch.Tensor) -> None:
        output.retain_grad()
        saved["maps"] = output

    device = next(model.parameters()).device
    handle = layer.register_forward_hook(keep)
    try:
        with torch.enable_grad():
            x = modelcard.preprocess_for(card, torch.from_numpy(np.ascontiguousarray(images)).to(device))
            x.requires_grad_(True)  # gradients reach the maps even when early layers are frozen
            logits = model(x)
            chosen = logits.gather(1, torch.as_tensor(classes, device=device).view(-1, 1)).sum()
            chosen.backward()
    finally:
        handle.remove()
        model.zero_grad(set_to_none=True)
    maps, grads = saved["maps"].detach(), saved["maps"].grad
    cam = F.relu((grads.mean((2, 3), keepdim=True) * maps).sum(1, keepdim=True))
    cam = F.interpolate(cam.float(), size=images.shape[1:], mode="bilinear", align_corners=False)[:, 0]
    peak = cam.flatten(1).max(1).values.clamp(min=1e-12).view(-1, 1, 1)
    return (cam / peak).cpu().numpy()


def overlay_png(image: np.ndarray, heat: np.ndarray) -> bytes:
    """The uint8 image (H, W) in gray with the heat map (H, W, [0, 1]) over it in a colormap, as PNG."""
    from matplotlib import colormaps

    gray = np.repeat(image[..., None].astype(np.float32) / 255.0, 3, axis=2)
    colour = colormaps["inferno"](heat)[..., :3]
    blended = (1 - ALPHA * heat[..., None]) * gray + ALPHA * heat[..., None] * colour
    buffer = io.BytesIO()
    Image.fromarray((blended.clip(0, 1) * 255).astype(np.uint8), "RGB").save(buffer, "PNG")
    return buffer.getvalue()
