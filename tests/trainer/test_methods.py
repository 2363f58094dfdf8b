"""Every fine-tuning method trains on CPU (in-process, tiny models) and writes its outputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import trainer_assets as assets
from kubetune_trainer.config import TrainerConfig
from kubetune_trainer.errors import PermanentError
from kubetune_trainer.runtime import Runtime, init_runtime
from kubetune_trainer.train import run

pytestmark = pytest.mark.trainer


@pytest.fixture(scope="module")
def rt() -> Runtime:
    return assets.cpu_runtime()


def train(tmp: Path, model_dir: Path, data: Path, rt: Runtime, **sections: dict[str, Any]) -> dict[str, Any]:
    cfg = TrainerConfig.model_validate(assets.trainer_config(tmp, model_dir, data, **sections))
    return run(cfg, rt)


def logged_losses(out: Path) -> list[float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


# (method settings, learning rate, the least the loss must fall between the first and last log interval)
METHODS = {
    "lora": ({"type": "lora", "lora": {"r": 8, "dropout": 0.05, "targetModules": ["q_proj", "v_proj"]}}, 1e-2, 0.3),
    "rslora": ({"type": "lora", "lora": {"r": 8, "alpha": 8, "rslora": True}}, 3e-3, 0.3),
    "dora": ({"type": "dora", "lora": {"r": 8, "alpha": 16}}, 3e-3, 0.3),
    "ia3": ({"type": "ia3"}, 0.3, 0.1),
    "prefix": ({"type": "prefix", "prefix": {"numVirtualTokens": 8}}, 0.1, 0.05),
    "prompt": ({"type": "prompt", "prompt": {"numVirtualTokens": 8}}, 0.3, 0.05),
    "full": ({"type": "full"}, 1e-3, 1.0),
}  # fmt: skip


@pytest.mark.parametrize("name", list(METHODS))
def test_method_trains_and_the_loss_goes_down(
    name: str, tmp_path: Path, llama_dir: Path, train_jsonl: Path, rt: Runtime
) -> None:
    method, lr, drop = METHODS[name]
    result = train(
        tmp_path,
        llama_dir,
        train_jsonl,
        rt,
        method=method,
        training={"learningRate": lr, "maxSteps": 40, "batchSizePerDevice": 8, "logEverySteps": 10},
    )
    losses = logged_losses(tmp_path / "out")
    assert len(losses) == 4
    assert losses[-1] < losses[0] - drop, losses
    assert result["steps"] == 40 and result["evalLoss"] < losses[0]
    out = tmp_path / "out"
    if name == "full":
        from transformers import AutoModelForCausalLM

        tuned, base = AutoModelForCausalLM.from_pretrained(out), AutoModelForCausalLM.from_pretrained(llama_dir)
        changed = [n for n, p in tuned.named_parameters() if not torch.equal(p, base.get_parameter(n))]
        assert len(changed) == len(list(base.parameters()))  # every weight trained, and the export loads
    else:
        assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()


def test_bf16_gradient_checkpointing_accumulation_on_qwen2(
    tmp_path: Path, qwen2_dir: Path, train_jsonl: Path, rt: Runtime
) -> None:
    result = train(
        tmp_path,
        qwen2_dir,
        train_jsonl,
        rt,
        training={
            "maxSteps": 12,
            "learningRate": 1e-2,
            "precision": "bf16",
            "gradientCheckpointing": True,
            "gradientAccumulationSteps": 2,
            "lrScheduler": "linear",
            "logEverySteps": 4,
        },
    )
    losses = logged_losses(tmp_path / "out")
    assert losses[-1] < losses[0] - 0.2, losses
    assert result["tokensTotal"] > 0


def test_prompt_tuning_starts_from_the_init_text(llama_dir: Path, tokenizer: Any) -> None:
    from kubetune_trainer.modeling import apply_method, load_config, load_model

    cfg = TrainerConfig.model_validate(
        assets.trainer_config(
            llama_dir,
            llama_dir,
            llama_dir,
            method={"type": "prompt", "prompt": {"numVirtualTokens": 5, "initText": "apple river"}},
        )
    )
    model = apply_method(load_model(cfg, load_config(cfg.model), torch.device("cpu"), None), cfg, tokenizer)
    ids = tokenizer("apple river", add_special_tokens=False)["input_ids"]
    expected = model.get_input_embeddings().weight[(ids * 5)[:5]]
    assert torch.equal(model.prompt_encoder["default"].embedding.weight, expected)


def test_fp16_with_a_grad_scaler(tmp_path: Path, llama_dir: Path, train_jsonl: Path, rt: Runtime) -> None:
    train(
        tmp_path,
        llama_dir,
        train_jsonl,
        rt,
        training={"maxSteps": 12, "logEverySteps": 4, "precision": "fp16", "learningRate": 1e-2},
    )
    losses = logged_losses(tmp_path / "out")
    assert losses[-1] < losses[0] - 0.2, losses
    [last] = (tmp_path / "ckpt").glob("step-00000012-*")  # step-<step>-<lineage>
    scaler = torch.load(last / "scheduler.pt", weights_only=False)["scaler"]
    assert scaler["scale"] > 0  # the fp16 loss scale is checkpointed with the schedule


@pytest.mark.slow
def test_compiled_decoder_layers_train_like_eager(
    tmp_path: Path, llama_dir: Path, train_jsonl: Path, rt: Runtime
) -> None:
    training = {"maxSteps": 8, "logEverySteps": 4, "learningRate": 1e-2}
    train(tmp_path / "eager", llama_dir, train_jsonl, rt, training=training)
    train(tmp_path / "compiled", llama_dir, train_jsonl, rt, training={**training, "compile": True})
    eager, compiled = logged_losses(tmp_path / "eager" / "out"), logged_losses(tmp_path / "compiled" / "out")
    assert compiled == pytest.approx(eager, abs=1e-3)


def test_qlora_on_cpu_is_a_clear_permanent_error(tmp_path: Path, llama_dir: Path, train_jsonl: Path) -> None:
    cfg = assets.write_config(
        tmp_path, assets.trainer_config(tmp_path, llama_dir, train_jsonl, method={"type": "qlora"})
    )
    log = tmp_path / "termination-log"
    env = assets.worker_env(KUBETUNE_TERMINATION_LOG=str(log))
    done = subprocess.run(
        [sys.executable, "-m", "kubetune_trainer", "--config", str(cfg)], env=env, capture_output=True
    )
    assert done.returncode == 78
    assert log.read_text() == "method qlora needs a CUDA GPU (bitsandbytes 4-bit); this worker has none\n"


def test_unknown_target_module_is_a_permanent_error(
    tmp_path: Path, llama_dir: Path, train_jsonl: Path, rt: Runtime
) -> None:
    with pytest.raises(PermanentError, match=r"method lora: .*nope_proj"):
        train(tmp_path, llama_dir, train_jsonl, rt, method={"type": "lora", "lora": {"targetModules": ["nope_proj"]}})


def test_a_model_directory_that_does_not_load_is_permanent(tmp_path: Path, train_jsonl: Path, rt: Runtime) -> None:
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    with pytest.raises(PermanentError, match=r"model.source .*broken-model: cannot load the tokenizer"):
        train(tmp_path, broken, train_jsonl, rt)


def test_merge_of_prefix_tuning_is_refused(tmp_path: Path, llama_dir: Path, train_jsonl: Path, rt: Runtime) -> None:
    with pytest.raises(PermanentError, match="cannot be merged"):
        train(tmp_path, llama_dir, train_jsonl, rt, method={"type": "prefix"}, output={"mergeAdapter": True})


@pytest.mark.gpu
def test_qlora_trains_on_a_gpu(tmp_path: Path, llama_dir: Path, train_jsonl: Path) -> None:
    if not torch.cuda.is_available():
        pytest.skip("QLoRA needs a CUDA GPU")
    result = train(
        tmp_path,
        llama_dir,
        train_jsonl,
        init_runtime(),
        method={"type": "qlora", "lora": {"r": 8, "alpha": 16}},
        training={
            "learningRate": 1e-2,
            "maxSteps": 30,
            "batchSizePerDevice": 8,
            "logEverySteps": 10,
            "precision": "bf16",
        },
    )
    losses = logged_losses(tmp_path / "out")
    assert losses[-1] < losses[0] - 0.2, losses
    assert result["steps"] == 30
