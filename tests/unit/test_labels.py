"""Label resolution: manifests (CSV/JSON), the training/<class>/ prefix and DICOM header rules."""

from __future__ import annotations

import json

import pytest

from mmpipe.config import CLASSES, get_settings
from mmpipe.errors import ConfigError
from mmpipe.imaging import Reason, Rejected
from mmpipe.labels import (
    Label,
    Labeler,
    Manifest,
    ManifestError,
    is_manifest,
    label_from_key,
    parse_manifest,
    parse_rules,
)

RULES = [
    {"modality": "CT", "body_part": "CHEST", "label": "lung_ct"},
    {"modality": "CT", "body_part": "ABDOMEN|LIVER", "label": "liver_ct"},
    {"modality": "MR", "study_description": r"brain|head", "label": "brain_mri"},
    {"modality": "CR|DX", "label": "chest_xray"},
]


def test_csv_manifest_normalises_paths_and_accepts_extra_columns() -> None:
    data = b"\xef\xbb\xbfnote,Path,LABEL\nx,./P1/img.dcm,brain_mri\n,,\ny,P2/,lung_ct\nz,P3.zip!/A/b.png, retinal_oct\n"
    assert parse_manifest("exports/labels.csv", data) == {
        "P1/img.dcm": "brain_mri",
        "P2/": "lung_ct",
        "P3.zip!A/b.png": "retinal_oct",
    }


@pytest.mark.parametrize(
    "payload",
    [
        {"P1/img.dcm": "brain_mri", "P2/": "lung_ct"},
        [{"path": "P1/img.dcm", "label": "brain_mri"}, {"path": "P2/", "label": "lung_ct"}],
    ],
)
def test_json_manifest_as_mapping_or_list(payload: object) -> None:
    entries = parse_manifest("a/labels.json", json.dumps(payload).encode())
    assert entries == {"P1/img.dcm": "brain_mri", "P2/": "lung_ct"}


@pytest.mark.parametrize(
    ("name", "data", "message"),
    [
        ("labels.csv", b"", "empty file"),
        ("labels.csv", b"file,class\na,b\n", "'path' and 'label'"),
        ("labels.csv", b"path,label\n", "no entries"),
        ("labels.csv", b"path,label\na.dcm\n", "line 2"),
        ("labels.csv", b"path,label\n../x.dcm,brain_mri\n", "leaves the manifest's folder"),
        ("labels.csv", b"path,label\na.dcm,\n", "empty label"),
        ("labels.csv", b"path,label\na.dcm,brain_mri\n./a.dcm,lung_ct\n", "twice"),
        ("labels.csv", b"\xff\xfe\x00", "UTF-8"),
        ("labels.json", b"{not json", "invalid JSON"),
        ("labels.json", b'"text"', "JSON must be"),
        ("labels.json", b'[{"path": 3, "label": "lung_ct"}]', "must be text"),
    ],
)
def test_bad_manifests_are_refused_with_a_reason(name: str, data: bytes, message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        parse_manifest(name, data)


def test_manifest_errors_never_quote_values() -> None:
    with pytest.raises(ManifestError) as caught:
        parse_manifest("labels.csv", b"path,label\nSMITH^JOHN/../x.dcm,brain_mri\n")
    assert "SMITH" not in str(caught.value)


def test_is_manifest_by_base_name() -> None:
    names = ("labels.csv", "labels.json")
    assert is_manifest("training/labels.csv", names) and is_manifest("labels.json", names)
    assert not is_manifest("training/labels.csv.bak", names) and not is_manifest(
        "training/mylabels.csv", names
    )


def test_lookup_prefers_member_then_object_then_deepest_folder() -> None:
    manifest = Manifest(
        "exp/labels.csv",
        {"P3.zip!A/b.png": "retinal_oct", "P3.zip": "chest_xray", "P2/": "lung_ct", "P2/sub/": "liver_ct"},
    )
    assert manifest.folder == "exp/"
    assert manifest.lookup("exp/P3.zip", "A/b.png") == "retinal_oct"
    assert manifest.lookup("exp/P3.zip", "A/c.png") == "chest_xray"
    assert manifest.lookup("exp/P2/x.dcm", "") == "lung_ct"
    assert manifest.lookup("exp/P2/sub/deeper/x.dcm", "") == "liver_ct"
    assert manifest.lookup("exp/P2x/x.dcm", "") is None  # a folder entry matches whole segments only
    assert manifest.lookup("other/P2/x.dcm", "") is None  # outside the manifest's folder


def test_nearest_manifest_that_mentions_the_object_decides() -> None:
    outer = Manifest("exp/labels.csv", {"P1/": "lung_ct", "P1/b.dcm": "liver_ct"})
    inner = Manifest("exp/P1/labels.json", {"a.dcm": "brain_mri"})
    labeler = Labeler(CLASSES, [outer, inner])
    assert labeler.explicit("exp/P1/a.dcm") == Label("brain_mri", "manifest")
    assert labeler.explicit("exp/P1/b.dcm") == Label("liver_ct", "manifest")  # inner does not mention it
    assert labeler.explicit("exp/P1/c.dcm") == Label("lung_ct", "manifest")


def test_precedence_manifest_then_prefix_then_header_rule() -> None:
    labeler = Labeler(
        CLASSES,
        [Manifest("training/brain_mri/labels.csv", {"x.dcm": "lung_ct"})],
        parse_rules(RULES, CLASSES),
    )
    assert labeler.resolve("training/brain_mri/x.dcm", "", "CT", "CHEST") == Label("lung_ct", "manifest")
    assert labeler.resolve("training/brain_mri/y.dcm", "", "CT", "CHEST") == Label("brain_mri", "prefix")
    assert labeler.resolve("exports/y.dcm", "", "ct", "chest") == Label("lung_ct", "header_rule")
    assert labeler.resolve("exports/y.dcm", "", "CT", "LIVER") == Label("liver_ct", "header_rule")
    assert labeler.resolve("exports/y.dcm", "", "MR", None, "MRI HEAD W/O") == Label(
        "brain_mri", "header_rule"
    )
    assert labeler.resolve("exports/y.dcm", "", "DX", "") == Label("chest_xray", "header_rule")


def test_unresolvable_image_is_unlabelled() -> None:
    labeler = Labeler(CLASSES, rules=parse_rules(RULES, CLASSES))
    for key, modality, part in (("exports/y.png", None, None), ("training/knee_xr/a.dcm", "MR", "KNEE")):
        with pytest.raises(Rejected) as caught:
            labeler.resolve(key, "", modality, part, None)
        assert caught.value.reason is Reason.UNLABELLED


def test_manifest_naming_an_unknown_class_is_unlabelled_not_a_fallthrough() -> None:
    labeler = Labeler(CLASSES, [Manifest("training/lung_ct/labels.csv", {"a.dcm": "lung-ct"})])
    with pytest.raises(Rejected) as caught:
        labeler.resolve("training/lung_ct/a.dcm", "", "CT", "CHEST")
    assert caught.value.reason is Reason.UNLABELLED and "'lung-ct'" in caught.value.detail


def test_prefix_label_needs_a_configured_class_folder() -> None:
    assert label_from_key("training/lung_ct/P1/a.dcm", CLASSES) == "lung_ct"
    assert label_from_key("training/lung_ct", CLASSES) is None
    assert label_from_key("training/knee/a.dcm", CLASSES) is None
    assert label_from_key("incoming/lung_ct/a.dcm", CLASSES) is None


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ({"modality": "CT", "label": "knee"}, "not a configured class"),
        ({"label": "lung_ct"}, "at least one of"),
        ({"modality": "CT", "bodypart": "CHEST", "label": "lung_ct"}, "unknown field"),
        ({"study_description": "(", "label": "lung_ct"}, "regular expression"),
        ("CT=lung_ct", "must be an object"),
    ],
)
def test_bad_rules_are_config_errors(rule: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_rules([rule], CLASSES)  # type: ignore[list-item]


def test_rules_come_from_settings_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MMPIPE_LABEL_RULES", json.dumps(RULES[:1]))
    monkeypatch.setenv("MMPIPE_LABEL_MANIFEST_NAMES", '["classes.csv"]')
    settings = get_settings()
    assert parse_rules(settings.label_rules, settings.classes)[0].label == "lung_ct"
    assert settings.label_manifest_names == ("classes.csv",)
