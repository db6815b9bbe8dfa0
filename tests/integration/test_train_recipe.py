"""The two-stage recipe as trained: frozen blocks keep their pretrained weights, stage 2 runs at the
fine-tuning rate, early stopping ends the run, the card holds recipe and calibration; random init
is never frozen; init=champion warm-starts from the champion of the same backbone only.

Real SeaweedFS + PostgreSQL; tinycnn (4 blocks) at 32 px with reference weights in the registry.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load as load_safetensors

from mmpipe import checkpoints, dataset, ingest, pipeline, synth, weights
from mmpipe.errors import ConfigError
from mmpipe.evaluate import stage_two_start
from mmpipe.models import backbone_blocks, create_model, export_reference_weights, weights_fingerprint
from mmpipe.train import Candidate, train_candidate
from tests.conftest import export_env

pytestmark = pytest.mark.integration


@pytest.fixture
def planned(ready, pg_url, tmp_path):
    settings, store, catalog = ready(
        database_url=pg_url, split_train=0.6, split_val=0.2, split_test=0.2, device="cpu", image_size=32
    )
    for obj in synth.generate(80, size=48, seed=2, images_per_patient=(1, 2), archive_fraction=0):
        store.put(f"training/{obj.key}", obj.body)
    ingest.run(settings, store, catalog, "ingest__recipe")
    dataset.validate_ingest(settings, store, catalog, "ingest__recipe")
    prepared = dataset.prepare_dataset(settings, store, catalog, "retrain__recipe")
    export_reference_weights("tinycnn", tmp_path / "tinycnn.safetensors", seed=1)
    weights.import_weights(store, "tinycnn", tmp_path / "tinycnn.safetensors")
    return settings, store, catalog, prepared


def train(env, run_id: str, **options) -> tuple[dict, dict, dict]:
    settings, store, catalog, prepared = env
    candidate = Candidate.from_dict({"backbone": "tinycnn", "image_size": 32, **options})
    result = train_candidate(settings, store, catalog, prepared["plan_uri"], candidate, run_id)
    prefix = store.key_of(result["card_uri"]).rsplit("/", 1)[0]
    state = load_safetensors(store.get(f"{prefix}/model.safetensors"))
    return result, store.get_json(f"{prefix}/card.json"), state


def test_pretrained_two_stages_keep_frozen_blocks_and_record_recipe_and_calibration(planned):
    _, store, catalog, _ = planned
    options = {
        "freeze_ratio": 0.67,
        "finetune_freeze_ratio": 0.33,
        "epochs": 6,
        "patience": 2,
        "min_delta": 100.0,
    }  # only the first epoch improves on nothing by 100: stage 2 after the second, stop two later
    result, card, state = train(planned, "manual__two", **options)

    epochs = catalog.query(
        "SELECT epoch, stage, lr FROM epoch_metrics WHERE training_run_id = :t ORDER BY epoch",
        t=result["training_run_id"],
    )
    assert [(e["stage"], e["lr"]) for e in epochs] == [(1, 1e-3), (1, 1e-3), (2, 1e-4), (2, 1e-4)]
    assert stage_two_start(epochs) == 2  # the training-curves PNG marks stage 2 from this epoch on
    run = catalog.query(
        "SELECT * FROM training_runs WHERE training_run_id = :t", t=result["training_run_id"]
    )[0]
    assert (run["status"], run["epochs_run"], run["warnings"]) == ("succeeded", 4, None)  # early stop

    pretrained, fingerprint = weights.fetch_weights(store, "tinycnn")
    first_block = backbone_blocks(create_model("tinycnn", 5))[0]
    assert all(torch.equal(state[name], pretrained[name]) for name in first_block)  # frozen in both stages
    # The running statistics of a frozen block stay pretrained too; the last block (never frozen) trained.
    assert torch.equal(state["features.1.running_mean"], pretrained["features.1.running_mean"])
    assert not torch.equal(state["features.9.weight"], pretrained["features.9.weight"])

    assert card["init"] == "pretrained" and card["weights_fingerprint"] == fingerprint
    assert card["freeze_ratio"] == 0.67 and card["warnings"] == []
    assert (
        card["recipe"] == Candidate.from_dict({"backbone": "tinycnn", "image_size": 32, **options}).to_dict()
    )
    assert card["dataset_version"] == run["dataset_version"]
    assert (
        0.05 <= card["temperature"] <= 20 and card["ece_before"] is not None and card["ece_after"] is not None
    )
    assert card["ood_threshold"] is not None and card["ood_recall"] >= 0.95
    assert checkpoints.load(store, result["training_run_id"]) is None  # resume state dropped once done


def test_random_init_is_not_frozen_and_the_warning_is_recorded(planned):
    _, _, catalog, _ = planned
    result, card, _ = train(planned, "manual__random", init="random", freeze_ratio=0.7, epochs=1)
    assert card["freeze_ratio"] == 0.0 and card["weights_fingerprint"] is None
    assert len(card["warnings"]) == 1 and "freeze_ratio 0.7" in card["warnings"][0]
    recorded = catalog.scalar(
        "SELECT warnings FROM training_runs WHERE training_run_id = :t", t=result["training_run_id"]
    )
    assert json.loads(recorded) == card["warnings"]
    assert card["recipe"]["freeze_ratio"] == 0.7  # the recipe as asked; the card says what was trained


def test_champion_init_warm_starts_the_same_backbone_only(planned, monkeypatch):
    settings, _, catalog, _ = planned
    with pytest.raises(ConfigError, match="no champion"):
        train(planned, "manual__nochamp", init="champion", epochs=1)
    first, _, champion_state = train(planned, "manual__first", epochs=1)
    catalog.upsert(
        "model_aliases", [{"alias": "champion", "model_version": first["model_version"]}], ["alias"]
    )

    _, card, _ = train(planned, "manual__warm", init="champion", epochs=1)
    assert card["init"] == "champion" and card["weights_fingerprint"] == weights_fingerprint(champion_state)

    export_env(monkeypatch, settings)
    with pytest.raises(ConfigError, match="is a tinycnn, not a resnet18"):
        pipeline.candidates([{"backbone": "resnet18", "init": "champion"}])


def test_pretrained_without_registered_weights_names_the_import_command(planned):
    settings, store, catalog, prepared = planned
    candidate = Candidate.from_dict({"backbone": "resnet18", "image_size": 32, "epochs": 1})
    with pytest.raises(ConfigError, match="mmpipe weights import resnet18"):
        train_candidate(settings, store, catalog, prepared["plan_uri"], candidate, "manual__noweights")
