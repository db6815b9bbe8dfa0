# syntax=docker/dockerfile:1
# Airflow 3 with mmpipe, its pinned dependencies and the project's DAGs and plugins baked in.
# Used by docker-compose.yml and by the Helm values (infra/helm/values.yaml). Build from the repo root:
#   docker build -f infra/docker/airflow.Dockerfile -t mmpipe-airflow:0.1.0 .
# The local training backend runs in this image, so it carries torch too; pass
# --build-arg PIP_EXTRA_INDEX_URL=<a CPU-only torch index> to keep it small where no GPU is used.
FROM apache/airflow:3.3.2-python3.11

ARG PIP_EXTRA_INDEX_URL=""
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1

COPY --chown=airflow:0 pyproject.toml README.md /opt/mmpipe/
COPY --chown=airflow:0 mmpipe /opt/mmpipe/mmpipe
# Naming apache-airflow at the base image's version keeps the project's pins from moving Airflow itself.
RUN pip install "apache-airflow==${AIRFLOW_VERSION}" "/opt/mmpipe[airflow]"

COPY --chown=airflow:0 dags /opt/airflow/dags
COPY --chown=airflow:0 plugins /opt/airflow/plugins

# Mount points of the compose stack's named volumes: created here so the volumes belong to `airflow`.
RUN mkdir -p /opt/airflow/mmpipe-home /opt/airflow/auth
