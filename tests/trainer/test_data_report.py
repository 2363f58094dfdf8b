"""The data report before training, on real data files: rows, tokens, lengths, truncation, skipped rows, exact and
near duplicates, leakage into the evaluation data; and the checks that stop a run before training (exit 78)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trainer_assets as assets
from kubetune_trainer import datareport
from kubetune_trainer.config import DataChecks, TrainerConfig
from kubetune_trainer.errors import EXIT_CONFIG, PermanentError
from kubetune_trainer.train import run

pytestmark = [pytest.mark.trainer]


def dirty_rows() -> list[dict[str, str]]:
    """Training rows with known faults, by 1-based line number."""
    words, repeats = assets.WORDS, (5, 11)  # every (word, repeats) once: no row is like another by chance
    rows = [
        {"prompt": f"repeat {words[i % 20]} {repeats[i // 20]} times: ", "completion": " ".join([words[i % 20]] * 5)}
        for i in range(40)
    ]
    rows[9] = {"prompt": rows[2]["prompt"].upper(), "completion": rows[2]["completion"] + "!"}  # line 10 = line 3
    rows[19] = {**rows[4], "completion": rows[4]["completion"] + " too"}  # line 20: nearly line 5
    long_story = " ".join(assets.WORDS * 3)
    rows[24] = {"prompt": f"tell a story about {long_story}: ", "completion": "ok"}  # line 25: no target left
    rows[29] = {"prompt": "list the words: ", "completion": long_story}  # line 30: truncated
    return rows


def eval_rows() -> list[dict[str, str]]:
    clean = [{"prompt": f"spell {w}: ", "completion": " ".join(w)} for w in assets.WORDS[:6]]
    train = dirty_rows()
    return [*clean[:3], dict(train[6]), *clean[3:]]  # line 4: line 7 of the training data


def test_report_names_duplicate_leaking_truncated_and_skipped_rows(tmp_path: Path, llama_dir: Path) -> None:
    data = assets.write_jsonl(tmp_path / "train.jsonl", dirty_rows())
    held_out = assets.write_jsonl(tmp_path / "eval.jsonl", eval_rows())
    cfg = assets.trainer_config(
        tmp_path, llama_dir, data, dataset={"evalPath": str(held_out), "evalSplit": 0.0, "maxSeqLength": 48}
    )
    result = run(TrainerConfig.model_validate(cfg), assets.cpu_runtime())
    report = json.loads((tmp_path / "out" / "data-report.json").read_text())
    train, held = report["train"], report["evaluation"]["heldOut"]
    line = lambda path, n: f"{path} row {n}"  # noqa: E731
    assert train["rows"] == 40 and train["tokens"] > 0
    assert train["length"]["p50"] <= train["length"]["p90"] <= train["length"]["p99"] <= train["length"]["max"]
    assert train["duplicates"]["exact"] == [[line(data, 3), line(data, 10)]]
    assert [g["rows"] for g in train["duplicates"]["near"]] == [[line(data, 5), line(data, 20)]]
    assert train["skipped"] == [{"row": line(data, 25), "reason": "no target token within maxSeqLength 48"}]
    assert line(data, 30) in train["truncated"] and line(data, 25) in train["truncated"]
    assert held["leaked"] == [{"row": line(held_out, 4), "trainingRow": line(data, 7), "similarity": 1.0}]
    assert result["dataReport"] == datareport.summary(report)
    assert result["dataReport"]["exactDuplicateRows"] == 1 and result["dataReport"]["leakedRows"] == 1
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert "data-report.json" in manifest["outputs"]


def test_checks_stop_before_training_naming_the_rows(tmp_path: Path, llama_dir: Path) -> None:
    data = assets.write_jsonl(tmp_path / "train.jsonl", dirty_rows())
    held_out = assets.write_jsonl(tmp_path / "eval.jsonl", eval_rows())
    cfg = assets.trainer_config(
        tmp_path,
        llama_dir,
        data,
        dataset={"evalPath": str(held_out), "evalSplit": 0.0, "maxSeqLength": 48},
        evaluation={"dataChecks": {"failOnLeakage": True, "maxTruncatedFraction": 0.01}},
    )
    path = assets.write_config(tmp_path, cfg)
    proc = subprocess.run(
        [sys.executable, "-m", "kubetune_trainer", "--config", str(path)],
        env=assets.worker_env(KUBETUNE_TERMINATION_LOG=str(tmp_path / "termination-log")),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == EXIT_CONFIG, proc.stderr[-3000:]
    reason = (tmp_path / "termination-log").read_text()
    assert reason.startswith(
        "the data fails evaluation.dataChecks (see data-report.json): 2 of 40 training rows (5.0%) are longer than "
        "maxSeqLength 48"
    )
    assert f"{data} row 25, {data} row 30" in reason
    assert (
        "1 held-out evaluation rows also appear in the training data (evaluation.dataChecks.failOnLeakage): " in reason
    )
    assert f"{held_out} row 4 (= {data} row 7)" in reason
    assert not (tmp_path / "ckpt").exists() or not any((tmp_path / "ckpt").rglob("step-*"))  # nothing trained


def rows_of(texts: list[str]) -> list[datareport.Row]:
    return [datareport.Row(f"f row {i + 1}", t, len(t.split()), True) for i, t in enumerate(texts)]


def test_near_duplicates_need_most_of_the_words_in_common() -> None:
    base = (
        "the quick brown fox jumps over the lazy dog near the river bank at dawn every single day while the farmer "
        "counts his sheep and the baker sells warm bread to the people of the small town by the hill"
    )
    texts = [
        base,
        base.replace("dawn", "dusk"),  # one word of 40 changed: near (word 3-grams in common: 35 of 41)
        base.upper() + "!!",  # the same once normalised: exact
        "a completely different sentence about cooking pasta with garlic olive oil and fresh basil leaves",
        " ".join(base.split()[:9]) + " while the cat sleeps on a warm windowsill all afternoon long",  # half: not near
    ]
    d = datareport.duplicates(rows_of(texts))
    assert d["exact"] == [["f row 1", "f row 3"]]
    assert [g["rows"] for g in d["near"]] == [["f row 1", "f row 2"]] and 0.8 <= d["near"][0]["similarity"] < 1


def test_problems_are_empty_when_the_checks_pass() -> None:
    report = datareport.build(rows_of(["a b c d", "e f g h"]), {"heldOut": rows_of(["i j k l"])}, max_len=16)
    assert datareport.problems(report, DataChecks(fail_on_leakage=True, max_truncated_fraction=0.0)) == []
    assert report["evaluation"]["heldOut"]["leakedRows"] == 0


def test_a_missing_row_error_is_still_the_preparations(tmp_path: Path, llama_dir: Path) -> None:
    data = assets.write_jsonl(tmp_path / "train.jsonl", [{"prompt": "x"}])
    cfg: dict[str, Any] = assets.trainer_config(tmp_path, llama_dir, data)
    with pytest.raises(PermanentError, match='row 1: field "completion" is missing'):
        run(TrainerConfig.model_validate(cfg), assets.cpu_runtime())


def test_thousands_of_look_alike_rows_form_one_group_without_comparing_every_pair() -> None:
    import time

    shared = " ".join(f"word{i}" for i in range(60))
    rows = rows_of([f"{shared} ticket {i}" for i in range(3000)])
    started = time.monotonic()
    d = datareport.duplicates(rows)
    assert (d["nearGroups"], d["nearRows"], d["exactRows"]) == (1, 2999, 0)
    assert time.monotonic() - started < 60  # all 4.5 million pairs would take far longer
