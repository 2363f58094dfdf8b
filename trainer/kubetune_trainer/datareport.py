"""The data report: what the training data is, before a GPU-hour is spent on it.

For the training rows and every evaluation source (the held-out split, dataset.evalSource, each evaluation set):
rows, tokens, length percentiles, rows truncated by maxSeqLength, rows skipped and why (no target token left
within maxSeqLength); for the training rows, exact and near duplicates; and leakage: evaluation rows that also
appear in the training data, exactly or nearly, which makes an evaluation measure memory instead of skill.

Rows are compared by what they say (the text, prompt and completion, or the turns of a conversation; not the chat
template around it, whose fixed parts would make short conversations look alike), normalised: lower case,
punctuation dropped, whitespace collapsed. Exact duplicates share a normalised text. Near duplicates are found
with MinHash over word 3-grams (character 5-grams for texts of few words) and locality-sensitive hashing, then
confirmed by the Jaccard similarity of their shingle sets (at least NEAR_THRESHOLD). Every row is named by its
file and 1-based row number.

The full report is `data-report.json` in the output directory; `summary` is what the status carries. `problems`
turns evaluation.dataChecks into the reasons to stop before training (exit 78), naming the rows.

`read` reads and renders the rows again on rank 0 (the training data's own preparation does not keep where each
row came from); the rest are pure functions.
"""

from __future__ import annotations

import hashlib
import itertools
import re
import unicodedata
import zlib
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .config import DataChecks, DatasetConfig, DatasetFormat, EvalSetConfig

REPORT_FILE = "data-report.json"
HELD_OUT = "heldOut"  # the evaluation split or dataset.evalSource (set names are lower case: no clash)
NEAR_THRESHOLD = 0.8
NUM_HASHES = 64
BANDS = 16  # of NUM_HASHES // BANDS rows: pairs at Jaccard 0.8 meet in some band with probability ~0.9996
MAX_LISTED = 1000  # groups or rows listed per finding in the report file; the counts are always complete
NAMED_IN_ERRORS = 5
_PRIME = (1 << 31) - 1  # a * x stays below 2^62: no uint64 overflow
_RNG = np.random.default_rng(20240917)
_A = _RNG.integers(1, _PRIME, NUM_HASHES, dtype=np.uint64)
_B = _RNG.integers(0, _PRIME, NUM_HASHES, dtype=np.uint64)
_PUNCTUATION = re.compile(r"[^\w\s]+")


@dataclass(frozen=True)
class Row:
    """One row as training sees it."""

    where: str  # "<file> row <n>"
    text: str  # what the row says, without the chat template
    tokens: int  # before truncation, special tokens included
    has_target: bool  # some target token within maxSeqLength (else the row is skipped)


# ----------------------------------------------------------------------------------------------
# reading (rank 0)
# ----------------------------------------------------------------------------------------------


def read_rows(path: str, fmt: DatasetFormat, tokenizer: Any, max_len: int) -> list[Row]:
    """Every row under `path`, rendered and measured as the training data's preparation does (which has already
    refused bad rows, so none is left here)."""
    from . import data

    has_template = bool(getattr(tokenizer, "chat_template", None))
    where, said, rendered = [], [], []
    for file in data.discover(path):
        for row in data.read_rows(file):
            item = data.normalize(fmt, row.value, has_template)
            where.append(f"{row.source} row {row.number}")
            said.append(content(item))
            rendered.append(data.render(item, tokenizer))
    rows = []
    for start in range(0, len(rendered), 512):
        chunk = rendered[start : start + 512]
        chat = chunk[0].chat
        enc = tokenizer([r.text for r in chunk], add_special_tokens=not chat, return_offsets_mapping=True)
        for i, (r, offsets) in enumerate(zip(chunk, enc["offset_mapping"], strict=True)):
            target = data.target_mask(np.asarray(offsets, dtype=np.int64).reshape(-1, 2), r.spans)
            if not chat and tokenizer.eos_token_id is not None:
                target = np.append(target, True)
            # label i is token i + 1: a target among tokens 1 .. max_len - 1 survives truncation
            rows.append(Row(where[start + i], said[start + i], len(target), bool(target[1:max_len].any())))
    return rows


def content(item: Any) -> str:
    """What a normalised row says: its text, prompt and completion, or its turns (data.Plain, PromptCompletion,
    Chat)."""
    if hasattr(item, "messages"):
        return "\n".join(m["content"] for m in item.messages)
    if hasattr(item, "completion"):
        return f"{item.prompt}\n{item.completion}"
    return str(item.text)


def read(
    dataset: DatasetConfig, sets: Sequence[EvalSetConfig], tokenizer: Any, seed: int
) -> tuple[list[Row], dict[str, list[Row]]]:
    """(training rows, evaluation sources by name): HELD_OUT for the held-out split or dataset.evalSource, then each
    evaluation set by its name; the split is the one training uses."""
    from .data import split_indices

    max_len = dataset.max_seq_length
    train = read_rows(dataset.path, dataset.format, tokenizer, max_len)
    evaluation: dict[str, list[Row]] = {}
    if dataset.eval_path:
        evaluation[HELD_OUT] = read_rows(dataset.eval_path, dataset.format, tokenizer, max_len)
    elif dataset.eval_split > 0:
        train_idx, eval_idx = split_indices(len(train), dataset.eval_split, seed)
        evaluation[HELD_OUT] = [train[i] for i in eval_idx]
        train = [train[i] for i in train_idx]
    for s in sets:
        evaluation[s.name] = read_rows(s.path, s.format or dataset.format, tokenizer, max_len)
    return train, evaluation


# ----------------------------------------------------------------------------------------------
# pure parts
# ----------------------------------------------------------------------------------------------


def normalise(text: str) -> str:
    """Case, punctuation and spacing do not make a row different."""
    text = unicodedata.normalize("NFKC", text).lower()
    return " ".join(_PUNCTUATION.sub(" ", text).split())


def digest(text: str) -> str:
    return hashlib.blake2b(normalise(text).encode(), digest_size=16).hexdigest()


def shingles(text: str) -> set[int]:
    """Hashed word 3-grams of the normalised text; character 5-grams when it has fewer than 8 words."""
    words = normalise(text).split()
    if len(words) >= 8:
        grams = [" ".join(words[i : i + 3]) for i in range(len(words) - 2)]
    else:
        joined = " ".join(words)
        grams = [joined[i : i + 5] for i in range(max(1, len(joined) - 4))]
    return {zlib.crc32(g.encode()) for g in grams}


def minhash(shingle_set: set[int]) -> np.ndarray:
    """NUM_HASHES minima of random affine hashes (mod a Mersenne prime) over the shingles."""
    if not shingle_set:
        return np.full(NUM_HASHES, _PRIME, dtype=np.uint64)
    x = np.fromiter(shingle_set, dtype=np.uint64, count=len(shingle_set)) % np.uint64(_PRIME)
    return ((_A[:, None] * x[None, :] + _B[:, None]) % np.uint64(_PRIME)).min(axis=1)


def jaccard(a: set[int], b: set[int]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def similar_pairs(texts: Sequence[str], threshold: float = NEAR_THRESHOLD) -> list[tuple[int, int, float]]:
    """Pairs (i < j) of texts whose shingle sets have a Jaccard similarity of at least `threshold`, with it."""
    sets = [shingles(t) for t in texts]
    signatures = np.stack([minhash(s) for s in sets]) if sets else np.zeros((0, NUM_HASHES), np.uint64)
    width = NUM_HASHES // BANDS
    candidates: set[tuple[int, int]] = set()
    for band in range(BANDS):
        buckets: dict[bytes, list[int]] = defaultdict(list)
        for i, sig in enumerate(signatures[:, band * width : (band + 1) * width]):
            buckets[sig.tobytes()].append(i)
        for members in buckets.values():
            # Each member against the first and its predecessor, not every pair: a bucket of thousands of look-alike
            # rows costs thousands of comparisons, not millions, and still joins them into one group.
            candidates.update((members[0], b) for b in members[1:])
            candidates.update(itertools.pairwise(members[1:]))
    pairs = [(a, b, jaccard(sets[a], sets[b])) for a, b in sorted(candidates)]
    return [(a, b, round(s, 4)) for a, b, s in pairs if s >= threshold]


def groups(pairs: Sequence[tuple[int, int]], n: int) -> list[list[int]]:
    """Connected groups of more than one index, each sorted, in order of their first index."""
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in pairs:
        parent[root(a)] = root(b)
    found: dict[int, list[int]] = defaultdict(list)
    for i in range(n):
        found[root(i)].append(i)
    return sorted((g for g in found.values() if len(g) > 1), key=lambda g: g[0])


def length_figures(rows: Sequence[Row], max_len: int) -> dict[str, Any]:
    lengths = np.array([r.tokens for r in rows], dtype=np.int64)
    kept = np.minimum(lengths, max_len)
    truncated = [r.where for r in rows if r.tokens > max_len]
    skipped = [r.where for r in rows if not r.has_target]
    percentiles = {
        f"p{p}": int(np.percentile(lengths, p, method="higher")) if len(lengths) else 0 for p in (50, 90, 99)
    }
    return {
        "rows": len(rows),
        "tokens": int(kept.sum()),  # as trained on, after truncation (skipped rows included)
        "tokensBeforeTruncation": int(lengths.sum()),
        "length": {"min": int(lengths.min(initial=0)), **percentiles, "max": int(lengths.max(initial=0))},
        "truncatedRows": len(truncated),
        "truncated": truncated[:MAX_LISTED],
        "skippedRows": len(skipped),
        "skipped": [{"row": w, "reason": f"no target token within maxSeqLength {max_len}"} for w in skipped][
            :MAX_LISTED
        ],
    }


def duplicates(rows: Sequence[Row]) -> dict[str, Any]:
    """Exact (same normalised text) and near duplicate groups of the rows; a row in an exact group is not also
    reported as a near duplicate of its copies."""
    by_digest: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        by_digest[digest(r.text)].append(i)
    exact = [g for g in by_digest.values() if len(g) > 1]
    first = {i: g[0] for g in exact for i in g}
    # near duplicates among one representative per exact group
    reps = [i for i in range(len(rows)) if first.get(i, i) == i]
    pairs = similar_pairs([rows[i].text for i in reps])
    near = groups([(a, b) for a, b, _ in pairs], len(reps))
    score = {(a, b): s for a, b, s in pairs}
    return {
        "exactGroups": len(exact),
        "exactRows": sum(len(g) - 1 for g in exact),  # copies beyond the first
        "exact": [[rows[i].where for i in g] for g in exact][:MAX_LISTED],
        "nearGroups": len(near),
        "nearRows": sum(len(g) - 1 for g in near),
        "near": [
            {
                "rows": [rows[reps[i]].where for i in g],
                "similarity": min(s for (a, b), s in score.items() if a in g and b in g),
            }
            for g in near
        ][:MAX_LISTED],
    }


def leaks(train: Sequence[Row], evaluation: Sequence[Row]) -> list[dict[str, Any]]:
    """Evaluation rows that also appear in the training rows, exactly (normalised) or nearly, with the training
    row they match."""
    train_digests: dict[str, int] = {}
    for i, r in enumerate(train):
        train_digests.setdefault(digest(r.text), i)
    found: dict[int, dict[str, Any]] = {}
    for j, r in enumerate(evaluation):
        i = train_digests.get(digest(r.text))
        if i is not None:
            found[j] = {"row": r.where, "trainingRow": train[i].where, "similarity": 1.0}
    n = len(train)
    for a, b, s in similar_pairs([r.text for r in train] + [r.text for r in evaluation]):
        if a < n <= b and (b - n) not in found:
            found[b - n] = {"row": evaluation[b - n].where, "trainingRow": train[a].where, "similarity": s}
    return [found[j] for j in sorted(found)]


def build(train: Sequence[Row], evaluation: dict[str, Sequence[Row]], max_len: int) -> dict[str, Any]:
    """The full report (JSON-ready)."""
    report: dict[str, Any] = {
        "maxSeqLength": max_len,
        "nearDuplicateThreshold": NEAR_THRESHOLD,
        "train": {**length_figures(train, max_len), "duplicates": duplicates(train)},
        "evaluation": {},
    }
    for name, rows in evaluation.items():
        leaked = leaks(train, rows)
        report["evaluation"][name] = {
            **length_figures(rows, max_len),
            "leakedRows": len(leaked),
            "leaked": leaked[:MAX_LISTED],
        }
    return report


def summary(report: dict[str, Any]) -> dict[str, Any]:
    """The few figures the status carries."""
    t = report["train"]
    return {
        "rows": t["rows"],
        "tokens": t["tokens"],
        "lengthP50": t["length"]["p50"],
        "lengthP99": t["length"]["p99"],
        "lengthMax": t["length"]["max"],
        "truncatedRows": t["truncatedRows"],
        "skippedRows": t["skippedRows"],
        "exactDuplicateRows": t["duplicates"]["exactRows"],
        "nearDuplicateRows": t["duplicates"]["nearRows"],
        "evaluationRows": sum(e["rows"] for e in report["evaluation"].values()),
        "leakedRows": sum(e["leakedRows"] for e in report["evaluation"].values()),
    }


def _named(items: Sequence[str], total: int) -> str:
    shown = ", ".join(items[:NAMED_IN_ERRORS])
    return shown + (f" and {total - NAMED_IN_ERRORS} more" if total > NAMED_IN_ERRORS else "")


def problems(report: dict[str, Any], checks: DataChecks) -> list[str]:
    """Why the data fails evaluation.dataChecks, each reason naming rows; empty when it passes."""
    found = []
    t = report["train"]
    limit = checks.max_truncated_fraction
    if limit is not None and t["rows"] and t["truncatedRows"] / t["rows"] > limit:
        found.append(
            f"{t['truncatedRows']} of {t['rows']} training rows ({t['truncatedRows'] / t['rows']:.1%}) are longer "
            f"than maxSeqLength {report['maxSeqLength']} and would be truncated, more than "
            f"evaluation.dataChecks.maxTruncatedFraction {limit:g}: {_named(t['truncated'], t['truncatedRows'])}"
        )
    limit = checks.max_duplicate_fraction
    d = t["duplicates"]
    copies = d["exactRows"] + d["nearRows"]
    if limit is not None and t["rows"] and copies / t["rows"] > limit:
        listed = [" = ".join(g) for g in d["exact"]] + [" ~ ".join(g["rows"]) for g in d["near"]]
        found.append(
            f"{copies} of {t['rows']} training rows ({copies / t['rows']:.1%}) duplicate others, more than "
            f"evaluation.dataChecks.maxDuplicateFraction {limit:g}: "
            f"{_named(listed, d['exactGroups'] + d['nearGroups'])}"
        )
    if checks.fail_on_leakage:
        for name, e in report["evaluation"].items():
            if e["leakedRows"]:
                listed = [f"{x['row']} (= {x['trainingRow']})" for x in e["leaked"]]
                source = "held-out evaluation" if name == HELD_OUT else f"evaluation set {name}"
                found.append(
                    f"{e['leakedRows']} {source} rows also appear in the training data "
                    f"(evaluation.dataChecks.failOnLeakage): {_named(listed, e['leakedRows'])}"
                )
    return found
