"""Which identical copies conflict: a disagreement on label or patient, never a harmless re-send."""

from __future__ import annotations

from mmpipe.dataset import duplicate_conflicts


def image(image_id: str, label: str = "lung_ct", patient: str = "p1") -> dict:
    return {"image_id": image_id, "label": label, "patient_key": patient}


def copy(of: str, label: str | None = "lung_ct", patient: str | None = "p1") -> dict:
    return {"duplicate_of": of, "label": label, "patient_key": patient}


def test_a_resent_copy_with_the_same_label_and_patient_is_harmless():
    assert duplicate_conflicts([image("a")], [copy("a"), copy("a")]) == {}


def test_copies_with_another_label_or_patient_conflict():
    images = [image("a"), image("b"), image("c")]
    copies = [copy("a", label="liver_ct"), copy("b", patient="p2"), copy("c", label="liver_ct", patient="p3")]
    assert duplicate_conflicts(images, copies) == {
        "a": "labels differ: liver_ct, lung_ct",
        "b": "2 patients",
        "c": "labels differ: liver_ct, lung_ct; 2 patients",
    }


def test_copies_recorded_without_label_or_patient_are_not_evidence_and_other_images_are_ignored():
    assert (
        duplicate_conflicts([image("a")], [copy("a", label=None, patient=None), copy("z", label="x")]) == {}
    )
