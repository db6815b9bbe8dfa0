"""Pseudonyms are stable per salt, differ across salts and kinds, and reveal nothing."""

from __future__ import annotations

from mmpipe.pseudonym import fallback_patient, pseudonym


def test_stable_and_salt_dependent() -> None:
    a = pseudonym(b"salt-1", "patient", "PAT-123")
    assert a == pseudonym(b"salt-1", "patient", " PAT-123 ")
    assert a != pseudonym(b"salt-2", "patient", "PAT-123")
    assert a != pseudonym(b"salt-1", "study", "PAT-123")
    assert "PAT" not in a and "123" not in a
    assert a.startswith("p") and len(a) == 25


def test_folder_stands_in_for_patient() -> None:
    assert fallback_patient("training/chest_xray/EXPORT-7/img1.png") == fallback_patient(
        "training/chest_xray/EXPORT-7/img2.png"
    )
    assert fallback_patient("a/b.png") != fallback_patient("c/b.png")
