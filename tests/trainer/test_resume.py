"""Checkpoints: kill -9 and resume to the same weights, corrupt checkpoints skipped, atomic layout, rotation."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import trainer_assets as assets
from kubetune_trainer import checkpoint
from kubetune_trainer.config import TrainerConfig
from kubetune_trainer.train import run

pytestmark = pytest.mark.trainer

# LoRA dropout on, so the RNG state has to come back too; eval in between, so the eval must not disturb it.
RESUME_SECTIONS: dict[str, Any] = {
    "method": {"type": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.1}},
    "training": {"maxSteps": 120, "logEverySteps": 5, "evalEverySteps": 25, "learningRate": 5e-3},
    "checkpoint": {"everySteps": 10, "keepLast": 2},
}


def trainer_cmd(config: Path) -> list[str]:
    return [sys.executable, "-m", "kubetune_trainer", "--config", str(config)]


@pytest.mark.slow
def test_kill_9_then_rerun_ends_with_the_same_weights(tmp_path: Path, llama_dir: Path, train_jsonl: Path) -> None:
    """Tolerance: none. On CPU the resumed run must be bitwise identical to an uninterrupted one."""
    env = assets.worker_env()
    ref_dir, cut_dir = tmp_path / "reference", tmp_path / "interrupted"
    ref_cfg = assets.write_config(ref_dir, assets.trainer_config(ref_dir, llama_dir, train_jsonl, **RESUME_SECTIONS))
    cut_cfg = assets.write_config(cut_dir, assets.trainer_config(cut_dir, llama_dir, train_jsonl, **RESUME_SECTIONS))

    victim = subprocess.Popen(trainer_cmd(cut_cfg), env=env, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while 30 not in assets.checkpoint_steps(cut_dir / "ckpt"):
        assert victim.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.005)
    victim.kill()
    assert victim.wait() == -9
    killed_at = max(assets.checkpoint_steps(cut_dir / "ckpt"))
    assert killed_at < 120

    reference = subprocess.run(trainer_cmd(ref_cfg), env=env, capture_output=True, text=True, timeout=300)
    assert reference.returncode == 0, reference.stderr[-3000:]
    resumed = subprocess.run(trainer_cmd(cut_cfg), env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    manifest = json.loads((cut_dir / "out" / "manifest.json").read_text())
    assert 30 <= manifest["resumedFromStep"] <= killed_at

    a, b = assets.adapter_tensors(ref_dir / "out"), assets.adapter_tensors(cut_dir / "out")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # The loss history, written before and after the kill, is the uninterrupted one.
    assert assets.losses_by_step(cut_dir / "out") == assets.losses_by_step(ref_dir / "out")
    ref_manifest = json.loads((ref_dir / "out" / "manifest.json").read_text())
    assert manifest["finalMetrics"]["evalLoss"] == ref_manifest["finalMetrics"]["evalLoss"]


def train_in_process(tmp: Path, llama_dir: Path, data: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    return run(
        TrainerConfig.model_validate(assets.trainer_config(tmp, llama_dir, data, **sections)), assets.cpu_runtime()
    )


def test_corrupt_latest_checkpoint_is_skipped(
    tmp_path: Path, llama_dir: Path, train_jsonl: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sections: dict[str, Any] = {
        "training": {"maxSteps": 15, "logEverySteps": 5},
        "checkpoint": {"everySteps": 5, "keepLast": 3},
    }
    train_in_process(tmp_path, llama_dir, train_jsonl, **sections)
    expected = assets.adapter_tensors(tmp_path / "out")
    ckpts = tmp_path / "ckpt"
    assert assets.checkpoint_steps(ckpts) == [5, 10, 15]
    # Damage the newest (one flipped byte), cut the middle one short, and leave a half-written save behind: the
    # old layout's, which recorded no owner (so it is not ours to delete), and one in this attempt's scratch.
    shard = assets.checkpoint_at(ckpts, 15) / "state" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    rng = assets.checkpoint_at(ckpts, 10) / "rng-rank00000.pt"
    rng.write_bytes(rng.read_bytes()[:-7])
    (ckpts / ".tmp-step-00000020" / "state").mkdir(parents=True)
    [scratch] = ckpts.glob(".attempt-*-00000001")
    (scratch / "step-00000020-000000000000" / "state").mkdir(parents=True)

    with caplog.at_level(logging.INFO):
        result = train_in_process(tmp_path, llama_dir, train_jsonl, **sections)
    messages = [r.getMessage() for r in caplog.records]
    assert any(
        re.search(r"step-00000015-\w+ is not valid \(state/__0_0.distcp does not match its sha256\); skipping", m)
        for m in messages
    )
    assert any(re.search(r"step-00000010-\w+ is not valid \(rng-rank00000.pt has", m) for m in messages)
    assert any(re.search(r"resumed from .*step-00000005-\w+ at step 5/15", m) for m in messages)
    assert any(".tmp-step-00000020: an unfinished save from before checkpoints recorded" in m for m in messages)
    assert (ckpts / ".tmp-step-00000020").is_dir() and not (scratch / "step-00000020-000000000000").exists()
    assert len(list(ckpts.glob("corrupt-step-00000015-*"))) == 1
    assert result["steps"] == 15
    # Resumed from step 5 of the same run: the same final adapter, bit for bit.
    got = assets.adapter_tensors(tmp_path / "out")
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_checkpoint_layout_manifest_and_rotation(tmp_path: Path, llama_dir: Path, train_jsonl: Path) -> None:
    train_in_process(
        tmp_path,
        llama_dir,
        train_jsonl,
        training={"maxSteps": 12, "logEverySteps": 4},
        checkpoint={"everySteps": 3, "keepLast": 2},
    )
    ckpts = tmp_path / "ckpt"
    assert assets.checkpoint_steps(ckpts) == [9, 12]
    latest = assets.checkpoint_at(ckpts, 12)
    manifest = json.loads((latest / "manifest.json").read_text())
    assert manifest["step"] == 12 and manifest["worldSize"] == 1
    # Who wrote it: the identity (with the attempt), and the lineage its name ends with.
    identity = {"namespace": "", "name": "", "uid": "", "run": 1, "attempt": 1, "specFingerprint": ""}
    assert manifest["identity"] == identity
    assert latest.name == f"step-00000012-{manifest['lineage']}"
    assert manifest["datasetSha256"] == [hashlib.sha256(train_jsonl.read_bytes()).hexdigest()]
    assert set(manifest["files"]) == {
        "rng-rank00000.pt",
        "scheduler.pt",
        "trainer_state.json",
        "state/.metadata",
        "state/__0_0.distcp",
    }
    assert checkpoint.problems(latest) is None
    state = json.loads((latest / "trainer_state.json").read_text())
    assert state["step"] == 12 and state["totalSteps"] == 12 and [h["step"] for h in state["history"]] == [0, 4, 8, 12]
    (latest / "scheduler.pt").unlink()
    assert checkpoint.problems(latest) == "scheduler.pt is missing"
    (latest / "manifest.json").write_text("{")
    assert checkpoint.problems(latest) == "no readable manifest (JSONDecodeError)"


def test_time_based_checkpoints(tmp_path: Path, llama_dir: Path, train_jsonl: Path) -> None:
    # A period far below one step's duration: a checkpoint is due at the start of every step.
    train_in_process(
        tmp_path,
        llama_dir,
        train_jsonl,
        training={"maxSteps": 7, "logEverySteps": 7},
        checkpoint={"everySteps": None, "everyMinutes": 1e-7, "keepLast": 4},
    )
    assert assets.checkpoint_steps(tmp_path / "ckpt") == [4, 5, 6, 7]
