"""Training consumes a plan: deterministic given the seeds, preprocessing carried into the model card,
optional weighted/focal loss; freezing a new test snapshot re-evaluates the champion, on the record.

Real SeaweedFS + PostgreSQL; tinycnn at 32 px for one or two epochs, so the file stays quick on CPU.
"""

from __future__ import annotations

import json

import pytest

from mmpipe import dataset, evaluate, ingest, modelcard, promote, splits, synth
from mmpipe.errors import ConfigError
from mmpipe.train import Candidate, train_candidate

pytestmark = pytest.mark.integration

TINY = {"backbone": "tinycnn", "init": "random", "image_size": 32, "epochs": 2, "batch_size": 32}


@pytest.fixture
def planned(ready, pg_url):
    """A validated, planned dataset with CLAHE and viridis chosen in the settings."""
    settings, store, catalog = ready(
        database_url=pg_url, split_train=0.5, split_val=0.25, split_test=0.25, clahe_clip_limit=2.5,
        clahe_tiles=4, channel_mode="viridis", device="cpu",
    )  # fmt: skip
    add_batch(settings, store, catalog, "ingest__a", 120, seed=1)
    prepared = dataset.prepare_dataset(settings, store, catalog, "retrain__1")
    return settings, store, catalog, prepared


def add_batch(settings, store, catalog, run_id: str, n: int, seed: int) -> None:
    for obj in synth.generate(n, size=64, seed=seed, images_per_patient=(1, 2), archive_fraction=0):
        store.put(f"training/{obj.key}", obj.body)
    ingest.run(settings, store, catalog, run_id)
    dataset.validate_ingest(settings, store, catalog, run_id)


def train(env, run_id: str, **options) -> dict:
    settings, store, catalog, prepared = env
    candidate = Candidate.from_dict({"name": "tiny", **TINY, **options})
    return train_candidate(settings, store, catalog, prepared["plan_uri"], candidate, run_id)


def test_training_is_deterministic_and_the_card_replays_the_plans_preprocessing(planned):
    settings, store, catalog, prepared = planned
    first, second = train(planned, "manual__a"), train(planned, "manual__b")
    assert first["model_version"] != second["model_version"]
    weights = [
        store.get(store.key_of(r["card_uri"]).rsplit("/", 1)[0] + "/model.safetensors")
        for r in (first, second)
    ]
    assert weights[0] == weights[1]  # same plan, same seeds: identical augmentation, order and init
    metrics = [
        catalog.query("SELECT epoch, train_loss, val_macro_f1 FROM epoch_metrics WHERE training_run_id = :t "
                      "ORDER BY epoch", t=r["training_run_id"])
        for r in (first, second)
    ]  # fmt: skip
    assert metrics[0] == metrics[1] and len(metrics[0]) == 2

    card = modelcard.ModelCard.from_json(store.get_json(store.key_of(first["card_uri"])))
    assert (card.clahe_clip_limit, card.clahe_tiles, card.channel_mode) == (2.5, 4, "viridis")
    assert card.dataset_version == prepared["dataset_version"] and card.plan_uri == prepared["plan_uri"]
    assert card.canonical_size == settings.image_size

    other_seed = train(planned, "manual__c", seed=1)
    other = store.get(store.key_of(other_seed["card_uri"]).rsplit("/", 1)[0] + "/model.safetensors")
    assert other != weights[0]


def test_a_candidate_may_override_the_channel_mode_and_use_a_weighted_focal_loss(planned):
    _, store, catalog, _ = planned
    result = train(planned, "manual__focal", name="tiny-focal", channel_mode="inferno", weighted_loss=True,
                   focal_gamma=2.0, epochs=1)  # fmt: skip
    card = modelcard.ModelCard.from_json(store.get_json(store.key_of(result["card_uri"])))
    assert card.channel_mode == "inferno" and card.clahe_clip_limit == 2.5
    (run,) = catalog.query(
        "SELECT * FROM training_runs WHERE training_run_id = :t", t=result["training_run_id"]
    )
    assert run["status"] == "succeeded" and json.loads(run["candidate_json"])["focal_gamma"] == 2.0
    loss = catalog.scalar(
        "SELECT train_loss FROM epoch_metrics WHERE training_run_id = :t", t=run["training_run_id"]
    )
    assert 0 < loss < 10


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"channel_mode": "jet"}, "channel_mode"),
        ({"focal_gamma": -1.0}, "focal_gamma"),
        ({"loss": "x"}, "unknown"),
    ],
)
def test_bad_candidate_options_fail_clearly(options, message):
    with pytest.raises(ConfigError, match=message):
        Candidate.from_dict({"name": "tiny", **TINY, **options})


def test_freezing_a_new_snapshot_re_evaluates_the_champion_on_the_record(planned):
    settings, store, catalog, _ = planned
    assert evaluate.evaluate_champion(settings, store, catalog, "test-v1", reason="no champion") is None
    trained = train(planned, "manual__champ", epochs=1)
    evaluate.evaluate_model(settings, store, catalog, trained["model_version"], "test-v1")
    promote.force(catalog, trained["model_version"], "manual__champ", "a champion to re-evaluate")

    add_batch(settings, store, catalog, "ingest__b", 80, seed=2)
    frozen = dataset.freeze_test(settings, store, catalog, "test-v2", reason="more test patients")
    recorded = frozen["champion_evaluation"]
    assert recorded["model_version"] == trained["model_version"] and recorded["evaluated_now"]
    assert "test-v2" in recorded["reason"] and "more test patients" in recorded["reason"]
    (row,) = catalog.query(
        "SELECT * FROM evaluations WHERE model_version = :m AND test_snapshot = 'test-v2'",
        m=trained["model_version"],
    )
    assert row["n_images"] == frozen["n_images"] == len(splits.snapshot_images(catalog, "test-v2"))
    assert row["n_images"] > catalog.scalar("SELECT n_images FROM test_snapshots WHERE name = 'test-v1'")
    (logged,) = catalog.query("SELECT * FROM champion_evaluations WHERE test_snapshot = 'test-v2'")
    assert logged["macro_f1"] == pytest.approx(row["macro_f1"])

    again = evaluate.evaluate_champion(settings, store, catalog, "test-v2", reason="retry")
    assert not again["evaluated_now"] and again["reason"] == logged["reason"]
    assert catalog.scalar("SELECT count(*) FROM champion_evaluations WHERE test_snapshot = 'test-v2'") == 1

    # The DAG path: prepare_dataset freezes on request, the evaluate_champion task measures the champion.
    third = dataset.prepare_dataset(settings, store, catalog, "retrain__2", freeze_test="test-v3")
    assert third["frozen_now"] == "test-v3" and third["test_snapshot"] == "test-v3"
    measured = evaluate.evaluate_champion(settings, store, catalog, "test-v3", reason="frozen by retrain__2")
    assert measured["evaluated_now"] and measured["model_version"] == trained["model_version"]
