"""Typed settings: the one place mmpipe reads its environment.

Build with :func:`get_settings`; nothing reads ``os.environ`` at import time, so tests and
Airflow workers can construct settings explicitly and pass them down.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from mmpipe.errors import ConfigError

#: The five modality classes of the transfer-learning papers, in label-index order.
CLASSES: tuple[str, ...] = ("brain_mri", "chest_xray", "retinal_oct", "lung_ct", "liver_ct")


class Settings(BaseSettings):
    """Everything configurable, with the env var ``MMPIPE_<FIELD>`` overriding each field."""

    model_config = SettingsConfigDict(env_prefix="MMPIPE_", extra="ignore", frozen=True)

    home: Path = Field(Path(".mmpipe"), description="Local state: embedded store data, SQLite, Airflow home.")
    s3_endpoint_url: str | None = Field(None, description="S3 endpoint; unset means AWS S3.")
    s3_bucket: str = "mmpipe"
    s3_region: str = "us-east-1"
    s3_access_key_id: SecretStr | None = None
    s3_secret_access_key: SecretStr | None = None
    database_url: str | None = Field(None, description="SQLAlchemy URL; unset means SQLite under home.")
    classes: tuple[str, ...] = CLASSES
    image_size: int = Field(256, ge=16, le=2048, description="Canonical curated image side (pixels).")
    pseudonym_salt: SecretStr | None = Field(None, description="Secret salt for patient pseudonyms.")
    training_backend: Literal["local", "kubernetes"] = "local"
    device: str = Field("auto", description="'auto' (CUDA when present), 'cpu' or 'cuda'.")
    train_loader_workers: int = Field(
        0,
        ge=0,
        le=32,
        description="Processes preparing training batches beside the model (0 = in the training process, "
        "cheapest on CPU: a batch takes ~1 ms, a worker's hand-over costs the model ~8% on 2 cores).",
    )
    shard_size: int = Field(256, ge=1, description="Images per curated shard object.")
    ingest_workers: int = Field(8, ge=1, le=64, description="Concurrent downloads/decodes per ingest task.")
    max_object_bytes: int = Field(512 * 2**20, description="Largest object ingest will read.")
    max_archive_members: int = Field(10_000, description="Most members one archive may hold.")
    max_archive_bytes: int = Field(2 * 2**30, description="Largest total uncompressed archive size.")
    max_image_pixels: int = Field(8192 * 8192, description="Largest rows*columns of one frame.")
    max_frames: int = Field(2048, description="Most frames one multi-frame object may hold.")
    low_confidence: float = Field(0.6, ge=0, le=1, description="Scores below this are flagged for review.")
    max_colourfulness: float = Field(
        15.0,
        ge=0,
        description="Scoring: an image more colourful than this (Hasler-Suesstrunk, 0-255; under 15 is "
        "'not colourful', photographs 30+) is out of distribution: the five modalities are greyscale.",
    )
    score_threads: int = Field(
        0,
        ge=0,
        le=256,
        description="torch threads of one scoring task: 0 = half the CPUs (the scoring DAG runs two "
        "batches at once, and decode processes need the rest).",
    )
    promotion_min_gain: float = Field(
        0.0, ge=0, description="Gain in the primary metric a challenger needs over the champion."
    )
    # The rest of the promotion gate (mmpipe.promote): every rule must pass.
    promotion_metric: Literal[
        "macro_f1", "accuracy", "macro_auc", "macro_recall", "macro_precision", "macro_specificity"
    ] = Field("macro_f1", description="The gate's primary metric on the frozen test snapshot.")
    promotion_baseline_margin: float = Field(
        0.02,
        ge=0,
        description="Primary-metric margin a challenger needs over the 16x16-thumbnail linear baseline.",
    )
    promotion_max_recall_drop: float = Field(
        0.05, ge=0, le=1, description="Largest drop of any class's recall below the champion's."
    )
    promotion_min_class_recall: float = Field(
        0.8, ge=0, le=1, description="Lowest recall any class may have (absolute floor)."
    )
    retrain_schedule: Literal["cron", "asset"] = Field(
        "cron",
        description="mmpipe_retrain runs nightly (cron) or whenever ingest publishes validated curated "
        "images (asset: data-aware scheduling on mmpipe_curated_images).",
    )
    k8s_namespace: str = "mmpipe"
    k8s_trainer_image: str = "mmpipe-trainer:latest"
    k8s_gpu_count: int = 1
    k8s_service_account: str = "mmpipe-trainer"
    # Training-ready datasets: splits, balancing, augmentation and preprocessing recorded in every plan.
    split_train: float = Field(
        0.70, ge=0, le=1, description="Share of newly seen patients assigned to train."
    )
    split_val: float = Field(0.15, ge=0, le=1, description="Share of newly seen patients assigned to val.")
    split_test: float = Field(0.15, ge=0, le=1, description="Share of newly seen patients assigned to test.")
    balance_target: str = Field(
        "median", description="Per-class training count: 'median', 'max', 'min', 'none' or an integer."
    )
    balance_class_targets: dict[str, int] = Field(
        default_factory=dict, description='Per-class count overrides, e.g. {"retinal_oct": 400}.'
    )
    augment_policies: dict[str, tuple[str, ...]] = Field(
        default_factory=dict,
        description='Per-class augmentation ops replacing the paper\'s defaults, e.g. {"chest_xray": ["hflip", "rotate:10"]}.',
    )
    clahe_clip_limit: float | None = Field(
        None, gt=0, description="CLAHE on every image at training and scoring time (off when unset)."
    )
    clahe_tiles: int = Field(8, ge=1, le=64, description="CLAHE tile grid side.")
    channel_mode: Literal["replicate", "viridis", "inferno"] = Field(
        "replicate", description="Grayscale to 3 channels in new plans (a candidate may override it)."
    )
    min_train_per_class: int = Field(5, ge=1, description="Dataset gate: fewest training images per class.")
    # Batch validation (see mmpipe.validate): per-image rules exclude failing images; a batch fails only
    # when a rule's passing share falls below its threshold (GX's ``mostly``).
    validation_mostly: float = Field(
        0.98, gt=0, le=1, description="Share of a batch's images every per-image rule must pass."
    )
    validation_rule_mostly: dict[str, float] = Field(
        default_factory=dict,
        description='Per-rule thresholds overriding validation_mostly, e.g. {"not_blank": 0.95}.',
    )
    validation_max_class_share: float = Field(
        0.9,
        gt=0,
        le=1,
        description="Class collapse: largest share one class may take of a batch of 50+ images.",
    )
    # Ingest labels (see mmpipe.labels): manifests beside the data, then training/<class>/, then header rules.
    label_manifest_names: tuple[str, ...] = Field(
        ("labels.csv", "labels.json"), description="File names that are label manifests, not data."
    )
    label_rules: list[dict[str, str]] = Field(
        default_factory=list,
        description='DICOM header rules, first match wins, e.g. [{"modality": "CT", "body_part": "CHEST", '
        '"label": "lung_ct"}]; fields modality, body_part ("|" separates alternatives), study_description (regex).',
    )
    decode_timeout_seconds: float = Field(
        300,
        gt=0,
        description="Longest one object may take to fetch and decode in a decode process; one stuck "
        "longer (a decoder looping on malformed data) is killed and the object quarantined as corrupt.",
    )
    orphan_grace_hours: float = Field(
        24,
        ge=0,
        description="Curated shards and quarantine records that no catalog row references are deleted once this old: what a "
        "batch killed before its commit left behind (younger ones may belong to a batch still running).",
    )
    ingest_processes: int = Field(
        0,
        ge=0,
        le=64,
        description="Processes fetching and decoding per ingest task (fork, Linux): 0 = CPU count + 1; "
        "1 = decode in the task's own threads (ingest_workers), as where fork is unavailable.",
    )
    # Faults become retries (docs/reliability.md).
    s3_max_attempts: int = Field(
        5,
        ge=1,
        le=20,
        description="Attempts per store request (first try included) on 5xx, throttling, timeouts and "
        "connection resets, with jittered exponential backoff; an object that still fails stays unseen.",
    )
    s3_retry_mode: Literal["standard", "adaptive"] = Field(
        "standard", description="botocore retry mode; 'adaptive' also rate-limits the client when throttled."
    )
    decoder_error_max_share: float = Field(
        0.01,
        ge=0,
        le=1,
        description="Share of an ingest batch's objects that may hit an unexpected decoder exception (a "
        "bug, not bad data) before the batch fails; those objects are never quarantined.",
    )
    abandon_after_hours: float = Field(
        2,
        gt=0,
        description="An ingest run still 'running' without a heartbeat for this long is marked abandoned "
        "(at once when its process, on this host, is gone).",
    )

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.home / 'catalog.db').resolve()}"

    @property
    def salt_file(self) -> Path:
        """Where `mmpipe init` keeps a generated salt when none is configured."""
        return self.home / "secrets" / "pseudonym_salt"

    def salt(self) -> bytes:
        """The pseudonymisation salt: from config, else the secret file under ``home``."""
        if self.pseudonym_salt is not None:
            return self.pseudonym_salt.get_secret_value().encode()
        path = self.salt_file
        if path.exists():
            return path.read_bytes().strip()
        raise ConfigError(
            f"no pseudonymisation salt: set MMPIPE_PSEUDONYM_SALT or run `mmpipe init` to create {path}"
        )

    def class_index(self, name: str) -> int:
        try:
            return self.classes.index(name)
        except ValueError:
            raise ConfigError(
                f"unknown class {name!r}; configured classes: {', '.join(self.classes)}"
            ) from None


#: Settings the embedded stack recorded under ``home`` (store endpoint and keys, the demo's image size),
#: so every command in a checkout reaches what ``make demo`` started without exports.
RECORD_FILE = "settings.json"


def recorded_settings(home: Path) -> dict[str, Any]:
    path = home / RECORD_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def record_settings(home: Path, **values: Any) -> None:
    """Merge ``values`` into the home's record (owner-only: it holds the embedded store's keys)."""
    home.mkdir(parents=True, exist_ok=True)
    path = home / RECORD_FILE
    merged = recorded_settings(home) | values
    fd = os.open(path.with_suffix(".tmp"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump(merged, out, indent=2, sort_keys=True)
    path.with_suffix(".tmp").replace(path)


def get_settings(**overrides: object) -> Settings:
    """Settings from the environment (``MMPIPE_*``), with explicit keyword overrides winning.

    When no S3 endpoint is configured, what the embedded stack recorded under ``home`` fills the
    fields that neither the environment nor ``overrides`` set.
    """
    try:
        settings = Settings(**overrides)
        if settings.s3_endpoint_url is None:
            recorded = recorded_settings(settings.home)
            unset = {k: v for k, v in recorded.items() if k not in settings.model_fields_set}
            if unset:
                settings = Settings(**overrides, **unset)
        return settings
    except ValidationError as exc:
        problems = "; ".join(
            f"MMPIPE_{'_'.join(str(p) for p in e['loc'][:1]).upper()}: {e['msg']}" for e in exc.errors()
        )
        raise ConfigError(f"invalid configuration: {problems}") from None
