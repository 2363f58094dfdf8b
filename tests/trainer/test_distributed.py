"""torchrun with two processes on gloo: DDP for PEFT, FSDP2 for full fine-tuning."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import trainer_assets as assets
from kubetune_trainer.config import TrainerConfig
from kubetune_trainer.train import run
from safetensors.torch import load_file

pytestmark = [pytest.mark.trainer, pytest.mark.slow]


def launch(tmp: Path, cfg: dict[str, Any], nproc: int = 2) -> subprocess.CompletedProcess[str]:
    path = assets.write_config(tmp, cfg)
    exe = shutil.which("kubetune-launch", path=str(Path(sys.executable).parent))
    assert exe
    env = assets.worker_env(
        KUBETUNE_CONFIG=str(path),
        KUBETUNE_NPROC_PER_NODE=str(nproc),
        KUBETUNE_MASTER_PORT=str(assets.free_port()),
        KUBETUNE_TERMINATION_LOG=str(tmp / "termination-log"),
    )
    done = subprocess.run([exe], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def manifest(out: Path) -> dict[str, Any]:
    return json.loads((out / "manifest.json").read_text())


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=atol, rtol=0), (k, (a[k] - b[k]).abs().max())


# Two ranks x one sequence per micro-batch see exactly the bins one process sees with two per micro-batch.
SPLIT = {"batchSizePerDevice": 1, "gradientAccumulationSteps": 2}
WHOLE = {"batchSizePerDevice": 2, "gradientAccumulationSteps": 2}


def test_ddp_lora_ranks_agree_and_match_one_process(tmp_path: Path, llama_dir: Path, train_jsonl: Path) -> None:
    training = {"maxSteps": 10, "logEverySteps": 5, "learningRate": 5e-3}
    two = tmp_path / "two"
    launch(two, assets.trainer_config(two, llama_dir, train_jsonl, training={**training, **SPLIT}))
    m = manifest(two / "out")
    assert m["worldSize"] == 2 and len(m["replicaDigests"]) == 2 and len(set(m["replicaDigests"])) == 1
    # The launcher's termination message on success: rank 0's final figures, as in the manifest.
    final = json.loads((two / "termination-log").read_text())
    assert final == {"finalMetrics": m["finalMetrics"], "output": str(two / "out")}
    assert final["finalMetrics"]["steps"] == 10 and final["finalMetrics"]["evalLoss"] > 0

    one = tmp_path / "one"
    cfg = assets.trainer_config(one, llama_dir, train_jsonl, training={**training, **WHOLE})
    run(TrainerConfig.model_validate(cfg), assets.cpu_runtime())
    # Same data, same global batch; only the order of floating-point sums differs.
    assert_close(assets.adapter_tensors(two / "out"), assets.adapter_tensors(one / "out"), atol=1e-5)
    assert manifest(one / "out")["finalMetrics"]["evalLoss"] == pytest.approx(m["finalMetrics"]["evalLoss"], rel=1e-5)


def test_fsdp2_full_finetune_shards_resumes_and_matches_one_process(
    tmp_path: Path, llama_dir: Path, train_jsonl: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sections: dict[str, Any] = {
        "method": {"type": "full"},
        "training": {"maxSteps": 6, "logEverySteps": 3, "learningRate": 1e-3, **SPLIT},
        "checkpoint": {"everySteps": 3, "keepLast": 3},
    }
    two = tmp_path / "two"
    launch(two, assets.trainer_config(two, llama_dir, train_jsonl, **sections))
    first = load_file(two / "out" / "model.safetensors")
    assert manifest(two / "out")["kind"] == "model"
    shards = sorted(p.name for p in (assets.checkpoint_at(two / "ckpt", 3) / "state").iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]

    # Resume the sharded checkpoint at step 3 with two ranks again: the same final weights.
    shutil.rmtree(assets.checkpoint_at(two / "ckpt", 6))
    shutil.rmtree(two / "out")
    launch(two, assets.trainer_config(two, llama_dir, train_jsonl, **sections))
    assert manifest(two / "out")["resumedFromStep"] == 3
    assert_close(load_file(two / "out" / "model.safetensors"), first, atol=0)

    one = tmp_path / "one"
    single = {**sections, "training": {**sections["training"], **WHOLE}}
    run(
        TrainerConfig.model_validate(assets.trainer_config(one, llama_dir, train_jsonl, **single)), assets.cpu_runtime()
    )
    assert_close(load_file(one / "out" / "model.safetensors"), first, atol=1e-5)

    # The two-rank checkpoint also loads into one process (DCP reshards), with a warning about the data order.
    elastic = tmp_path / "elastic"
    written = assets.checkpoint_at(two / "ckpt", 3)
    shutil.copytree(written, elastic / "ckpt" / written.name)
    with caplog.at_level(logging.WARNING):
        result = run(
            TrainerConfig.model_validate(assets.trainer_config(elastic, llama_dir, train_jsonl, **single)),
            assets.cpu_runtime(),
        )
    assert result["steps"] == 6 and manifest(elastic / "out")["resumedFromStep"] == 3
    assert any("written by 2 processes, this run has 1" in r.getMessage() for r in caplog.records)
