"""The benchmark's moving parts (timings themselves are the benchmark's business, not the tests')."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trainer_assets as assets
from kubetune_trainer import bench
from kubetune_trainer.modeling import decoder_layers

pytestmark = pytest.mark.trainer


def test_long_workload_is_long_tailed_chat() -> None:
    rows = bench.read_jsonl(bench.TRAIN_ROWS)
    chats = bench.conversations(rows, 400, seed=0)
    turns = sorted(len(c["messages"]) // 2 for c in chats)
    assert all(m["role"] in ("user", "assistant") for c in chats for m in c["messages"])
    assert turns[0] == 1 and 2 <= bench.percentile(turns, 0.5) <= 4 and bench.percentile(turns, 0.95) >= 10
    assert chats == bench.conversations(rows, 400, seed=0)


def result(tps: float, rss: int) -> bench.Result:
    return bench.Result(tokens=int(tps * 10), seconds=10.0, slots=int(tps * 10), peak_rss=rss, eval_loss=1.0)


def test_ratio_against_the_best_baseline_memory_against_the_leanest(capsys: pytest.CaptureFixture[str]) -> None:
    runs = {
        bench.OURS: [result(300, 5), result(330, 6)],
        "hf-pad": [result(100, 4), result(120, 4)],
        "hf-group": [result(200, 7), result(180, 7)],
        "trl-pack": [result(90, 3), result(95, 3)],
    }
    stats = bench.summarise(runs)
    assert stats[bench.OURS]["tps"] == 315 and stats[bench.OURS]["peak_rss"] == 6
    ratio, within = bench.report("short", stats, runs)
    assert ratio == pytest.approx(315 / 190) and not within  # best: hf-group; leanest: trl-pack (3 bytes)
    assert "best baseline (hf-group)" in capsys.readouterr().out


def test_padding_counts_the_positions_fed_beyond_the_real_tokens() -> None:
    r = bench.Result(tokens=75, seconds=1.0, slots=100)
    assert r.padding == pytest.approx(0.25) and r.tps == 75


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--workloads", "tiny"], "unknown workload 'tiny'"),
        (["--arms", "hf-magic"], "unknown baseline 'hf-magic'"),
        (["--steps", "1"], "--steps must be at least 2"),
        (["--dry-run"], "--dry-run goes with --gpu"),
        (["--accumulation", "0"], "--accumulation must be at least 1"),
    ],
)
def test_bad_arguments_are_named(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        bench.parse(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_gpu_mode_refuses_without_a_gpu() -> None:
    cmd = [sys.executable, "-m", "kubetune_trainer.bench", "--gpu"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=assets.worker_env())
    assert done.returncode == 2 and "needs a CUDA GPU" in done.stderr


@pytest.mark.slow
def test_gpu_mode_dry_run_exercises_both_arms_on_the_cpu() -> None:
    cmd = [sys.executable, "-m", "kubetune_trainer.bench", "--gpu", "--dry-run"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=assets.worker_env())
    assert done.returncode == 0, done.stderr[-3000:]
    assert "dry run" in done.stdout and "trl-padding-free (sdpa)" in done.stdout
    assert "ratio (kubetune / trl tokens/s): " in done.stdout


def small_spec(model: Path, train: Path, held: Path, out: Path, **overrides: Any) -> bench.Spec:
    """A two-step run of this trainer's arm on short packed rows."""
    shape: dict[str, Any] = dict(steps=2, rows_per_micro=2, micro_tokens=256, accumulation=1, learning_rate=1e-3)
    return bench.Spec(
        arm=bench.OURS, model=str(model), train=str(train), eval=str(held), out=str(out), **{**shape, **overrides}
    )


@pytest.mark.slow
def test_one_arm_trains_and_evaluates_the_real_smollm2(tmp_path: Path) -> None:
    model = bench.smollm2_dir(tmp_path / "cache")
    train, held = bench.write_workload("short", tmp_path / "data")
    spec = small_spec(model, train, held, tmp_path / "run", eval_rows=2)
    done = subprocess.run(
        [sys.executable, "-m", "kubetune_trainer.bench", "--arm-spec", json.dumps(bench.asdict(spec))],
        capture_output=True,
        text=True,
        timeout=600,
        env=assets.worker_env(),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    r = bench.Result(**json.loads(done.stdout.strip().splitlines()[-1]))
    assert r.tokens > 0 and r.seconds > 0 and r.padding == 0.0 and len(r.tokens_per_step) == 2
    assert 0 < r.eval_loss < 10 and r.peak_rss > 2**28  # a real model: far below ln(49152) = 10.8


def test_compile_reaches_every_arm(tmp_path: Path) -> None:
    """`--compile` compiles the decoder blocks of this trainer and of the baselines alike, or of none."""
    model_dir = assets.make_model_dir(tmp_path / "model")
    assert bench.parse(["--compile"]).compile and not bench.parse([]).compile
    for compiled in (False, True):
        flagged = small_spec(model_dir, Path("train.jsonl"), Path("eval.jsonl"), tmp_path / "run", compile=compiled)
        assert bench.kubetune_config(flagged).training.compile is compiled
        layers = decoder_layers(bench.load_lora_model(str(model_dir), flagged.compile))
        assert layers and all((layer._compiled_call_impl is not None) is compiled for layer in layers)
