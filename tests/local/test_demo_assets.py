"""What `make demo` ships and renders, checked without running it: the dataset against SmolLM2's own chat
template, and the operator settings taken from the Helm chart."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from kubetune_dev import demo
from kubetune_operator.settings import load_settings
from kubetune_trainer.data import load_rendered


def rows(path: Path) -> list[tuple[str, str]]:
    out = []
    for line in path.read_text().splitlines():
        user, assistant = json.loads(line)["messages"]
        assert (user["role"], assistant["role"]) == ("user", "assistant")
        out.append((user["content"], assistant["content"]))
    return out


def test_the_held_out_questions_are_new_and_their_answers_are_taught() -> None:
    train, heldout = rows(demo.TRAIN_DATA), rows(demo.HELDOUT_DATA)
    assert len(train) >= 200 and len(heldout) >= 20
    assert not {q for q, _ in heldout} & {q for q, _ in train}
    assert {a for _, a in heldout} <= {a for _, a in train}  # each held-out question is about a trained fact
    assert demo.sample_questions() == heldout[: demo.SAMPLE_QUESTIONS]


@pytest.mark.trainer
def test_every_row_renders_with_smollm2s_chat_template_within_the_sequence_length() -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo.gguf_package_dir(), gguf_file=demo.GGUF_FILE)
    max_length = yaml.safe_load(demo.EXAMPLE.read_text())["spec"]["dataset"]["maxSeqLength"]
    for path in (demo.TRAIN_DATA, demo.HELDOUT_DATA):
        rendered, _ = load_rendered(str(path), "messages", tokenizer)
        lengths = [len(tokenizer(r.text, add_special_tokens=False)["input_ids"]) for r in rendered]
        assert len(rendered) == len(rows(path)) and max(lengths) <= max_length


def test_the_operator_settings_come_from_the_chart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(demo, "STATE", tmp_path)
    settings_file = tmp_path / "settings.yaml"
    settings_file.write_text(yaml.safe_dump(demo.chart_settings()))
    settings = load_settings(settings_file)
    assert settings.namespaces == [demo.NAMESPACE]
    assert settings.progress_poll_interval_seconds == 5
    assert 0 < settings.health_port != 8080 and 0 < settings.metrics_port != 9090  # free ports, not the chart's
