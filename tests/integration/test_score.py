"""Scoring against the real store: tags written back, idempotent per object version and model,
unusable members recorded, and an identical re-upload (which drops S3 tags) tagged again."""

from __future__ import annotations

import time

import pytest
import torch

from mmpipe import modelcard, score
from mmpipe.config import CLASSES
from mmpipe.models import create_model, get_spec
from mmpipe.synth import generate

pytestmark = pytest.mark.integration


@pytest.fixture
def champion(ready):
    """A registered tinycnn champion (random weights: these tests check plumbing, not accuracy)."""
    settings, store, catalog = ready()
    torch.manual_seed(0)
    spec = get_spec("tinycnn")
    card = modelcard.ModelCard(
        model_version="tiny-1", backbone="tinycnn", classes=CLASSES, canonical_size=settings.image_size,
        image_size=32, channel_mode="replicate", mean=spec.mean, std=spec.std, init="random",
        weights_fingerprint=None, freeze_ratio=0.0, dataset_version="d", plan_uri="s3://x/plan.json",
        training_run_id="r.tiny", best_val_macro_f1=0.0,
    )  # fmt: skip
    _, card_uri = modelcard.save(store, "models/tiny-1", create_model("tinycnn", len(CLASSES)), card)
    catalog.upsert("models", [{"model_version": "tiny-1", "training_run_id": "r.tiny", "backbone": "tinycnn",
                               "checkpoint_uri": "s3://x/ckpt", "card_uri": card_uri}], ["model_version"])  # fmt: skip
    catalog.upsert("model_aliases", [{"alias": "champion", "model_version": "tiny-1"}], ["alias"])
    return settings, store, catalog


def run_scoring(settings, store, catalog, run_id: str) -> dict:
    version, card_uri = score.current_champion(catalog)
    todo = score.list_unscored(store, catalog, "incoming/", version)
    if not todo:
        return {"objects": 0, "tagged": 0}
    return score.score_objects(settings, store, catalog, todo, version, card_uri, run_id)


def test_tags_are_written_once_per_object_version_and_model(champion) -> None:
    settings, store, catalog = champion
    objects = list(generate(12, size=48, seed=4, archive_fraction=0.5))
    for obj in objects:
        store.put("incoming/" + obj.key.split("/", 1)[1], obj.body)
    store.put("incoming/notes.txt.dcm", b"not an image at all")
    keys = [o.key for o in store.list("incoming/")]

    first = run_scoring(settings, store, catalog, "s1")
    assert first["objects"] == len(keys) and first["tagged"] == len(keys) - 1
    assert first["images"] == 12 and first["failures"] == 1
    for key in keys:
        tags = store.get_tags(key)
        if key.endswith("notes.txt.dcm"):
            assert tags == {}
            continue
        assert tags["mmpipe-modality"] in CLASSES and tags["mmpipe-model"] == "tiny-1"
    failure = catalog.query("SELECT reason FROM score_failures")
    assert failure == [{"reason": "not_image"}]
    before = catalog.query("SELECT * FROM predictions ORDER BY source_key, member_path")

    assert run_scoring(settings, store, catalog, "s2")["objects"] == 0  # nothing new: no-op
    assert catalog.query("SELECT * FROM predictions ORDER BY source_key, member_path") == before


def test_identical_reupload_loses_tags_and_is_tagged_again(champion) -> None:
    settings, store, catalog = champion
    obj = next(iter(generate(1, size=48, seed=5, archive_fraction=0)))
    store.put("incoming/study.dcm", obj.body)
    run_scoring(settings, store, catalog, "s1")
    etag = store.head("incoming/study.dcm").etag
    assert "mmpipe-modality" in store.get_tags("incoming/study.dcm")

    time.sleep(1.1)  # LastModified has one-second resolution in S3 listings
    store.put("incoming/study.dcm", obj.body)  # same bytes, same ETag: S3 drops the tags
    assert store.head("incoming/study.dcm").etag == etag
    assert store.get_tags("incoming/study.dcm") == {}
    again = run_scoring(settings, store, catalog, "s2")
    assert again["tagged"] == 1
    assert "mmpipe-modality" in store.get_tags("incoming/study.dcm")
    assert catalog.scalar("SELECT count(*) FROM predictions") == 1  # one row per member and model, updated
