"""torchrun with two processes on gloo: DDP for PEFT, FSDP2 for full fine-tuning."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
import trainer_assets as assets
from kubetune_trainer import evalsets
from kubetune_trainer.config import TrainerConfig
from kubetune_trainer.train import run
from safetensors.torch import load_file

pytestmark = [pytest.mark.trainer, pytest.mark.slow]


def launch(tmp: Path, cfg: dict[str, Any], nproc: int = 2) -> subprocess.CompletedProcess[str]:
    done = assets.run_launcher(tmp, assets.write_config(tmp, cfg), nproc)
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
    # The launcher's termination message on success: rank 0's final figures, as in the manifest (the data report
    # summary left to the manifest and the status).
    final = json.loads((two / "termination-log").read_text())
    assert final == {"finalMetrics": evalsets.message_figures(m["finalMetrics"]), "output": str(two / "out")}
    assert "dataReport" in m["finalMetrics"] and "dataReport" not in final["finalMetrics"]
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


def test_fsdp2_without_safetensors_rank_0_reads_and_sends_the_shards(
    tmp_path: Path, llama_dir: Path, train_jsonl: Path
) -> None:
    # The same model with .bin weights: no rows to read per rank, so rank 0 loads it and broadcasts each shard.
    bin_dir = tmp_path / "bin-model"
    shutil.copytree(llama_dir, bin_dir, ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save(load_file(llama_dir / "model.safetensors"), bin_dir / "pytorch_model.bin")
    sections: dict[str, Any] = {"method": {"type": "full"}, "training": {"maxSteps": 3, "learningRate": 1e-3, **SPLIT}}
    results = {}
    for name, model in (("bin", bin_dir), ("safetensors", llama_dir)):
        where = tmp_path / name
        launch(where, assets.trainer_config(where, model, train_jsonl, **sections))
        results[name] = load_file(where / "out" / "model.safetensors")
    assert_close(results["bin"], results["safetensors"], atol=0)


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_fsdp2_peft_trains_like_ddp_and_resumes(
    tmp_path: Path, llama_dir: Path, train_jsonl: Path, method: str
) -> None:
    settings = {"lora": {"r": 8, "alpha": 16, "dropout": 0.0}, "ia3": {}}[method]
    runs = {}
    for sharding in ("ddp", "fsdp"):
        where = tmp_path / sharding
        cfg = assets.trainer_config(
            where,
            llama_dir,
            train_jsonl,
            method={"type": method, method: {**settings, "sharding": sharding}},
            training={"maxSteps": 6, "logEverySteps": 3, "learningRate": 5e-3, **SPLIT},
            checkpoint={"everySteps": 3, "keepLast": 3},
        )
        launch(where, cfg)
        runs[sharding] = (cfg, manifest(where / "out"))
    ddp, fsdp = runs["ddp"][1], runs["fsdp"][1]
    assert fsdp["replicaDigests"] is None and ddp["replicaDigests"] is not None  # sharded, and replicated
    # The same adapter start (same seed), the same data, the same updates: only the order of sums differs.
    assert_close(
        assets.adapter_tensors(tmp_path / "fsdp" / "out"), assets.adapter_tensors(tmp_path / "ddp" / "out"), 1e-5
    )
    assert fsdp["finalMetrics"]["evalLoss"] == pytest.approx(ddp["finalMetrics"]["evalLoss"], rel=1e-5)
    shards = sorted(p.name for p in (assets.checkpoint_at(tmp_path / "fsdp" / "ckpt", 3) / "state").iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"]

    # Resume the sharded adapter from step 3: the same final adapter, exactly.
    where = tmp_path / "fsdp"
    first = assets.adapter_tensors(where / "out")
    shutil.rmtree(assets.checkpoint_at(where / "ckpt", 6))
    shutil.rmtree(where / "out")
    launch(where, runs["fsdp"][0])
    assert manifest(where / "out")["resumedFromStep"] == 3
    assert_close(assets.adapter_tensors(where / "out"), first, atol=0)


def test_dora_on_fsdp2_is_refused_with_the_alternatives(tmp_path: Path, llama_dir: Path, train_jsonl: Path) -> None:
    cfg = assets.trainer_config(tmp_path, llama_dir, train_jsonl, method={"type": "dora", "lora": {"sharding": "fsdp"}})
    done = assets.run_launcher(tmp_path, assets.write_config(tmp_path, cfg))
    assert done.returncode == 78, done.stderr[-3000:]
    reason = (tmp_path / "termination-log").read_text()
    assert reason.startswith("method dora with FSDP2") and "use lora, or sharding ddp" in reason


def test_fsdp2_loads_each_ranks_share_and_peak_memory_falls_with_the_ranks(
    tmp_path: Path, train_jsonl: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model_dir = assets.wide_llama_dir(tmp_path / "model", hidden=1024, layers=12)
    sections: dict[str, Any] = {
        "method": {"type": "full"},
        "dataset": {"maxSeqLength": 64, "evalSplit": 0.0},
        "training": {"maxSteps": 2, "logEverySteps": 1, "learningRate": 1e-4, "batchSizePerDevice": 1},
        "checkpoint": {"everySteps": 1000},
    }
    runs = {}
    for ranks in (1, 4):
        where = tmp_path / f"ranks-{ranks}"
        # The same 4 sequences per step: one process accumulates them, 4 ranks take one each.
        training = {**sections["training"], "gradientAccumulationSteps": 4 // ranks}
        cfg = assets.trainer_config(where, model_dir, train_jsonl, **{**sections, "training": training})
        launch(where, cfg, nproc=ranks)
        runs[ranks] = manifest(where / "out")
    params = runs[1]["parameters"]["total"]
    whole = params * 4  # fp32
    [one] = runs[1]["memory"]
    assert one["parameterBytes"] == whole

    def mib(n: int) -> str:
        return f"{n / 2**20:.0f} MiB"

    def training(m: dict[str, int]) -> int:
        """Peak RSS the model and its training added to the process (the Python runtime does not shard)."""
        return m["peakRssBytesTrained"] - m["peakRssBytesBeforeModel"]

    with capsys.disabled():
        print(f"\n{params:,} parameters: {mib(whole)} fp32, {mib(4 * whole)} with gradients and Adam moments")
        for name, m in [("1 process", one)] + [(f"4 ranks, rank {r}", m) for r, m in enumerate(runs[4]["memory"])]:
            print(
                f"{name}: {mib(m['parameterBytes'])} of parameters at load; peak RSS "
                f"{mib(m['peakRssBytesBeforeModel'])} before the model, {mib(m['peakRssBytesTrained'])} trained "
                f"({mib(training(m))} for the model)"
            )
    for m in runs[4]["memory"]:
        # Each rank holds its quarter of the rows (a few small tensors have fewer rows than ranks).
        assert m["parameterBytes"] == pytest.approx(whole / 4, rel=0.01)
        assert training(m) < 0.6 * training(one)
    # The same weights loaded and trained: the losses of both steps agree whatever the sharding.
    losses = {
        ranks: [json.loads(line)["loss"] for line in (tmp_path / f"ranks-{ranks}" / "out" / "metrics.jsonl").open()]
        for ranks in (1, 4)
    }
    assert len(losses[1]) == 2 and losses[4] == pytest.approx(losses[1], rel=1e-4), losses
