# syntax=docker/dockerfile:1
# loraplane data plane: one multi-LoRA inference server per GPU.
# Build from the repository root:
#   docker build -f docker/data-plane.Dockerfile -t ghcr.io/loraplane/data-plane:0.1.0 .
#
# The CUDA major version follows the torch wheel: PyPI's Linux torch 2.13 is built
# for CUDA 13.0 (bundling its own CUDA libraries), so nodes need an NVIDIA driver
# that supports CUDA 13 (R580 or newer).

FROM nvidia/cuda:13.0.0-runtime-ubuntu24.04

ARG TORCH_VERSION=2.13.0

# Ubuntu 24.04's own Python (3.12, security-supported by the distribution); the
# package supports 3.10+. gcc and the Python headers are runtime needs, not build
# leftovers: Triton compiles its kernel launcher with the system C compiler on
# first use. DL3008: the pinned base tag fixes the Ubuntu release; pinning package
# versions as well breaks the build whenever a security update lands.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        ca-certificates \
        gcc \
        libc6-dev \
        python3 \
        python3-dev \
        python3-venv \
    && rm -rf /var/lib/apt/lists/*

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# Its own layer: the biggest one by far, and it changes only with TORCH_VERSION.
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY loraplane ./loraplane
COPY control_plane ./control_plane
COPY data_plane ./data_plane
COPY kernels ./kernels
# DL3013: this installs the project itself; its dependency ranges live in pyproject.toml.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir . \
    && rm -rf /src

# A fixed numeric UID: the chart's runAsUser matches it, and the kubelet can only
# enforce runAsNonRoot for numeric users. Ubuntu images ship a user at 1000, hence 10001.
RUN groupadd --system --gid 10001 loraplane \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/loraplane loraplane \
    && mkdir -p /models /var/lib/loraplane/adapter-cache /var/cache/loraplane \
    && chown -R 10001:10001 /var/lib/loraplane /var/cache/loraplane

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    XDG_CACHE_HOME=/var/cache/loraplane \
    HF_HOME=/var/cache/loraplane/huggingface \
    TRITON_CACHE_DIR=/var/cache/loraplane/triton

USER 10001:10001
WORKDIR /var/lib/loraplane

# gRPC (inference, cache services, grpc.health.v1) and Prometheus /metrics.
EXPOSE 50052 9090

# No HEALTHCHECK: Kubernetes probes the gRPC health services directly.
ENTRYPOINT ["loraplane"]
CMD ["data-plane", "--help"]
