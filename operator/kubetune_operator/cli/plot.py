"""`kubectl finetune plot`: training and evaluation loss curves as a PNG.

Points come from the job's status (status.progress.history: rank 0's bounded `history`, [{step, loss,
evalLoss?}], as the operator copies it) or from a run's output directory (`metrics.jsonl`, one record per log
step: {step, loss, ...} or {step, evalLoss, ...}). Both have the same record shape, so one reader serves both.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from kubetune_operator.cli.errors import CliError

METRICS_FILE = "metrics.jsonl"  # as the trainer writes it (kubetune_trainer.export, which imports torch)
Points = list[tuple[int, float]]


def curves(records: Iterable[Mapping[str, Any]]) -> tuple[Points, Points]:
    """(train loss, eval loss) points by step; a later record for the same step wins (a resumed run logs again)."""
    train: dict[int, float] = {}
    evaluation: dict[int, float] = {}
    for record in records:
        step = record.get("step")
        if not isinstance(step, int):
            continue
        for key, into in (("loss", train), ("evalLoss", evaluation)):
            value = record.get(key)
            if isinstance(value, int | float) and math.isfinite(value):
                into[step] = float(value)
    return sorted(train.items()), sorted(evaluation.items())


def read_metrics(directory: Path) -> list[dict[str, Any]]:
    path = directory / METRICS_FILE
    try:
        text = path.read_text()
    except OSError as e:
        raise CliError(f"cannot read {path} ({e.strerror}): --from-dir takes a run's output directory") from e
    records = []
    for line in text.splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue  # the last line of a killed run can be cut short
    return records


def render(train: Points, evaluation: Points, title: str, out: Path) -> None:
    if not train and not evaluation:
        raise CliError("no loss values to plot yet")
    try:
        import matplotlib
    except ImportError as e:  # an optional dependency: only `plot` needs it
        raise CliError("plot needs matplotlib: pip install matplotlib") from e
    matplotlib.use("Agg")  # no display needed; set before pyplot is imported
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss")
    if evaluation:
        ax.plot(*zip(*evaluation, strict=True), marker="o", label="eval loss")
    ax.set(xlabel="step", ylabel="loss", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
