# kubetune developer commands. Heavy artefacts (Go toolchain, Python venv) are cached outside the
# repository under $(KUBETUNE_CACHE), keyed by version, so a warm machine starts in seconds.
SHELL := /bin/bash
export KUBETUNE_CACHE ?= $(HOME)/.cache/kubetune
# This checkout's packages come first, whichever checkout the shared environment's editable install points at.
export PYTHONPATH := $(CURDIR)/operator:$(CURDIR)/trainer:$(CURDIR)/hack
PY := .cache/venv/bin/python
PYTEST_ARGS ?=

.PHONY: help setup system-packages venv toolchain images cluster-up cluster-down lint test test-unit test-e2e crds bench-trainer bench-operator bench-chaos bench-sharded gpu-check demo demo-down

help:
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-16s %s\n", $$1, $$2}'

.cache/venv.stamp: pyproject.toml constraints.txt hack/venv.sh
	@mkdir -p .cache
	@ln -sfn "$$(hack/venv.sh)" .cache/venv
	@touch $@

# The environment is shared by every checkout with the same pins; PYTHONPATH above makes each run use its own code.
venv: .cache/venv.stamp ## create or reuse the Python environment (cached by dependency hash)

toolchain: ## build kube-apiserver, etcd, kwok, kubectl, helm from Go modules (cached)
	@hack/toolchain.sh >/dev/null

system-packages: ## install the Debian packages the tests and the demo use (hack/system-packages.txt) when missing
	@hack/system-packages.sh

# Everything the two commands need, prepared side by side (apt and pip wait on the network, Go on the CPU).
setup: ## Debian packages, the Go-built toolchain and the Python environment (each cached; seconds when warm)
	@$(MAKE) --no-print-directory -j3 system-packages toolchain venv

images: system-packages venv ## the Dockerfile's operator and trainer images, built without a Docker daemon (podman); cached by content
	@$(PY) -m kubetune_dev.images

# The images build (mostly network and disk) beside the Go build (CPU): a cold start waits for the longer one only.
demo: ## main job: LoRA fine-tune of SmolLM2-135M through the operator on 2 real local nodes (CPU, minutes warm)
	@$(MAKE) --no-print-directory -j4 toolchain images
	@$(PY) -m kubetune_dev.demo

demo-down: venv ## remove what make demo started: its real nodes (processes, mounts, network), operator, control plane
	@$(PY) -m kubetune_dev.demo down

cluster-up: venv toolchain ## start the local control plane with fake GPU nodes; kubeconfig at .cache/kubeconfig
	@$(PY) -m kubetune_dev cluster up

cluster-down: venv ## stop the local control plane
	@$(PY) -m kubetune_dev cluster down

lint: venv ## ruff (lint + format) and mypy
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

test: ## everything CI runs: lint, types, and every test tier against a real control plane
	@$(MAKE) --no-print-directory -j4 toolchain images
	@$(MAKE) --no-print-directory lint
	$(PY) -m pytest $(PYTEST_ARGS)

test-unit: setup ## only the fast tier
	$(PY) -m pytest -m unit $(PYTEST_ARGS)

test-e2e: setup ## only the tests that need the control plane
	$(PY) -m pytest -m e2e $(PYTEST_ARGS)

crds: venv ## regenerate crds/ and the chart's copies (CRD, dashboard, alerts, Argo CD snippet); tests fail when stale
	$(PY) -m kubetune_operator.api.crd
	$(PY) hack/chart_files.py

bench-trainer: venv ## trainer vs HF Trainer and TRL on SmolLM2: tokens/s, ratio, memory, eval loss (BENCH_ARGS=--gpu: 8B-shaped MFU)
	$(PY) -m kubetune_trainer.bench $(BENCH_ARGS)

gpu-check: venv ## on one GPU, < 8 min: QLoRA, varlen kernel vs reference, FSDP2 bf16 full and LoRA, 8B-shaped LoRA MFU (GPU_CHECK_ARGS=--dry-run: CPU)
	hack/gpu-check.sh $(GPU_CHECK_ARGS)

bench-operator: venv toolchain ## kubetune vs Kubeflow Trainer+JobSet, 200 and 500 jobs x 4 workers on fake GPU nodes: requests/job, latency, RSS
	$(PY) bench/operator_scale.py --jobs 200 500

bench-sharded: venv ## FSDP2 on 4 CPU ranks (gloo), full and LoRA: training state >= 2x a rank's peak RSS, rank < 60% of 1 process, exact resume
	$(PY) bench/sharded_memory.py $(BENCH_ARGS)

bench-chaos: venv toolchain ## real trainings while the operator and workers are killed at random: duplicates, lost checkpoints/outputs, extra restarts (all 0)
	$(PY) bench/chaos.py $(BENCH_ARGS)
