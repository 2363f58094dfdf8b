"""What `make demo` ships and renders, checked without running it: the dataset against SmolLM2's own chat
template, the chart values it installs the operator with, and the job's placement on the real nodes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from chart_support import of_kind, one, render, settings_of
from kubetune_dev import demo
from kubetune_dev.images import Image
from kubetune_dev.realnodes import NODE_SELECTOR, NODE_TOLERATION, operator_values
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


def test_the_job_evaluates_itself_on_everyday_questions_and_answers_held_out_ones() -> None:
    train, general = rows(demo.TRAIN_DATA), rows(demo.GENERAL_DATA)
    assert len(general) >= 20 and not {q for q, _ in general} & {q for q, _ in train}
    assert not any("Lumaquill" in q + a for q, a in general)  # another domain than the training data
    evaluation = yaml.safe_load(demo.EXAMPLE.read_text())["spec"]["evaluation"]
    claim_path = f"pvc://datasets/{demo.DATASET_DIR}/"
    assert [s["source"] for s in evaluation["sets"]] == [claim_path + "general.jsonl"]
    assert evaluation["samples"]["source"] == claim_path + "heldout.jsonl"  # questions it never trains on


@pytest.mark.trainer
def test_every_row_renders_with_smollm2s_chat_template_within_the_sequence_length() -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo.gguf_package_dir(), gguf_file=demo.GGUF_FILE)
    max_length = yaml.safe_load(demo.EXAMPLE.read_text())["spec"]["dataset"]["maxSeqLength"]
    for path in (demo.TRAIN_DATA, demo.HELDOUT_DATA):
        rendered, _ = load_rendered(str(path), "messages", tokenizer)
        lengths = [len(tokenizer(r.text, add_special_tokens=False)["input_ids"]) for r in rendered]
        assert len(rendered) == len(rows(path)) and max(lengths) <= max_length


def test_the_chart_installs_the_demos_operator_from_this_checkouts_images(tmp_path: Path) -> None:
    images = {t: Image(t, f"key-{t}") for t in ("operator", "trainer")}
    values = operator_values(images, [demo.NAMESPACE], demo.CHART_VALUES)
    docs = render([values], tmp=tmp_path)
    settings = settings_of(docs)
    assert settings["namespaces"] == [demo.NAMESPACE]
    assert settings["progressPollIntervalSeconds"] == 5
    assert settings["images"] == dict.fromkeys(("peft", "full"), "kubetune.local/kubetune/kubetune-trainer:key-trainer")
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert pod["containers"][0]["image"] == "kubetune.local/kubetune/kubetune-operator:key-operator"
    assert pod["nodeSelector"] == {"kubetune.io/real-node": "true"}
    assert not of_kind(docs, "CustomResourceDefinition")  # the demo applies the CRD apart


def test_the_demo_job_runs_on_the_real_nodes() -> None:
    resources = yaml.safe_load(demo.EXAMPLE.read_text())["spec"]["resources"]
    assert resources["nodeSelector"] == NODE_SELECTOR and resources["tolerations"] == [NODE_TOLERATION]


# The highest memory use of a demo worker measured under its cgroup on a real node (`make demo` prints it; page
# cache included): 2.86 GiB in this project's runs, 3.5 GiB in an earlier one; 3Gi was OOM-killed near step 43.
MEASURED_PEAK_BYTES = 3.5 * 2**30
HEADROOM = 1.4


def test_the_demo_workers_memory_holds_the_peak_measured_on_a_real_node_with_headroom() -> None:
    memory = yaml.safe_load(demo.EXAMPLE.read_text())["spec"]["resources"]["memory"]
    number, unit = memory[:-2], memory[-2:]
    assert unit == "Gi", memory
    assert float(number) * 2**30 >= MEASURED_PEAK_BYTES * HEADROOM
