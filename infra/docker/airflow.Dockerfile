# syntax=docker/dockerfile:1
# Airflow 3 with mmpipe, its pinned dependencies and the project's DAGs and plugins baked in.
# Used by docker-compose.yml and by the Helm values (infra/helm/values.yaml). Build from the repo root:
#   docker build -f infra/docker/airflow.Dockerfile -t mmpipe-airflow:0.1.0 .
# What is installed is the built wheel (migrations are package data), pinned by constraints.txt, as a
# hospital installs it. The local training backend runs in this image, so it carries torch too; pass
# --build-arg PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu to keep it small without a GPU.

FROM python:3.11-slim AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY mmpipe ./mmpipe
RUN pip wheel --no-deps --no-cache-dir --wheel-dir /dist .

FROM apache/airflow:3.3.2-python3.11

ARG PIP_EXTRA_INDEX_URL=""
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1

COPY --chown=airflow:0 constraints.txt /opt/mmpipe/constraints.txt
COPY --from=wheel --chown=airflow:0 /dist /opt/mmpipe/dist
# Naming apache-airflow at the base image's version keeps the project's pins from moving Airflow itself.
RUN set -- /opt/mmpipe/dist/mmpipe-*.whl \
    && pip install -c /opt/mmpipe/constraints.txt "apache-airflow==${AIRFLOW_VERSION}" "$1[airflow]"

COPY --chown=airflow:0 dags /opt/airflow/dags
COPY --chown=airflow:0 plugins /opt/airflow/plugins

# Mount points of the compose stack's named volumes: created here so the volumes belong to `airflow`.
RUN mkdir -p /opt/airflow/mmpipe-home /opt/airflow/auth
