"""Great Expectations validation of ingested image batches and of a dataset before training.

Why GX rather than pandas asserts: the expectation suites, their results and the HTML Data Docs form an
auditable record per run that a reviewer can open without reading code. Each call builds a throwaway
ephemeral GX context whose only Data Docs site is a temporary directory, so nothing persists between calls
and concurrent calls share no state; every suite runs through a GX Checkpoint whose UpdateDataDocsAction
builds the site, named by the caller's run (the Airflow run id) and data asset (the ingest prefix). The
site is read back into memory, pointed at front-end files shipped with mmpipe (:func:`offline_site`).

Per-image rules judge single images: an image failing one is excluded from training alone, and the
batch fails only when a rule's failing share exceeds its threshold (GX's own ``mostly``, so Data Docs
show the share and the failing examples). Batch rules (class collapse) and dataset rules (leakage,
images per class) are critical as a whole. A *warning* is recorded but never blocks.
"""

from __future__ import annotations

import logging
import re
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from great_expectations.data_context import EphemeralDataContext
    from great_expectations.expectations import Expectation

logger = logging.getLogger(__name__)

SEVERITIES = ("critical", "warning")
SPLITS = ("train", "val", "test")
#: How many unexpected ids/values a Check's detail keeps (the full per-rule lists are in the report).
SAMPLE = 10
#: Rules judged per image: a failing image is excluded alone; the batch fails past the rule's threshold.
IMAGE_RULES = (
    "label_in_classes",
    "rows_in_range",
    "cols_in_range",
    "bit_depth_consistent",
    "not_blank",
    "patient_key_present",
)
#: The share of a batch's images each per-image rule must pass unless configured otherwise.
DEFAULT_MOSTLY = 0.98
#: Largest BitsAllocated for grayscale integer samples, and for floating point or colour ones.
MAX_BITS, MAX_BITS_FLOAT_OR_COLOUR = 16, 32
CONSISTENT = "consistent"

DEFAULT_MODALITY_FOR_CLASS: dict[str, tuple[str, ...]] = {
    "brain_mri": ("MR",),
    "chest_xray": ("CR", "DX", "DR"),
    "retinal_oct": ("OPT", "OCT", "OP"),
    "lung_ct": ("CT",),
    "liver_ct": ("CT",),
}

BATCH_COLUMNS = (
    "image_id",
    "label",
    "orig_rows",
    "orig_cols",
    "bits_stored",
    "bits_allocated",
    "float_pixels",
    "photometric",
    "pixel_std",
    "patient_key",
    "modality",
)
#: Columns the decoder computes for every image: a null or non-number there is an ingest bug, not bad data.
_COMPUTED_NUMERIC = ("orig_rows", "orig_cols", "bits_stored", "bits_allocated", "pixel_std")
_DATASET_COLUMNS = ("image_id", "label", "patient_key", "split")
_SITE = "mmpipe_site"
_COLOUR = ("RGB", "YBR", "PALETTE")


@dataclass(frozen=True)
class Check:
    """The outcome of one expectation, named for humans and the catalog.

    ``scope`` is ``image`` for per-image rules (``threshold`` is their ``mostly``), else ``batch`` or
    ``dataset``: a rule about the whole, whose failure is the whole's.
    """

    name: str
    severity: str
    success: bool
    detail: dict
    scope: str = "batch"
    threshold: float | None = None


@dataclass(frozen=True)
class ValidationReport:
    """One suite run: ``success`` iff no critical check failed; ``docs`` is the Data Docs site by path.

    ``image_failures`` names, per rule, every image failing a per-image rule (whether or not the rule's
    share stayed within its threshold) or a failed critical dataset rule; ``failed_image_ids`` is their
    union in input order.
    """

    suite: str
    success: bool
    checks: list[Check]
    failed_image_ids: list[str]
    image_failures: dict[str, list[str]]
    docs: dict[str, bytes] = field(repr=False)

    def to_json(self) -> dict:
        """Everything but the Data Docs, as JSON-ready builtins."""
        return {
            "suite": self.suite,
            "success": self.success,
            "checks": [asdict(check) for check in self.checks],
            "failed_image_ids": list(self.failed_image_ids),
        }

    def failures(self, severity: str = "critical") -> list[Check]:
        if severity not in SEVERITIES:
            raise ValueError(f"unknown severity {severity!r}; expected one of {SEVERITIES}")
        return [check for check in self.checks if check.severity == severity and not check.success]


@dataclass(frozen=True)
class BatchRules:
    """What an ingested batch must satisfy; ``std_floor`` is on the uint8 canonical image.

    ``mostly`` is every per-image rule's threshold unless ``rule_mostly`` names the rule. Class
    collapse is judged only on batches of at least ``min_images_for_share`` images: a small night
    may well hold one modality only.
    """

    classes: tuple[str, ...]
    min_side: int = 32
    max_side: int = 8192
    std_floor: float = 2.0
    mostly: float = DEFAULT_MOSTLY
    rule_mostly: Mapping[str, float] = field(default_factory=dict)
    max_class_share: float = 0.9
    min_images_for_share: int = 50
    modality_for_class: dict[str, tuple[str, ...]] = field(
        default_factory=lambda: dict(DEFAULT_MODALITY_FOR_CLASS)
    )

    def __post_init__(self) -> None:
        _check_classes(self.classes)
        if not 0 < self.min_side <= self.max_side:
            raise ValueError(
                f"BatchRules needs 0 < min_side <= max_side, got {self.min_side}..{self.max_side}"
            )
        unknown = sorted(set(self.rule_mostly) - set(IMAGE_RULES))
        if unknown:
            raise ValueError(f"no per-image rule named {', '.join(unknown)}; rules: {', '.join(IMAGE_RULES)}")
        for name, value in {"mostly": self.mostly, **self.rule_mostly}.items():
            if not 0 < value <= 1:
                raise ValueError(f"threshold {name} must be within (0, 1], got {value}")
        if not 0 < self.max_class_share <= 1:
            raise ValueError(f"max_class_share must be within (0, 1], got {self.max_class_share}")

    def threshold(self, rule: str) -> float:
        return self.rule_mostly.get(rule, self.mostly)


@dataclass(frozen=True)
class _Part:
    """One DataFrame validated against one GX suite; ``key`` is the column that names its rows."""

    name: str
    asset: str
    frame: pd.DataFrame
    key: str
    expectations: list[Expectation]


def _gx_expectations() -> ModuleType:
    """GX's expectation classes, imported on first use: importing GX takes seconds (DAG parsing must not
    pay for it) and logs hundreds of INFO lines unless its logger is quietened first."""
    gx_logger = logging.getLogger("great_expectations")
    if gx_logger.level == logging.NOTSET:
        gx_logger.setLevel(logging.WARNING)
    import great_expectations.expectations as gxe

    return gxe


def _expect(
    cls: type[Expectation], check: str, severity: str, scope: str = "batch", **kwargs: Any
) -> Expectation:
    """A GX expectation tagged with our check name, severity and scope; extra ``meta`` lands in the detail."""
    meta = {"check": check, "severity": severity, "scope": scope, **kwargs.pop("meta", {})}
    return cls(meta=meta, severity=severity, **kwargs)


def bit_depth_problem(stored: Any, allocated: Any, photometric: Any, float_pixels: Any) -> str:
    """``consistent`` when 1 <= BitsStored <= BitsAllocated <= 16 (32 for float or colour samples),
    else what is wrong, in words a data team can act on."""
    wide = bool(float_pixels) or str(photometric or "").startswith(_COLOUR)
    ceiling = MAX_BITS_FLOAT_OR_COLOUR if wide else MAX_BITS
    stored, allocated = int(stored), int(allocated)
    if stored < 1:
        return f"BitsStored {stored} < 1"
    if stored > allocated:
        return f"BitsStored {stored} > BitsAllocated {allocated}"
    if allocated > ceiling:
        kind = "float or colour" if wide else "grayscale integer"
        return f"BitsAllocated {allocated} > {ceiling} ({kind})"
    return CONSISTENT


def validate_batch(
    rows: pd.DataFrame,
    rules: BatchRules,
    *,
    run_name: str | None = None,
    asset: str = "catalog_rows",
    docs: bool = True,
) -> ValidationReport:
    """Validate one ingested batch of catalog rows before its images may reach training.

    ``run_name`` (the Airflow run id) and ``asset`` (the ingest prefix) name the result in Data
    Docs; ``docs=False`` skips building them (re-evaluating earlier exclusions needs verdicts only).
    """
    _check_input(rows, BATCH_COLUMNS, numeric=_COMPUTED_NUMERIC, non_null=("label",))
    gxe = _gx_expectations()
    frame = rows[list(BATCH_COLUMNS)].copy()
    frame["patient_key"] = frame["patient_key"].where(frame["patient_key"].fillna("") != "", None)
    frame["bit_depth"] = [
        bit_depth_problem(*values)
        for values in zip(
            frame["bits_stored"], frame["bits_allocated"], frame["photometric"], frame["float_pixels"],
            strict=True,
        )
    ]  # fmt: skip
    # Each image carries its class's share of the batch, so GX can judge collapse on the image rows;
    # too small a batch carries none (GX leaves nulls out).
    share = frame["label"].map(frame["label"].value_counts(normalize=True))
    frame["class_share"] = share if len(frame) >= rules.min_images_for_share else np.nan
    # Only labels with known modalities are compared; GX's column-pair row_condition is not applied to
    # the unexpected rows (GX 1.24, pandas), so the exclusion is a derived column instead.
    known = frame["label"].isin(list(rules.modality_for_class))
    frame["modality_checked"] = frame["modality"].where(known & frame["modality"].notna(), None)
    counts = {c: int((frame["label"] == c).sum()) for c in rules.classes}
    pairs = [(c, m) for c, mods in rules.modality_for_class.items() for m in mods]
    crit, warn = "critical", "warning"

    def image_rule(cls: type[Expectation], name: str, **kwargs: Any) -> Expectation:
        return _expect(cls, name, crit, "image", mostly=rules.threshold(name), **kwargs)

    expectations = [
        image_rule(gxe.ExpectColumnValuesToBeInSet, "label_in_classes", column="label", value_set=list(rules.classes)),
        *(
            image_rule(
                gxe.ExpectColumnValuesToBeBetween,
                f"{side}_in_range",
                column=f"orig_{side}",
                min_value=rules.min_side,
                max_value=rules.max_side,
            )
            for side in ("rows", "cols")
        ),
        image_rule(gxe.ExpectColumnValuesToBeInSet, "bit_depth_consistent", column="bit_depth", value_set=[CONSISTENT]),
        image_rule(
            gxe.ExpectColumnValuesToBeBetween, "not_blank", column="pixel_std", min_value=rules.std_floor, strict_min=True
        ),
        image_rule(gxe.ExpectColumnValuesToNotBeNull, "patient_key_present", column="patient_key"),
        _expect(
            gxe.ExpectColumnValuesToBeBetween,
            "class_collapse",
            crit,
            column="class_share",
            max_value=rules.max_class_share,
            meta={"class_counts": counts, "min_images": rules.min_images_for_share},
        ),
        _expect(
            gxe.ExpectColumnPairValuesToBeInSet,
            "modality_matches_label",
            warn,
            column_A="label",
            column_B="modality_checked",
            value_pairs_set=pairs,
            ignore_row_if="either_value_is_missing",
        ),
        _expect(
            gxe.ExpectColumnDistinctValuesToContainSet,
            "class_counts",
            warn,
            column="label",
            value_set=list(rules.classes),
            meta={"class_counts": counts},
        ),
    ]  # fmt: skip
    return _run("batch", [_Part("mmpipe_batch", asset, frame, "image_id", expectations)], run_name, docs)


def validate_dataset(
    rows: pd.DataFrame, classes: tuple[str, ...], min_per_class: int = 5, *, run_name: str | None = None
) -> ValidationReport:
    """Validate the split dataset before training: enough data per class, and no patient in two splits."""
    _check_classes(classes)
    _check_input(rows, _DATASET_COLUMNS, numeric=(), non_null=("label", "split"))
    gxe = _gx_expectations()
    frame = rows[list(_DATASET_COLUMNS)].copy()
    # Leakage as a row property, so GX can name the images of every patient found in several splits.
    frame["patient_split_count"] = frame.groupby("patient_key")["split"].transform("nunique")
    table = (
        frame.groupby(["label", "split"])
        .size()
        .unstack(fill_value=0)
        .reindex(index=list(classes), columns=list(SPLITS), fill_value=0)
    )
    per_class = pd.DataFrame({"label": list(classes), **{f"n_{s}": table[s].to_numpy() for s in SPLITS}})
    split_counts = {c: {s: int(table.at[c, s]) for s in SPLITS} for c in classes}
    crit = "critical"

    def rule(cls: type[Expectation], name: str, **kwargs: Any) -> Expectation:
        return _expect(cls, name, crit, "dataset", **kwargs)

    image_checks = [
        rule(gxe.ExpectColumnValuesToBeInSet, "split_in_set", column="split", value_set=list(SPLITS)),
        rule(gxe.ExpectColumnValuesToBeInSet, "label_in_classes", column="label", value_set=list(classes)),
        rule(gxe.ExpectColumnValuesToNotBeNull, "patient_key_not_null", column="patient_key"),
        rule(
            gxe.ExpectColumnValuesToBeBetween, "no_patient_leakage", column="patient_split_count", max_value=1
        ),
    ]
    class_checks = [
        rule(
            gxe.ExpectColumnValuesToBeBetween,
            "train_min_per_class",
            column="n_train",
            min_value=min_per_class,
            meta={"split_counts": split_counts},
        ),
        rule(gxe.ExpectColumnValuesToBeBetween, "test_nonempty_per_class", column="n_test", min_value=1),
    ]
    return _run(
        "dataset",
        [
            _Part("mmpipe_dataset_images", "dataset_images", frame, "image_id", image_checks),
            _Part("mmpipe_dataset_classes", "dataset_classes", per_class, "label", class_checks),
        ],
        run_name,
        docs=True,
    )


def _check_classes(classes: tuple[str, ...]) -> None:
    if not classes or len(set(classes)) != len(classes):
        raise ValueError(f"classes must be non-empty and distinct, got {classes!r}")


def _check_input(
    rows: pd.DataFrame, columns: tuple[str, ...], numeric: tuple[str, ...], non_null: tuple[str, ...]
) -> None:
    """Reject input no expectation could judge fairly (GX skips nulls and errors on mixed types)."""
    if not isinstance(rows, pd.DataFrame):
        raise TypeError(f"expected a pandas DataFrame of catalog rows, got {type(rows).__name__}")
    missing = [c for c in columns if c not in rows.columns]
    if missing:
        raise ValueError(f"catalog rows lack column(s): {', '.join(missing)}")
    if rows.empty:
        raise ValueError("no catalog rows to validate")
    ids = rows["image_id"]
    if ids.isna().any() or ids.duplicated().any():
        raise ValueError("image_id must be present and unique in every row")
    for column in numeric:
        if not pd.api.types.is_numeric_dtype(rows[column]) or pd.api.types.is_bool_dtype(rows[column]):
            raise ValueError(f"column {column!r} must be numeric, got dtype {rows[column].dtype}")
    for column in (*numeric, *non_null):
        if rows[column].isna().any():
            raise ValueError(f"column {column!r} has nulls in {int(rows[column].isna().sum())} row(s)")


def _context(site_dir: Path) -> EphemeralDataContext:
    """An in-memory context whose single Data Docs site is ``site_dir``; no progress bars, no analytics."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(),
        data_docs_sites={
            _SITE: {
                "class_name": "SiteBuilder",
                "show_how_to_buttons": False,
                "store_backend": {
                    "class_name": "TupleFilesystemStoreBackend",
                    "base_directory": str(site_dir),
                },
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            }
        },
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False),
    )
    return gx.get_context(mode="ephemeral", project_config=config)


def _run(suite: str, parts: list[_Part], run_name: str | None, docs: bool) -> ValidationReport:
    """Each part through a GX Checkpoint named for the run; its UpdateDataDocsAction builds the site."""
    import great_expectations as gx
    from great_expectations.core.run_identifier import RunIdentifier

    from mmpipe.datadocs import NamedAssetDataDocsAction, offline_site

    checks: list[Check] = []
    failures: dict[str, list[str]] = {}
    with tempfile.TemporaryDirectory(prefix="mmpipe-gx-") as tmp:
        site_dir = Path(tmp)
        context = _context(site_dir)
        source = context.data_sources.add_pandas("catalog_rows")
        for part in parts:
            asset = source.add_dataframe_asset(_key_safe(part.asset))
            batch = asset.add_batch_definition_whole_dataframe(part.name)
            gx_suite = context.suites.add(gx.ExpectationSuite(name=part.name, expectations=part.expectations))
            definition = context.validation_definitions.add(
                gx.ValidationDefinition(name=part.name, data=batch, suite=gx_suite)
            )
            checkpoint = context.checkpoints.add(
                gx.Checkpoint(
                    name=part.name,
                    validation_definitions=[definition],
                    actions=[NamedAssetDataDocsAction(name="data_docs", site_names=[_SITE])] if docs else [],
                    result_format={
                        "result_format": "COMPLETE",
                        "unexpected_index_column_names": [part.key],
                        "return_unexpected_index_query": False,
                    },
                )
            )
            outcome = checkpoint.run(
                batch_parameters={"dataframe": part.frame},
                run_id=RunIdentifier(run_name=_key_safe(run_name) if run_name else None),
            )
            (result,) = outcome.run_results.values()
            by_name = {r.expectation_config.meta["check"]: r for r in result.results}
            for expectation in part.expectations:
                check, keys = _to_check(by_name[expectation.meta["check"]], part.key)
                checks.append(check)
                dataset_failure = (
                    check.scope == "dataset" and check.severity == "critical" and not check.success
                )
                if part.key == "image_id" and keys and (check.scope == "image" or dataset_failure):
                    failures[check.name] = keys
        site = {
            p.relative_to(site_dir).as_posix(): p.read_bytes() for p in site_dir.rglob("*") if p.is_file()
        }
    failed = {i for ids in failures.values() for i in ids}
    # Report in input order so exclusion lists are stable and diffable.
    failed_ids = [i for i in parts[0].frame["image_id"] if i in failed]
    n_failed = {s: sum(c.severity == s and not c.success for c in checks) for s in SEVERITIES}
    logger.info(
        "%s validation: %d check(s), %d critical failure(s), %d warning(s), %d image(s) failing a rule",
        suite,
        len(checks),
        n_failed["critical"],
        n_failed["warning"],
        len(failed_ids),
    )
    return ValidationReport(
        suite, n_failed["critical"] == 0, checks, failed_ids, failures, offline_site(site) if site else {}
    )


def _key_safe(name: str) -> str:
    """A run or asset name as GX's filesystem site keys accept it (no slashes): ``training/`` -> ``training``."""
    return re.sub(r"[/\\]+", "-", name.strip("/\\")) or "-"


def _to_check(result: Any, key: str) -> tuple[Check, list]:
    """Our Check from one GX expectation result, plus every unexpected ``key`` value (row-level only)."""
    config = result.expectation_config
    meta = dict(config.meta)
    name, severity, scope = meta.pop("check"), meta.pop("severity"), meta.pop("scope")
    raw = result.result or {}
    keys = [row[key] for row in raw.get("unexpected_index_list") or []]
    detail: dict[str, Any] = {"expectation": config.type, **meta}
    for field_name in ("element_count", "unexpected_count", "unexpected_percent", "observed_value"):
        if raw.get(field_name) is not None:
            detail[field_name] = raw[field_name]
    if "missing_count" in raw and "partial_missing_list" in raw:  # distinct-values expectations
        detail["missing_values"] = sorted(raw["partial_missing_list"], key=str)[:SAMPLE]
    if keys:
        detail[f"unexpected_{key}s"] = keys[:SAMPLE]
        detail["unexpected_values"] = raw.get("partial_unexpected_counts", [])[:SAMPLE]
    error = _exception_message(result.exception_info)
    if error:
        detail["error"] = error
    threshold = config.kwargs.get("mostly") if scope == "image" else None
    check = Check(name, severity, bool(result.success), _jsonable(detail), scope, threshold)
    return check, keys


def _exception_message(info: Any) -> str | None:
    """GX reports errors either flat or keyed by metric id; flatten both to one message."""
    if not isinstance(info, Mapping):
        return None
    entries = [info] if "raised_exception" in info else [v for v in info.values() if isinstance(v, Mapping)]
    messages = [str(e.get("exception_message")) for e in entries if e.get("raised_exception")]
    return "; ".join(messages) or None


def _jsonable(value: Any) -> Any:
    """Plain JSON builtins: numpy scalars unwrapped, tuples as lists, NaN/NA as None."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return None if np.isnan(value) else value
    return None if pd.isna(value) else str(value)
