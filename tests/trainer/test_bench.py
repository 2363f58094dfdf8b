"""The benchmark's moving parts (timings themselves are the benchmark's business, not the tests')."""

from __future__ import annotations

import subprocess
import sys

import pytest
import trainer_assets as assets
from kubetune_trainer import attention
from kubetune_trainer.bench import measure_mfu, synthetic_rows

pytestmark = pytest.mark.trainer


def test_synthetic_lengths_are_long_tailed() -> None:
    words = sorted(len(r["completion"].split()) for r in synthetic_rows(400, seed=0))
    assert words[0] < 20 and words[len(words) // 2] < 100 and words[-1] > 250


def test_mfu_measurement_runs_on_a_tiny_model() -> None:
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    result = measure_mfu(config, "cpu", seq=64, batch=2, steps=2, warmup=1)
    assert result["attention"] == attention.REFERENCE
    assert result["tokens_per_second"] > 0 and result["mfu"] == 0.0  # no peak for a CPU
    assert 0 < result["trainable"] < result["parameters"] and 0 < result["mean_attention_span"] <= 64


def test_gpu_mfu_refuses_without_a_gpu() -> None:
    env = assets.worker_env()  # no visible GPU
    cmd = [sys.executable, "-m", "kubetune_trainer.bench", "--gpu-mfu"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert done.returncode == 2 and "needs a CUDA GPU" in done.stderr


@pytest.mark.slow
def test_compare_mode_reports_both_arms() -> None:
    cmd = [
        sys.executable,
        "-m",
        "kubetune_trainer.bench",
        "--samples",
        "48",
        "--hidden",
        "64",
        "--layers",
        "1",
        "--repeat",
        "1",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=assets.worker_env())
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert any(line.startswith("ours ") for line in lines) and any(line.startswith("baseline ") for line in lines)
    assert lines[-1].startswith("ratio (ours / baseline tokens/s): ")
