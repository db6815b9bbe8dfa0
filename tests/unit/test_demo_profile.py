"""The demo trains EfficientNet-Lite0 pretrained and from random weights side by side, each init with
the recipe it needs, and says under the leaderboard who missed the target and whether pretraining helped."""

from __future__ import annotations

import pytest

from mmpipe import pipeline
from mmpipe.candidate import Candidate, defaults
from mmpipe.demo import PROFILES, TARGET_F1, pretraining_verdict
from mmpipe.train import effective_recipe


def lite0_twins(profile: str) -> dict[str, Candidate]:
    """The profile's Lite0 candidates as the retrain DAG builds them: its conf over the shared defaults."""
    conf = PROFILES[profile].retrain_conf
    shared = defaults() | {k: v for k, v in conf.items() if k in defaults()}
    built = [Candidate.from_dict(c) for c in pipeline.candidates(conf["candidates"], **shared)]
    return {c.init: c for c in built if c.backbone == "efficientnet_lite0"}


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_every_profile_trains_lite0_pretrained_and_random_on_the_same_budget(profile: str) -> None:
    twins = lite0_twins(profile)
    assert sorted(twins) == ["pretrained", "random"]
    pretrained, random = twins["pretrained"], twins["random"]
    assert pretrained.name != random.name
    budget = ("epochs", "batch_size", "input_size", "seed")
    assert [getattr(pretrained, b) for b in budget] == [getattr(random, b) for b in budget]


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_the_random_twin_trains_every_layer_in_one_annealed_stage(profile: str) -> None:
    recipe, warnings = effective_recipe(lite0_twins(profile)["random"])
    assert (recipe.freeze_ratio, recipe.finetune_freeze_ratio) == (0.0, 0.0) and warnings
    # No plateau can reach stage 2 (which for a random init would only drop the rate to lr_finetune).
    assert recipe.scheduler == "cosine" and recipe.plateau_patience >= recipe.epochs


def test_the_verdict_names_the_latest_runs_misses_and_whether_pretraining_helped() -> None:
    def row(run: str, name: str, init: str, f1: float) -> dict:
        return {
            "airflow_run_id": run,
            "candidate": name,
            "backbone": "efficientnet_lite0",
            "init": init,
            "macro_f1": f1,
        }

    board = [  # newest first, as the leaderboard lists them
        row("r2", "efficientnet-lite0", "pretrained", 0.95),
        row("r2", "efficientnet-lite0-random", "random", 0.62),
        row("r1", "older-candidate", "random", 0.10),
    ]
    text = pretraining_verdict(board)
    assert f"below {TARGET_F1} test macro-F1: efficientnet-lite0-random 0.620\n" in text
    assert "older-candidate" not in text
    assert text.endswith("pretraining helps efficientnet_lite0: 0.950 pretrained vs 0.620 random")
    board[0]["macro_f1"] = 0.5
    assert (
        "pretraining does not help efficientnet_lite0: 0.500 pretrained vs 0.620 random"
        in pretraining_verdict(board)
    )
    assert "below 0.9 test macro-F1: none" in pretraining_verdict([row("r3", "a", "pretrained", 0.93)])
