"""The sharded memory benchmark's figures and verdicts (bench/sharded_memory.py; the runs are the benchmark's)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import sharded_memory as bench

GIB = 2**30


def memory(peak: float, params: float = 1, before: float = 0.5) -> dict[str, int]:
    return {
        "parameterBytes": int(params * GIB),
        "peakRssBytesBeforeModel": int(before * GIB),
        "peakRssBytesAtLoad": int(peak * GIB),
        "peakRssBytesTrained": int(peak * GIB),
        "peakRssBytesExported": int(peak * GIB),
    }


def figures(ranks: list[float], single: float, parameters: int = 2**29, trainable: int = 2**29) -> bench.Figures:
    return bench.Figures("full", parameters, trainable, [memory(p) for p in ranks], memory(single, params=4))


def test_training_state_is_16_bytes_a_trained_parameter_and_4_a_frozen_one() -> None:
    assert bench.state_bytes(100, 100) == 1600  # full: weights, gradients, two AdamW moments
    assert bench.state_bytes(1000, 10) == 4120  # LoRA: the frozen base and a small adapter


def test_both_memory_criteria_pass_with_room() -> None:
    f = figures([3.0, 2.9, 2.9, 2.9], single=9.0)  # state: 2**29 parameters x 16 bytes = 8 GiB
    assert f.state == 8 * GIB and f.largest == 3 * GIB
    share, ratio = bench.memory_verdicts(f)
    assert share.ok and "largest rank 3.00 GiB = 0.33 x 9.00 GiB" in share.detail
    assert ratio.ok and "8.00 GiB = 2.67 x 3.00 GiB" in ratio.detail
    assert share.line().startswith("PASS  full: every rank's peak RSS < 60% of the 1-process peak")


def test_the_largest_rank_decides_and_the_limits_are_strict_and_inclusive() -> None:
    # One rank at exactly 60% of the single process fails; the state at exactly twice the largest rank passes.
    share, ratio = bench.memory_verdicts(figures([2.0, 4.0, 2.0, 2.0], single=4.0 / 0.6))
    assert not share.ok and "0.60 x" in share.detail
    assert ratio.ok and "= 2.00 x 4.00 GiB" in ratio.detail
    share, ratio = bench.memory_verdicts(figures([4.1, 2.0, 2.0, 2.0], single=10.0))
    assert share.ok and not ratio.ok
    assert ratio.line().startswith("FAIL  full: unsharded training state >= 2x the largest rank's peak RSS")


def test_losses_agree_within_the_relative_tolerance_at_every_step() -> None:
    assert bench.loss_verdict("lora", {1: 6.0, 2: 5.9995}, {1: 6.0, 2: 6.0}).ok
    assert not bench.loss_verdict("lora", {1: 6.0, 2: 5.99}, {1: 6.0, 2: 6.0}).ok
    assert not bench.loss_verdict("lora", {1: 6.0}, {1: 6.0, 2: 6.0}).ok


@pytest.mark.parametrize(
    ("resumed_from", "loss", "differing", "ok"),
    [(1, 5.5, [], True), (None, 5.5, [], False), (1, 5.500001, [], False), (1, 5.5, ["lm_head.weight"], False)],
)
def test_resume_must_start_at_step_1_and_end_bit_for_bit(
    resumed_from: int | None, loss: float, differing: list[str], ok: bool
) -> None:
    verdict = bench.resume_verdict("full", resumed_from, loss, 5.5, differing)
    assert verdict.ok is ok
    assert ("1 differing tensor(s): lm_head.weight" in verdict.detail) is bool(differing)


def test_table_has_a_line_per_process_with_the_ratios() -> None:
    text = bench.table(figures([3.0, 2.9, 2.9, 2.9], single=9.0))
    lines = text.splitlines()
    assert lines[0].startswith("full: 536,870,912 parameters (536,870,912 trainable); unsharded training state 8.00")
    assert "16.0 bytes a parameter" in lines[0]
    assert lines[2].split()[:3] == ["1", "process", "(unsharded)"]
    rank0 = lines[3].split()
    assert rank0[:4] == ["4", "ranks:", "rank", "0"] and rank0[8:12] == ["3.00", "GiB", "0.33", "2.67"]
    assert len(lines) == 2 + 5 + 1 and "ru_maxrss" in lines[-1]


def test_differing_tensors_reads_both_directories(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    save_file({"x": torch.ones(3), "y": torch.zeros(2)}, a / "model.safetensors")
    save_file({"x": torch.ones(3)}, b / "model-00001-of-00002.safetensors")
    save_file({"y": torch.tensor([0.0, 1e-30]), "z": torch.ones(1)}, b / "model-00002-of-00002.safetensors")
    assert bench.differing_tensors(a, b) == ["y", "z"]
    assert bench.differing_tensors(a, a) == []
