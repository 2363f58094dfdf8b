"""What a finished run leaves behind, and what rank 0 publishes while it trains."""

from __future__ import annotations

import itertools
import json
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import torch
import trainer_assets as assets
from kubetune_trainer.config import TrainerConfig
from kubetune_trainer.progress import MAX_HISTORY, Progress, downsample, serve
from kubetune_trainer.train import run

pytestmark = pytest.mark.trainer


@pytest.fixture(scope="module")
def finished(
    tmp_path_factory: pytest.TempPathFactory, llama_dir: Path, train_jsonl: Path
) -> tuple[Path, dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("run")
    cfg = assets.trainer_config(
        tmp,
        llama_dir,
        train_jsonl,
        training={"maxSteps": 12, "logEverySteps": 4, "evalEverySteps": 6, "learningRate": 1e-2},
        output={"mergeAdapter": True},
        identity={"namespace": "team-a", "name": "bot", "run": 3},
    )
    result = run(TrainerConfig.model_validate(cfg), assets.cpu_runtime())
    return tmp, result


def test_adapter_tokenizer_plot_and_metrics_history(finished: tuple[Path, dict[str, Any]]) -> None:
    tmp, result = finished
    out = tmp / "out"
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "loss.png", "manifest.json"):
        assert (out / name).is_file(), name
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [4, 6, 8, 12]  # log steps plus eval steps
    assert [r["step"] for r in records if "evalLoss" in r] == [0, 6, 12]  # the base model first
    assert result["baseEvalLoss"] == records[0]["evalLoss"] > result["evalLoss"]
    first = next(r for r in records if "loss" in r)
    assert {"loss", "learningRate", "gradNorm", "tokensPerSecond", "tokensTotal", "mfu", "epoch"} <= set(first)
    assert result["evalLoss"] == records[-1]["evalLoss"]


def test_manifest_describes_the_run(finished: tuple[Path, dict[str, Any]], llama_dir: Path, train_jsonl: Path) -> None:
    tmp, result = finished
    manifest = json.loads((tmp / "out" / "manifest.json").read_text())
    assert manifest["kind"] == "adapter" and manifest["method"] == "lora"
    assert manifest["baseModel"]["source"] == str(llama_dir)
    import hashlib

    [entry] = manifest["dataset"]["files"]
    assert entry == {
        "path": str(train_jsonl),
        "sha256": hashlib.sha256(train_jsonl.read_bytes()).hexdigest(),
        "rows": 160,
    }
    assert manifest["config"]["training"]["maxSteps"] == 12 and manifest["config"]["output"]["mergeAdapter"] is True
    assert manifest["finalMetrics"] == result and result["evalPerplexity"] > 1
    assert manifest["worldSize"] == 1 and manifest["identity"]["name"] == "bot"
    assert {"torch", "transformers", "peft"} <= set(manifest["versions"])
    assert manifest["merged"] == "merged"
    assert "adapter_model.safetensors" in manifest["outputs"] and "merged/model.safetensors" in manifest["outputs"]
    assert 0 < manifest["parameters"]["trainable"] < manifest["parameters"]["total"]


@torch.no_grad()
def test_merged_model_equals_base_plus_adapter(finished: tuple[Path, dict[str, Any]], llama_dir: Path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = finished[0] / "out"
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llama_dir), str(out)).eval()
    merged = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    tok = AutoTokenizer.from_pretrained(out / "merged")
    ids = tok("repeat apple 3 times: apple apple apple", return_tensors="pt")["input_ids"]
    a, b = adapted(input_ids=ids).logits, merged(input_ids=ids).logits
    base = AutoModelForCausalLM.from_pretrained(llama_dir).eval()(input_ids=ids).logits
    assert (a - b).abs().max() < 1e-4
    assert (a - base).abs().max() > 1e-3  # the adapter did change something


def get(url: str) -> tuple[str, str]:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.headers["Content-Type"], r.read().decode()


def test_metrics_and_progress_endpoints() -> None:
    progress = Progress(world_size=2)
    server = serve(progress, "127.0.0.1", 0)
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        progress.set_plan(100)
        progress.set_state("training")
        progress.step_done(10, 0.25, 1.5, 4096)
        progress.logged(
            loss=1.5,
            learning_rate=2e-4,
            grad_norm=0.8,
            tokens_per_second=2730.0,
            mfu=0.31,
            eta_seconds=135,
            gpu_memory_peak=7,
        )
        progress.evaluated(10, 1.7, 5.47)
        progress.checkpointed(10, "/ckpt/step-00000010", 1_700_000_000.0, 2.5)
        ctype, text = get(base + "/metrics")
        assert ctype.startswith("text/plain")
        expected = {
            "kubetune_train_loss 1.5",
            "kubetune_train_eval_loss 1.7",
            "kubetune_train_learning_rate 0.0002",
            "kubetune_train_grad_norm 0.8",
            "kubetune_train_global_step 10.0",
            "kubetune_train_total_steps 100.0",
            "kubetune_train_tokens_total 4096.0",
            'kubetune_train_step_duration_seconds_bucket{le="2.5"} 1.0',
            "kubetune_train_step_duration_seconds_count 1.0",
            "kubetune_train_mfu_ratio 0.31",
            "kubetune_train_gpu_memory_peak_bytes 7.0",
            "kubetune_train_checkpoint_duration_seconds 2.5",
            "kubetune_train_last_checkpoint_timestamp_seconds 1.7e+09",
        }
        assert expected <= set(text.splitlines())
        assert "kubetune_train_estimated_completion_timestamp_seconds " in text
        assert all(line.startswith("kubetune_train_") for line in text.splitlines() if not line.startswith("#"))
        ctype, body = get(base + "/progress")
        doc = json.loads(body)
        assert ctype == "application/json"
        assert doc["state"] == "training" and doc["step"] == 10 and doc["totalSteps"] == 100
        assert doc["epoch"] == 0.25 and doc["loss"] == 1.5 and doc["evalLoss"] == 1.7 and doc["mfu"] == 0.31
        assert doc["learningRate"] == 2e-4 and doc["tokensPerSecond"] == 2730.0 and doc["etaSeconds"] == 135
        assert doc["checkpoint"] == {
            "step": 10,
            "path": "/ckpt/step-00000010",
            "savedAt": "2023-11-14T22:13:20.000000Z",
        }
        assert doc["resumedFromStep"] is None and doc["worldSize"] == 2
        assert doc["updatedAt"].endswith("Z") and doc["history"] == [{"step": 10, "loss": 1.5, "evalLoss": 1.7}]
        with pytest.raises(urllib.error.HTTPError):
            get(base + "/other")
    finally:
        server.shutdown()
        server.server_close()


def test_history_is_bounded_and_spans_the_run() -> None:
    points = [{"step": i, "loss": 1.0} for i in range(1, 2001)]
    kept = downsample(points)
    assert len(kept) <= MAX_HISTORY
    assert kept[0]["step"] == 1 and kept[-1]["step"] == 2000
    steps = [p["step"] for p in kept]
    assert steps == sorted(steps)


def logged_history(steps: int, eval_every: int) -> list[dict[str, Any]]:
    """The history rank 0 builds logging every step and evaluating every `eval_every` steps."""
    p = Progress(world_size=1)
    p.set_plan(steps)
    for step in range(1, steps + 1):
        p.step_done(step, epoch=step / steps, duration=0.1, tokens=10)
        p.logged(
            loss=2.0, learning_rate=1e-4, grad_norm=1.0, tokens_per_second=1.0, mfu=0, eta_seconds=1, gpu_memory_peak=0
        )
        if step % eval_every == 0:
            p.evaluated(step, eval_loss=2.5, perplexity=12.0)
    return p.history()


def test_history_thinning_keeps_every_evaluation_while_they_fit_in_half() -> None:
    history = logged_history(3000, eval_every=20)
    assert len(history) <= MAX_HISTORY
    assert [h["step"] for h in history if "evalLoss" in h] == list(range(20, 3001, 20))
    steps = [h["step"] for h in history]
    assert steps == sorted(set(steps)) and steps[0] == 1 and steps[-1] == 3000
    # the training curve still spans the run: points from its first and its last tenth
    assert any(s < 300 for s in steps if s % 20) and any(s > 2700 for s in steps if s % 20)


def test_history_thinning_spreads_evaluations_over_the_run_when_there_are_too_many() -> None:
    history = logged_history(3000, eval_every=2)
    evaluated = [h["step"] for h in history if "evalLoss" in h]
    assert len(history) <= MAX_HISTORY and len(evaluated) > MAX_HISTORY // 4
    # the eval curve spans the whole run, evenly: no gap wider than a bucket of 16 steps
    assert evaluated[0] == 2 and evaluated[-1] == 3000
    assert max(b - a for a, b in itertools.pairwise(evaluated)) <= 16


def test_setup_reports_each_stage_and_how_far_it_got(
    tmp_path: Path, llama_dir: Path, train_jsonl: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What /progress says while the trainer loads: the stage, and counts where it can count; nothing once it
    trains. The operator's stall clock reads it."""
    seen: list[dict[str, Any]] = []

    class Recorded(Progress):
        def _update(self, **fields: Any) -> None:
            super()._update(**fields)
            doc = self.snapshot()
            seen.append({"state": doc["state"], "setup": doc["setup"]})

    monkeypatch.setattr("kubetune_trainer.train.Progress", Recorded)
    cfg = TrainerConfig.model_validate(
        assets.trainer_config(tmp_path, llama_dir, train_jsonl, training={"maxSteps": 2, "logEverySteps": 1})
    )
    for first in (True, False):  # the second run resumes from the first one's last checkpoint
        seen.clear()
        run(cfg, assets.cpu_runtime())
        setups = [s["setup"] for s in seen if s["setup"]]
        assert all(s["state"] == "loading" for s in seen if s["setup"])
        stages = [stage for stage, _ in itertools.groupby(s["stage"] for s in setups)]
        resuming = [] if first else ["loading checkpoint"]
        assert stages == ["tokenising", "checking data", "loading model", "verifying checkpoints", *resuming]
        # 160 rows: 144 to train on, 16 held out, counted as one total
        tokenising = [
            k
            for k, _ in itertools.groupby(
                (s["done"], s["total"], s["unit"]) for s in setups if s["stage"] == "tokenising"
            )
        ]
        assert tokenising == [(144, 160, "rows"), (160, 160, "rows")]
        assert seen[-1] == {"state": "done", "setup": None}
