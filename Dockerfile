# syntax=docker/dockerfile:1
#
# kubetune images, one Dockerfile, two targets:
#
#   docker build --target operator -t ghcr.io/kubetune/kubetune-operator:0.1.0 .
#   docker build --target trainer  -t ghcr.io/kubetune/kubetune-trainer:0.1.0 .
#
# operator: the `operator` extra only (kopf, kubernetes, prometheus-client, aiohttp): no torch, a few hundred MB.
#           Entrypoint kubetune-operator; the Helm chart's Deployment (values `image`) runs it.
# trainer:  the `trainer` extra (torch from PyPI, whose CUDA wheels bring the CUDA runtime, NCCL and cuDNN;
#           transformers, peft, accelerate, bitsandbytes, ...). Entrypoint kubetune-launch, the command the
#           operator gives every worker (values `trainerImages`). The GPU driver comes from the node (NVIDIA
#           container toolkit), not from the image.
#
# Both run as uid/gid 1000 (the chart's runAsUser for the operator, the operator's for workers), with a
# read-only root filesystem in the cluster: nothing is written outside /tmp and the volumes.
# Every Python package is pinned by constraints.txt; the base image by its exact tag (Debian bookworm).
# tests/chart/test_dockerfile.py checks the stages, users and entrypoints against the chart and the operator.

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# ---- base: Python, an unprivileged user, pinned packaging tools -------------------------------------------------
FROM ${PYTHON_IMAGE} AS base
ARG PIP_VERSION=26.3
ARG SETUPTOOLS_VERSION=84.2.1
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    VIRTUAL_ENV=/opt/kubetune \
    PATH=/opt/kubetune/bin:$PATH
RUN groupadd --gid 1000 kubetune \
 && useradd --uid 1000 --gid 1000 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin kubetune \
 && python -m venv /opt/kubetune \
 && pip install "pip==${PIP_VERSION}" "setuptools==${SETUPTOOLS_VERSION}"

# ---- wheel: the kubetune distribution (operator and trainer packages; pure Python) ----------------------------
FROM base AS wheel
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY operator/ operator/
COPY trainer/ trainer/
# No build isolation: the pinned setuptools from the base stage builds it.
RUN pip wheel --no-deps --no-build-isolation --wheel-dir /wheels .

# ---- operator -----------------------------------------------------------------------------------------------------
FROM base AS operator
RUN --mount=type=bind,from=wheel,source=/wheels,target=/wheels \
    --mount=type=bind,source=constraints.txt,target=/tmp/constraints.txt \
    pip install --constraint /tmp/constraints.txt "kubetune[operator] @ file://$(ls /wheels/kubetune-*.whl)" \
 && python -c "import kubetune_operator.__main__, sys; assert 'torch' not in sys.modules"
USER 1000:1000
WORKDIR /tmp
# 8080: /healthz and /readyz; 9090: /metrics (settings healthPort, metricsPort).
EXPOSE 8080 9090
ENTRYPOINT ["kubetune-operator"]

# ---- trainer ------------------------------------------------------------------------------------------------------
FROM base AS trainer
# A C compiler: Triton (torch.compile, bitsandbytes kernels) builds a small launcher module at run time.
RUN apt-get update \
 && apt-get install --yes --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
RUN --mount=type=bind,from=wheel,source=/wheels,target=/wheels \
    --mount=type=bind,source=constraints.txt,target=/tmp/constraints.txt \
    pip install --constraint /tmp/constraints.txt "kubetune[trainer] @ file://$(ls /wheels/kubetune-*.whl)" \
 && python -c "import torch, transformers, peft, accelerate, bitsandbytes, kubetune_trainer.launch"
USER 1000:1000
WORKDIR /tmp
# HOME is /tmp (an emptyDir in the pod) for the libraries that cache under $HOME.
ENV HOME=/tmp
# 9400: rank 0's /metrics and /progress; 29500: torchrun's rendezvous (settings trainerMetricsPort, masterPort).
EXPOSE 9400 29500
ENTRYPOINT ["kubetune-launch"]
