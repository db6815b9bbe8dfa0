"""A hard synthetic corpus with header faults ingests whole: labels come from the training/<class>/
prefix, so missing or wrong Modality/BodyPartExamined neither relabel nor quarantine anything."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from mmpipe import dataset, ingest, synth

pytestmark = pytest.mark.integration


def test_hard_corpus_with_header_faults_ingests_with_true_labels(ready) -> None:
    settings, store, catalog = ready(image_size=48)
    objects = list(synth.generate(90, size=64, seed=4, difficulty="hard", header_faults=0.5))
    truth = {"training/" + o.key: o.label for o in objects}
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda o: store.put("training/" + o.key, o.body), objects))

    report = ingest.run(settings, store, catalog, "hard")
    assert report["images"] == 90 and report["quarantined"] == 0
    rows = catalog.query(
        "SELECT source_key, label, label_source, modality FROM images WHERE status = 'active'"
    )
    assert len(rows) == 90
    assert all(r["label"] == truth[r["source_key"]] and r["label_source"] == "prefix" for r in rows)
    assert any(r["modality"] is None for r in rows)  # some objects lost their headers
    wrong = [
        r for r in rows if r["modality"] is not None and r["label"].endswith("_ct") != (r["modality"] == "CT")
    ]
    assert wrong  # some objects carry another class's modality

    summary = dataset.validate_ingest(settings, store, catalog, "hard")
    assert summary["success"] and summary["images_excluded"] == 0
