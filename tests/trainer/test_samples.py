"""Samples on real training: the base and the fine-tuned model answer the same prompts greedily, side by side."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import trainer_assets as assets
from kubetune_trainer import samples
from kubetune_trainer.config import TrainerConfig
from kubetune_trainer.errors import PermanentError
from kubetune_trainer.train import run

pytestmark = [pytest.mark.trainer]

PROMPTS = [
    {"prompt": "repeat apple 3 times: ", "completion": "apple apple apple"},
    {"prompt": "repeat river 5 times: "},
    {
        "messages": [
            {"role": "user", "content": "repeat stone 2 times:"},
            {"role": "assistant", "content": "stone stone"},
        ]
    },
    {"text": "repeat cloud 4 times:"},
]


@pytest.mark.parametrize("method", ["lora", "full"])
def test_base_and_tuned_answers_differ_and_are_written_beside_the_output(
    tmp_path: Path, llama_dir: Path, train_jsonl: Path, method: str, caplog: pytest.LogCaptureFixture
) -> None:
    prompts = assets.write_jsonl(tmp_path / "prompts.jsonl", PROMPTS)
    cfg = assets.trainer_config(
        tmp_path,
        llama_dir,
        train_jsonl,
        method={"type": method},
        training={"maxSteps": 30, "learningRate": 3e-3 if method == "lora" else 1e-3},
        evaluation={"samples": {"path": str(prompts), "maxNewTokens": 12, "maxPrompts": 3}},
    )
    with caplog.at_level(logging.INFO, logger="kubetune_trainer.samples"):
        run(TrainerConfig.model_validate(cfg), assets.cpu_runtime())
    out = tmp_path / "out"
    found = [json.loads(line) for line in (out / samples.SAMPLES_FILE).read_text().splitlines()]
    assert [(r["row"], r["prompt"], r["reference"]) for r in found] == [
        (f"{prompts} row 1", "repeat apple 3 times: ", "apple apple apple"),
        (f"{prompts} row 2", "repeat river 5 times: ", None),
        (f"{prompts} row 3", "repeat stone 2 times:", "stone stone"),  # the last assistant turn is the reference
    ]
    assert all(r["base"] != r["tuned"] for r in found), found
    # the fine-tune learned the task: its answers speak of the word asked for; the random base model's do not
    assert sum(word in r["tuned"] for r, word in zip(found, ("apple", "river", "stone"), strict=True)) >= 2, found
    logged = [m.split(samples.SAMPLE_LOG_PREFIX, 1)[1] for m in caplog.messages if samples.SAMPLE_LOG_PREFIX in m]
    assert [json.loads(m) for m in logged] == found
    assert samples.SAMPLES_FILE in json.loads((out / "manifest.json").read_text())["outputs"]
    # greedy: the same model answers the same again
    again = assets.trainer_config(
        tmp_path / "again", llama_dir, train_jsonl, **{k: cfg[k] for k in ("method", "training", "evaluation")}
    )
    run(TrainerConfig.model_validate(again), assets.cpu_runtime())
    assert (tmp_path / "again" / "out" / samples.SAMPLES_FILE).read_text() == (out / samples.SAMPLES_FILE).read_text()


def test_a_prompt_of_no_known_shape_fails_before_training(tmp_path: Path, llama_dir: Path, train_jsonl: Path) -> None:
    prompts = assets.write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "fine"}, {"question": "what?"}])
    cfg = assets.trainer_config(tmp_path, llama_dir, train_jsonl, evaluation={"samples": {"path": str(prompts)}})
    with pytest.raises(PermanentError, match=r"samples .*prompts\.jsonl row 2: expected a prompt"):
        run(TrainerConfig.model_validate(cfg), assets.cpu_runtime())
    assert not (tmp_path / "ckpt").exists() or not any((tmp_path / "ckpt").rglob("step-*"))


def test_every_row_shape_becomes_a_prompt_as_training_renders_it() -> None:
    def of(value: dict[str, object], fmt: str = "messages", template: bool = True) -> samples.Prompt:
        return samples.prompt_of(value, fmt, template, "p.jsonl row 1")  # type: ignore[arg-type]

    chat = of({"prompt": "Hi?", "completion": "Hello."})
    assert (chat.messages, chat.text, chat.reference) == (({"role": "user", "content": "Hi?"},), None, "Hello.")
    plain = of({"prompt": "Q: 2+2=", "completion": "4"}, fmt="prompt_completion")
    assert (plain.messages, plain.text, plain.reference) == (None, "Q: 2+2=", "4")
    share = of({"conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hey."}]}, "sharegpt")
    assert (share.shown, share.messages, share.reference) == ("Hi?", ({"role": "user", "content": "Hi?"},), "Hey.")
    alpaca = of({"instruction": "Add", "input": "2 and 2", "output": "4"}, fmt="alpaca", template=False)
    assert alpaca.text is not None and alpaca.text.endswith("### Input:\n2 and 2\n\n### Response:\n")
    assert alpaca.reference == "4"
    with pytest.raises(PermanentError, match=r"p\.jsonl row 1: a conversation needs a chat template"):
        of({"messages": [{"role": "user", "content": "Hi?"}]}, template=False)
