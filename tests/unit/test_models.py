"""Backbone registry, weights import/verification, freezing and fingerprints (CPU, small inputs)."""

from __future__ import annotations

import functools

import pytest
import timm
import torch
from safetensors import safe_open
from torch import nn

from mmpipe.errors import ConfigError
from mmpipe.models import (
    BACKBONES,
    backbone_blocks,
    classifier_parameter_names,
    create_model,
    export_reference_weights,
    freeze,
    get_spec,
    load_weights_file,
    set_train_mode,
    weights_fingerprint,
)

NUM_CLASSES = 5


@functools.cache
def _model(name: str) -> nn.Module:
    """One eval-mode build per backbone for the read-only tests (vgg16 alone takes seconds)."""
    return create_model(name, NUM_CLASSES).eval()


def _forward(model: nn.Module, size: int) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.randn(2, 3, size, size))


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("weights") / "resnet18.safetensors"
    export_reference_weights("resnet18", path, seed=1)
    return path


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_backbone_builds_and_gives_logits_per_class(name: str) -> None:
    spec = get_spec(name)
    model = _model(name)
    logits = _forward(model, max(64, spec.min_size))
    assert logits.shape == (2, NUM_CLASSES)
    assert torch.isfinite(logits).all()
    head = classifier_parameter_names(model)
    params = dict(model.named_parameters())
    assert head and head <= params.keys()
    assert all(params[n].shape[0] == NUM_CLASSES for n in head)


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_min_size_is_the_smallest_input_that_works(name: str) -> None:
    spec = get_spec(name)
    model = _model(name)
    assert _forward(model, spec.min_size).shape == (2, NUM_CLASSES)
    if spec.min_size > 1:
        with pytest.raises(RuntimeError):
            _forward(model, spec.min_size - 1)


@pytest.mark.parametrize("name", sorted(n for n, s in BACKBONES.items() if s.source == "timm"))
def test_timm_specs_match_timm_default_pretrained_config(name: str) -> None:
    spec = get_spec(name)
    cfg = timm.models.get_pretrained_cfg(spec.arch)
    assert (spec.mean, spec.std, spec.default_size) == (cfg.mean, cfg.std, cfg.input_size[-1])


def test_unknown_backbone_names_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="unknown backbone 'resnet19'") as err:
        get_spec("resnet19")
    assert all(name in str(err.value) for name in BACKBONES)
    with pytest.raises(ConfigError, match="unknown backbone"):
        create_model("resnet19", NUM_CLASSES)


@pytest.mark.parametrize("kwargs", [{"num_classes": 0}, {"freeze_ratio": 1.5}, {"freeze_ratio": -0.1}])
def test_bad_model_options_are_rejected(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        create_model("tinycnn", **{"num_classes": NUM_CLASSES, **kwargs})


@pytest.mark.parametrize("name", ["resnet18", "googlenet", "tinycnn"])  # one per source
def test_weights_round_trip_loads_every_backbone_tensor(name: str, tmp_path) -> None:
    path = tmp_path / f"{name}.safetensors"
    export_reference_weights(name, path, seed=3)
    weights = load_weights_file(path)
    torch.manual_seed(99)  # a different init, so an ignored file would show
    model = create_model(name, NUM_CLASSES, weights=weights)
    head = classifier_parameter_names(model)
    assert all(weights[h].shape[0] == 1000 for h in head)
    state = model.state_dict()
    backbone = [k for k in state if k not in head and not k.endswith("num_batches_tracked")]
    assert all(torch.equal(state[k], weights[k]) for k in backbone)
    assert all(state[h].shape[0] == NUM_CLASSES for h in head)


def test_headless_or_slightly_incomplete_weights_still_load(resnet18_file) -> None:
    weights = load_weights_file(resnet18_file)
    weights = {k: v for k, v in weights.items() if not k.startswith("fc.") and k != "layer4.1.bn2.bias"}
    model = create_model("resnet18", NUM_CLASSES, weights=weights)
    assert torch.equal(model.state_dict()["layer4.1.conv2.weight"], weights["layer4.1.conv2.weight"])


def test_weights_missing_much_of_the_backbone_are_refused(resnet18_file) -> None:
    weights = load_weights_file(resnet18_file)
    kept = {k: v for k, v in weights.items() if not k.startswith("layer4.")}
    with pytest.raises(ConfigError, match="weights fit only"):
        create_model("resnet18", NUM_CLASSES, weights=kept)


@pytest.mark.parametrize(
    ("source", "target"),
    [("mobilenetv2", "resnet18"), ("efficientnet_b0", "mobilenetv2")],  # different names; same names, shapes
)
def test_weights_of_another_architecture_are_refused(source: str, target: str, tmp_path) -> None:
    path = tmp_path / f"{source}.safetensors"
    export_reference_weights(source, path)
    with pytest.raises(ConfigError, match=rf"weights fit only \d+ of \d+ backbone tensors of '{target}'"):
        create_model(target, NUM_CLASSES, weights=load_weights_file(path))


def test_pth_checkpoint_is_unwrapped_to_the_same_weights(resnet18_file, tmp_path) -> None:
    weights = load_weights_file(resnet18_file)
    pth = tmp_path / "ddp_checkpoint.pth"
    torch.save({"epoch": 7, "state_dict": {f"module.{k}": v for k, v in weights.items()}}, pth)
    from_pth = load_weights_file(pth)
    assert from_pth.keys() == weights.keys()
    assert weights_fingerprint(from_pth) == weights_fingerprint(weights)


def test_unreadable_weights_files_raise_config_error(tmp_path) -> None:
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a tensor file" * 8)
    pickled_module = tmp_path / "whole_model.pt"
    torch.save(nn.Linear(2, 2), pickled_module)
    not_tensors = tmp_path / "config.pt"
    torch.save({"lr": 0.1, "epochs": 3}, not_tensors)
    wrong_suffix = tmp_path / "weights.onnx"
    wrong_suffix.write_bytes(b"x")
    for path, message in [
        (tmp_path / "absent.safetensors", "not found"),
        (wrong_suffix, "must be .safetensors"),
        (garbage, "cannot read"),
        (pickled_module, "cannot read"),
        (not_tensors, "state dict of named tensors"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_weights_file(path)


def test_freeze_ratio_freezes_leading_whole_blocks_and_never_the_head() -> None:
    model = create_model("resnet18", NUM_CLASSES, freeze_ratio=0.5)
    head = classifier_parameter_names(model)
    blocks = backbone_blocks(model)
    assert [b[0].split(".")[0] for b in blocks] == ["conv1", "layer1", "layer2", "layer3", "layer4"]
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {n for block in blocks[:2] for n in block}  # round(0.5 * 5) leading blocks
    assert all(dict(model.named_parameters())[h].requires_grad for h in head)
    fully = create_model("resnet18", NUM_CLASSES, freeze_ratio=1.0)
    assert {n for n, p in fully.named_parameters() if p.requires_grad} == head


def test_progressive_unfreezing_and_frozen_batchnorm_statistics() -> None:
    model = create_model("resnet18", NUM_CLASSES)
    assert freeze(model, 0.8) == 4 and freeze(model, 0.4) == 2  # a smaller share unfreezes later blocks
    assert model.layer2[0].conv1.weight.requires_grad and not model.layer1[0].conv1.weight.requires_grad
    set_train_mode(model)
    assert not model.bn1.training and not model.layer1[0].bn1.training  # frozen: running stats kept
    assert model.layer2[0].bn1.training and model.training
    assert len(backbone_blocks(create_model("tinycnn", NUM_CLASSES))) == 3  # conv-BN-ReLU blocks


def test_backward_step_updates_only_unfrozen_parameters() -> None:
    torch.manual_seed(0)
    # tinycnn: timm's resnets zero-init each block's last BN, so one step leaves some trainable tensors still
    model = create_model("tinycnn", NUM_CLASSES, freeze_ratio=0.5).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimiser = torch.optim.SGD(model.parameters(), lr=0.1)  # given all params on purpose
    loss = nn.functional.cross_entropy(model(torch.randn(2, 3, 64, 64)), torch.tensor([0, 3]))
    loss.backward()
    optimiser.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed == trainable
    assert 0 < len(trainable) < len(before)


def test_weights_fingerprint_is_stable_and_sensitive() -> None:
    torch.manual_seed(0)
    base = {"b.weight": torch.randn(4, 3), "a.bias": torch.randn(4), "a.count": torch.tensor(3)}
    fingerprint = weights_fingerprint(base)
    reordered = {k: base[k].clone() for k in reversed(list(base))}
    assert weights_fingerprint(reordered) == fingerprint
    nudged = dict(base, **{"b.weight": base["b.weight"].clone()})
    nudged["b.weight"][2, 1] += 1e-3
    variants = [
        nudged,
        {("c.weight" if k == "b.weight" else k): v for k, v in base.items()},
        dict(base, **{"b.weight": base["b.weight"].reshape(3, 4)}),
        dict(base, **{"a.bias": base["a.bias"].double()}),
        {k: v for k, v in base.items() if k != "a.count"},
    ]
    assert len({fingerprint, *map(weights_fingerprint, variants)}) == len(variants) + 1


def test_reference_weights_are_seeded_and_marked(tmp_path) -> None:
    paths = [tmp_path / f"{i}.safetensors" for i in range(3)]
    for path, seed in zip(paths, (0, 0, 1), strict=True):
        export_reference_weights("tinycnn", path, seed=seed)
    first, again, other = (weights_fingerprint(load_weights_file(p)) for p in paths)
    assert first == again != other
    assert load_weights_file(paths[0])["fc.weight"].shape == (1000, 64)
    with safe_open(paths[0], "pt") as handle:
        assert handle.metadata() == {"backbone": "tinycnn", "origin": "mmpipe-reference-random-init"}
