# syntax=docker/dockerfile:1
# The training container: runs `mmpipe train` for one candidate inside a KubernetesPodOperator pod.
# Build from the repository root:
#   docker build -f infra/docker/trainer.Dockerfile -t mmpipe-trainer:0.1.0 .
# GPU (default): a CUDA runtime base and CUDA torch wheels; the GPU driver comes from the node.
# CPU variant (no GPU node pool; also set MMPIPE_K8S_GPU_COUNT=0):
#   docker build -f infra/docker/trainer.Dockerfile -t mmpipe-trainer:0.1.0-cpu \
#     --build-arg BASE_IMAGE=ubuntu:22.04 --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .
# What is installed is the built wheel, pinned by constraints.txt: torch==2.14.1 there admits the
# index's local build (2.14.1+cu128, 2.14.1+cpu).
ARG BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04

FROM python:3.11-slim AS wheel
WORKDIR /src
COPY pyproject.toml README.md ./
COPY mmpipe ./mmpipe
RUN pip wheel --no-deps --no-cache-dir --wheel-dir /dist .

FROM ${BASE_IMAGE}
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1

# Python 3.11 (the project's pin) on the CUDA base's Ubuntu, in a venv owned by root.
RUN apt-get update \
    && apt-get install -y --no-install-recommends software-properties-common gpg-agent \
    && add-apt-repository -y ppa:deadsnakes/ppa \
    && apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
    && apt-get purge -y software-properties-common gpg-agent \
    && apt-get autoremove -y \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

COPY constraints.txt /opt/mmpipe/constraints.txt
COPY --from=wheel /dist /opt/mmpipe/dist
RUN pip install --extra-index-url "${TORCH_INDEX_URL}" -c /opt/mmpipe/constraints.txt /opt/mmpipe/dist/mmpipe-*.whl

# A numeric non-root user, so the pod's `runAsNonRoot: true` can be verified by the kubelet.
RUN groupadd --gid 10001 mmpipe \
    && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/mmpipe --shell /usr/sbin/nologin mmpipe
USER 10001:10001
WORKDIR /home/mmpipe
ENV MMPIPE_HOME=/home/mmpipe/.mmpipe

ENTRYPOINT ["mmpipe"]
CMD ["--help"]
