"""Evaluation evidence and the promotion path with real models: baselines on the same snapshot, ECE
before/after temperature, latency, precision agreement and PNGs; the card (not the checkpoint)
records the evaluation; the smoke check catches a model that no longer reproduces its evaluation;
a failed candidate does not stop the others; rollback and force from the CLI.

Real SeaweedFS + PostgreSQL; tinycnn at 32 px for two epochs.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save as save_safetensors

from mmpipe import cli, dataset, evaluate, ingest, modelcard, pipeline, promote, synth
from mmpipe.models import create_model
from mmpipe.train import Candidate, train_candidate
from tests.conftest import export_env

pytestmark = pytest.mark.integration

TINY = {"backbone": "tinycnn", "init": "random", "image_size": 32, "epochs": 2, "batch_size": 32}
TINY |= {"freeze_ratio": 0.0, "finetune_freeze_ratio": 0.0}
RUN = "retrain__gate"


@pytest.fixture
def trained(ready, monkeypatch):
    """A planned dataset and one candidate trained in RUN; a second candidate of RUN that failed."""
    settings, store, catalog = ready(split_train=0.5, split_val=0.25, split_test=0.25, device="cpu")
    export_env(monkeypatch, settings)
    for obj in synth.generate(120, size=64, seed=1, images_per_patient=(1, 2), archive_fraction=0):
        store.put(f"training/{obj.key}", obj.body)
    ingest.run(settings, store, catalog, "ingest__a")
    dataset.validate_ingest(settings, store, catalog, "ingest__a")
    prepared = dataset.prepare_dataset(settings, store, catalog, RUN)
    good = train_candidate(
        settings, store, catalog, prepared["plan_uri"], Candidate.from_dict({"name": "good", **TINY}), RUN
    )
    # No pretrained weights are registered for tinycnn: this candidate fails as an OOM would, mid-run.
    broken = Candidate.from_dict({"name": "broken", **TINY, "init": "pretrained"})
    with pytest.raises(Exception):  # noqa: B017 - whatever the failure, it must not stop the others
        train_candidate(settings, store, catalog, prepared["plan_uri"], broken, RUN)
    return settings, store, catalog, prepared, good


def checkpoint_key(store, card_uri: str) -> str:
    return store.key_of(card_uri).rsplit("/", 1)[0] + "/model.safetensors"


def test_evaluation_records_baselines_calibration_latency_plots_and_the_card(trained) -> None:
    settings, store, catalog, prepared, good = trained
    snapshot, version = prepared["test_snapshot"], good["model_version"]
    weights = store.get(checkpoint_key(store, good["card_uri"]))
    # A deliberately flat temperature in the card: evaluation must score with it (ECE after) and report
    # the raw logits' calibration beside it (ECE before); the predictions, hence accuracy, do not move.
    card_key = store.key_of(good["card_uri"])
    untouched = evaluate.evaluate_model(settings, store, catalog, version, snapshot)
    store.put_json(card_key, store.get_json(card_key) | {"temperature": 4.0})
    row = evaluate.evaluate_model(settings, store, catalog, version, snapshot)
    assert row["latency_ms"] > 0 and row["device"] == "cpu" and row["init"] == "random"
    assert row["temperature"] == 4.0 and row["accuracy"] == untouched["accuracy"]
    assert row["ece_before"] == pytest.approx(untouched["ece_before"])
    assert abs(row["ece"] - row["ece_before"]) > 1e-3

    baselines = {
        b["baseline"]: b
        for b in catalog.query("SELECT * FROM baseline_evaluations WHERE test_snapshot = :s", s=snapshot)
    }
    assert set(baselines) == {"majority", promote.THUMBNAIL_BASELINE}
    majority = json.loads(baselines["majority"]["per_class_json"])
    assert sorted(c["recall"] for c in majority.values()) == [0, 0, 0, 0, 1]  # always the same class
    assert baselines[promote.THUMBNAIL_BASELINE]["macro_f1"] > baselines["majority"]["macro_f1"]
    assert {b["n_images"] for b in baselines.values()} == {row["n_images"]}
    assert {b["dataset_version"] for b in baselines.values()} == {prepared["dataset_version"]}

    report = store.get_json(store.key_of(row["report_uri"]))
    assert set(report["plots"]) == {"confusion", "roc", "reliability", "training_curves"}
    for uri in report["plots"].values():
        assert store.get(store.key_of(uri)).startswith(b"\x89PNG")
    assert len(report["smoke_batch"]["image_ids"]) == evaluate.SMOKE_BATCH

    card = modelcard.ModelCard.from_json(store.get_json(store.key_of(good["card_uri"])))
    assert card.test_snapshot == snapshot and card.test_metrics["macro_f1"] == row["macro_f1"]
    assert set(card.test_metrics["recall"]) == set(card.classes)
    assert 0.0 <= card.precision_agreement["bfloat16"] <= 1.0
    assert store.get(checkpoint_key(store, good["card_uri"])) == weights  # the checkpoint is untouched

    board = {r["model_version"]: r for r in pipeline.leaderboard()}
    assert board[version]["thumbnail_f1"] == baselines[promote.THUMBNAIL_BASELINE]["macro_f1"]
    assert board[version]["val_macro_f1"] is not None and board[version]["init"] == "random"


def test_the_smoke_check_catches_a_model_that_changed_since_its_evaluation(trained) -> None:
    settings, store, catalog, prepared, good = trained
    snapshot, version = prepared["test_snapshot"], good["model_version"]
    evaluate.evaluate_model(settings, store, catalog, version, snapshot)
    ok, detail = evaluate.smoke_check(settings, store, catalog, version, snapshot)
    assert ok, detail
    torch.manual_seed(123)
    other = {
        k: v.contiguous() for k, v in create_model("tinycnn", len(settings.classes)).state_dict().items()
    }
    store.put(checkpoint_key(store, good["card_uri"]), save_safetensors(other))  # replaced behind our back
    ok, detail = evaluate.smoke_check(settings, store, catalog, version, snapshot)
    assert not ok and "changed" in detail
    decision = pipeline.promote_best([version], snapshot, RUN)
    assert decision["decision"] == "kept_champion" and promote.champion(catalog) is None
    smoke = next(c for c in json.loads(decision["checks_json"]) if c["rule"] == "smoke_check")
    assert smoke == {"rule": "smoke_check", "passed": False, "detail": detail}


def test_a_failed_candidate_is_recorded_and_the_others_still_compete(trained) -> None:
    _, _, catalog, prepared, good = trained
    runs = {
        r["candidate"]: r
        for r in catalog.query("SELECT * FROM training_runs WHERE airflow_run_id = :r", r=RUN)
    }
    assert runs["broken"]["status"] == "failed" and runs["good"]["status"] == "succeeded"
    # What the DAG's mapped evaluate tasks do: the failed candidate is skipped, the other evaluated.
    snapshot = prepared["test_snapshot"]
    assert pipeline.evaluate_candidate(RUN, "broken", snapshot) is None
    evaluated = pipeline.evaluate_candidate(RUN, "good", snapshot)
    assert evaluated["model_version"] == good["model_version"]
    decision = pipeline.promote_best([evaluated["model_version"]], snapshot, RUN)
    assert decision["challenger"] == good["model_version"] and decision["selected_by"] == "best_val_f1"
    assert decision["selection_value"] == runs["good"]["best_val_f1"]


def test_rollback_and_force_from_the_cli(trained, capsys) -> None:
    _, _, catalog, _, good = trained
    version = good["model_version"]
    assert cli.main(["promote", "--force", version]) == 2  # a forced promotion needs a reason
    assert "needs a reason" in capsys.readouterr().err
    assert (
        cli.main(
            ["promote", "--force", version, "--reason", "reviewed by radiology", "--run-id", "manual__1"]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["to_version"] == version
    assert promote.champion(catalog) == version
    assert cli.main(["promote", "--rollback"]) == 2  # nothing before the first champion
    assert "no champion before" in capsys.readouterr().err
    (change,) = promote.history(catalog)
    assert (change["action"], change["reason"], change["airflow_run_id"]) == (
        "force",
        "reviewed by radiology",
        "manual__1",
    )
