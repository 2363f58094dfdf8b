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
# `make images` builds both targets without a Docker daemon (podman with runc, on a Python base image made from
# Debian packages, passed as PYTHON_IMAGE) for the local cluster's real nodes: hack/kubetune_dev/images.py.

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

# ---- dependencies: the third-party packages of one extra, pinned, without kubetune itself ----------------------
# Only pyproject.toml and constraints.txt go into these layers, so the large ones (the trainer's: several GB) are
# rebuilt when the dependencies change, not when the code does; a code change rebuilds the small layers below.
FROM base AS operator-deps
COPY pyproject.toml constraints.txt /tmp/deps/
RUN python -c 'import tomllib; p = tomllib.load(open("/tmp/deps/pyproject.toml", "rb"))["project"]; \
      print("\n".join(p["dependencies"] + p["optional-dependencies"]["operator"]))' > /tmp/deps/requirements.txt \
 && pip install --constraint /tmp/deps/constraints.txt --requirement /tmp/deps/requirements.txt \
 && rm -rf /tmp/deps

FROM base AS trainer-deps
# A C compiler: Triton (torch.compile, bitsandbytes kernels) builds a small launcher module at run time.
RUN apt-get update \
 && apt-get install --yes --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml constraints.txt /tmp/deps/
RUN python -c 'import tomllib; p = tomllib.load(open("/tmp/deps/pyproject.toml", "rb"))["project"]; \
      print("\n".join(p["dependencies"] + p["optional-dependencies"]["trainer"]))' > /tmp/deps/requirements.txt \
 && pip install --constraint /tmp/deps/constraints.txt --requirement /tmp/deps/requirements.txt \
 && rm -rf /tmp/deps

# ---- operator -----------------------------------------------------------------------------------------------------
FROM operator-deps AS operator
COPY --from=wheel /wheels/ /tmp/wheels/
RUN pip install --no-deps --no-index /tmp/wheels/kubetune-*.whl \
 && rm -rf /tmp/wheels \
 && python -c "import kubetune_operator.__main__, sys; assert 'torch' not in sys.modules"
USER 1000:1000
WORKDIR /tmp
# 8080: /healthz and /readyz; 9090: /metrics (settings healthPort, metricsPort).
EXPOSE 8080 9090
ENTRYPOINT ["kubetune-operator"]

# ---- trainer ------------------------------------------------------------------------------------------------------
FROM trainer-deps AS trainer
COPY --from=wheel /wheels/ /tmp/wheels/
RUN pip install --no-deps --no-index /tmp/wheels/kubetune-*.whl \
 && rm -rf /tmp/wheels \
 && python -c "import torch, transformers, peft, accelerate, bitsandbytes, kubetune_trainer.launch"
USER 1000:1000
WORKDIR /tmp
# HOME is /tmp (an emptyDir in the pod) for the libraries that cache under $HOME.
ENV HOME=/tmp
# 9400: rank 0's /metrics and /progress; 29500: torchrun's rendezvous (settings trainerMetricsPort, masterPort).
EXPOSE 9400 29500
ENTRYPOINT ["kubetune-launch"]
