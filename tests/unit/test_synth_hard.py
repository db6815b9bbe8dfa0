"""The hard difficulty and header faults: thumbnails lose the class, patients' images are correlated,
headers stop being the answer; the realistic default stays easy."""

from __future__ import annotations

import io
from collections import Counter

import numpy as np
import pydicom
import pytest
from sklearn.model_selection import GroupShuffleSplit

from mmpipe import synth
from mmpipe.bench.synth import decode_corpus, split_inflation, thumbnail_scores

N_IMAGES = 300


@pytest.fixture(scope="module")
def corpora() -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    return {
        difficulty: decode_corpus(list(synth.generate(N_IMAGES, size=64, seed=3, difficulty=difficulty)), 64)
        for difficulty in synth.DIFFICULTIES
    }


def test_thumbnail_baselines_lose_the_class_only_on_hard(corpora) -> None:
    scores = {}
    for difficulty, (pixels, labels, patients) in corpora.items():
        train, test = next(GroupShuffleSplit(1, test_size=0.3, random_state=0).split(pixels, groups=patients))
        scores[difficulty] = thumbnail_scores(pixels, labels, train, test)
    print(scores)
    assert scores["realistic"]["linear_16"] >= 0.9
    assert scores["hard"]["linear_16"] <= 0.8 and scores["hard"]["rf_4"] <= 0.8


def test_splitting_by_image_inflates_the_score_of_correlated_patients(corpora) -> None:
    pixels, labels, patients = corpora["hard"]
    figures = split_inflation(pixels, labels, patients, repeats=3)
    print(figures)
    assert figures["knn_16"]["inflation"] >= 0.15
    assert figures["linear_16"]["inflation"] > 0


def test_hard_images_keep_type_and_vary_in_shape_and_are_reproducible() -> None:
    objects = list(
        synth.generate(60, size=64, seed=1, difficulty="hard", formats={"dicom": 1}, archive_fraction=0)
    )
    again = list(
        synth.generate(60, size=64, seed=1, difficulty="hard", formats={"dicom": 1}, archive_fraction=0)
    )
    assert [o.body for o in objects] == [o.body for o in again]
    datasets = [pydicom.dcmread(io.BytesIO(o.body)) for o in objects]
    shapes = {(int(ds.Rows), int(ds.Columns)) for ds in datasets}
    assert len(shapes) > 10 and all(min(s) >= synth.MIN_SIZE and max(s) <= 64 for s in shapes)
    for obj, ds in zip(objects, datasets, strict=True):
        assert ds.pixel_array.shape == (ds.Rows, ds.Columns), obj.key
        assert "PixelPaddingValue" not in ds  # resampled CT has no padding to mask


def test_header_faults_remove_or_falsify_modality_and_body_part() -> None:
    def headers(faults: float) -> list[tuple[str, str | None, str | None]]:
        objects = synth.generate(
            300, size=48, seed=2, formats={"dicom": 1}, archive_fraction=0, header_faults=faults
        )
        out = []
        for obj in objects:
            ds = pydicom.dcmread(io.BytesIO(obj.body))
            out.append((obj.label, ds.get("Modality"), ds.get("BodyPartExamined")))
        return out

    expected = {"brain_mri": {"MR"}, "chest_xray": {"CR", "DX"}, "retinal_oct": {"OPT"}}
    expected |= {"lung_ct": {"CT"}, "liver_ct": {"CT"}}
    assert all(modality in expected[label] and part for label, modality, part in headers(0.0))
    kinds = Counter(
        "missing" if modality is None else "wrong" if modality not in expected[label] else "right"
        for label, modality, part in headers(0.4)
    )
    assert kinds["missing"] > 20 and kinds["wrong"] > 20
    assert 0.25 < (kinds["missing"] + kinds["wrong"]) / 300 < 0.55
    with pytest.raises(ValueError, match="header_faults"):
        synth.generate(5, header_faults=1.5)
    with pytest.raises(ValueError, match="difficulty"):
        synth.generate(5, difficulty="nightmare")
