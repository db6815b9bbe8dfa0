"""Backbone registry, weights import/verification, freezing and fingerprints (CPU, small inputs)."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable

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
    load_backbone_weights,
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


def test_headless_weights_and_files_without_batchnorm_counters_load(resnet18_file) -> None:
    weights = load_weights_file(resnet18_file)
    # torchvision's older files lack num_batches_tracked; a file may come without its ImageNet head.
    weights = {
        k: v for k, v in weights.items() if not k.startswith("fc.") and not k.endswith("num_batches_tracked")
    }
    model = create_model("resnet18", NUM_CLASSES, weights=weights)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda w: w.pop("layer4.1.bn2.bias"), r"1 missing: layer4\.1\.bn2\.bias"),
        (
            lambda w: w.update({"layer5.0.conv1.weight": torch.zeros(3)}),
            r"1 unexpected: layer5\.0\.conv1\.weight",
        ),
        (
            lambda w: w.update({"layer1.0.conv1.weight": torch.zeros(64, 64, 1, 1)}),
            r"1 wrong shape: layer1\.0\.conv1\.weight \(64, 64, 1, 1\) in the weights, \(64, 64, 3, 3\) in the model",
        ),
    ],
)
def test_one_mismatched_backbone_tensor_refuses_the_file_and_loads_nothing(
    resnet18_file, change, message
) -> None:
    weights = load_weights_file(resnet18_file)
    change(weights)
    model = create_model("resnet18", NUM_CLASSES)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=rf"weights do not fit backbone 'resnet18'.*{message}"):
        load_backbone_weights(model, weights, "resnet18")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_many_mismatches_name_the_first_few(resnet18_file) -> None:
    kept = {k: v for k, v in load_weights_file(resnet18_file).items() if not k.startswith("layer4.")}
    with pytest.raises(
        ConfigError,
        match=r"25 missing: layer4\.0\.conv1\.weight, layer4\.0\.bn1\.weight, layer4\.0\.bn1\.bias, \.\.\.$",
    ):
        create_model("resnet18", NUM_CLASSES, weights=kept)


@pytest.mark.parametrize(
    ("source", "target"),
    [("mobilenetv2", "resnet18"), ("efficientnet_b0", "mobilenetv2")],  # different names; same names, shapes
)
def test_weights_of_another_architecture_are_refused(source: str, target: str, tmp_path) -> None:
    path = tmp_path / f"{source}.safetensors"
    export_reference_weights(source, path)
    with pytest.raises(
        ConfigError, match=rf"weights do not fit backbone '{target}'.* (missing|unexpected|wrong shape): "
    ):
        create_model(target, NUM_CLASSES, weights=load_weights_file(path))


def test_pth_checkpoint_is_unwrapped_to_the_same_weights(resnet18_file, tmp_path) -> None:
    weights = load_weights_file(resnet18_file)
    pth = tmp_path / "ddp_checkpoint.pth"
    torch.save({"epoch": 7, "state_dict": {f"module.{k}": v for k, v in weights.items()}}, pth)
    hub = tmp_path / "pytorch_model.bin"  # a model hub's name for a torch-saved state dict
    torch.save(weights, hub)
    for path in (pth, hub):
        from_file = load_weights_file(path)
        assert from_file.keys() == weights.keys()
        assert weights_fingerprint(from_file) == weights_fingerprint(weights)


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
    assert len(backbone_blocks(create_model("tinycnn", NUM_CLASSES))) == 4  # conv-BN-ReLU blocks


# Blocks per backbone: the stem, then whole stages; a final norm or head conv joins the last stage.
EXPECTED_BLOCKS = {
    "resnet18": 5,  # stem, layer1-4
    "vgg16": 6,  # five conv stages (each ends at a max-pool), the pre-logits MLP
    "googlenet": 12,  # conv1-3, inception3a-5b
    "mobilenetv2": 8,  # stem, seven stages
    "inceptionv3": 13,  # Conv2d_1a-2b, Conv2d_3b-4a, Mixed_5b-7c
    "efficientnet_b0": 8,
    "efficientnet_lite0": 8,
    "densenet121": 5,  # stem, dense blocks with their transitions, norm5 with the last
    "vit_tiny": 13,  # patch embedding with cls token and position embedding, twelve transformer blocks
    "tinycnn": 4,
}


def _first_run(model: nn.Module, size: int) -> dict[str, int]:
    """For each parameter, when (in call order) the module owning it first runs in a forward pass."""
    owners = {
        name: m for name, m in model.named_modules() if next(m.parameters(recurse=False), None) is not None
    }
    calls: dict[str, int] = {}

    def record(name: str) -> Callable[..., None]:
        def hook(*_: object) -> None:  # returns None: a pre-hook's result would replace the input
            calls.setdefault(name, len(calls))

        return hook

    hooks = [module.register_forward_pre_hook(record(name)) for name, module in owners.items()]
    try:
        _forward(model, size)
    finally:
        for hook in hooks:
            hook.remove()
    return {
        f"{owner}.{param}".lstrip("."): calls[owner]
        for owner, module in owners.items()
        if owner in calls
        for param, _ in module.named_parameters(recurse=False)
    }


def test_every_backbone_has_its_expected_blocks() -> None:
    assert EXPECTED_BLOCKS.keys() == BACKBONES.keys()


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_blocks_partition_the_backbone_into_stages_in_forward_order(name: str) -> None:
    model = _model(name)
    blocks = backbone_blocks(model)
    names = [n for block in blocks for n in block]
    assert len(names) == len(set(names))
    assert set(names) == {n for n, _ in model.named_parameters()} - classifier_parameter_names(model)
    assert len(blocks) == EXPECTED_BLOCKS[name]
    first_run = _first_run(model, max(32, get_spec(name).min_size))
    assert set(names) <= first_run.keys()  # every backbone parameter takes part in the forward pass
    spans = [(min(first_run[n] for n in block), max(first_run[n] for n in block)) for block in blocks]
    assert all(end < start for (_, end), (start, _) in itertools.pairwise(spans))


def test_vit_blocks_are_the_embeddings_then_each_transformer_block() -> None:
    blocks = backbone_blocks(_model("vit_tiny"))
    assert set(blocks[0]) == {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"}
    assert [{n.split(".")[1] for n in block if n.startswith("blocks.")} for block in blocks[1:]] == [
        {str(i)} for i in range(12)
    ]
    assert blocks[-1][-2:] == ["norm.weight", "norm.bias"]


def test_vgg_blocks_are_its_conv_stages_then_the_pre_logits() -> None:
    blocks = backbone_blocks(_model("vgg16"))
    assert [len(block) // 2 for block in blocks] == [2, 2, 3, 3, 3, 2]  # layers (weight + bias) per block
    assert all(n.startswith("pre_logits.") for n in blocks[-1])


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_one_training_step_trains_the_unfrozen_blocks_only(name: str) -> None:
    torch.manual_seed(0)
    model = set_train_mode(create_model(name, NUM_CLASSES, freeze_ratio=0.5))
    blocks = backbone_blocks(model)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {n for block in blocks[: round(0.5 * len(blocks))] for n in block}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)  # given all parameters on purpose
    size = max(32, get_spec(name).min_size)
    loss = nn.functional.cross_entropy(model(torch.randn(2, 3, size, size)), torch.tensor([0, 3]))
    loss.backward()
    optimiser.step()
    assert torch.isfinite(loss)
    params = dict(model.named_parameters())
    trainable = params.keys() - frozen
    assert all(params[n].grad is not None and torch.isfinite(params[n].grad).all() for n in trainable)
    changed = {n for n in params if not torch.equal(params[n], before[n])}
    # Exactly the trainable tensors with a gradient move (timm zero-initialises some last BN scales,
    # which leaves their residual branch without gradient on the first step).
    assert changed == {n for n in trainable if params[n].grad.any()}
    assert classifier_parameter_names(model) <= changed and changed & set(blocks[-1])
    # Frozen blocks keep their parameters and their BatchNorm statistics (set_train_mode).
    frozen_state = [k for k in before if k in frozen or k.rpartition(".")[0] + ".weight" in frozen]
    after = model.state_dict()
    assert frozen and all(torch.equal(after[k], before[k]) for k in frozen_state)


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
    assert load_weights_file(paths[0])["fc.weight"].shape == (1000, 128)
    with safe_open(paths[0], "pt") as handle:
        assert handle.metadata() == {"backbone": "tinycnn", "origin": "mmpipe-reference-random-init"}
