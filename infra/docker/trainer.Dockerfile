# syntax=docker/dockerfile:1
# The training container: runs `mmpipe train` for one candidate inside a KubernetesPodOperator pod.
# Build from the repository root:
#   docker build -f infra/docker/trainer.Dockerfile -t mmpipe-trainer:0.1.0 .
# torch comes from PyPI with its CUDA runtime wheels; the GPU driver comes from the node.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1

WORKDIR /opt/mmpipe
COPY pyproject.toml README.md ./
COPY mmpipe ./mmpipe
RUN pip install .

# A numeric non-root user, so the pod's `runAsNonRoot: true` can be verified by the kubelet.
RUN groupadd --gid 10001 mmpipe \
    && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/mmpipe --shell /usr/sbin/nologin mmpipe
USER 10001:10001
WORKDIR /home/mmpipe
ENV MMPIPE_HOME=/home/mmpipe/.mmpipe

ENTRYPOINT ["mmpipe"]
CMD ["--help"]
