"""Named evaluation sets on real training: a set from another domain measures forgetting against the base model.

The base model is a tiny Llama that first learns domain B (spelling words letter by letter) with the trainer itself
(full fine-tuning); it is then fine-tuned on domain A (repeating words) with domain B as an evaluation set. A high
learning rate makes it forget B far more than a low one, and the operator's gate (from rank 0's final message, as
the operator reads it) fails the forgetting run naming the set and its figures.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import pytest
import trainer_assets as assets
from kubetune_operator.api.spec import Evaluation, EvaluationSet
from kubetune_operator.observed import parse_final_report
from kubetune_operator.policies import eval_gate
from kubetune_operator.reconcile import final_progress
from kubetune_trainer import evalsets
from kubetune_trainer.config import TrainerConfig
from kubetune_trainer.errors import final_message
from kubetune_trainer.train import run

pytestmark = [pytest.mark.trainer, pytest.mark.slow]


def spelling_rows(n: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    return [{"prompt": f"spell {w}: ", "completion": " ".join(w)} for w in (rng.choice(assets.WORDS) for _ in range(n))]


@pytest.fixture(scope="module")
def speller(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(a model that spells words, held-out spelling rows): the base model of the fine-tunes below."""
    tmp = tmp_path_factory.mktemp("speller")
    random_model = assets.make_model_dir(tmp / "random")
    data = assets.write_jsonl(tmp / "spell.jsonl", spelling_rows(200, seed=1))
    cfg = assets.trainer_config(
        tmp / "pretrain",
        random_model,
        data,
        dataset={"evalSplit": 0.0},
        method={"type": "full"},
        training={"maxSteps": 60, "learningRate": 3e-3, "batchSizePerDevice": 8},
        checkpoint={"dir": str(tmp / "pretrain" / "ckpt"), "everySteps": 1000},
    )
    run(TrainerConfig.model_validate(cfg), assets.cpu_runtime())
    return tmp / "pretrain" / "out", assets.write_jsonl(tmp / "held-out.jsonl", spelling_rows(24, seed=2))


def fine_tune(tmp: Path, base: Path, ood: Path, train_jsonl: Path, lr: float) -> dict[str, Any]:
    cfg = assets.trainer_config(
        tmp,
        base,
        train_jsonl,
        method={"type": "full"},
        training={"maxSteps": 16, "learningRate": lr, "evalEverySteps": 8, "warmupRatio": 0.0},
        evaluation={"sets": [{"name": "spelling", "path": str(ood)}]},
    )
    return run(TrainerConfig.model_validate(cfg), assets.cpu_runtime())


def records(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_high_learning_rate_forgets_the_other_domain_and_the_gate_fails_the_run(
    tmp_path: Path, speller: tuple[Path, Path], train_jsonl: Path
) -> None:
    base, ood = speller
    gentle = fine_tune(tmp_path / "gentle", base, ood, train_jsonl, lr=1e-4)
    harsh = fine_tune(tmp_path / "harsh", base, ood, train_jsonl, lr=2e-2)

    # Every evaluation, the base model's (step 0) included, measured the set.
    evals = [r for r in records(tmp_path / "harsh" / "out") if "evalSets" in r]
    assert [r["step"] for r in evals] == [0, 8, 16]
    base_loss = evals[0]["evalSets"]["spelling"]["loss"]
    assert evals[0]["evalSets"]["spelling"]["baseLoss"] == base_loss and evals[0]["evalSets"]["spelling"]["change"] == 0
    assert 0 < base_loss < 2  # the speller knows its domain (a random model: ln 384 ~ 5.95)
    assert evals[0]["evalLoss"] > evals[-1]["evalLoss"]  # and learns the new one

    g, h = gentle["evalSets"]["spelling"], harsh["evalSets"]["spelling"]
    print(
        f"spelling set: base loss {base_loss:.4f}; after lr 1e-4: {g['loss']:.4f} ({100 * g['change']:+.1f}%), "
        f"after lr 2e-2: {h['loss']:.4f} ({100 * h['change']:+.1f}%)"
    )
    assert g["baseLoss"] == h["baseLoss"] == pytest.approx(base_loss)
    assert h["change"] > 0.5 and h["change"] > 5 * max(g["change"], 0.01), (g, h)
    assert h["perplexity"] == pytest.approx(math.exp(h["loss"]))
    manifest = json.loads((tmp_path / "harsh" / "out" / "manifest.json").read_text())
    assert manifest["finalMetrics"]["evalSets"]["spelling"] == h

    # The operator judges rank 0's final message: the forgetting run fails, naming the set and the figures.
    evaluation = Evaluation(sets=[EvaluationSet(name="spelling", source="pvc://data/spell.jsonl", max_increase=0.25)])
    verdicts = {}
    for name, final in (("gentle", gentle), ("harsh", harsh)):
        report = parse_final_report(final_message(evalsets.message_figures(final), "/out"))
        assert report is not None
        progress = final_progress(report, None, None)
        verdicts[name] = eval_gate(evaluation, progress.eval_loss, progress.eval_sets)
    assert verdicts["gentle"] is None
    message = verdicts["harsh"]
    assert message is not None and message.startswith("evaluation set spelling: final loss ")
    # The figures as the termination message carries them (4 decimals).
    loss, base_loss = round(h["loss"], 4), round(h["baseLoss"], 4)
    assert f"final loss {loss:.4g} is {100 * (loss - base_loss) / base_loss:.1f}% above the base model's " in message
    assert f"base model's {base_loss:.4g};" in message
    assert message.endswith("evaluation.sets[spelling].maxIncrease is 0.25 (25%)")


def test_a_set_alone_is_evaluated_and_a_bad_row_is_named(tmp_path: Path, llama_dir: Path, train_jsonl: Path) -> None:
    ood = assets.write_jsonl(tmp_path / "ood.jsonl", spelling_rows(6, seed=3))
    cfg = assets.trainer_config(
        tmp_path,
        llama_dir,
        train_jsonl,
        dataset={"evalSplit": 0.0},
        training={"maxSteps": 4},
        evaluation={"sets": [{"name": "spelling", "path": str(ood)}]},
    )
    result = run(TrainerConfig.model_validate(cfg), assets.cpu_runtime())
    assert result["evalLoss"] is None and result["baseEvalLoss"] is None
    assert set(result["evalSets"]) == {"spelling"} and result["evalSets"]["spelling"]["baseLoss"] > 0

    bad = assets.write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "spell x: ", "completion": "x"}, {"prompt": "y"}])
    cfg["evaluation"] = {"sets": [{"name": "broken", "path": str(bad)}]}
    cfg["output"] = {"dir": str(tmp_path / "out2")}
    cfg["checkpoint"]["dir"] = str(tmp_path / "ckpt2")
    from kubetune_trainer.errors import PermanentError

    with pytest.raises(PermanentError, match=r'bad\.jsonl row 2: field "completion" is missing'):
        run(TrainerConfig.model_validate(cfg), assets.cpu_runtime())
