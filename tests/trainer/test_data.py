"""Data loading, validation, rendering and the loss masks of every format."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trainer_assets as assets
from kubetune_trainer.config import DatasetConfig
from kubetune_trainer.data import IGNORE, prepare, shifted_labels, split_indices
from kubetune_trainer.errors import PermanentError

pytestmark = pytest.mark.trainer


def decode_targets(tok: Any, ids: np.ndarray, labels: np.ndarray) -> str:
    """The text the loss is computed on: the tokens that labels ask the model to predict."""
    return tok.decode([int(x) for x in labels if x != IGNORE])


def single(tmp_path: Path, tok: Any, fmt: str, row: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    data = assets.write_jsonl(tmp_path / "d.jsonl", [row])
    prepared = prepare(DatasetConfig(path=str(data), format=fmt, max_seq_length=512), tok, seed=0)
    return prepared.train.get(0)


def test_text_trains_on_everything_plus_eos(tmp_path: Path, tokenizer: Any) -> None:
    ids, labels = single(tmp_path, tokenizer, "text", {"text": "repeat apple 2 times: apple apple"})
    assert ids[-1] == tokenizer.eos_token_id
    # every token but the first is predicted, ending with EOS
    assert list(labels[:-1]) == list(ids[1:])
    assert labels[-1] == IGNORE


def test_prompt_completion_masks_the_prompt(tmp_path: Path, tokenizer: Any) -> None:
    ids, labels = single(
        tmp_path, tokenizer, "prompt_completion", {"prompt": "repeat river 2 times: ", "completion": "river river"}
    )
    # The prompt's trailing space merges into the first completion token, which is therefore predicted.
    assert decode_targets(tokenizer, ids, labels) == " river river<|eos|>"


@pytest.mark.parametrize(
    ("fmt", "row"),
    [
        ("messages", {"messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "repeat stone 1 times:"},
            {"role": "assistant", "content": "stone"},
            {"role": "user", "content": "again twice"},
            {"role": "assistant", "content": "stone stone"},
        ]}),
        ("sharegpt", {"conversations": [
            {"from": "system", "value": "be brief"},
            {"from": "human", "value": "repeat stone 1 times:"},
            {"from": "gpt", "value": "stone"},
            {"from": "human", "value": "again twice"},
            {"from": "gpt", "value": "stone stone"},
        ]}),
    ],
)  # fmt: skip
def test_chat_formats_train_on_assistant_turns_only(
    tmp_path: Path, tokenizer: Any, fmt: str, row: dict[str, Any]
) -> None:
    ids, labels = single(tmp_path, tokenizer, fmt, row)
    text = tokenizer.decode([int(x) for x in ids])
    assert text.startswith("<|bos|>system: be brief<|eos|><|bos|>user:")
    # Both assistant answers with their closing token, nothing from the system or user turns (the space
    # closing "assistant: " merges into the answer's first token).
    assert decode_targets(tokenizer, ids, labels) == " stone<|eos|> stone stone<|eos|>"


def test_alpaca_goes_through_the_chat_template(tmp_path: Path, tokenizer: Any) -> None:
    row = {"instruction": "repeat the word", "input": "cloud 2", "output": "cloud cloud"}
    ids, labels = single(tmp_path, tokenizer, "alpaca", row)
    assert tokenizer.decode([int(x) for x in ids]).startswith("<|bos|>user: repeat the word\n\ncloud 2<|eos|>")
    assert decode_targets(tokenizer, ids, labels) == " cloud cloud<|eos|>"


def test_alpaca_without_a_chat_template_uses_the_alpaca_prompt(tmp_path: Path, tokenizer: Any) -> None:
    tok = assets.make_tokenizer()
    tok.chat_template = None
    ids, labels = single(tmp_path, tok, "alpaca", {"instruction": "repeat the word", "output": "cloud cloud"})
    text = tok.decode([int(x) for x in ids])
    assert "### Instruction:\nrepeat the word" in text and "### Input" not in text
    assert decode_targets(tok, ids, labels) == "cloud cloud<|eos|>"


def test_messages_need_a_chat_template(tmp_path: Path) -> None:
    tok = assets.make_tokenizer()
    tok.chat_template = None
    with pytest.raises(PermanentError, match="needs a chat template"):
        single(tmp_path, tok, "messages", {"messages": [{"role": "assistant", "content": "x"}]})


BAD_ROWS = [
    ("prompt_completion", {"prompt": "a"}, 'field "completion" is missing'),
    ("prompt_completion", {"prompt": "a", "completion": 3}, 'field "completion" must be a string, got int'),
    ("text", {"text": "   "}, 'field "text" is empty'),
    ("text", ["not", "an", "object"], "a row must be a JSON object, got list"),
    ("messages", {"messages": [{"role": "user", "content": "hi"}]}, 'field "messages" has no assistant turn'),
    ("messages", {"messages": [{"role": "bot", "content": "hi"}]}, 'field "messages" item 1: role "bot" is not one of'),
    ("sharegpt", {"conversations": [{"from": "gpt"}]}, 'field "conversations" item 1: "value" is missing'),
    ("alpaca", {"instruction": "x", "output": None}, 'field "output" must be a string, got null'),
]


@pytest.mark.parametrize(("fmt", "bad", "message"), BAD_ROWS)
def test_a_bad_row_is_named_by_file_and_line(tmp_path: Path, tokenizer: Any, fmt: str, bad: Any, message: str) -> None:
    good = assets.rows(5, fmt)
    path = tmp_path / "train.jsonl"
    lines = [json.dumps(r) for r in good[:3]] + [""] + [json.dumps(bad)] + [json.dumps(r) for r in good[3:]]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(PermanentError) as err:
        prepare(DatasetConfig(path=str(path), format=fmt), tokenizer, seed=0)
    # Line 5: three good rows, one blank line, then the bad one.
    assert str(err.value).startswith(f"dataset {path} row 5: {message}")


def test_invalid_json_and_every_bad_row_counted(tmp_path: Path, tokenizer: Any) -> None:
    path = tmp_path / "train.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "broken"\n{"nope": 1}\n')
    with pytest.raises(PermanentError) as err:
        prepare(DatasetConfig(path=str(path), format="text"), tokenizer, seed=0)
    assert (
        str(err.value)
        == f"dataset {path} row 2: invalid JSON: Expecting ',' delimiter at column 18 (and 1 more bad rows)"
    )


def test_template_errors_name_the_row(tmp_path: Path) -> None:
    tok = assets.make_tokenizer()
    tok.chat_template = (
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first turn must be user') }}{% endif %}x"
    )
    rows = [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}] * 2
    rows.append({"messages": [{"role": "assistant", "content": "b"}]})
    path = assets.write_jsonl(tmp_path / "chat.jsonl", rows)
    with pytest.raises(PermanentError, match=r"row 3: chat template failed: first turn must be user"):
        prepare(DatasetConfig(path=str(path), format="messages"), tok, seed=0)


def write_all_kinds(root: Path) -> dict[str, Path]:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    items = assets.rows(30, "prompt_completion", seed=3)
    root.mkdir(parents=True, exist_ok=True)
    paths = {
        "jsonl": assets.write_jsonl(root / "a.jsonl", items),
        "json": root / "b.json",
        "json-lines": root / "c.json",
        "parquet": root / "d.parquet",
        "saved": root / "saved",
    }
    paths["json"].write_text(json.dumps(items))
    paths["json-lines"].write_text("".join(json.dumps(r) + "\n" for r in items))
    pq.write_table(pa.Table.from_pylist(items), paths["parquet"])
    datasets.Dataset.from_list(items).save_to_disk(str(paths["saved"]))
    return paths


def test_every_source_kind_reads_the_same_rows(tmp_path: Path, tokenizer: Any) -> None:
    paths = write_all_kinds(tmp_path / "kinds")
    results = {}
    for kind, path in paths.items():
        prepared = prepare(DatasetConfig(path=str(path), format="prompt_completion"), tokenizer, seed=0)
        results[kind] = prepared.train
        assert prepared.files[0].rows == 30 and len(prepared.files[0].sha256) == 64
    reference = results["jsonl"]
    for kind, samples in results.items():
        assert np.array_equal(samples.ids, reference.ids), kind
        assert np.array_equal(samples.labels, reference.labels), kind


def test_a_directory_reads_its_files_in_order(tmp_path: Path, tokenizer: Any) -> None:
    import datasets

    root = tmp_path / "dir"
    assets.write_jsonl(root / "b" / "part2.jsonl", assets.rows(4, "text", seed=2))
    assets.write_jsonl(root / "a" / "part1.jsonl", assets.rows(3, "text", seed=1))
    assets.write_jsonl(root / ".hidden" / "skip.jsonl", [{"bad": 1}])
    datasets.Dataset.from_list(assets.rows(2, "text", seed=3)).save_to_disk(str(root / "c_saved"))
    (root / "README.md").write_text("ignored")
    prepared = prepare(DatasetConfig(path=str(root), format="text"), tokenizer, seed=0)
    assert [Path(f.path).name for f in prepared.files] == ["part1.jsonl", "part2.jsonl", "c_saved"]
    assert len(prepared.train) == 9


def test_bad_row_in_parquet_is_named(tmp_path: Path, tokenizer: Any) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    items = [{"prompt": "p", "completion": "c"}] * 3 + [{"prompt": "p", "completion": None}]
    pq.write_table(pa.Table.from_pylist(items), tmp_path / "x.parquet")
    with pytest.raises(PermanentError, match=r"x.parquet row 4: field \"completion\" must be a string, got null"):
        prepare(DatasetConfig(path=str(tmp_path / "x.parquet"), format="prompt_completion"), tokenizer, seed=0)


def test_missing_dataset_is_permanent(tmp_path: Path, tokenizer: Any) -> None:
    with pytest.raises(PermanentError, match="no such file or directory"):
        prepare(DatasetConfig(path=str(tmp_path / "nope.jsonl")), tokenizer, seed=0)


def test_split_is_deterministic_and_disjoint() -> None:
    a_train, a_eval = split_indices(100, 0.1, seed=5)
    _, b_eval = split_indices(100, 0.1, seed=5)
    assert np.array_equal(a_eval, b_eval) and len(a_eval) == 10
    assert set(a_train) | set(a_eval) == set(range(100)) and not set(a_train) & set(a_eval)
    assert not np.array_equal(split_indices(100, 0.1, seed=6)[1], a_eval)
    assert len(split_indices(5, 0.01, seed=0)[1]) == 1


def test_truncation_and_samples_without_targets(tmp_path: Path, tokenizer: Any) -> None:
    long_prompt = "repeat " * 60
    items = [{"prompt": long_prompt, "completion": "x"}, {"prompt": "p ", "completion": "apple " * 40}]
    path = assets.write_jsonl(tmp_path / "t.jsonl", items)
    prepared = prepare(DatasetConfig(path=str(path), format="prompt_completion", max_seq_length=32), tokenizer, seed=0)
    # The first loses its whole completion to truncation and is dropped; the second is cut to 32 tokens.
    assert len(prepared.train) == 1 and prepared.train.dropped == 1 and prepared.train.truncated == 2
    ids, labels = prepared.train.get(0)
    assert len(ids) == 32 and labels[-1] == IGNORE


def test_shifted_labels() -> None:
    ids = np.array([5, 6, 7, 8], dtype=np.int32)
    target = np.array([False, False, True, True])
    assert shifted_labels(ids, target).tolist() == [IGNORE, 7, 8, IGNORE]
