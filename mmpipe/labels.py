"""Training labels for ingested images: a manifest, the key prefix, or DICOM header rules.

Sources, most explicit first (the first that speaks decides, recorded as ``label_source``):

1. ``manifest``: a CSV (header ``path,label``) or JSON (``{"<path>": "<label>"}`` or
   ``[{"path": ..., "label": ...}]``) file named one of ``Settings.label_manifest_names`` and
   uploaded beside the data. Paths are relative to the manifest's folder and name an object
   (``P001/0001.dcm``), a member of an archive (``P002.zip!STUDY/IMG1.dcm``) or a folder (``P003/``:
   every object below it). The nearest manifest that mentions an object decides; inside it the
   most specific entry (member, then object, then the deepest folder).
2. ``prefix``: ``training/<class>/...``.
3. ``header_rule``: ``Settings.label_rules``, tried in order, e.g.
   ``{"modality": "CT", "body_part": "CHEST", "label": "lung_ct"}``. ``modality`` and ``body_part``
   match case-insensitively (``|`` separates alternatives); ``study_description`` is a
   case-insensitive regular expression searched in the description. Header values are only
   compared in memory: none is stored.

A manifest naming a class that is not configured makes the object ``unlabelled`` (with that as the
detail) instead of falling through to weaker sources: a typo must not quietly train on a guess.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath

from mmpipe.errors import ConfigError
from mmpipe.imaging import Reason, Rejected

TRAINING_PREFIX = "training/"
MEMBER_SEPARATOR = "!"
RULE_FIELDS = ("modality", "body_part", "study_description")
MAX_MANIFEST_ENTRIES = 1_000_000


class ManifestError(ValueError):
    """A label manifest that cannot be read; the message names the row, never a value."""


@dataclass(frozen=True)
class Label:
    name: str
    source: str  # manifest | prefix | header_rule


# --------------------------------------------------------------------------- manifests


def is_manifest(key: str, names: Sequence[str]) -> bool:
    return key.rsplit("/", 1)[-1] in names


def _entry_path(raw: str, where: str) -> str:
    """Normalise one manifest path (``./`` and leading ``/`` dropped; ``..`` refused); folders keep a ``/``."""
    path, _, member = raw.strip().replace("\\", "/").partition(MEMBER_SEPARATOR)
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if not parts:
        raise ManifestError(f"{where}: empty path")
    if ".." in parts:
        raise ManifestError(f"{where}: path leaves the manifest's folder (..)")
    folder = path.rstrip().endswith("/") and not member
    normal = str(PurePosixPath(*parts)) + ("/" if folder else "")
    return f"{normal}{MEMBER_SEPARATOR}{member.strip().lstrip('/')}" if member.strip() else normal


def parse_manifest(key: str, data: bytes) -> dict[str, str]:
    """Entries of a CSV or JSON manifest as {normalised relative path: label as written}."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ManifestError("not UTF-8 text") from None
    pairs = _json_pairs(text) if key.lower().endswith(".json") else _csv_pairs(text)
    entries: dict[str, str] = {}
    for n, (path, label) in enumerate(pairs, 1):
        where = f"entry {n}"
        if not isinstance(path, str) or not isinstance(label, str):
            raise ManifestError(f"{where}: path and label must be text")
        if not label.strip():
            raise ManifestError(f"{where}: empty label")
        normal = _entry_path(path, where)
        if entries.get(normal, label.strip()) != label.strip():
            raise ManifestError(f"{where}: path listed twice with different labels")
        entries[normal] = label.strip()
        if len(entries) > MAX_MANIFEST_ENTRIES:
            raise ManifestError(f"more than {MAX_MANIFEST_ENTRIES} entries")
    if not entries:
        raise ManifestError("no entries")
    return entries


def _csv_pairs(text: str) -> list[tuple[str, str]]:
    rows = csv.reader(io.StringIO(text))
    try:
        header = [h.strip().lower() for h in next(rows)]
    except StopIteration:
        raise ManifestError("empty file") from None
    except csv.Error:
        raise ManifestError("unreadable CSV header") from None
    if "path" not in header or "label" not in header:
        raise ManifestError("CSV header must name the columns 'path' and 'label'")
    p, lab = header.index("path"), header.index("label")
    pairs = []
    try:
        for n, row in enumerate(rows, 2):
            if not any(cell.strip() for cell in row):
                continue
            if len(row) <= max(p, lab):
                raise ManifestError(f"line {n}: missing path or label column")
            pairs.append((row[p], row[lab]))
    except csv.Error:
        raise ManifestError("malformed CSV") from None
    return pairs


def _json_pairs(text: str) -> list[tuple[object, object]]:
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ManifestError(f"invalid JSON at line {exc.lineno}") from None
    if isinstance(payload, dict):
        return list(payload.items())
    if isinstance(payload, list) and all(isinstance(item, dict) for item in payload):
        return [(item.get("path"), item.get("label")) for item in payload]
    raise ManifestError('JSON must be {"<path>": "<label>"} or a list of {"path": ..., "label": ...}')


@dataclass(frozen=True)
class Manifest:
    key: str
    entries: Mapping[str, str]

    @property
    def folder(self) -> str:
        return self.key.rsplit("/", 1)[0] + "/" if "/" in self.key else ""

    def lookup(self, key: str, member: str) -> str | None:
        """This manifest's label for ``key`` (and archive ``member``), most specific entry first."""
        if not key.startswith(self.folder):
            return None
        rel = key[len(self.folder) :]
        if member and (hit := self.entries.get(f"{rel}{MEMBER_SEPARATOR}{member}")):
            return hit
        if hit := self.entries.get(rel):
            return hit
        parts = rel.split("/")
        for depth in range(len(parts) - 1, 0, -1):
            if hit := self.entries.get("/".join(parts[:depth]) + "/"):
                return hit
        return None


# --------------------------------------------------------------------------- header rules


@dataclass(frozen=True)
class HeaderRule:
    label: str
    modality: frozenset[str] | None = None
    body_part: frozenset[str] | None = None
    study_description: re.Pattern[str] | None = None

    def matches(self, modality: str | None, body_part: str | None, description: str | None) -> bool:
        def one_of(allowed: frozenset[str] | None, value: str | None) -> bool:
            return allowed is None or (value or "").strip().upper() in allowed

        return (
            one_of(self.modality, modality)
            and one_of(self.body_part, body_part)
            and (self.study_description is None or bool(self.study_description.search(description or "")))
        )


def parse_rules(raw: Iterable[Mapping[str, str]], classes: Sequence[str]) -> tuple[HeaderRule, ...]:
    """Validate configured header rules; a bad rule is a ConfigError naming its position."""
    rules = []
    for n, rule in enumerate(raw, 1):
        where = f"label_rules[{n}]"
        if not isinstance(rule, Mapping):
            raise ConfigError(f"{where} must be an object like {{'modality': 'CT', 'label': 'lung_ct'}}")
        unknown = sorted(set(rule) - {"label", *RULE_FIELDS})
        if unknown:
            raise ConfigError(
                f"{where}: unknown field(s) {', '.join(unknown)}; allowed: label, {', '.join(RULE_FIELDS)}"
            )
        label = str(rule.get("label", "")).strip()
        if label not in classes:
            raise ConfigError(f"{where}: label {label!r} is not a configured class ({', '.join(classes)})")
        if not any(str(rule.get(f, "")).strip() for f in RULE_FIELDS):
            raise ConfigError(f"{where} needs at least one of {', '.join(RULE_FIELDS)}")

        def alternatives(name: str, rule: Mapping[str, str] = rule) -> frozenset[str] | None:
            value = str(rule.get(name, "")).strip()
            return frozenset(v.strip().upper() for v in value.split("|")) if value else None

        pattern = str(rule.get("study_description", "")).strip()
        try:
            description = re.compile(pattern, re.IGNORECASE) if pattern else None
        except re.error as exc:
            raise ConfigError(
                f"{where}: study_description is not a valid regular expression ({exc})"
            ) from None
        rules.append(HeaderRule(label, alternatives("modality"), alternatives("body_part"), description))
    return tuple(rules)


# --------------------------------------------------------------------------- resolution


def label_from_key(key: str, classes: Sequence[str]) -> str | None:
    """``training/<class>/...`` -> class, when the folder names a configured class."""
    if not key.startswith(TRAINING_PREFIX):
        return None
    head, slash, _ = key[len(TRAINING_PREFIX) :].partition("/")
    return head if slash and head in classes else None


class Labeler:
    """Resolves one image's class from manifests, the key and header rules (see module doc)."""

    def __init__(
        self,
        classes: Sequence[str],
        manifests: Iterable[Manifest] = (),
        rules: Sequence[HeaderRule] = (),
        fallback: Label | None = None,
    ):
        self.classes = tuple(classes)
        self.fallback = fallback  # what resolve gives when no source speaks (scoring: no label needed)
        # deepest folder first: the nearest manifest wins
        self.manifests = sorted(manifests, key=lambda m: (-m.folder.count("/"), m.key))
        self.rules = tuple(rules)

    def explicit(self, key: str, member: str = "") -> Label | None:
        """The label a manifest or the prefix gives, without looking inside the object.

        Raises :class:`Rejected` (UNLABELLED) when the deciding manifest names an unknown class.
        """
        for manifest in self.manifests:
            label = manifest.lookup(key, member)
            if label is None:
                continue
            if label not in self.classes:
                raise Rejected(
                    Reason.UNLABELLED,
                    f"manifest {manifest.key.rsplit('/', 1)[-1]} names {label[:40]!r}, not a configured class",
                )
            return Label(label, "manifest")
        by_key = label_from_key(key, self.classes)
        return Label(by_key, "prefix") if by_key else None

    def resolve(
        self,
        key: str,
        member: str = "",
        modality: str | None = None,
        body_part: str | None = None,
        description: str | None = None,
    ) -> Label:
        """The image's label; the fallback, else :class:`Rejected` (UNLABELLED), when no source gives one."""
        label = self.explicit(key, member)
        if label:
            return label
        for rule in self.rules:
            if rule.matches(modality, body_part, description):
                return Label(rule.label, "header_rule")
        if self.fallback is not None:
            return self.fallback
        raise Rejected(
            Reason.UNLABELLED,
            "no manifest entry, no training/<class>/ folder and no header rule matched",
        )
