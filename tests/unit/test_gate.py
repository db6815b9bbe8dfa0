"""The promotion gate (pure): a challenger that passes every rule is promoted, and each rule alone can refuse."""

from __future__ import annotations

import pytest

from mmpipe.promote import Check, Policy, gate

POLICY = Policy(
    metric="macro_f1", min_gain=0.0, baseline_margin=0.02, max_recall_drop=0.05, min_class_recall=0.8
)
SMOKE_OK = Check("smoke_check", True, "reproduces its predictions")


def scores(f1: float, recalls: dict[str, float], **more: float) -> dict:
    return {
        "macro_f1": f1,
        "accuracy": f1,
        **more,
        "per_class": {c: {"recall": r} for c, r in recalls.items()},
    }


CHALLENGER = scores(0.95, {"a": 0.96, "b": 0.93, "c": 0.90})
CHAMPION = scores(0.92, {"a": 0.95, "b": 0.92, "c": 0.90})
BASELINE = scores(0.70, {"a": 0.8, "b": 0.6, "c": 0.7})


def verdicts(checks: list[Check]) -> dict[str, bool]:
    return {c.rule: c.passed for c in checks}


def test_a_better_model_passes_every_rule() -> None:
    checks = gate(POLICY, CHALLENGER, CHAMPION, BASELINE, SMOKE_OK)
    assert verdicts(checks) == dict.fromkeys(
        ("beats_baseline", "class_recall_floor", "beats_champion", "recall_vs_champion", "smoke_check"), True
    )
    no_champion = gate(POLICY, CHALLENGER, None, BASELINE, SMOKE_OK)
    assert all(c.passed for c in no_champion) and verdicts(no_champion)["beats_champion"]


@pytest.mark.parametrize(
    ("rule", "challenger", "champion", "baseline", "smoke", "policy"),
    [
        # Not better than the champion on the primary metric (ties refuse; so does a missing gain).
        ("beats_champion", scores(0.92, {"a": 0.96, "b": 0.93, "c": 0.9}), CHAMPION, BASELINE, SMOKE_OK, POLICY),
        ("beats_champion", CHALLENGER, CHAMPION, BASELINE, SMOKE_OK, Policy(min_gain=0.05)),
        # Better on average, but one class's recall drops more than 0.05 below the champion's.
        ("recall_vs_champion", scores(0.96, {"a": 1.0, "b": 0.86, "c": 0.99}), CHAMPION, BASELINE, SMOKE_OK,
         POLICY),
        # A class below the absolute floor, even with no champion to compare to.
        ("class_recall_floor", scores(0.9, {"a": 1.0, "b": 0.79, "c": 0.95}), None, BASELINE, SMOKE_OK, POLICY),
        # Not better than the thumbnail baseline by the margin, or no baseline recorded at all.
        ("beats_baseline", CHALLENGER, None, scores(0.94, {}), SMOKE_OK, POLICY),
        ("beats_baseline", CHALLENGER, None, None, SMOKE_OK, POLICY),
        # The model from the store does not reproduce its evaluation.
        ("smoke_check", CHALLENGER, CHAMPION, BASELINE, Check("smoke_check", False, "changed"), POLICY),
        # Another primary metric: better macro-F1 does not help when accuracy is the metric.
        ("beats_champion", scores(0.95, {"a": 0.96, "b": 0.93, "c": 0.9}) | {"accuracy": 0.90},
         CHAMPION, BASELINE, SMOKE_OK, Policy(metric="accuracy")),
        # A metric the evaluation could not compute (AUC with a class missing) refuses.
        ("beats_champion", CHALLENGER | {"macro_auc": None}, CHAMPION | {"macro_auc": 0.9},
         BASELINE | {"macro_auc": None}, SMOKE_OK, Policy(metric="macro_auc", baseline_margin=0.0)),
    ],
)  # fmt: skip
def test_each_rule_alone_refuses(rule, challenger, champion, baseline, smoke, policy) -> None:
    checks = gate(policy, challenger, champion, baseline, smoke)
    refused = {c.rule for c in checks if not c.passed}
    assert rule in refused
    assert all(c.detail for c in checks)


def test_each_refusal_is_only_that_rule() -> None:
    """The cases above differ from the passing case in one respect, so one rule fails (no collateral)."""
    worse = gate(POLICY, scores(0.96, {"a": 1.0, "b": 0.86, "c": 0.99}), CHAMPION, BASELINE, SMOKE_OK)
    assert [c.rule for c in worse if not c.passed] == ["recall_vs_champion"]
    assert "b 0.860" in next(c.detail for c in worse if not c.passed)
    floor = gate(POLICY, scores(0.9, {"a": 1.0, "b": 0.79, "c": 0.95}), None, BASELINE, SMOKE_OK)
    assert [c.rule for c in floor if not c.passed] == ["class_recall_floor"]


def test_a_class_the_challenger_never_predicts_counts_as_zero_recall() -> None:
    missing = scores(0.95, {"a": 0.96, "b": 0.93})  # no "c" at all
    checks = gate(POLICY, missing, CHAMPION, BASELINE, SMOKE_OK)
    assert not verdicts(checks)["recall_vs_champion"]
