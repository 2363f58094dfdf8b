"""Training data: read rows from local files, validate every row, render and tokenise them.

Sources: a JSONL, JSON (an array of objects, or JSON lines) or Parquet file; a directory of such files
(read in sorted order); or a `datasets` dataset written with `save_to_disk` (its "train" split if it is a
DatasetDict). Every row is checked and rendered before any training starts; errors name the file, the
1-based row number (the line number for JSONL) and what is wrong.

Formats, and which tokens carry the loss:

- text `{text}`: every token, plus an end-of-sequence token.
- prompt_completion `{prompt, completion}`: the completion and the end-of-sequence token.
- messages `{messages: [{role, content}]}`: rendered with the tokenizer's chat template; the assistant turns
  (as the template renders them, closing tokens included).
- alpaca `{instruction, input?, output}`: one user turn and one assistant turn through the chat template
  when the tokenizer has one, else the classic Alpaca prompt as prompt_completion.
- sharegpt `{conversations: [{from, value}]}`: mapped to messages (human/user, gpt/assistant, system).

Under torchrun, each node reads and tokenises once (`prepare_once_per_node`): its local rank 0 prepares the data and
writes the arrays; the node's other ranks memory-map them, so the node holds one copy.

A tokenised sample stores its token ids and its labels already shifted (label[i] is the token the model must
predict after token i, or -100), so packing samples side by side never links one sample to the next.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .config import DatasetConfig, DatasetFormat
from .errors import PermanentError
from .files import sha256_file
from .progress import Report, no_report
from .runtime import Runtime

log = logging.getLogger(__name__)

IGNORE = -100
DATA_SUFFIXES = (".jsonl", ".json", ".parquet")
CHAT_ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
MAX_ERRORS_LOGGED = 20
ALPACA_PROMPT = "Below is an instruction that describes a task. Write a response that completes the request.\n\n"
REPORT_ROWS = 1000  # rows read between two progress reports
RowCount = Callable[[int], None]  # rows done so far


def ignore_rows(done: int) -> None:
    """A RowCount that tells nobody."""


class RowError(ValueError):
    """What is wrong with one row (without the file and row number)."""


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceFile:
    path: str
    sha256: str
    rows: int


@dataclass
class Row:
    source: str
    number: int  # 1-based: the line number in JSONL, the index + 1 elsewhere
    value: Any  # the decoded row, or a RowError when it could not be decoded


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists())


def discover(path: str) -> list[Path]:
    """The files (or the one saved dataset directory) that make up a dataset path."""
    root = Path(path)
    if not root.exists():
        raise PermanentError(f"dataset {path}: no such file or directory")
    if root.is_file() or _is_saved_dataset(root):
        return [root]
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if here != root and _is_saved_dataset(here):
            files.append(here)  # its metadata .json files are not rows
            dirnames.clear()
            continue
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        files += [here / f for f in filenames if f.endswith(DATA_SUFFIXES) and not f.startswith(".")]
    files.sort()
    if not files:
        raise PermanentError(f"dataset {path}: no .jsonl, .json or .parquet files and not a saved dataset")
    return files


def _read_jsonl(path: Path) -> Iterator[Row]:
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                yield Row(str(path), number, _decode_json(line.rstrip()))


def _decode_json(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        return RowError(f"invalid JSON: {e.msg} at column {e.colno}")


def _read_json(path: Path) -> Iterator[Row]:
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # JSON lines in a .json file
            yield from _read_jsonl(path)
            return
        raise PermanentError(f"dataset {path}: invalid JSON at line {e.lineno}: {e.msg}") from None
    if not isinstance(data, list):
        raise PermanentError(f"dataset {path}: expected a JSON array of rows, got a {type(data).__name__}")
    for i, value in enumerate(data, 1):
        yield Row(str(path), i, value)


def _read_parquet(path: Path) -> Iterator[Row]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise PermanentError(f"dataset {path}: not a readable Parquet file ({e})") from None
    number = 0
    for batch in pf.iter_batches():
        for value in batch.to_pylist():
            number += 1
            yield Row(str(path), number, value)


def _read_saved(path: Path) -> Iterator[Row]:
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if "train" in ds:
            ds = ds["train"]
        elif len(ds) == 1:
            ds = next(iter(ds.values()))
        else:
            raise PermanentError(f"dataset {path}: a DatasetDict without a 'train' split ({', '.join(ds)})")
    for i, value in enumerate(ds, 1):
        yield Row(str(path), i, value)


def read_rows(path: Path) -> Iterator[Row]:
    if _is_saved_dataset(path):
        return _read_saved(path)
    if path.name.endswith(".jsonl"):
        return _read_jsonl(path)
    if path.name.endswith(".json"):
        return _read_json(path)
    if path.name.endswith(".parquet"):
        return _read_parquet(path)
    raise PermanentError(f"dataset {path}: unsupported file type (use .jsonl, .json or .parquet)")


def fingerprint(path: Path) -> str:
    """sha256 of a file, or of the sorted (name, sha256) list of a saved dataset directory."""
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for p in sorted(q for q in path.rglob("*") if q.is_file()):
        h.update(f"{p.relative_to(path)}\0{sha256_file(p)}\n".encode())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# Validation and normalisation: every format becomes plain text, prompt + completion, or a chat
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plain:
    text: str


@dataclass(frozen=True)
class PromptCompletion:
    prompt: str
    completion: str


@dataclass(frozen=True)
class Chat:
    messages: tuple[dict[str, str], ...]


Normalized = Plain | PromptCompletion | Chat


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _string(row: dict[str, Any], key: str, *, required: bool = True, nonempty: bool = True) -> str:
    if key not in row or (row[key] is None and not required):
        if required:
            raise RowError(f'field "{key}" is missing')
        return ""
    value = row[key]
    if not isinstance(value, str):
        raise RowError(f'field "{key}" must be a string, got {_type_name(value)}')
    if nonempty and required and not value.strip():
        raise RowError(f'field "{key}" is empty')
    return value


def _chat(turns: Any, key: str, role_key: str, text_key: str, roles: dict[str, str]) -> Chat:
    if not isinstance(turns, list):
        raise RowError(f'field "{key}" must be a list, got {_type_name(turns)}')
    if not turns:
        raise RowError(f'field "{key}" is empty')
    messages = []
    for i, turn in enumerate(turns, 1):
        where = f'field "{key}" item {i}'
        if not isinstance(turn, dict):
            raise RowError(f"{where} must be an object, got {_type_name(turn)}")
        if role_key not in turn:
            raise RowError(f'{where}: "{role_key}" is missing')
        role = turn[role_key]
        if role not in roles:
            raise RowError(f'{where}: {role_key} "{role}" is not one of {", ".join(roles)}')
        if text_key not in turn:
            raise RowError(f'{where}: "{text_key}" is missing')
        if not isinstance(turn[text_key], str):
            raise RowError(f'{where}: "{text_key}" must be a string, got {_type_name(turn[text_key])}')
        messages.append({"role": roles[role], "content": turn[text_key]})
    if not any(m["role"] == "assistant" for m in messages):
        raise RowError(f'field "{key}" has no assistant turn to learn from')
    return Chat(tuple(messages))


def normalize(fmt: DatasetFormat, row: Any, has_chat_template: bool) -> Normalized:
    """Check one decoded row against its format; raise RowError saying what is wrong."""
    if isinstance(row, RowError):
        raise row
    if not isinstance(row, dict):
        raise RowError(f"a row must be a JSON object, got {_type_name(row)}")
    if fmt == "text":
        return Plain(_string(row, "text"))
    if fmt == "prompt_completion":
        return PromptCompletion(_string(row, "prompt", nonempty=False), _string(row, "completion"))
    if fmt == "alpaca":
        instruction = _string(row, "instruction")
        extra = _string(row, "input", required=False)
        output = _string(row, "output")
        if has_chat_template:
            user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
            return Chat(({"role": "user", "content": user}, {"role": "assistant", "content": output}))
        prompt = ALPACA_PROMPT + f"### Instruction:\n{instruction}\n\n"
        if extra.strip():
            prompt += f"### Input:\n{extra}\n\n"
        return PromptCompletion(prompt + "### Response:\n", output)
    if fmt == "messages":
        if "messages" not in row:
            raise RowError('field "messages" is missing')
        return _chat(row["messages"], "messages", "role", "content", {r: r for r in CHAT_ROLES})
    if fmt == "sharegpt":
        if "conversations" not in row:
            raise RowError('field "conversations" is missing')
        return _chat(row["conversations"], "conversations", "from", "value", SHAREGPT_ROLES)
    raise RowError(f"unknown format {fmt}")


# ----------------------------------------------------------------------------------------------
# Rendering: text plus the character spans the loss is computed on
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rendered:
    text: str
    spans: tuple[tuple[int, int], ...]  # character ranges whose tokens are predicted (the loss)
    chat: bool  # chat text carries its own special tokens; plain text gets the tokenizer's and an EOS


def _render_chat(messages: Sequence[dict[str, str]], tokenizer: Any) -> Rendered:
    def render(msgs: Sequence[dict[str, str]], gen: bool) -> str:
        out = tokenizer.apply_chat_template(list(msgs), tokenize=False, add_generation_prompt=gen)
        if not isinstance(out, str):
            raise RowError("the chat template did not render to text")
        return out

    try:
        full = render(messages, False)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            start = render(messages[:i], True) if i else ""
            end = render(messages[: i + 1], False)
            if not full.startswith(end) or not end.startswith(start):
                raise RowError(
                    "the tokenizer's chat template does not render this conversation incrementally, so the "
                    "assistant turns cannot be located"
                )
            spans.append((len(start), len(end)))
    except RowError:
        raise
    except Exception as e:  # jinja's raise_exception (e.g. roles must alternate) and template bugs
        raise RowError(f"chat template failed: {e}") from None
    return Rendered(full, tuple(spans), True)


def render(item: Normalized, tokenizer: Any) -> Rendered:
    if isinstance(item, Plain):
        return Rendered(item.text, ((0, len(item.text)),), False)
    if isinstance(item, PromptCompletion):
        text = item.prompt + item.completion
        return Rendered(text, ((len(item.prompt), len(text)),), False)
    return _render_chat(item.messages, tokenizer)


# ----------------------------------------------------------------------------------------------
# Tokenised samples
# ----------------------------------------------------------------------------------------------


@dataclass
class Samples:
    """Tokenised samples stored flat: sample i is ids[offsets[i]:offsets[i+1]] (same for labels)."""

    ids: np.ndarray
    labels: np.ndarray
    offsets: np.ndarray
    truncated: int = 0
    dropped: int = 0

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def get(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        s, e = self.offsets[i], self.offsets[i + 1]
        return self.ids[s:e], self.labels[s:e]

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])


def shifted_labels(ids: np.ndarray, target: np.ndarray) -> np.ndarray:
    """label[i] = ids[i + 1] where token i + 1 is a target, else -100; the last token predicts nothing."""
    labels = np.full(len(ids), IGNORE, dtype=np.int32)
    labels[:-1] = np.where(target[1:], ids[1:], IGNORE)
    return labels


def target_mask(offsets: np.ndarray, spans: Sequence[tuple[int, int]]) -> np.ndarray:
    """Tokens whose characters overlap a target span (special tokens the tokenizer adds have empty spans)."""
    starts, ends = offsets[:, 0], offsets[:, 1]
    mask = np.zeros(len(offsets), dtype=bool)
    for a, b in spans:
        mask |= (ends > a) & (starts < b) & (ends > starts)
    return mask


def tokenize(
    rendered: Sequence[Rendered], tokenizer: Any, max_len: int, batch: int = 512, on_rows: RowCount = ignore_rows
) -> Samples:
    eos = tokenizer.eos_token_id
    ids_parts: list[np.ndarray] = []
    label_parts: list[np.ndarray] = []
    lengths: list[int] = []
    truncated = dropped = 0
    for start in range(0, len(rendered), batch):
        chunk = rendered[start : start + batch]
        chat = chunk[0].chat  # one format per dataset, so one kind of text
        enc = tokenizer(
            [r.text for r in chunk], add_special_tokens=not chat, return_offsets_mapping=True, verbose=False
        )
        for r, ids, offs in zip(chunk, enc["input_ids"], enc["offset_mapping"], strict=True):
            ids_a = np.asarray(ids, dtype=np.int32)
            target = target_mask(np.asarray(offs, dtype=np.int64).reshape(-1, 2), r.spans)
            if not chat and eos is not None:
                ids_a = np.append(ids_a, np.int32(eos))
                target = np.append(target, True)
            if len(ids_a) > max_len:
                truncated += 1
                ids_a, target = ids_a[:max_len], target[:max_len]
            labels = shifted_labels(ids_a, target)
            if not (labels != IGNORE).any():
                dropped += 1
                continue
            ids_parts.append(ids_a)
            label_parts.append(labels)
            lengths.append(len(ids_a))
        on_rows(start + len(chunk))
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return Samples(
        ids=np.concatenate(ids_parts) if ids_parts else np.zeros(0, np.int32),
        labels=np.concatenate(label_parts) if label_parts else np.zeros(0, np.int32),
        offsets=offsets,
        truncated=truncated,
        dropped=dropped,
    )


# ----------------------------------------------------------------------------------------------
# The whole preparation
# ----------------------------------------------------------------------------------------------


@dataclass
class PreparedData:
    train: Samples
    eval: Samples | None
    files: list[SourceFile] = field(default_factory=list)
    eval_files: list[SourceFile] = field(default_factory=list)


def load_rendered(
    path: str, fmt: DatasetFormat, tokenizer: Any, on_rows: RowCount = ignore_rows
) -> tuple[list[Rendered], list[SourceFile]]:
    """Read, validate and render every row under a path; raise PermanentError naming the bad rows."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if fmt in ("messages", "sharegpt") and not has_template:
        raise PermanentError(f"dataset format {fmt} needs a chat template, and the model's tokenizer has none")
    rendered: list[Rendered] = []
    errors: list[str] = []
    files = []
    for file in discover(path):
        count = 0
        for row in read_rows(file):
            count += 1
            try:
                rendered.append(render(normalize(fmt, row.value, has_template), tokenizer))
            except RowError as e:
                errors.append(f"dataset {row.source} row {row.number}: {e}")
            if (len(rendered) + len(errors)) % REPORT_ROWS == 0:
                on_rows(len(rendered) + len(errors))
        files.append(SourceFile(str(file), fingerprint(file), count))
    if errors:
        for e in errors[:MAX_ERRORS_LOGGED]:
            log.error("%s", e)
        more = f" (and {len(errors) - 1} more bad rows)" if len(errors) > 1 else ""
        raise PermanentError(errors[0] + more)
    if not rendered:
        raise PermanentError(f"dataset {path}: no rows")
    return rendered, files


def split_indices(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A deterministic (train, eval) split of n rows; eval gets round(n * fraction) rows, at least one."""
    if fraction <= 0 or n < 2:
        return np.arange(n), np.zeros(0, dtype=np.int64)
    n_eval = min(n - 1, max(1, round(n * fraction)))
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_eval:]), np.sort(perm[:n_eval])


def prepare(cfg: DatasetConfig, tokenizer: Any, seed: int, report: Report = no_report) -> PreparedData:
    """Read, validate, render and tokenise the training (and eval) rows; `report` hears how far it got."""
    rendered, files = load_rendered(cfg.path, cfg.format, tokenizer, lambda n: report("reading data", n, None, "rows"))
    eval_files: list[SourceFile] = []
    if cfg.eval_path:
        train_rows = rendered
        eval_rows, eval_files = load_rendered(
            cfg.eval_path, cfg.format, tokenizer, lambda n: report("reading data", len(rendered) + n, None, "rows")
        )
    else:
        train_idx, eval_idx = split_indices(len(rendered), cfg.eval_split, seed)
        train_rows = [rendered[i] for i in train_idx]
        eval_rows = [rendered[i] for i in eval_idx]
    rows = len(train_rows) + len(eval_rows)  # one count over both, so that it only grows
    train = tokenize(train_rows, tokenizer, cfg.max_seq_length, on_rows=lambda n: report("tokenising", n, rows, "rows"))
    evaluation = None
    if eval_rows:
        evaluation = tokenize(
            eval_rows,
            tokenizer,
            cfg.max_seq_length,
            on_rows=lambda n: report("tokenising", len(train_rows) + n, rows, "rows"),
        )
    for name, s in (("train", train), ("eval", evaluation)):
        if s is None:
            continue
        log.info(
            "%s data: %d samples, %d tokens (%d truncated to %d tokens, %d dropped with no target tokens left)",
            name,
            len(s),
            s.num_tokens,
            s.truncated,
            cfg.max_seq_length,
            s.dropped,
        )
    if len(train) == 0:
        raise PermanentError(f"dataset {cfg.path}: no training sample has a target token within maxSeqLength")
    if evaluation is not None and len(evaluation) == 0:
        evaluation = None
    return PreparedData(train, evaluation, files, eval_files)


# ----------------------------------------------------------------------------------------------
# One tokenisation per node
# ----------------------------------------------------------------------------------------------

SAMPLE_ARRAYS = ("ids", "labels", "offsets")


def save_prepared(data: PreparedData, directory: Path) -> None:
    """The prepared data as .npy arrays (memory-mappable) and a JSON file for the rest."""
    parts: dict[str, Any] = {}
    for name, samples in (("train", data.train), ("eval", data.eval)):
        if samples is None:
            continue
        for array in SAMPLE_ARRAYS:
            np.save(directory / f"{name}-{array}.npy", getattr(samples, array))
        parts[name] = {"truncated": samples.truncated, "dropped": samples.dropped}
    files = {"files": [vars(f) for f in data.files], "evalFiles": [vars(f) for f in data.eval_files]}
    (directory / "prepared.json").write_text(json.dumps({"samples": parts, **files}))


def load_prepared(directory: Path) -> PreparedData:
    """What save_prepared wrote, the arrays memory-mapped read-only: every process of a node maps the same pages."""
    meta = json.loads((directory / "prepared.json").read_text())

    def samples(name: str) -> Samples | None:
        counts = meta["samples"].get(name)
        if counts is None:
            return None
        arrays = {a: np.load(directory / f"{name}-{a}.npy", mmap_mode="r") for a in SAMPLE_ARRAYS}
        return Samples(**arrays, **counts)

    train = samples("train")
    assert train is not None
    return PreparedData(
        train,
        samples("eval"),
        [SourceFile(**f) for f in meta["files"]],
        [SourceFile(**f) for f in meta["evalFiles"]],
    )


def prepare_once_per_node(rt: Runtime, make: Callable[[], PreparedData]) -> PreparedData:
    """Local rank 0 of each node reads and tokenises (`make`); the node's other ranks wait, then map its arrays,
    so a pod of 8 processes tokenises once and holds one copy in memory (the page cache), not 8 (collective).
    A bad row is reported by every rank alike."""
    if not rt.distributed:
        return make()
    directory: str | None = None
    problem: str | None = None
    if rt.local_rank == 0:
        try:
            data = make()
        except PermanentError as e:
            problem = str(e)
        else:
            directory = tempfile.mkdtemp(prefix="kubetune-data-")
            save_prepared(data, Path(directory))
            del data
    shared = rt.gather_objects((directory, problem))
    problems = [p for _, p in shared if p]
    if problems:
        raise PermanentError(problems[0])
    mine = shared[rt.rank - rt.local_rank][0]  # torchrun numbers a node's ranks consecutively from its local rank 0
    assert mine is not None
    prepared = load_prepared(Path(mine))
    rt.barrier()  # every rank has mapped the files: they can go (the mappings stay)
    if directory:
        shutil.rmtree(directory)
    return prepared
