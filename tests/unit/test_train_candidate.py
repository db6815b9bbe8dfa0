"""A candidate is the papers' recipe unless told otherwise, every option is checked up front, and a
random-init backbone is never frozen."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch

from mmpipe import checkpoints, pipeline
from mmpipe.candidate import Candidate, candidate_schema, defaults, option_schema
from mmpipe.errors import ConfigError
from mmpipe.models import backbone_blocks, create_model
from mmpipe.train import _stage_setup, effective_recipe, make_optimizer, make_scheduler


def test_the_default_candidate_is_the_papers_recipe() -> None:
    c = Candidate.from_dict({"backbone": "resnet18"})
    assert (c.name, c.init, c.optimizer, c.lr, c.lr_finetune, c.batch_size, c.epochs) == (
        "resnet18", "pretrained", "adam", 1e-3, 1e-4, 16, 10
    )  # fmt: skip
    assert 0.5 <= c.freeze_ratio <= 0.7 and c.finetune_freeze_ratio < c.freeze_ratio
    optimizer = make_optimizer(c, create_model("tinycnn", 5), c.lr)
    assert isinstance(optimizer, torch.optim.Adam) and optimizer.defaults["betas"] == (0.9, 0.999)


@pytest.mark.parametrize(("backbone", "size"), [("inceptionv3", 299), ("resnet18", 224), ("tinycnn", 64)])
def test_the_input_size_is_the_backbones_native_one_unless_overridden(backbone: str, size: int) -> None:
    assert Candidate.from_dict({"backbone": backbone}).input_size == size
    assert Candidate.from_dict({"backbone": backbone, "image_size": 96}).input_size == 96


def test_random_init_is_never_frozen_and_says_so() -> None:
    candidate = Candidate.from_dict({"backbone": "resnet18", "init": "random", "freeze_ratio": 0.5})
    assert candidate.name == "resnet18-random"
    recipe, warnings = effective_recipe(candidate)
    assert (recipe.freeze_ratio, recipe.finetune_freeze_ratio) == (0.0, 0.0)
    assert len(warnings) == 1 and "freeze_ratio 0.5" in warnings[0] and "ignored" in warnings[0]
    pretrained, none = effective_recipe(Candidate.from_dict({"backbone": "resnet18"}))
    assert pretrained.freeze_ratio == 0.6 and none == []


def test_stage_two_unfreezes_later_blocks_with_a_fresh_optimizer_at_the_lower_rate() -> None:
    candidate = Candidate.from_dict(
        {"backbone": "resnet18", "freeze_ratio": 0.6, "finetune_freeze_ratio": 0.2}
    )
    model = create_model("resnet18", 5)
    blocks = backbone_blocks(model)
    first, _ = _stage_setup(candidate, model, 1, 10)
    trainable_1 = {id(p) for p in first.param_groups[0]["params"]}
    second, _ = _stage_setup(candidate, model, 2, 5)
    trainable_2 = {id(p) for p in second.param_groups[0]["params"]}
    assert (first.param_groups[0]["lr"], second.param_groups[0]["lr"]) == (1e-3, 1e-4)
    assert trainable_1 < trainable_2 and second.state == {}
    params = dict(model.named_parameters())
    assert all(
        id(params[name]) not in trainable_1 for block in blocks[: round(0.6 * len(blocks))] for name in block
    )
    assert all(
        id(params[name]) in trainable_2 for block in blocks[round(0.2 * len(blocks)) :] for name in block
    )


def test_adamw_and_cosine_are_options() -> None:
    c = Candidate.from_dict({"backbone": "tinycnn", "optimizer": "adamw", "scheduler": "cosine", "epochs": 4})
    optimizer = make_optimizer(c, create_model("tinycnn", 5), c.lr)
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["weight_decay"] == 0.01
    scheduler = make_scheduler(c, optimizer, 4)
    lrs = []
    for _ in range(4):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == 1e-3 and lrs == sorted(lrs, reverse=True) and lrs[-1] < 2e-4


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"loss": "x"}, "unknown candidate option"),
        ({"init": "imagenet"}, "init must be one of"),
        ({"optimizer": "sgd"}, "optimizer must be one of"),
        ({"scheduler": "step"}, "scheduler must be one of"),
        ({"amp": "fp8"}, "amp must be one of"),
        ({"freeze_ratio": 0.2, "finetune_freeze_ratio": 0.5}, "finetune_freeze_ratio <= freeze_ratio"),
        ({"epochs": "10"}, "epochs must be int"),
        ({"weighted_loss": 1}, "weighted_loss must be bool"),
        ({"lr": 0}, "lr must be positive"),
        ({"image_size": 32, "backbone": "inceptionv3"}, "image_size >= 75"),
        ({"backbone": "resnet19"}, "unknown backbone"),
        ({"name": "a/b"}, "candidate name"),
    ],
)
def test_bad_options_fail_with_one_clear_error(options: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Candidate.from_dict({"backbone": "resnet18", **options})


def test_candidates_are_per_candidate_over_shared_options_with_unique_names() -> None:
    chosen = pipeline.candidates(
        [
            {"backbone": "efficientnet_lite0"},
            {"backbone": "efficientnet_lite0", "init": "random", "lr": 3e-3},
        ],
        epochs=4,
        image_size=None,
    )
    assert [(c["name"], c["init"], c["lr"], c["epochs"]) for c in chosen] == [
        ("efficientnet-lite0", "pretrained", 1e-3, 4),
        ("efficientnet-lite0-random", "random", 3e-3, 4),
    ]
    assert [c["name"] for c in pipeline.candidates(None, ["resnet18", "tinycnn"], init="random")] == [
        "resnet18-random",
        "tinycnn-random",
    ]
    with pytest.raises(ConfigError, match="used twice"):
        pipeline.candidates([{"backbone": "resnet18"}, {"backbone": "resnet18"}])


def test_the_param_schema_covers_every_option_with_its_default() -> None:
    schema = candidate_schema(["resnet18"])
    assert set(schema["properties"]) == set(defaults()) | {"name", "backbone"}
    assert option_schema("init")["enum"] == ["pretrained", "random", "champion"]
    assert option_schema("image_size")["type"] == ["null", "integer"]


def test_rng_states_round_trip_through_a_weights_only_checkpoint() -> None:
    states = checkpoints.rng_states()
    expected = torch.rand(3), np.random.rand(2), random.random()
    buffer = io.BytesIO()
    torch.save(states, buffer)
    checkpoints.set_rng_states(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    again = torch.rand(3), np.random.rand(2), random.random()
    assert torch.equal(expected[0], again[0]) and (expected[1] == again[1]).all() and expected[2] == again[2]
