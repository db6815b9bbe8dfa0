"""Typed settings: the one place mmpipe reads its environment.

Build with :func:`get_settings`; nothing reads ``os.environ`` at import time, so tests and
Airflow workers can construct settings explicitly and pass them down.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

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
    shard_size: int = Field(256, ge=1, description="Images per curated shard object.")
    ingest_workers: int = Field(8, ge=1, le=64, description="Concurrent downloads/decodes per ingest task.")
    max_object_bytes: int = Field(512 * 2**20, description="Largest object ingest will read.")
    max_archive_members: int = Field(10_000, description="Most members one archive may hold.")
    max_archive_bytes: int = Field(2 * 2**30, description="Largest total uncompressed archive size.")
    max_image_pixels: int = Field(8192 * 8192, description="Largest rows*columns of one frame.")
    max_frames: int = Field(2048, description="Most frames one multi-frame object may hold.")
    low_confidence: float = Field(0.6, ge=0, le=1, description="Scores below this are flagged for review.")
    promotion_min_gain: float = Field(0.0, description="Macro-F1 gain a challenger needs over the champion.")
    k8s_namespace: str = "mmpipe"
    k8s_trainer_image: str = "mmpipe-trainer:latest"
    k8s_gpu_count: int = 1
    k8s_service_account: str = "mmpipe-trainer"

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.home / 'catalog.db').resolve()}"

    def salt(self) -> bytes:
        """The pseudonymisation salt: from config, else the secret file under ``home``."""
        if self.pseudonym_salt is not None:
            return self.pseudonym_salt.get_secret_value().encode()
        path = self.home / "secrets" / "pseudonym_salt"
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


def get_settings(**overrides: object) -> Settings:
    """Settings from the environment (``MMPIPE_*``), with explicit keyword overrides winning."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(
            f"MMPIPE_{'_'.join(str(p) for p in e['loc'][:1]).upper()}: {e['msg']}" for e in exc.errors()
        )
        raise ConfigError(f"invalid configuration: {problems}") from None
