"""Synthetic studies: deterministic, well-formed DICOM/PNG/JPEG/zip, labelled by anatomy not brightness."""

from __future__ import annotations

import io
import re
import zipfile
from collections import Counter, defaultdict
from dataclasses import dataclass

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.pixels import apply_rescale
from pydicom.uid import UID, ExplicitVRLittleEndian, RLELossless
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from mmpipe import synth
from mmpipe.config import CLASSES
from mmpipe.pixels import normalise

N_IMAGES = 400
EXPECTED_HEADERS = {  # label -> (modalities, body parts)
    "brain_mri": ({"MR"}, {"HEAD", "BRAIN"}),
    "chest_xray": ({"CR", "DX"}, {"CHEST"}),
    "retinal_oct": ({"OPT"}, {"EYE"}),
    "lung_ct": ({"CT"}, {"CHEST"}),
    "liver_ct": ({"CT"}, {"ABDOMEN"}),
}


@dataclass
class Member:
    label: str
    patient_id: str
    name: str  # object key, or "<zip key>!<member>"
    body: bytes


def _expand(objects: list[synth.SynthObject]) -> list[Member]:
    images = []
    for obj in objects:
        if obj.kind == "zip":
            with zipfile.ZipFile(io.BytesIO(obj.body)) as archive:
                images += [
                    Member(obj.label, obj.patient_id, f"{obj.key}!{n}", archive.read(n))
                    for n in archive.namelist()
                ]
        else:
            images.append(Member(obj.label, obj.patient_id, obj.key, obj.body))
    return images


def _native(image: Member) -> np.ndarray:
    """Decode as ingest would: DICOM pixel data, rescale, MONOCHROME1 inversion; PNG/JPEG via Pillow."""
    if image.name.endswith(".dcm"):
        ds = pydicom.dcmread(io.BytesIO(image.body))
        array = apply_rescale(ds.pixel_array.astype(np.float64), ds)
        if ds.PhotometricInterpretation == "MONOCHROME1":
            array = (2**ds.BitsStored - 1) - array
        return array
    return np.asarray(Image.open(io.BytesIO(image.body))).astype(np.float64)


@pytest.fixture(scope="module")
def objects() -> list[synth.SynthObject]:
    return list(synth.generate(N_IMAGES, seed=7))


@pytest.fixture(scope="module")
def images(objects) -> list[Member]:
    return _expand(objects)


@pytest.fixture(scope="module")
def datasets(images) -> list[tuple[Member, pydicom.Dataset]]:
    return [(im, pydicom.dcmread(io.BytesIO(im.body))) for im in images if im.name.endswith(".dcm")]


# --------------------------------------------------------------------------- determinism


def test_same_arguments_give_identical_bytes_and_another_seed_differs():
    args = {"formats": {"dicom": 1, "png": 1, "jpeg": 1}, "archive_fraction": 0.3, "size": 64}
    first = list(synth.generate(40, seed=3, **args))
    again = list(synth.generate(40, seed=3, **args))
    other = list(synth.generate(40, seed=4, **args))
    assert {o.kind for o in first} == {"dicom", "png", "jpeg", "zip"}
    assert [(o.key, o.body) for o in first] == [(o.key, o.body) for o in again]
    assert not {o.body for o in first} & {o.body for o in other}


# --------------------------------------------------------------------------- headers and pixels


def test_dicom_headers_match_the_class(objects, datasets):
    patient_of = {o.patient_id: o.label for o in objects}
    assert len(datasets) > 0.6 * N_IMAGES
    for image, ds in datasets:
        modalities, parts = EXPECTED_HEADERS[image.label]
        assert ds.Modality in modalities and ds.BodyPartExamined in parts, image.name
        assert patient_of[ds.PatientID] == image.label and ds.PatientID == image.patient_id
        assert ds.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert all(UID(u).is_valid for u in (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID))
        assert ds.SamplesPerPixel == 1 and ds.HighBit == ds.BitsStored - 1
        assert ds.BitsAllocated == (8 if ds.Modality == "OPT" else 16)
        assert (ds.Rows, ds.Columns) == (128, 128)
        if ds.PixelRepresentation == 0:
            assert int(ds.pixel_array.max()) < 2**ds.BitsStored
    assert len({ds.SOPInstanceUID for _, ds in datasets}) == len(datasets)
    studies = defaultdict(set)
    for _, ds in datasets:
        studies[ds.PatientID].add(ds.StudyInstanceUID)
    assert all(len(uids) == 1 for uids in studies.values())


def test_transfer_syntaxes_include_rle_that_decodes(datasets):
    syntaxes = Counter(ds.file_meta.TransferSyntaxUID for _, ds in datasets)
    assert set(syntaxes) == {ExplicitVRLittleEndian, RLELossless}
    assert 0.03 < syntaxes[RLELossless] / len(datasets) < 0.2
    for _, ds in datasets:
        if ds.file_meta.TransferSyntaxUID == RLELossless:
            assert ds.pixel_array.shape == (ds.Rows, ds.Columns)


def test_chest_xrays_mix_photometric_interpretations_and_invert_correctly(datasets, images):
    chest = [(im, ds) for im, ds in datasets if im.label == "chest_xray"]
    photometric = Counter(ds.PhotometricInterpretation for _, ds in chest)
    assert photometric["MONOCHROME1"] > 0 and photometric["MONOCHROME2"] > 0
    assert {ds.Modality for _, ds in chest} == {"CR", "DX"}
    for image, _ in chest:  # once decoded, the mediastinum is brighter than the lung fields
        array = _native(image)
        n = array.shape[0]
        rows = slice(2 * n // 5, 3 * n // 5)
        centre = array[rows, n // 2 - n // 20 : n // 2 + n // 20].mean()
        lungs = np.r_[
            array[rows, n // 5 : 3 * n // 10].ravel(), array[rows, 7 * n // 10 : 4 * n // 5].ravel()
        ].mean()
        assert centre > lungs, image.name


def test_ct_values_are_hounsfield_units(datasets):
    ct = [(im, ds) for im, ds in datasets if ds.Modality == "CT"]
    assert {im.label for im, _ in ct} == {"lung_ct", "liver_ct"}
    assert any("PixelPaddingValue" in ds for _, ds in ct)
    for image, ds in ct:
        assert ds.RescaleIntercept == -1024 and ds.RescaleSlope == 1
        hu = apply_rescale(ds.pixel_array, ds)
        if "PixelPaddingValue" in ds:
            assert ds.PixelPaddingValue + ds.RescaleIntercept in synth.CT_PADDING_HU
            hu = hu[ds.pixel_array != ds.PixelPaddingValue]
        assert -1010 < np.median(hu[hu < -950]) < -990, image.name  # air
        body = hu[hu > -950]
        lung_density = ((body > -920) & (body < -780)).mean()
        if image.label == "lung_ct":
            assert lung_density > 0.18, image.name  # two large lung fields near -850 HU
        else:
            assert lung_density < 0.2, image.name  # at most small lung bases
            soft = body[(body > -500)]
            liver_range = soft[(soft >= 20) & (soft <= 150)]
            assert liver_range.size > 0.3 * soft.size and 40 < np.median(liver_range) < 110, image.name


@pytest.mark.parametrize("label", CLASSES)
def test_dicom_round_trip_preserves_native_values(label):
    array, hints = synth.render(label, np.random.default_rng(5), 64)
    variants = [{}, {"rle": True}]
    if label == "chest_xray":
        variants += [
            {"photometric": "MONOCHROME1"},
            {"photometric": "MONOCHROME1", "rle": True, "modality": "DX"},
        ]
    if label.endswith("_ct"):  # a drawn padding value forces signed storage whatever "signed" says
        variants += [{"signed": True}, {"signed": True, "rle": True}, {"signed": False}]
    for extra in variants:
        body = synth.dicom_bytes(
            array,
            label=label,
            patient_id="P",
            study_uid="1.2.3",
            series_uid="1.2.3.4",
            sop_uid="1.2.3.4.5",
            hints=hints | extra,
            PatientName="SYNTH^ROUNDTRIP",
        )
        decoded = _native(Member(label, "P", "x.dcm", body))
        np.testing.assert_array_equal(decoded, array.astype(np.float64), err_msg=str(extra))


def test_png_and_jpeg_exports_decode(images):
    modes = Counter(Image.open(io.BytesIO(im.body)).mode for im in images if not im.name.endswith(".dcm"))
    assert modes["L"] > 0 and modes["I;16"] > 0
    assert any(im.name.endswith(".jpg") for im in images)


# --------------------------------------------------------------------------- the labels are not trivial


def _cv_accuracy(features: np.ndarray, labels: np.ndarray) -> float:
    """Best 5-fold accuracy of a random forest and a logistic regression."""
    folds = StratifiedKFold(5, shuffle=True, random_state=0)
    models = [
        RandomForestClassifier(200, min_samples_leaf=3, random_state=0, n_jobs=1),
        make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000)),
    ]
    return max(cross_val_score(m, features, labels, cv=folds).mean() for m in models)


def test_mean_and_std_alone_are_weak_but_shape_is_learnable(images):
    labels = np.array([im.label for im in images])
    pixels = np.stack([normalise(_native(im), 64) for im in images]).astype(np.float32)
    simple = np.stack([pixels.mean(axis=(1, 2)), pixels.std(axis=(1, 2))], axis=1)
    thumbnails = pixels.reshape(len(pixels), 16, 4, 16, 4).mean(axis=(2, 4)).reshape(len(pixels), -1)
    majority = Counter(labels).most_common(1)[0][1] / len(labels)
    weak, rich = _cv_accuracy(simple, labels), _cv_accuracy(thumbnails, labels)
    print(f"\n{len(labels)} images: majority {majority:.3f}, mean+std {weak:.3f}, 16x16 pixels {rich:.3f}")
    assert weak <= 0.60
    assert rich >= 0.85


# --------------------------------------------------------------------------- studies, archives, PHI


def test_class_proportions_and_patient_sizes(objects, images):
    assert len(images) == N_IMAGES
    shares = Counter(im.label for im in images)
    for label, weight in synth.TABLE_I_WEIGHTS.items():
        assert abs(shares[label] / N_IMAGES - weight) < 0.03, label
    per_patient = Counter(im.patient_id for im in images)
    assert all(2 <= n <= 4 for n in per_patient.values())
    assert len({(o.patient_id, o.label) for o in objects}) == len(per_patient)  # one class per patient
    folders = {}
    for obj in objects:
        pattern = (
            rf"{obj.label}/EXP[0-9a-f]{{10}}\.zip"
            if obj.kind == "zip"
            else rf"{obj.label}/EXP[0-9a-f]{{10}}/\d{{4}}\.(dcm|png|jpg)"
        )
        assert re.fullmatch(pattern, obj.key), obj.key
        assert obj.patient_id not in obj.key  # keys are stored verbatim downstream: no PHI in them
        folders.setdefault(obj.key.split("/")[1].removesuffix(".zip"), set()).add(obj.patient_id)
    assert all(len(patients) == 1 for patients in folders.values())  # one export folder per patient


def test_zip_archives_hold_a_patients_dicom_in_nested_folders(objects):
    archives = [o for o in objects if o.kind == "zip"]
    assert archives
    dicom_members = 0
    for obj in archives:
        with zipfile.ZipFile(io.BytesIO(obj.body)) as archive:
            assert archive.testzip() is None
            for name in archive.namelist():
                assert re.fullmatch(r"STUDY\d{4}/SERIES\d{4}/IMG\d{4}\.(dcm|png|jpg)", name), name
                if name.endswith(".dcm"):
                    assert pydicom.dcmread(io.BytesIO(archive.read(name))).PatientID == obj.patient_id
                    dicom_members += 1
    assert dicom_members > 0


def test_inputs_carry_phi_for_the_leak_test_to_look_for(datasets):
    for image, ds in datasets:
        assert str(ds.PatientName).startswith("SYNTH^PATIENT"), image.name
        assert re.fullmatch(r"\d{8}", ds.PatientBirthDate) and re.fullmatch(r"\d{8}", ds.StudyDate)
        assert ds.AccessionNumber and ds.InstitutionName and ds.StudyDescription and ds.ReferringPhysicianName


def test_weights_select_classes_and_bad_arguments_fail_fast():
    only = list(synth.generate(6, seed=1, weights={"retinal_oct": 1.0}, size=48))
    assert {o.label for o in only} == {"retinal_oct"}
    with pytest.raises(ValueError, match="unknown keys"):
        synth.generate(5, weights={"ct": 1.0})  # raises before iteration
    with pytest.raises(ValueError, match="images_per_patient"):
        synth.generate(5, images_per_patient=(3, 2))
    with pytest.raises(ValueError, match="unknown class"):
        synth.render("xray", np.random.default_rng(0), 64)
    with pytest.raises(ValueError, match="must be uint16"):
        synth.dicom_bytes(
            np.zeros((8, 8), np.float32),
            label="brain_mri",
            patient_id="P",
            study_uid="1.2",
            series_uid="1.2.3",
            sop_uid="1.2.3.4",
            hints={},
        )
