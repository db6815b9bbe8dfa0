"""docker-compose.yml, checked offline (no Docker engine here): against the Compose Specification's JSON
schema, and against the project (images, commands, settings, start order, secrets from .env).

The schema is the one check-jsonschema 0.39.0 ships (``check_jsonschema/builtin_schemas/vendor/
compose-spec.json``, vendored by that package from the compose-spec repository's
``schema/compose-spec.json``): a registry package, pinned in constraints.txt, so nothing is copied here.
"""

from __future__ import annotations

import copy
import json
import re
from importlib.resources import files
from pathlib import Path

import jsonschema
import pytest
import yaml

from mmpipe.config import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
INTERPOLATION = re.compile(r"(?<!\$)\$\{([A-Z0-9_]+)(?::?[-?][^}]*)?\}")
ONE_SHOT = {"minio-init", "airflow-init", "mmpipe-init"}
AIRFLOW = {"airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer"}


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def compose_errors(doc: dict) -> list[str]:
    schema = json.loads(
        files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json").read_text()
    )
    validator = jsonschema.validators.validator_for(schema)
    return [e.message for e in validator(schema, format_checker=validator.FORMAT_CHECKER).iter_errors(doc)]


def settings_field(env_name: str) -> str:
    assert env_name.startswith("MMPIPE_"), env_name
    return env_name.removeprefix("MMPIPE_").lower()


def test_compose_file_follows_the_compose_specification():
    assert compose_errors(compose()) == []


@pytest.mark.parametrize(
    "break_it",
    [
        lambda doc: doc["services"]["minio"].update(healthchek=doc["services"]["minio"].pop("healthcheck")),
        lambda doc: doc["services"]["airflow-scheduler"].update(
            depends_on={"mmpipe-init": {"condition": "service_done"}}
        ),
        lambda doc: doc["services"]["mmpipe-init"].update(depends_on="postgres"),
    ],
    ids=["misspelt key", "unknown condition", "depends_on not a list or mapping"],
)
def test_the_schema_check_catches_mistakes(break_it):
    doc = copy.deepcopy(compose())
    break_it(doc)
    assert compose_errors(doc)


def test_compose_runs_airflow3_postgres_and_minio_on_localhost_only():
    services = compose()["services"]
    airflow_commands = {name: s["command"] for name, s in services.items() if name.startswith("airflow-")}
    assert airflow_commands == {
        "airflow-init": ["db", "migrate"], "airflow-apiserver": ["api-server"],
        "airflow-scheduler": ["scheduler"], "airflow-dag-processor": ["dag-processor"],
        "airflow-triggerer": ["triggerer"],
    }  # fmt: skip
    for name in [*airflow_commands, "mmpipe-init"]:
        assert services[name]["build"]["dockerfile"] == "infra/docker/airflow.Dockerfile"
        assert services[name]["environment"]["MMPIPE_TRAINING_BACKEND"] == "local"
    for name in airflow_commands:
        assert services[name]["environment"]["AIRFLOW__CORE__EXECUTOR"] == "LocalExecutor"
        assert int(services[name]["environment"]["AIRFLOW__CORE__PARALLELISM"]) <= 4
    assert (ROOT / "infra" / "docker" / "airflow.Dockerfile").exists()
    assert services["postgres"]["image"].split(":")[1].startswith("16")
    assert "minio" in services and "minio-init" in services
    published = [p for s in services.values() for p in s.get("ports", [])]
    assert published, "the UI must be reachable from the host"
    assert all(p.startswith("127.0.0.1:") for p in published), published


def test_every_long_running_service_has_a_healthcheck():
    services = compose()["services"]
    long_running = {name for name, s in services.items() if s.get("restart") != "no" and name not in ONE_SHOT}
    assert long_running == {"postgres", "minio"} | AIRFLOW
    for name in long_running:
        test = services[name]["healthcheck"]["test"]
        assert test[0] in ("CMD", "CMD-SHELL") and len(test) > 1, name
    assert services["minio"]["healthcheck"]["test"] == ["CMD", "mc", "ready", "local"]


def test_start_order_runs_one_shot_inits_before_airflow():
    services = compose()["services"]
    for name in AIRFLOW:
        depends = services[name]["depends_on"]
        for init in ("airflow-init", "mmpipe-init"):
            assert depends[init]["condition"] == "service_completed_successfully", name
    init = services["mmpipe-init"]
    assert init["restart"] == "no"
    assert init["entrypoint"] == ["mmpipe"] and init["command"] == ["init"]
    assert init["depends_on"]["postgres"]["condition"] == "service_healthy"
    # mmpipe-init uses the restricted mmpipe key, which minio-init creates.
    assert init["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"
    assert services["minio-init"]["depends_on"]["minio"]["condition"] == "service_healthy"


def test_mmpipe_init_and_airflow_share_one_set_of_settings():
    services = compose()["services"]
    init_env = services["mmpipe-init"]["environment"]
    scheduler_env = services["airflow-scheduler"]["environment"]
    assert {k: v for k, v in scheduler_env.items() if k.startswith("MMPIPE_")} == init_env
    assert set(init_env) >= {"MMPIPE_S3_ENDPOINT_URL", "MMPIPE_DATABASE_URL", "MMPIPE_PSEUDONYM_SALT"}


def test_compose_env_is_mmpipe_settings_and_secrets_come_from_dotenv(monkeypatch):
    services = compose()["services"]
    for name, service in services.items():
        for key, value in service.get("environment", {}).items():
            if key.startswith("MMPIPE_"):
                assert settings_field(key) in Settings.model_fields, f"{name}: {key}"
            if re.search(r"PASSWORD$|SECRET|SALT|FERNET_KEY", key):
                assert INTERPOLATION.fullmatch(str(value)), f"{name}: {key} must come from .env"
            if "@" in str(value):  # a URL with credentials: its password must come from .env too
                assert re.search(r"://[^:/@]+:\$\{[A-Z0-9_]+:\?", str(value)), f"{name}: {key}"
    # The containers' settings parse, and point at the stack's own MinIO and Postgres.
    for key, value in services["mmpipe-init"]["environment"].items():
        monkeypatch.setenv(key, INTERPOLATION.sub("x", str(value)))
    settings = Settings()
    assert settings.s3_endpoint_url == "http://minio:9000"
    assert settings.training_backend == "local"
    assert settings.database_url.startswith("postgresql+psycopg2://mmpipe:")
    assert settings.database_url.endswith("@postgres:5432/mmpipe")


def test_compose_creates_the_catalog_db_and_the_bucket():
    services = compose()["services"]
    mounts = services["postgres"]["volumes"]
    init_mount = [m for m in mounts if "/docker-entrypoint-initdb.d/" in m]
    assert init_mount == ["./infra/compose/init-db.sql:/docker-entrypoint-initdb.d/10-mmpipe-catalog.sql:ro"]
    sql = (ROOT / "infra" / "compose" / "init-db.sql").read_text()
    assert "CREATE DATABASE mmpipe" in sql
    assert "CATALOG_DB_PASSWORD" in services["postgres"]["environment"]
    bucket = services["mmpipe-init"]["environment"]["MMPIPE_S3_BUCKET"]
    assert f"mc mb --ignore-existing local/{bucket}" in services["minio-init"]["command"][0]


def test_env_example_defines_every_variable_compose_requires():
    required = set(INTERPOLATION.findall(COMPOSE.read_text()))
    example = ROOT / "infra" / "compose" / "env.example"
    defined = {
        line.split("=", 1)[0] for line in example.read_text().splitlines() if re.match(r"^[A-Z]", line)
    }
    assert required == defined
