"""Small pure pieces: config loading, exit reporting, MFU arithmetic, the learning-rate schedule."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from kubetune_trainer import errors
from kubetune_trainer.config import MethodConfig, TrainerConfig, load_config
from kubetune_trainer.mfu import flops_per_token, mfu, peak_flops
from kubetune_trainer.modeling import count_params, uses_fsdp
from kubetune_trainer.optim import lr_factor

pytestmark = pytest.mark.trainer

MINIMAL = {
    "model": {"source": "/models/base"},
    "dataset": {"path": "/data/train.jsonl"},
    "checkpoint": {"dir": "/ckpt"},
    "output": {"dir": "/out"},
}


def test_config_round_trips_in_camel_case(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps({**MINIMAL, "training": {"maxSteps": 5, "learningRate": 1e-4}}))
    cfg = load_config(str(path))
    assert cfg.training.max_steps == 5 and cfg.method.type == "lora" and cfg.metrics.port == 9400
    dumped = json.loads(cfg.dump())
    assert dumped["training"]["maxSteps"] == 5 and dumped["dataset"]["maxSeqLength"] == 2048
    assert TrainerConfig.model_validate(dumped) == cfg


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{", "not valid JSON"),
        (
            json.dumps({**MINIMAL, "training": {"learningRate": 0}}),
            "training.learningRate: Input should be greater than 0",
        ),
        (json.dumps({**MINIMAL, "method": {"type": "lora", "typo": 1}}), "method.typo: Extra inputs are not permitted"),
    ],
)
def test_config_errors_are_permanent_one_liners(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "c.json"
    path.write_text(text)
    with pytest.raises(errors.PermanentError, match=message):
        load_config(str(path))
    with pytest.raises(errors.PermanentError, match="no such file"):
        load_config(str(tmp_path / "missing.json"))


def test_report_exit_goes_to_the_launcher_or_the_termination_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = tmp_path / "termination-log"
    monkeypatch.setenv(errors.TERMINATION_LOG_ENV, str(log))
    monkeypatch.delenv(errors.EXIT_STATUS_DIR_ENV, raising=False)
    errors.report_exit(78, "dataset x row 2:\n  bad")
    assert log.read_text() == "dataset x row 2: bad\n"
    status = tmp_path / "status"
    status.mkdir()
    monkeypatch.setenv(errors.EXIT_STATUS_DIR_ENV, str(status))
    monkeypatch.setenv("RANK", "3")
    errors.report_exit(143, "stopped")
    assert errors.read_exit_statuses(status) == [(143, "stopped")]
    monkeypatch.setenv(errors.TERMINATION_LOG_ENV, str(tmp_path / "no" / "such" / "dir"))
    errors.write_termination_log("not writable: silently skipped")


def test_the_final_message_is_one_bounded_json_line() -> None:
    metrics = {"steps": 120, "trainLoss": 1.25, "evalLoss": float("nan"), "tokensTotal": 98304, "epochs": 2.0}
    message = errors.final_message(metrics, "/kubetune/output/runs/3")
    assert "\n" not in message and " " not in message and errors.one_line(message) == message
    assert json.loads(message) == {
        "finalMetrics": {"steps": 120, "trainLoss": 1.25, "evalLoss": None, "tokensTotal": 98304, "epochs": 2.0},
        "output": "/kubetune/output/runs/3",
    }
    long_path = errors.final_message(metrics, "/x" * 600)  # would not fit: the path is left out, the figures stay
    assert len(long_path) <= errors.MESSAGE_LIMIT and json.loads(long_path)["finalMetrics"]["steps"] == 120


def test_report_final_goes_to_the_launcher_or_the_termination_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = tmp_path / "termination-log"
    monkeypatch.setenv(errors.TERMINATION_LOG_ENV, str(log))
    monkeypatch.delenv(errors.EXIT_STATUS_DIR_ENV, raising=False)
    errors.report_final('{"finalMetrics":{"steps":3}}')
    assert log.read_text() == '{"finalMetrics":{"steps":3}}\n'
    status = tmp_path / "status"
    status.mkdir()
    assert errors.read_final(status) is None
    monkeypatch.setenv(errors.EXIT_STATUS_DIR_ENV, str(status))
    errors.report_final('{"finalMetrics":{"steps":4}}')
    assert errors.read_final(status) == '{"finalMetrics":{"steps":4}}'
    assert errors.read_exit_statuses(status) == []  # a success is no exit status to choose from


def llama_8b_counts() -> object:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return count_params(model, model, is_peft=False)


def test_mfu_matches_the_published_llama_8b_figures() -> None:
    c = llama_8b_counts()
    assert c.total == 8_030_261_248 and c.matmul == c.total - 128256 * 4096  # untied head counted, embedding not
    assert (c.layers, c.attention_width) == (32, 4096)
    h100 = peak_flops("NVIDIA H100 80GB HBM3")
    # torchtitan, full fine-tuning, seq 8192, 5,762 tokens/s per H100: about 33.7%.
    full = flops_per_token(c.matmul, c.layers, c.attention_width, 8192, peft=False)
    assert mfu(full, 5762, h100) == pytest.approx(0.337, abs=0.002)
    # LoRA r16 on every linear layer (41.9M adapter parameters), seq 1024, 9,621 tokens/s: the reference notes
    # give 30.8% from 4N alone; the 6 N_adapter term adds 0.2 points.
    lora = flops_per_token(c.matmul, c.layers, c.attention_width, 1024, peft=True, adapter_params=41_943_040)
    assert mfu(lora, 9621, h100) == pytest.approx(0.310, abs=0.001)
    assert mfu(lora - 6 * 41_943_040, 9621, h100) == pytest.approx(0.308, abs=0.001)


def test_tied_head_is_counted_once_as_a_matmul(qwen2_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(qwen2_dir)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    counts = count_params(model, model, is_peft=False)
    assert counts.matmul == counts.total


def test_peak_flops_table() -> None:
    assert peak_flops("NVIDIA H200") == 989e12
    assert peak_flops("NVIDIA H100 NVL") == 835e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("Tesla T4") is None
    assert mfu(1e9, 1e3, None) == 0.0


def test_schedules_warm_up_then_follow_their_shape() -> None:
    assert [round(lr_factor(s, 4, 20, "cosine"), 3) for s in (0, 3, 4, 12, 20)] == [0.2, 0.8, 1.0, 0.5, 0.0]
    assert [lr_factor(s, 0, 10, "linear") for s in (0, 5, 10)] == [1.0, 0.5, 0.0]
    assert {lr_factor(s, 2, 10, "constant") for s in range(2, 10)} == {1.0}


def test_evaluation_set_figures_against_the_base_model() -> None:
    from kubetune_trainer import evalsets

    figures = evalsets.figures({"general": 2.31, "code": 1.5}, {"general": 2.1})
    assert figures["general"]["change"] == pytest.approx(0.1)
    assert figures["general"]["perplexity"] == pytest.approx(10.0744, abs=1e-4)
    assert figures["code"] == {
        "loss": 1.5,
        "perplexity": pytest.approx(4.4817, abs=1e-4),
        "baseLoss": None,
        "change": None,
    }
    assert evalsets.change(float("nan"), 2.0) is None and evalsets.change(1.0, 0.0) is None
    assert evalsets.perplexity(1000.0) == pytest.approx(5.184705528587072e21)  # capped at e^50, still a number
    assert evalsets.compact(
        {"general": {**figures["general"], "loss": 2.312345678}, "nan": {"loss": float("nan")}}
    ) == {
        "general": {"loss": 2.3123, "baseLoss": 2.1},
        "nan": {"loss": None, "baseLoss": None},
    }


def test_the_final_message_holds_the_most_evaluation_sets_the_api_allows() -> None:
    from kubetune_trainer import evalsets
    from kubetune_trainer.config import MAX_EVAL_SETS

    sets = {
        f"{i}-{'x' * 30}": {"loss": 12.345678, "perplexity": 2e5, "baseLoss": 10.123456, "change": 0.22}
        for i in range(MAX_EVAL_SETS)
    }
    final = {
        "steps": 123456,
        "trainLoss": 1.2345678901234567,
        "evalLoss": 1.2345678901234567,
        "evalPerplexity": 3.4567890123456789,
        "baseEvalLoss": 2.3456789012345678,
        "tokensTotal": 123456789012,
        "trainSeconds": 123456.789,
        "tokensPerSecond": 12345.678901234567,
        "epochs": 3.0,
        "evalSets": sets,
    }
    message = errors.final_message(evalsets.message_figures(final), "/kubetune/output/" + "d" * 100)
    assert len(message) <= errors.MESSAGE_LIMIT
    assert json.loads(message)["finalMetrics"]["evalSets"][f"7-{'x' * 30}"] == {"loss": 12.3457, "baseLoss": 10.1235}


def test_evaluation_set_names_are_checked_and_unique() -> None:
    from kubetune_trainer.config import EvaluationConfig
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="evaluation set name 'Chat_1': use a-z, 0-9 and '-'"):
        EvaluationConfig.model_validate({"sets": [{"name": "Chat_1", "path": "/d"}]})
    with pytest.raises(ValidationError, match="evaluation set names must be unique: chat given more than once"):
        EvaluationConfig.model_validate({"sets": [{"name": "chat", "path": "/a"}, {"name": "chat", "path": "/b"}]})


GIB = 2**30


@pytest.mark.parametrize(
    ("method", "world", "weights", "device", "fsdp"),
    [
        ({"type": "full"}, 8, 1 * GIB, 80 * GIB, True),  # full: sharded whenever there are several processes
        ({"type": "full"}, 1, 100 * GIB, 80 * GIB, False),
        ({"type": "full", "full": {"sharding": "ddp"}}, 8, 1 * GIB, 80 * GIB, False),
        ({"type": "lora"}, 8, 16 * GIB, 80 * GIB, False),  # an 8B bf16 base fits: DDP, no all-gathers
        ({"type": "lora"}, 8, 64 * GIB, 80 * GIB, True),  # a 32B bf16 base leaves too little room: FSDP2
        ({"type": "qlora"}, 8, 39 * GIB, 80 * GIB, False),  # a 70B 4-bit base fits
        ({"type": "ia3"}, 8, 64 * GIB, None, False),  # on CPUs there is no device to outgrow
        ({"type": "lora", "lora": {"sharding": "fsdp"}}, 2, 1, None, True),
        ({"type": "ia3", "ia3": {"sharding": "ddp"}}, 8, 140 * GIB, 80 * GIB, False),
        ({"type": "prompt"}, 8, 140 * GIB, 80 * GIB, False),  # virtual tokens are always replicated
        ({"type": "lora", "lora": {"sharding": "fsdp"}}, 1, 1, None, False),
    ],
)
def test_sharding_auto_shards_a_peft_base_only_when_it_outgrows_half_a_device(
    method: dict[str, object], world: int, weights: int, device: int | None, fsdp: bool
) -> None:
    assert uses_fsdp(MethodConfig.model_validate(method), world, weights, device) is fsdp
