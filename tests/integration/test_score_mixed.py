"""A scoring run over a prefix like a hospital's: good DICOM, PNG, archives, unreadable objects,
studies of modalities mmpipe does not classify and objects full of foreign tags. Every object's fate
is reconciled; the open-set figures (share of out-of-class studies caught, share of in-class ones
wrongly flagged) are printed for the closing note."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mmpipe import calibration, modelcard, openset, score
from mmpipe.config import CLASSES
from mmpipe.imaging import Limits, decode_image
from mmpipe.models import create_model, get_spec
from mmpipe.synth import generate, unlabelled_key
from tests.integration.openset_factory import KINDS, out_of_class

pytestmark = pytest.mark.integration


def pixels(objects, limits) -> tuple[np.ndarray, np.ndarray]:
    plain = [o for o in objects if o.kind != "zip"]
    images = [decode_image(o.body, o.key, 64, limits).pixels for o in plain]
    return np.stack(images), np.array([CLASSES.index(o.label) for o in plain])


def trained_champion(settings, store, catalog) -> modelcard.ModelCard:
    """tinycnn trained a few epochs on synthetic studies, calibrated (temperature, energy threshold at
    95% in-distribution recall) on a validation set, registered as champion."""
    limits = Limits.from_settings(settings)
    x_train, y_train = pixels(generate(300, size=64, seed=11, archive_fraction=0), limits)
    x_val, y_val = pixels(generate(120, size=64, seed=12, archive_fraction=0), limits)
    spec = get_spec("tinycnn")
    card = modelcard.ModelCard(
        model_version="tiny-trained", backbone="tinycnn", classes=CLASSES, canonical_size=64, image_size=32,
        channel_mode="replicate", mean=spec.mean, std=spec.std, init="random", weights_fingerprint=None,
        freeze_ratio=0.0, dataset_version="d", plan_uri="s3://x/plan.json", training_run_id="r.t",
        best_val_macro_f1=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = create_model("tinycnn", len(CLASSES))
    optimiser = torch.optim.Adam(model.parameters(), 1e-3)
    for epoch in range(10):
        model.train()
        order = np.random.default_rng(epoch).permutation(len(x_train))
        for start in range(0, len(order), 32):
            batch = order[start : start + 32]
            x = modelcard.preprocess_for(card, torch.from_numpy(x_train[batch]))
            loss = F.cross_entropy(model(x), torch.from_numpy(y_train[batch]))
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    model.eval()
    val_logits = modelcard.logits(model, card, x_val)
    assert (val_logits.argmax(1) == y_val).mean() > 0.6  # it learned: the open set is judged on a real model
    fitted = calibration.calibrate(val_logits, y_val, recall=0.95)
    card = modelcard.ModelCard(
        **card.to_json()
        | {
            "temperature": fitted.temperature,
            "ood_threshold": fitted.ood_threshold,
            "ood_recall": fitted.ood_recall,
        }
    )
    _, card_uri = modelcard.save(store, "models/tiny-trained", model, card)
    catalog.upsert("models", [{"model_version": card.model_version, "training_run_id": "r.t", "backbone": "tinycnn",
                               "checkpoint_uri": "s3://x/ckpt", "card_uri": card_uri}], ["model_version"])  # fmt: skip
    catalog.upsert("model_aliases", [{"alias": "champion", "model_version": card.model_version}], ["alias"])
    # the feature check, as scoring fits it from a plan: class means on train, threshold on validation
    scorer = score.Scorer.load(settings, store, card.model_version, card_uri)
    stats = openset.fit_features(scorer.forward(x_train)[1], y_train, scorer.forward(x_val)[1], len(CLASSES))
    score.save_feature_check(store, card.model_version, stats)
    return card


def test_mixed_prefix_every_fate_reconciled_and_open_set_measured(ready) -> None:
    settings, store, catalog = ready(ingest_processes=2)
    trained_champion(settings, store, catalog)
    in_class = {
        "incoming/" + unlabelled_key(o.key): o.body
        for o in generate(40, size=64, seed=13, archive_fraction=0.2)
    }
    out = {
        kind: {f"incoming/other/{n}": b for n, b in (out_of_class(kind, s) for s in range(12))}
        for kind in KINDS
    }
    unreadable = {"incoming/bad/cut.dcm": next(iter(in_class.values()))[:200], "incoming/bad/notes.dcm": b"hello",
                  "incoming/bad/empty.png": b""}  # fmt: skip
    for key, body in (in_class | unreadable | {k: v for o in out.values() for k, v in o.items()}).items():
        store.put(key, body)
    crowded = sorted(in_class)[:2]
    store.set_tags(crowded[0], {f"pacs-{i}": "x" for i in range(10)})
    store.set_tags(crowded[1], {f"pacs-{i}": "x" for i in range(8)})
    listed = len(store.list("incoming/"))

    summary = score.run(settings, store, catalog, "mixed")

    fates = ("tagged", "unreadable", "unknown", "skipped", "failed", "not_reached")
    assert summary["listed"] == listed == sum(summary[f] for f in fates)
    assert summary["status"] == "finished" and summary["unreadable"] == 3 and summary["failed"] == 1
    rows = {r["source_key"]: r for r in catalog.query("SELECT * FROM scored_objects")}
    assert set(rows) == {o.key for o in store.list("incoming/")}  # one fate per object, in the catalog
    assert rows[crowded[0]]["fate"] == "failed" and rows[crowded[0]]["reason"] == "tag_limit"
    assert len(store.get_tags(crowded[1])) == 10
    for key, row in rows.items():
        tags = store.get_tags(key)
        if row["fate"] == "unreadable":
            assert tags["mmpipe-status"] == "unreadable" and tags["mmpipe-reason"]
        elif row["fate"] == "unknown":
            assert (
                tags["mmpipe-status"] == "unknown" and tags["mmpipe-review-reason"] == "out_of_distribution"
            )
        if tags.get("mmpipe-review") == "yes":
            assert tags["mmpipe-review-reason"]  # never a bare yes

    def flagged(keys, reasons=("out_of_distribution", "header_disagrees")) -> float:
        """Share of ``keys`` unknown or flagged for one of ``reasons`` (None: for any reason)."""
        hits = [
            rows[k]["fate"] == "unknown"
            or any(r in rows[k]["review_reasons"].split(",") for r in reasons or openset.REASONS)
            for k in keys
        ]
        return sum(hits) / len(hits)

    caught = {kind: flagged(keys) for kind, keys in out.items()}
    wrongly = flagged([k for k in in_class if rows[k]["fate"] != "failed"])
    review_any = {kind: flagged(keys, None) for kind, keys in out.items()}
    print(f"\nopen set: caught (unknown, out_of_distribution or header_disagrees) {caught}; "
          f"flagged for any review reason {review_any}; in-class wrongly flagged {wrongly:.2f}")  # fmt: skip
    assert caught["ultrasound"] == 1.0  # Modality US contradicts every class the rules know
    assert caught["photo"] == 1.0  # colour: the five modalities are greyscale
    assert wrongly <= 0.25
