"""Scoring against the real store and catalog: every object gets a fate, foreign tags survive the
tag budget, a poison object costs only itself, idempotent per object version and model."""

from __future__ import annotations

import faulthandler
import os
import signal
import time

import pytest
import torch

from mmpipe import decoding, modelcard, report, score
from mmpipe.config import CLASSES
from mmpipe.imaging import decode_image as real_decode_image
from mmpipe.models import create_model, get_spec
from mmpipe.store import ObjectInfo
from mmpipe.synth import generate
from tests.dicom_factory import dicom_bytes

pytestmark = pytest.mark.integration


def register(store, catalog, version: str, **card_fields) -> str:
    """A tinycnn model (random weights: these tests check plumbing, not accuracy) made champion."""
    torch.manual_seed(0)
    spec = get_spec("tinycnn")
    card = modelcard.ModelCard(
        model_version=version, backbone="tinycnn", classes=CLASSES, canonical_size=64,
        image_size=32, channel_mode="replicate", mean=spec.mean, std=spec.std, init="random",
        weights_fingerprint=None, freeze_ratio=0.0, dataset_version="d", plan_uri="s3://x/plan.json",
        training_run_id=f"r.{version}", best_val_macro_f1=0.0, **card_fields,
    )  # fmt: skip
    _, card_uri = modelcard.save(store, f"models/{version}", create_model("tinycnn", len(CLASSES)), card)
    catalog.upsert("models", [{"model_version": version, "training_run_id": f"r.{version}", "backbone": "tinycnn",
                               "checkpoint_uri": "s3://x/ckpt", "card_uri": card_uri}], ["model_version"])  # fmt: skip
    catalog.upsert("model_aliases", [{"alias": "champion", "model_version": version}], ["alias"])
    return card_uri


@pytest.fixture
def champion(ready):
    settings, store, catalog = ready(ingest_processes=2)
    register(store, catalog, "tiny-1")
    return settings, store, catalog


def reconciled(summary: dict) -> bool:
    fates = ("tagged", "unreadable", "unknown", "skipped", "failed", "not_reached")
    return summary["listed"] == sum(summary[f] for f in fates)


def mine(tags: dict) -> dict:
    return {k: v for k, v in tags.items() if k.startswith("mmpipe-")}


def test_tag_budget_keeps_foreign_tags_and_writes_essentials_first(champion) -> None:
    settings, store, catalog = champion
    for n in (0, 5, 8, 10):
        key = f"incoming/foreign{n:02d}.dcm"
        store.put(key, dicom_bytes(n, Modality="CT"))
        store.set_tags(key, {f"hospital-{i}": f"v{i}" for i in range(n)})
    store.set_tags(
        "incoming/foreign05.dcm", store.get_tags("incoming/foreign05.dcm") | {"mmpipe-modality": "old"}
    )

    summary = score.run(settings, store, catalog, "budget")

    assert reconciled(summary) and summary["status"] == "finished"
    assert (summary["tagged"], summary["failed"]) == (3, 1)
    for n in (0, 5, 8, 10):
        key = f"incoming/foreign{n:02d}.dcm"
        tags = store.get_tags(key)
        assert len(tags) <= 10
        assert {k: v for k, v in tags.items() if k.startswith("hospital-")} == {
            f"hospital-{i}": f"v{i}" for i in range(n)
        }
        sidecar = store.get_json(score.sidecar_key("tiny-1", key))
        assert sidecar["modality"] in CLASSES  # the result is kept even where no tag fits
        assert mine(tags) == sidecar["tags_written"]
        if sidecar["review_reasons"]:  # a flagged image of a CNN: its Grad-CAM overlay, linked
            png = store.get(store.key_of(sidecar["images"][0]["gradcam"]))
            assert png.startswith(b"\x89PNG\r\n\x1a\n")
        else:
            assert sidecar["images"][0]["gradcam"] is None
        ours = mine(tags)
        if n <= 5:  # room for 10 - n tags; the old champion's tag is replaced, not kept
            assert ours["mmpipe-modality"] in CLASSES and ours["mmpipe-model"] == "tiny-1"
            assert len(ours) + len(sidecar["tags_left_out"]) == len(ours | sidecar["tags_left_out"]) >= 5
            assert len(tags) == min(10, n + len(ours | sidecar["tags_left_out"]))
        elif n == 8:  # two slots: the modality, then the review flag
            assert list(ours) == ["mmpipe-modality", "mmpipe-review"]
            assert "mmpipe-model" in sidecar["tags_left_out"]
        else:
            assert ours == {}
    row = catalog.query(
        "SELECT fate, reason, settled FROM scored_objects WHERE source_key = 'incoming/foreign10.dcm'"
    )
    assert row == [{"fate": "failed", "reason": "tag_limit", "settled": True}]


def test_every_object_gets_a_fate_once_per_object_version_and_model(champion) -> None:
    settings, store, catalog = champion
    objects = list(generate(12, size=48, seed=4, archive_fraction=0.5))
    for obj in objects:
        store.put("incoming/" + obj.key.split("/", 1)[1], obj.body)
    store.put("incoming/notes.txt.dcm", b"not an image at all")
    store.put("incoming/cut.dcm", dicom_bytes(1, Modality="MR")[:300])  # truncated
    keys = [o.key for o in store.list("incoming/")]

    first = score.run(settings, store, catalog, "s1")
    assert reconciled(first) and first["listed"] == len(keys)
    assert (first["tagged"], first["unreadable"], first["skipped"]) == (len(keys) - 2, 2, 0)
    for key in keys:
        tags = store.get_tags(key)
        if key in ("incoming/notes.txt.dcm", "incoming/cut.dcm"):
            assert tags["mmpipe-status"] == "unreadable" and tags["mmpipe-reason"]
            continue
        assert tags["mmpipe-modality"] in CLASSES and tags["mmpipe-model"] == "tiny-1"
        assert tags["mmpipe-review"] == "no" or tags["mmpipe-review-reason"]
    before = catalog.query("SELECT * FROM predictions ORDER BY source_key, member_path")
    assert len(before) == 12

    again = score.run(settings, store, catalog, "s2")
    assert reconciled(again) and again["skipped"] == len(keys) and again["tagged"] == 0
    assert catalog.query("SELECT * FROM predictions ORDER BY source_key, member_path") == before
    run = catalog.query(
        "SELECT listed, tagged, unreadable, skipped, status FROM score_runs WHERE run_id = 's1'"
    )
    assert run == [
        {"listed": len(keys), "tagged": len(keys) - 2, "unreadable": 2, "skipped": 0, "status": "finished"}
    ]


def test_identical_reupload_loses_tags_and_is_tagged_again(champion) -> None:
    settings, store, catalog = champion
    obj = next(iter(generate(1, size=48, seed=5, archive_fraction=0)))
    store.put("incoming/study.dcm", obj.body)
    score.run(settings, store, catalog, "s1")
    etag = store.head("incoming/study.dcm").etag
    assert "mmpipe-modality" in store.get_tags("incoming/study.dcm")

    time.sleep(1.1)  # LastModified has one-second resolution in S3 listings
    store.put("incoming/study.dcm", obj.body)  # same bytes, same ETag: S3 drops the tags
    assert store.head("incoming/study.dcm").etag == etag
    assert store.get_tags("incoming/study.dcm") == {}
    again = score.run(settings, store, catalog, "s2")
    assert again["tagged"] == 1
    assert "mmpipe-modality" in store.get_tags("incoming/study.dcm")
    assert catalog.scalar("SELECT count(*) FROM predictions") == 1  # one row per member and model, updated


def dying_decode(data: bytes, *args, **kwargs):
    """The real decoder, except that a marked object takes its decode process down (a C decoder's segfault)."""
    if data.startswith(b"POISON-SEGV"):
        faulthandler.disable()
        os.kill(os.getpid(), signal.SIGSEGV)
    return real_decode_image(data, *args, **kwargs)


def test_a_poison_object_costs_only_itself(champion, monkeypatch) -> None:
    settings, store, catalog = champion
    monkeypatch.setattr(decoding, "decode_image", dying_decode)  # forked decode processes inherit it
    for n in range(6):
        store.put(f"incoming/P{n}/ct.dcm", dicom_bytes(n, Modality="CT"))
    store.put("incoming/P9/poison.dcm", b"POISON-SEGV" + bytes(64))

    summary = score.run(settings, store, catalog, "poison")

    assert reconciled(summary) and (summary["tagged"], summary["unreadable"]) == (6, 1)
    assert store.get_tags("incoming/P9/poison.dcm") == {
        "mmpipe-status": "unreadable", "mmpipe-reason": "corrupt", "mmpipe-model": "tiny-1",
    }  # fmt: skip


def test_a_new_champion_rescores_and_replaces_only_its_own_tags(champion) -> None:
    settings, store, catalog = champion
    store.put("incoming/a.dcm", dicom_bytes(1, Modality="CT"))
    store.set_tags("incoming/a.dcm", {"ward": "icu"})
    score.run(settings, store, catalog, "s1")
    register(store, catalog, "tiny-2")

    summary = score.run(settings, store, catalog, "s2")

    assert (summary["model_version"], summary["tagged"], summary["skipped"]) == ("tiny-2", 1, 0)
    tags = store.get_tags("incoming/a.dcm")
    assert tags["ward"] == "icu" and tags["mmpipe-model"] == "tiny-2"
    old = score.run(settings, store, catalog, "s3", model_version="tiny-1")  # a chosen model: already done
    assert (old["model_version"], old["skipped"]) == ("tiny-1", 1)


def test_watermark_spares_the_catalog_and_waits_for_unsettled_objects(champion) -> None:
    settings, store, catalog = champion
    old, new = "2026-01-01T00:00:00.000Z", "2026-06-01T00:00:00.000Z"
    listed = [ObjectInfo("incoming/old.dcm", "e1", 10, old), ObjectInfo("incoming/new.dcm", "e2", 10, new)]
    # no catalog row at all: before the watermark an object counts as scored, after it it is looked up
    assert score.select_unscored(catalog, listed, "tiny-1", "2026-03-01T00:00:00+00:00") == ([listed[1]], 1)
    assert score.select_unscored(catalog, listed, "tiny-1", None) == (listed, 0)
    assert score.select_unscored(catalog, listed, "tiny-1", "2026-03-01T00:00:00+00:00", force=True) == (
        listed,
        0,
    )

    store.put("incoming/x.dcm", dicom_bytes(1, Modality="CT"))
    first = score.run(settings, store, catalog, "w1")
    listed_at = catalog.scalar("SELECT listed_at FROM score_runs WHERE run_id = 'w1'")
    assert first["watermark"] is not None and first["watermark"] < listed_at  # a margin behind the listing
    catalog.execute("UPDATE scored_objects SET settled = FALSE, fate = 'failed', reason = 'tag_write_failed'")
    modified = store.list("incoming/")[0].modified
    catalog.execute("UPDATE score_runs SET watermark = NULL")
    catalog.execute("UPDATE score_runs SET listed_at = :t", {"t": "2030-01-01T00:00:00+00:00"})
    held = score.finish_run(catalog, "w1")  # an unsettled object holds the watermark at its LastModified
    assert score._time(held["watermark"]) == score._time(modified)
    again = score.run(settings, store, catalog, "w2")
    assert again["tagged"] == 1  # the unsettled object was taken again


def test_the_run_report_reconciles_every_fate(champion) -> None:
    settings, store, catalog = champion
    store.put("incoming/a.dcm", dicom_bytes(1, Modality="CT"))
    store.put("incoming/b.dcm", dicom_bytes(2, Modality="CT"))
    store.set_tags("incoming/b.dcm", {f"pacs-{i}": "x" for i in range(10)})
    store.put("incoming/c.dcm", b"not an image")
    score.run(settings, store, catalog, "r1")

    page, _ = report.render(report.gather(store, catalog, "r1"))

    assert (
        "Scoring (finished): 3 listed = 1 tagged + 1 unreadable + 0 unknown + 0 skipped + 1 failed." in page
    )
    assert "tag_limit" in page  # the failed object's reason is on the page
