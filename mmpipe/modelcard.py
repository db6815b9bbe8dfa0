"""The model card: typed config that travels with every checkpoint.

Scoring and evaluation rebuild the exact input transform from the card (canonical size, optional
CLAHE, model input size, channel mode, normalisation), never from code defaults, so a model trained
with CLAHE and a colormap at 96 px is always fed CLAHE and a colormap at 96 px. The curated pixels
in the store stay un-enhanced; enhancement happens here, identically at training and scoring time.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from mmpipe.calibration import probabilities
from mmpipe.models import create_model
from mmpipe.store import Store

CHANNEL_MODES = ("replicate", "viridis", "inferno")


@dataclass(frozen=True)
class ModelCard:
    model_version: str
    backbone: str
    classes: tuple[str, ...]
    canonical_size: int  # side of the curated uint8 images (mmpipe.pixels.normalise)
    image_size: int  # model input side
    channel_mode: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    init: str
    weights_fingerprint: str | None
    freeze_ratio: float
    dataset_version: str
    plan_uri: str
    training_run_id: str
    best_val_macro_f1: float
    clahe_clip_limit: float | None = None  # CLAHE before the channel mode; None = off (cards before CLAHE)
    clahe_tiles: int = 8
    # Fitted on the validation split at training time (mmpipe.calibration); scoring replays them.
    temperature: float = 1.0  # logits / temperature before softmax; 1.0 = uncalibrated
    ood_score: str = "energy"  # how out-of-distribution is scored (mmpipe.calibration.energy)
    ood_threshold: float | None = None  # score above this = out of distribution; None = no open-set check
    ood_recall: float | None = None  # share of in-distribution validation images under the threshold
    ece_before: float | None = None  # validation ECE at temperature 1 and at the fitted temperature
    ece_after: float | None = None
    recipe: dict[str, Any] = field(default_factory=dict)  # the whole candidate (mmpipe.train.Candidate)
    warnings: tuple[str, ...] = ()  # options the training ignored, and why
    # Share of frozen-test predictions that a reduced precision ("bfloat16", "float16") keeps equal to
    # float32, measured at promotion; scoring uses a precision only where it is recorded high enough.
    precision_agreement: dict[str, float] = field(default_factory=dict)
    # The latest evaluation on a frozen test snapshot (mmpipe.evaluate): which snapshot, and its metrics.
    test_snapshot: str | None = None
    test_metrics: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelCard:
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**fields)


def _colormap_lut(name: str) -> torch.Tensor:
    from matplotlib import colormaps

    return torch.tensor(colormaps[name](np.linspace(0, 1, 256))[:, :3], dtype=torch.float32)


def clahe(images: torch.Tensor, clip_limit: float = 2.0, tiles: int = 8) -> torch.Tensor:
    """Contrast-limited adaptive histogram equalisation of uint8 images (..., H, W), on their device.

    As in the deep-learning survey's contrast enhancement (and OpenCV's ``createCLAHE``): per tile of a
    ``tiles`` x ``tiles`` grid, a histogram clipped at ``clip_limit`` times its mean bin (the excess
    spread evenly) gives an equalising lookup table; each pixel blends the tables of its four nearest
    tile centres bilinearly, so there are no seams at tile borders.
    """
    if images.dtype != torch.uint8 or images.dim() < 2:
        raise ValueError(f"clahe expects uint8 images (..., H, W), got {images.dtype} {tuple(images.shape)}")
    if clip_limit <= 0 or tiles < 1:
        raise ValueError(f"clahe needs clip_limit > 0 and tiles >= 1, got {clip_limit}, {tiles}")
    *lead, h, w = images.shape
    x = images.reshape(-1, h, w)
    b, dev = x.shape[0], x.device
    th, tw = math.ceil(h / tiles), math.ceil(w / tiles)
    padded = F.pad(x.unsqueeze(1).float(), (0, tw * tiles - w, 0, th * tiles - h), mode="replicate")
    blocks = (
        padded.long().reshape(b, tiles, th, tiles, tw).permute(0, 1, 3, 2, 4).reshape(b, tiles, tiles, -1)
    )
    hist = torch.zeros(b, tiles, tiles, 256, device=dev).scatter_add_(
        -1, blocks, torch.ones_like(blocks, dtype=torch.float32)
    )
    limit = max(clip_limit * th * tw / 256, 1.0)
    excess = (hist - limit).clamp(min=0).sum(-1, keepdim=True)
    lut = (hist.clamp(max=limit) + excess / 256).cumsum(-1) * (255.0 / (th * tw))

    def grid(n: int, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pos = ((torch.arange(n, device=dev) + 0.5) / size - 0.5).clamp(0, tiles - 1)
        lo = pos.floor().long()
        return lo, (lo + 1).clamp(max=tiles - 1), pos - lo

    y0, y1, wy = grid(h, th)
    x0, x1, wx = grid(w, tw)
    v, n = x.long(), torch.arange(b, device=dev).view(-1, 1, 1)

    def at(yi: torch.Tensor, xi: torch.Tensor) -> torch.Tensor:
        return lut[n, yi.view(1, -1, 1), xi.view(1, 1, -1), v]

    wy, wx = wy.view(1, -1, 1), wx.view(1, 1, -1)
    top = at(y0, x0) * (1 - wx) + at(y0, x1) * wx
    bottom = at(y1, x0) * (1 - wx) + at(y1, x1) * wx
    out = (top * (1 - wy) + bottom * wy).round().clamp(0, 255).to(torch.uint8)
    return out.reshape(*lead, h, w)


def preprocess(
    images: torch.Tensor,
    image_size: int,
    channel_mode: str,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    clahe_clip_limit: float | None = None,
    clahe_tiles: int = 8,
) -> torch.Tensor:
    """uint8 (B, H, W) canonical images -> normalised float (B, 3, S, S), channels_last.

    Optional CLAHE first; then ``replicate`` copies gray into three channels, or a colormap maps
    intensity through a perceptual LUT (viridis, inferno), as compared in the colour-transformation paper.
    """
    if channel_mode not in CHANNEL_MODES:
        raise ValueError(f"unknown channel mode {channel_mode!r}; known: {', '.join(CHANNEL_MODES)}")
    if clahe_clip_limit is not None:
        images = clahe(images, clahe_clip_limit, clahe_tiles)
    if channel_mode == "replicate":
        x = (images.float() / 255.0).unsqueeze(1).expand(-1, 3, -1, -1)
    else:
        x = _colormap_lut(channel_mode).to(images.device)[images.long()].permute(0, 3, 1, 2)
    if x.shape[-1] != image_size:
        x = F.interpolate(
            x, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False
        )
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return ((x - m) / s).contiguous(memory_format=torch.channels_last)


def preprocess_for(card: ModelCard, images: torch.Tensor) -> torch.Tensor:
    """:func:`preprocess` exactly as ``card`` says: the one input transform of training, evaluation and scoring."""
    return preprocess(
        images,
        card.image_size,
        card.channel_mode,
        card.mean,
        card.std,
        card.clahe_clip_limit,
        card.clahe_tiles,
    )


def save(store: Store, prefix: str, model: torch.nn.Module, card: ModelCard) -> tuple[str, str]:
    """Checkpoint (safetensors) and card (JSON) under ``prefix``; returns their URIs."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    ckpt = store.put(f"{prefix}/model.safetensors", save_safetensors(state))
    card_uri = store.put_json(f"{prefix}/card.json", card.to_json())
    return ckpt, card_uri


def read_card(store: Store, card_uri: str) -> ModelCard:
    return ModelCard.from_json(store.get_json(store.key_of(card_uri)))


def load(
    store: Store, card_uri: str, device: torch.device, card: ModelCard | None = None
) -> tuple[torch.nn.Module, ModelCard]:
    """Rebuild the model from its card (``card``: already read) and checkpoint, strictly (every key
    must match)."""
    card = card or read_card(store, card_uri)
    ckpt_key = store.key_of(card_uri).rsplit("/", 1)[0] + "/model.safetensors"
    model = create_model(card.backbone, len(card.classes))
    model.load_state_dict(load_safetensors(store.get(ckpt_key)), strict=True)
    model.to(device, memory_format=torch.channels_last).eval()
    return model, card


def resolve_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


@torch.inference_mode()
def logits(
    model: torch.nn.Module,
    card: ModelCard,
    images: np.ndarray,
    batch_size: int = 64,
    autocast: torch.dtype | None = None,
) -> np.ndarray:
    """Raw logits (N, C) for uint8 canonical images (N, H, W); ``autocast`` runs the model at that dtype."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(images), batch_size):
        # writable too: torch warns on (and may not write into) a read-only array, e.g. one PIL made
        batch = torch.from_numpy(np.require(images[start : start + batch_size], requirements="CW")).to(device)
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            out.append(model(preprocess_for(card, batch)).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, len(card.classes)), dtype=np.float32)


def predict(model: torch.nn.Module, card: ModelCard, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Class probabilities (N, C) for uint8 canonical images (N, H, W), at the card's temperature."""
    return probabilities(logits(model, card, images, batch_size), card.temperature).astype(np.float32)
