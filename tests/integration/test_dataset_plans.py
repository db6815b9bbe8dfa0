"""Training plans and frozen test snapshots through the real pipeline (SeaweedFS + PostgreSQL).

Plans must be balanced, versioned by content (same inputs and seed, same version), configured from
settings, traceable back to source objects; the frozen test snapshot must never change as data arrives.
"""

from __future__ import annotations

import json

import pytest

from mmpipe import cli, dataset, ingest, splits, synth
from mmpipe.config import CLASSES
from mmpipe.errors import MmpipeError
from tests.conftest import export_env

pytestmark = pytest.mark.integration

SETTINGS = {
    "split_train": 0.5,
    "split_val": 0.25,
    "split_test": 0.25,
    "augment_policies": {"chest_xray": ("hflip", "rotate:10"), "retinal_oct": ("clahe:3",)},
    "balance_class_targets": {"retinal_oct": 30},
    "clahe_clip_limit": 2.5,
    "clahe_tiles": 4,
    "channel_mode": "viridis",
}


@pytest.fixture
def env(ready, pg_url):
    return ready(database_url=pg_url, **SETTINGS)


def add_batch(env, run_id: str, n: int, seed: int, validate: bool = True) -> None:
    settings, store, catalog = env
    for obj in synth.generate(n, size=64, seed=seed, images_per_patient=(1, 2), archive_fraction=0.1):
        store.put(f"training/{obj.key}", obj.body)
    ingest.run(settings, store, catalog, run_id)
    if validate:
        dataset.validate_ingest(settings, store, catalog, run_id)


def load(store, uri: str) -> dict:
    return store.get_json(store.key_of(uri))


def test_plan_is_balanced_configured_from_settings_and_recorded(env):
    settings, store, catalog = env
    add_batch(env, "ingest__a", 120, seed=1)
    result = dataset.prepare_dataset(settings, store, catalog, "retrain__1", seed=5)
    plan = load(store, result["plan_uri"])

    assert result["plan_uri"] == store.uri(f"plans/{result['dataset_version']}.json")
    counts = plan["class_counts_after"]
    goal = sorted(plan["class_counts_before"].values())[2]  # the median
    for label in CLASSES:
        expected = 30 if label == "retinal_oct" else goal
        assert abs(counts[label] - expected) <= 0.05 * expected, (label, counts)
    assert plan["policies"]["chest_xray"] == ["hflip:0.5", "rotate:10"]
    assert plan["policies"]["retinal_oct"] == ["clahe:3"] and plan["policies"]["lung_ct"][-1] == "zoom:1.25"
    assert plan["preprocessing"] == {"clahe": {"clip_limit": 2.5, "tiles": 4}, "channel_mode": "viridis"}
    assert plan["seed"] == 5 and plan["test_snapshot"] == result["test_snapshot"] == "test-v1"
    # train/val members never include a test patient or a frozen image
    split_of = {r["patient_key"]: r["split"] for r in catalog.query("SELECT * FROM patient_splits")}
    patient_of = {
        r["image_id"]: r["patient_key"] for r in catalog.query("SELECT image_id, patient_key FROM images")
    }
    assert {split_of[patient_of[e["image_id"]]] for e in plan["train"]} == {"train"}
    assert {split_of[patient_of[e["image_id"]]] for e in plan["val"]} == {"val"}
    (row,) = catalog.query("SELECT * FROM dataset_versions")
    assert row["dataset_version"] == result["dataset_version"] and json.loads(row["class_counts"]) == counts
    assert row["n_train"] == len(plan["train"]) and row["n_val"] == len(plan["val"])


def test_same_inputs_and_seed_give_the_same_plan_and_new_data_a_new_one(env):
    settings, store, catalog = env
    add_batch(env, "ingest__a", 120, seed=1)
    first = dataset.prepare_dataset(settings, store, catalog, "retrain__1")
    body = store.get(store.key_of(first["plan_uri"]))
    again = dataset.prepare_dataset(settings, store, catalog, "retrain__2")
    assert again["dataset_version"] == first["dataset_version"]
    assert store.get(store.key_of(again["plan_uri"])) == body  # the versioned artefact is never rewritten
    other_seed = dataset.prepare_dataset(settings, store, catalog, "retrain__3", seed=1)
    assert other_seed["dataset_version"] != first["dataset_version"]

    # A batch ingested but not validated yet waits outside: same members, same version.
    add_batch(env, "ingest__b", 40, seed=2, validate=False)
    waiting = dataset.prepare_dataset(settings, store, catalog, "retrain__4")
    assert (
        waiting["pending_validation"] == ["ingest__b"]
        and waiting["dataset_version"] == first["dataset_version"]
    )
    dataset.validate_ingest(settings, store, catalog, "ingest__b")
    grown = dataset.prepare_dataset(settings, store, catalog, "retrain__5")
    assert grown["dataset_version"] != first["dataset_version"] and grown["pending_validation"] == []
    assert catalog.scalar("SELECT count(*) FROM dataset_versions") == 3


def test_lineage_runs_from_plan_to_validations_ingest_runs_and_source_objects(env, monkeypatch, capsys):
    settings, store, catalog = env
    add_batch(env, "ingest__a", 80, seed=1)
    add_batch(env, "ingest__b", 60, seed=2)
    result = dataset.prepare_dataset(settings, store, catalog, "retrain__1")
    lineage = dataset.lineage(store, catalog, result["dataset_version"])

    assert [r["run_id"] for r in lineage["ingest_runs"]] == ["ingest__a", "ingest__b"]
    for run in lineage["ingest_runs"]:
        report = load(store, run["validation_report_uri"])
        assert report["success"] and report["docs_uri"] and store.head(store.key_of(run["report_uri"]))
    assert {v["validation_id"] for v in lineage["validations"]} == {
        "batch:ingest-ingest__a", "batch:ingest-ingest__b", result["validation"],
    }  # fmt: skip
    assert all(v["success"] and v["docs_uri"] for v in lineage["validations"])
    # every image of the plan is accounted to a source object that was really ingested
    plan = load(store, result["plan_uri"])
    used = {e["image_id"] for e in plan["train"] + plan["val"]}
    assert sum(s["images"] for s in lineage["source_objects"]) == len(used)
    recorded = {(r["source_key"], r["etag"]) for r in catalog.query("SELECT * FROM source_objects")}
    assert {(s["source_key"], s["etag"]) for s in lineage["source_objects"]} <= recorded
    assert any(s["source_key"].endswith(".zip") for s in lineage["source_objects"])

    export_env(monkeypatch, settings.model_copy(update={"augment_policies": {}, "balance_class_targets": {}}))
    assert cli.main(["--json", "dataset", "lineage", result["dataset_version"]]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["dataset_version"] == result["dataset_version"]
    assert len(printed["source_objects"]) == len(lineage["source_objects"])
    assert cli.main(["dataset", "lineage", "0" * 16]) == 2
    assert "not found" in capsys.readouterr().err


def test_frozen_test_set_never_changes_when_new_data_arrives(env):
    settings, store, catalog = env
    add_batch(env, "ingest__a", 120, seed=1)
    first = dataset.prepare_dataset(settings, store, catalog, "retrain__1")
    assert first["frozen_now"] == "test-v1"
    (snap,) = catalog.query("SELECT * FROM test_snapshots")
    members = [m["image_id"] for m in splits.snapshot_images(catalog, "test-v1")]
    stored = store.get(store.key_of(snap["members_uri"]))
    assert json.loads(stored)["image_ids"] == members and snap["content_hash"] == splits.members_hash(members)

    add_batch(env, "ingest__b", 100, seed=2)  # brings new test-split patients
    second = dataset.prepare_dataset(settings, store, catalog, "retrain__2")
    new_test = {i["image_id"] for i in splits.usable_images(catalog, "test")} - set(members)
    assert new_test, "the second batch should bring test-split patients"
    assert second["test_snapshot"] == "test-v1" and second["frozen_now"] is None
    assert [m["image_id"] for m in splits.snapshot_images(catalog, "test-v1")] == members
    assert catalog.query("SELECT * FROM test_snapshots") == [snap]
    assert store.get(store.key_of(snap["members_uri"])) == stored
    plan = load(store, second["plan_uri"])
    assert not new_test & {e["image_id"] for e in plan["train"] + plan["val"]}  # unfrozen test data is unused

    with pytest.raises(MmpipeError, match="already exists and is immutable"):
        splits.freeze_test(catalog, store, "test-v1", reason="again")
    third = dataset.prepare_dataset(settings, store, catalog, "retrain__3", freeze_test="test-v2")
    assert third["test_snapshot"] == third["frozen_now"] == "test-v2"
    v2 = {m["image_id"] for m in splits.snapshot_images(catalog, "test-v2")}
    assert v2 == set(members) | new_test
    assert [m["image_id"] for m in splits.snapshot_images(catalog, "test-v1")] == members
    # a retried task that froze test-v2 itself goes on; another run asking for the name is refused
    assert dataset.prepare_dataset(settings, store, catalog, "retrain__3", freeze_test="test-v2")[
        "frozen_now"
    ]
    with pytest.raises(MmpipeError, match="immutable"):
        dataset.prepare_dataset(settings, store, catalog, "retrain__4", freeze_test="test-v2")

    # excluding or relabelling an image later changes no snapshot; editing its member list is detected
    frozen = splits.snapshot_images(catalog, "test-v1")
    catalog.execute("UPDATE images SET status = 'excluded' WHERE image_id = :i", {"i": members[0]})
    relabel = "chest_xray" if frozen[1]["label"] != "chest_xray" else "lung_ct"
    catalog.execute("UPDATE images SET label = :l WHERE image_id = :i", {"l": relabel, "i": members[1]})
    assert splits.snapshot_images(catalog, "test-v1") == frozen
    catalog.execute(
        "DELETE FROM test_snapshot_members WHERE name = 'test-v1' AND image_id = :i", {"i": members[0]}
    )
    with pytest.raises(MmpipeError, match="no longer matches its content hash"):
        splits.snapshot_images(catalog, "test-v1")
