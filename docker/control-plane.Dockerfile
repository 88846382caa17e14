# syntax=docker/dockerfile:1
# loraplane control plane: adapter registry, ingestion and artifact distribution.
# CPU only. Build from the repository root:
#   docker build -f docker/control-plane.Dockerfile -t ghcr.io/loraplane/control-plane:0.1.0 .

FROM python:3.11.13-slim-bookworm AS build

# Keep in step with the torch the test suite runs on (Makefile).
ARG TORCH_VERSION=2.13.0

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# torch is here only for safetensors tensor math (validating and normalizing
# adapters), never for inference: the CPU wheel is a fraction of the CUDA one.
# Installed first so the later `pip install .` finds "torch" satisfied and keeps it.
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu "torch==${TORCH_VERSION}"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY loraplane ./loraplane
COPY control_plane ./control_plane
COPY data_plane ./data_plane
COPY kernels ./kernels
# The s3 extra: adapters can be registered from S3 URIs. DL3013: this installs the
# project itself; its dependency ranges live in pyproject.toml.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[s3]"


FROM python:3.11.13-slim-bookworm

# A fixed numeric UID: the chart's runAsUser matches it, and the kubelet can only
# enforce runAsNonRoot for numeric users.
RUN groupadd --system --gid 10001 loraplane \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/loraplane loraplane \
    && mkdir -p /var/lib/loraplane /var/cache/loraplane \
    && chown 10001:10001 /var/lib/loraplane /var/cache/loraplane

COPY --from=build /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    XDG_CACHE_HOME=/var/cache/loraplane \
    HF_HOME=/var/cache/loraplane/huggingface

USER 10001:10001
WORKDIR /var/lib/loraplane

# gRPC (registry, admin and distribution services, grpc.health.v1).
EXPOSE 50051

# No HEALTHCHECK: Kubernetes probes the gRPC health services directly.
ENTRYPOINT ["loraplane"]
CMD ["control-plane", "--help"]
