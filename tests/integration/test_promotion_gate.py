"""Promotion in the catalog: chosen on validation, judged on test, one locked transaction, alias history,
rollback and forced promotion; on PostgreSQL and the embedded SQLite. Concurrent promotions on PostgreSQL."""

from __future__ import annotations

import json
import threading

import pytest

from mmpipe import catalog as catalog_mod
from mmpipe import promote
from mmpipe.errors import MmpipeError
from mmpipe.promote import Check, Policy

pytestmark = pytest.mark.integration

CLASSES = ("a", "b", "c")
SMOKE_OK = Check("smoke_check", True, "reproduces its predictions")
POLICY = Policy()


@pytest.fixture(params=["postgres", "sqlite"])
def db(request, pg_url, tmp_path) -> catalog_mod.Catalog:
    url = pg_url if request.param == "postgres" else f"sqlite:///{tmp_path / 'catalog.db'}"
    catalog = catalog_mod.Catalog(url)
    catalog_mod.upgrade(catalog)
    seed_baseline(catalog)
    yield catalog
    catalog.dispose()


def seed_baseline(db, f1: float = 0.6, snapshot: str = "test-v1") -> None:
    per_class = {c: {"recall": f1} for c in CLASSES}
    row = {"dataset_version": "d", "test_snapshot": snapshot, "n_train": 30, "n_images": 10}
    row |= dict.fromkeys(
        ("accuracy", "macro_precision", "macro_recall", "macro_specificity", "macro_auc"), f1
    )
    for name in ("majority", promote.THUMBNAIL_BASELINE):
        db.upsert(
            "baseline_evaluations",
            [
                row
                | {
                    "baseline": name,
                    "macro_f1": f1 if name != "majority" else 0.1,
                    "per_class_json": json.dumps(per_class),
                }
            ],
            ["dataset_version", "test_snapshot", "baseline"],
        )


def seed(db, version: str, val_f1: float, test_f1: float, status: str = "succeeded", run: str = "r") -> None:
    """A trained model with a validation metric and an evaluation on test-v1 (every class at ``test_f1``)."""
    db.upsert("training_runs", [{
        "training_run_id": f"{run}.{version}", "airflow_run_id": run, "candidate": version, "backbone": "tinycnn",
        "candidate_json": "{}", "dataset_version": "d", "status": status, "best_val_f1": val_f1,
        "model_version": version,
    }], ["training_run_id"])  # fmt: skip
    db.upsert("models", [{"model_version": version, "training_run_id": f"{run}.{version}", "backbone": "tinycnn",
                          "checkpoint_uri": "s3://b/c", "card_uri": "s3://b/card"}], ["model_version"])  # fmt: skip
    metrics = dict.fromkeys(("accuracy", "macro_precision", "macro_recall", "macro_specificity"), test_f1)
    db.upsert("evaluations", [{
        "model_version": version, "test_snapshot": "test-v1", "n_images": 10, **metrics, "macro_f1": test_f1,
        "macro_auc": 0.9, "ece": 0.1, "per_class_json": json.dumps({c: {"recall": test_f1} for c in CLASSES}),
        "confusion_json": "[]", "init": "random",
    }], ["model_version", "test_snapshot"])  # fmt: skip


def judge(db, versions: list[str], run: str, smoke: Check = SMOKE_OK, policy: Policy = POLICY) -> dict:
    challenger = promote.select_challenger(db, versions)
    baseline = db.query(
        "SELECT * FROM baseline_evaluations WHERE test_snapshot = 'test-v1' AND baseline = :b",
        b=promote.THUMBNAIL_BASELINE,
    )[0]
    return promote.judge(db, policy, challenger, "test-v1", run, baseline, smoke)


def assert_history_is_a_chain(db) -> list[dict]:
    """Each change starts where the previous one ended, seq counts 1..n, and the last is the champion."""
    rows = promote.history(db)
    assert [r["seq"] for r in rows] == list(range(1, len(rows) + 1))
    before = None
    for r in rows:
        assert r["from_version"] == before and r["to_version"] != before
        before = r["to_version"]
    assert promote.champion(db) == before
    return rows


def test_the_challenger_is_chosen_on_validation_and_failed_candidates_never_compete(db) -> None:
    seed(db, "m1", val_f1=0.90, test_f1=0.95)
    seed(db, "m2", val_f1=0.93, test_f1=0.90)  # worse on test: the test snapshot must not choose
    seed(db, "m3", val_f1=0.99, test_f1=0.99, status="failed")
    assert promote.select_challenger(db, ["m1", "m2", "m3"])["model_version"] == "m2"
    decision = judge(db, ["m1", "m2", "m3"], "run-1")
    assert decision["challenger"] == "m2" and decision["decision"] == "promoted"
    assert (decision["selected_by"], decision["selection_value"]) == ("best_val_f1", 0.93)
    seed(db, "m4", val_f1=0.5, test_f1=0.5, status="failed")
    with pytest.raises(MmpipeError, match="finished training successfully"):
        promote.select_challenger(db, ["m4"])


def test_the_gate_refuses_a_worse_model_and_records_every_rule(db) -> None:
    seed(db, "m1", 0.9, 0.90)
    assert judge(db, ["m1"], "run-1")["decision"] == "promoted"
    seed(db, "m2", 0.95, 0.89)
    kept = judge(db, ["m2"], "run-2")
    assert kept["decision"] == "kept_champion" and promote.champion(db) == "m1"
    assert kept["champion_before"] == "m1" and kept["champion_score"] == 0.90
    rules = {c["rule"]: c["passed"] for c in json.loads(kept["checks_json"])}
    assert rules == {"beats_baseline": True, "class_recall_floor": True, "beats_champion": False,
                     "recall_vs_champion": True, "smoke_check": True}  # fmt: skip
    seed(db, "m3", 0.95, 0.97)
    refused = judge(db, ["m3"], "run-3", smoke=Check("smoke_check", False, "changed 3 of 16 predictions"))
    assert refused["decision"] == "kept_champion" and "changed 3 of 16" in refused["reason"]
    # The same run asks again (a retried task): the recorded decision, not a new one.
    assert judge(db, ["m3"], "run-3")["decision"] == "kept_champion"
    assert judge(db, ["m3"], "run-4")["decision"] == "promoted" and promote.champion(db) == "m3"
    assert [r["to_version"] for r in assert_history_is_a_chain(db)] == ["m1", "m3"]
    board = {r["model_version"]: r for r in db.query("SELECT * FROM leaderboard")}
    assert board["m3"]["is_champion"] == 1 and board["m1"]["promoted"] == 1 and board["m2"]["promoted"] == 0
    assert board["m2"]["val_macro_f1"] == 0.95 and board["m2"]["thumbnail_f1"] == 0.6
    assert board["m2"]["majority_f1"] == 0.1 and board["m2"]["init"] == "random"


def test_a_model_below_the_thumbnail_baseline_is_never_promoted(db) -> None:
    seed(db, "m1", 0.9, 0.61)  # beats the 0.60 baseline, but not by the 0.02 margin; no champion yet
    decision = judge(db, ["m1"], "run-1", policy=Policy(min_class_recall=0.5))
    assert decision["decision"] == "kept_champion" and "thumbnail baseline" in decision["reason"]
    assert promote.champion(db) is None and promote.history(db) == []


def test_a_decision_is_one_transaction(db, monkeypatch) -> None:
    """If writing the alias change fails, the promotion row is rolled back with it."""
    seed(db, "m1", 0.9, 0.9)

    def crash(*args, **kwargs):
        raise RuntimeError("crash between the two writes")

    monkeypatch.setattr(promote, "_change_alias", crash)
    with pytest.raises(RuntimeError):
        judge(db, ["m1"], "run-1")
    assert db.scalar("SELECT count(*) FROM promotions") == 0 and promote.champion(db) is None


def test_rollback_and_forced_promotion_are_recorded_changes(db) -> None:
    for n, f1 in enumerate((0.85, 0.9, 0.95), start=1):
        seed(db, f"m{n}", f1, f1)
        assert judge(db, [f"m{n}"], f"run-{n}")["decision"] == "promoted"
    back = promote.rollback(db, "manual__1", "m3 mislabels portable chest films")
    assert (back["from_version"], back["to_version"], back["action"]) == ("m3", "m2", "rollback")
    assert promote.rollback(db, "manual__2", "again")["to_version"] == "m1"  # walks back, not a toggle
    with pytest.raises(MmpipeError, match="no champion before m1"):
        promote.rollback(db, "manual__3", "nothing earlier")
    assert promote.rollback(db, "manual__4", "back to the newest", to="m3")["to_version"] == "m3"
    seed(db, "m9", 0.1, 0.1)
    with pytest.raises(MmpipeError, match="never champion"):
        promote.rollback(db, "manual__5", "not a former champion", to="m9")
    with pytest.raises(MmpipeError, match="needs a reason"):
        promote.force(db, "m9", "manual__6", " ")
    with pytest.raises(MmpipeError, match="not found"):
        promote.force(db, "nope", "manual__6", "typo")
    forced = promote.force(db, "m9", "manual__7", "vendor hotfix validated offline")
    assert forced["action"] == "force" and promote.champion(db) == "m9"
    rows = assert_history_is_a_chain(db)
    assert [r["action"] for r in rows] == ["promote"] * 3 + ["rollback"] * 3 + ["force"]
    assert (
        rows[-1]["reason"] == "vendor hotfix validated offline" and rows[-1]["airflow_run_id"] == "manual__7"
    )


def test_concurrent_promotions_leave_one_champion_and_a_consistent_history(pg_url) -> None:
    """Eight promotions at once, each on its own connection, each better than the last on test: every
    decision is taken against the champion of that moment (never a stale one), so the history is a chain."""
    db = catalog_mod.Catalog(pg_url)
    catalog_mod.upgrade(db)
    seed_baseline(db)
    versions = [f"m{n}" for n in range(8)]
    for n, version in enumerate(versions):
        seed(db, version, 0.9, 0.85 + 0.01 * n, run=f"run-{n}")
    start, results, errors = threading.Barrier(len(versions)), {}, []

    def run(version: str) -> None:
        own = catalog_mod.Catalog(pg_url)
        try:
            start.wait()
            results[version] = judge(own, [version], f"run-{version}")
        except Exception as exc:  # reported below: a failure in a thread must fail the test
            errors.append(exc)
        finally:
            own.dispose()

    threads = [threading.Thread(target=run, args=(v,)) for v in versions]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert db.scalar("SELECT count(*) FROM model_aliases WHERE alias = 'champion'") == 1
    rows = assert_history_is_a_chain(db)
    promoted = [d for d in results.values() if d["decision"] == "promoted"]
    assert len(rows) == len(promoted) >= 1
    # Each promotion was judged against the champion it replaced, as recorded in the history.
    by_to = {r["to_version"]: r for r in rows}
    for d in promoted:
        assert by_to[d["challenger"]]["from_version"] == d["champion_before"]
    for d in results.values():
        if d["decision"] == "kept_champion":
            assert d["champion_before"] is not None and d["champion_score"] >= d["challenger_f1"]
    assert promote.champion(db) == "m7" or "m7" not in [d["challenger"] for d in promoted]
    assert results["m7"]["decision"] == "promoted"  # the best beats whichever champion it met
    db.dispose()
