"""Training learns: on a small seeded synthetic set, a trained candidate separates the five modalities.

Real SeaweedFS + PostgreSQL, the real data path (shards, augmentation, preprocessing in a loader
worker). tinycnn at 32 px keeps the test within seconds of CPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score

from mmpipe import dataset, ingest, modelcard, splits, synth
from mmpipe.train import Candidate, train_candidate

pytestmark = pytest.mark.integration


@pytest.fixture
def planned(ready, pg_url):
    settings, store, catalog = ready(
        database_url=pg_url, split_train=0.5, split_val=0.25, split_test=0.25, device="cpu", image_size=48
    )
    for obj in synth.generate(240, size=64, seed=3, images_per_patient=(1, 2), archive_fraction=0):
        store.put(f"training/{obj.key}", obj.body)
    ingest.run(settings, store, catalog, "ingest__learn")
    dataset.validate_ingest(settings, store, catalog, "ingest__learn")
    return settings, store, catalog, dataset.prepare_dataset(settings, store, catalog, "retrain__learn")


def test_a_small_cnn_reaches_a_macro_f1_of_0_9_on_validation_and_on_the_frozen_test_split(planned):
    settings, store, catalog, prepared = planned
    candidate = Candidate.from_dict(
        {
            "backbone": "tinycnn",
            "init": "random",
            "image_size": 48,
            "epochs": 12,
            "lr": 3e-3,
            "lr_finetune": 1e-3,
        }
    )
    result = train_candidate(settings, store, catalog, prepared["plan_uri"], candidate, "manual__learn")

    model, card = modelcard.load(store, result["card_uri"], torch.device("cpu"))
    assert card.best_val_macro_f1 >= 0.9
    members = splits.snapshot_images(catalog, prepared["test_snapshot"])
    pixels = ingest.load_pixels(store, members)
    images = np.stack([pixels[m["image_id"]] for m in members])
    truth = [card.classes.index(m["label"]) for m in members]
    predicted = modelcard.predict(model, card, images).argmax(1)
    assert len(set(truth)) == 5
    assert f1_score(truth, predicted, average="macro") >= 0.9
