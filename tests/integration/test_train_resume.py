"""A training job SIGKILLed mid-run and rerun with the same run id resumes from its last epoch's
checkpoint and ends exactly where an uninterrupted run with the same seed ends: same epochs, same
per-epoch metrics, same weights, same calibration.

Real `mmpipe train` processes (one CPU thread each, so float reductions run in one order), real
SeaweedFS + PostgreSQL. A pretrained tinycnn (reference weights imported into the registry) so the
resumed run also restores frozen blocks, the stage and the stage-2 optimizer.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from mmpipe import checkpoints, dataset, ingest, synth, weights
from mmpipe.models import export_reference_weights
from mmpipe.train import run_ids
from tests.conftest import export_env

pytestmark = pytest.mark.integration

CANDIDATE = {
    "name": "tiny",
    "backbone": "tinycnn",
    "init": "pretrained",
    "freeze_ratio": 0.67,
    "finetune_freeze_ratio": 0.33,
    "image_size": 32,
    "epochs": 10,
    "batch_size": 16,
    "patience": 3,
    "min_delta": 0.05,
    "lr": 1e-2,
    "lr_finetune": 1e-3,
    "optimizer": "adamw",
}
KILL_AFTER_EPOCH = 1


@pytest.fixture
def planned(ready, pg_url, tmp_path, monkeypatch):
    settings, store, catalog = ready(
        database_url=pg_url, split_train=0.6, split_val=0.2, split_test=0.2, device="cpu", image_size=32
    )
    for obj in synth.generate(120, size=48, seed=5, images_per_patient=(1, 2), archive_fraction=0):
        store.put(f"training/{obj.key}", obj.body)
    ingest.run(settings, store, catalog, "ingest__resume")
    dataset.validate_ingest(settings, store, catalog, "ingest__resume")
    prepared = dataset.prepare_dataset(settings, store, catalog, "retrain__resume")
    export_reference_weights("tinycnn", tmp_path / "tinycnn.safetensors", seed=1)
    weights.import_weights(store, "tinycnn", tmp_path / "tinycnn.safetensors")
    export_env(monkeypatch, settings)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return settings, store, catalog, prepared


def train_command(plan_uri: str, run_id: str) -> list[str]:
    return [sys.executable, "-m", "mmpipe", "train", "--plan", plan_uri, "--candidate", json.dumps(CANDIDATE),
            "--run-id", run_id]  # fmt: skip


def outcome(store, catalog, result: dict) -> tuple:
    metrics = catalog.query(
        "SELECT epoch, stage, lr, train_loss, val_loss, val_accuracy, val_macro_f1 FROM epoch_metrics "
        "WHERE training_run_id = :t ORDER BY epoch",
        t=result["training_run_id"],
    )
    prefix = store.key_of(result["card_uri"]).rsplit("/", 1)[0]
    card = store.get_json(f"{prefix}/card.json")
    calibrated = {k: card[k] for k in ("best_val_macro_f1", "temperature", "ood_threshold", "ece_after")}
    return metrics, calibrated, store.get(f"{prefix}/model.safetensors")


def test_a_killed_training_resumes_and_ends_as_an_uninterrupted_run(planned):
    _, store, catalog, prepared = planned
    plan_uri = prepared["plan_uri"]
    full = subprocess.run(train_command(plan_uri, "manual__full"), capture_output=True, text=True, check=True)
    expected = outcome(store, catalog, json.loads(full.stdout.splitlines()[-1]))
    assert len(expected[0]) > KILL_AFTER_EPOCH + 2  # epochs left to run after the kill
    assert {row["stage"] for row in expected[0]} == {1, 2}, [
        (r["val_loss"], r["stage"]) for r in expected[0]
    ]  # the resumed part may cross the switch

    training_run_id, _ = run_ids("manual__killed", CANDIDATE["name"])
    victim = subprocess.Popen(
        train_command(plan_uri, "manual__killed"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and victim.poll() is None:
            saved = checkpoints.load(store, training_run_id)
            if saved is not None and saved["progress"]["epoch"] >= KILL_AFTER_EPOCH:
                break
            time.sleep(0.05)
        assert victim.poll() is None, "training finished before it could be killed"
        os.kill(victim.pid, signal.SIGKILL)
    finally:
        victim.kill()
        victim.wait()
    killed_at = checkpoints.load(store, training_run_id)["progress"]["epoch"]
    assert KILL_AFTER_EPOCH <= killed_at < len(expected[0]) - 1
    assert catalog.scalar(
        "SELECT status FROM training_runs WHERE training_run_id = :t", t=training_run_id
    ) == ("running")  # a SIGKILL leaves no chance to record anything

    rerun = subprocess.run(
        train_command(plan_uri, "manual__killed"), capture_output=True, text=True, check=True
    )
    assert f"resuming after epoch {killed_at}" in rerun.stderr
    assert "epoch 0 (" not in rerun.stderr  # carried on, not started over
    assert outcome(store, catalog, json.loads(rerun.stdout.splitlines()[-1])) == expected
    run = catalog.query("SELECT * FROM training_runs WHERE training_run_id = :t", t=training_run_id)[0]
    assert (run["status"], run["resumed"], run["epochs_run"]) == ("succeeded", 1, len(expected[0]))
    assert checkpoints.load(store, training_run_id) is None  # dropped once the model is saved
