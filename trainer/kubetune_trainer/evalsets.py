"""Named evaluation sets: rows measured before training (the base model) and at every evaluation.

A set from another domain than the training data measures forgetting: a fine-tune that gets better at its task
and worse at everything else shows it as a rising loss on that set. Each set's figures at an evaluation are its
loss (mean cross-entropy over its target tokens), perplexity, and, once the base model was measured, the base
loss and the relative change against it: (loss - base) / base, so 0.1 means 10% worse than the base model.

The pure functions here shape those figures for the progress document, the metrics log and the manifest (the
operator uses them too, so this module imports no numpy or torch at module level); the training loop (train.py)
measures them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .config import DatasetConfig, EvalSetConfig
from .errors import PermanentError

if TYPE_CHECKING:
    from .data import Samples, SourceFile

# A perplexity past e^50 says only "diverged"; the cap keeps it a finite JSON number.
MAX_LOG_PERPLEXITY = 50.0


@dataclass
class EvalSet:
    name: str
    samples: Samples
    files: list[SourceFile]


def load(sets: list[EvalSetConfig], dataset: DatasetConfig, tokenizer: Any) -> list[EvalSet]:
    """Read, validate and tokenise every evaluation set like the training data (bad rows are named); a set
    none of whose rows has a target token within maxSeqLength is a PermanentError naming it."""
    from .data import load_rendered, tokenize

    loaded = []
    for s in sets:
        rendered, files = load_rendered(s.path, s.format or dataset.format, tokenizer)
        samples = tokenize(rendered, tokenizer, dataset.max_seq_length)
        if len(samples) == 0:
            raise PermanentError(
                f"evaluation set {s.name} ({s.path}): no row has a target token within maxSeqLength "
                f"{dataset.max_seq_length}"
            )
        loaded.append(EvalSet(s.name, samples, files))
    return loaded


def perplexity(loss: float) -> float:
    return math.exp(min(loss, MAX_LOG_PERPLEXITY))


def change(loss: float | None, base: float | None) -> float | None:
    """Relative change of a loss against the base model's: 0.1 is 10% higher (worse). None without both figures,
    or when either is not finite."""
    if loss is None or base is None or not (math.isfinite(loss) and math.isfinite(base)) or base <= 0:
        return None
    return (loss - base) / base


def figures(losses: dict[str, float], base: dict[str, float] | None) -> dict[str, dict[str, float | None]]:
    """Each set's figures at one evaluation: {name: {loss, perplexity, baseLoss, change}}, base figures null while
    (or when) the base model was not measured."""
    base = base or {}
    return {
        name: {
            "loss": loss,
            "perplexity": perplexity(loss),
            "baseLoss": base.get(name),
            "change": change(loss, base.get(name)),
        }
        for name, loss in losses.items()
    }


def compact(sets: dict[str, dict[str, Any]], digits: int = 4) -> dict[str, dict[str, float | None]]:
    """The figures the termination message carries ({name: {loss, baseLoss}}, rounded): what the operator's gate
    needs, small enough for Kubernetes' termination message with the most sets the API allows."""

    def r(value: Any) -> float | None:
        return round(value, digits) if isinstance(value, float) and math.isfinite(value) else None

    return {name: {"loss": r(f.get("loss")), "baseLoss": r(f.get("baseLoss"))} for name, f in sets.items()}


def message_figures(final: dict[str, Any]) -> dict[str, Any]:
    """The final figures as rank 0's termination message carries them: the sets compacted, the data report left
    to the manifest (the status has it from the progress reports)."""
    figures = {k: v for k, v in final.items() if k != "dataReport"}
    if figures.get("evalSets"):
        figures["evalSets"] = compact(figures["evalSets"])
    return figures
