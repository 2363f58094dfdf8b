#!/usr/bin/env bash
# What only a GPU can prove, on one GPU in under 8 minutes: QLoRA, the varlen kernel against the reference, FSDP2 bf16
# full fine-tuning and LoRA loaded the sharded way, and the MFU of a Llama-3.1-8B-shaped LoRA (hack/kubetune_dev/
# gpu_check.py). Nothing is downloaded. --dry-run: the same code on the CPU with a tiny model (no figures).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/operator:$PWD/trainer:$PWD/hack${PYTHONPATH:+:$PYTHONPATH}"
exec timeout 480 "${PYTHON:-.cache/venv/bin/python}" -m kubetune_dev.gpu_check "$@"
