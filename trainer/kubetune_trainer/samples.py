"""Sample answers: the base model and the fine-tuned one answer the same prompts, greedily, at the end of a run.

Prompts come from `evaluation.samples.path` (any dataset source), one per row, at most `maxPrompts`:

- {"prompt": str, "completion"?: str}: the prompt; with a chat-style training format (messages, sharegpt, alpaca
  with a chat template) it becomes one user turn of the chat template, as training renders it; else it is the
  text itself. A completion is kept as the reference answer.
- {"messages": [...]} (or sharegpt {"conversations": [...]}): the conversation through the chat template with the
  generation prompt; a last assistant turn is left out and kept as the reference.
- {"instruction", "input"?, "output"?} (alpaca): as training renders it, output as the reference.
- {"text": str}: the text as the prompt.

Rank 0 loads both models afresh after the outputs are written: the base from the model source, the fine-tune from
the output (base + adapter, or the full model), with PyTorch's own attention (the training attention is for packed
batches). Greedy decoding, so the answers are reproducible. They are written to `samples.jsonl` in the output
directory, one object per prompt {row, prompt, reference, base, tuned, truncated}, and logged one per line after
SAMPLE_LOG_PREFIX (`kubectl finetune samples NAME` reads them from rank 0's log).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import DatasetFormat, SamplesConfig, TrainerConfig
from .errors import PermanentError

log = logging.getLogger(__name__)

SAMPLES_FILE = "samples.jsonl"
SAMPLE_LOG_PREFIX = "kubetune-sample "
CHAT_FORMATS: tuple[DatasetFormat, ...] = ("messages", "sharegpt")


@dataclass(frozen=True)
class Prompt:
    row: str  # "<file> row <n>"
    shown: str  # what the user asked (the last user turn, or the prompt text)
    messages: tuple[dict[str, str], ...] | None  # through the chat template
    text: str | None  # as is
    reference: str | None


def _chat_training(fmt: DatasetFormat, has_template: bool) -> bool:
    return fmt in CHAT_FORMATS or (fmt == "alpaca" and has_template)


def prompt_of(value: Any, fmt: DatasetFormat, has_template: bool, row: str) -> Prompt:
    """One row as a prompt (pure); PermanentError naming the row when it is none of the accepted shapes."""
    from .data import SHAREGPT_ROLES, Chat, PromptCompletion, RowError, normalize

    if not isinstance(value, dict):
        raise PermanentError(f"samples {row}: a row must be a JSON object")
    chat_style = _chat_training(fmt, has_template)
    if isinstance(value.get("prompt"), str):
        reference = value.get("completion") if isinstance(value.get("completion"), str) else None
        if chat_style and has_template:
            messages = ({"role": "user", "content": value["prompt"]},)
            return Prompt(row, value["prompt"], messages, None, reference)
        return Prompt(row, value["prompt"], None, value["prompt"], reference)
    turns_key, role_key, text_key = ("messages", "role", "content")
    if "conversations" in value:
        turns_key, role_key, text_key = ("conversations", "from", "value")
    if isinstance(value.get(turns_key), list):
        roles: dict[str, str] = SHAREGPT_ROLES if turns_key == "conversations" else {}
        turns: list[dict[str, Any]] = [
            {"role": roles.get(str(t.get(role_key)), str(t.get(role_key))), "content": t.get(text_key)}
            for t in value[turns_key]
            if isinstance(t, dict)
        ]
        if not turns or any(not isinstance(m["content"], str) for m in turns):
            raise PermanentError(f'samples {row}: "{turns_key}" must be a list of turns with text')
        if not has_template:
            raise PermanentError(f"samples {row}: a conversation needs a chat template, and the tokenizer has none")
        reference = turns.pop()["content"] if turns[-1]["role"] == "assistant" and len(turns) > 1 else None
        users = [m["content"] for m in turns if m["role"] == "user"]
        return Prompt(row, users[-1] if users else turns[-1]["content"], tuple(turns), None, reference)
    if "instruction" in value:
        try:
            item = normalize("alpaca", {"output": "-", **value}, has_template)
        except RowError as e:
            raise PermanentError(f"samples {row}: {e}") from None
        reference = value.get("output") if isinstance(value.get("output"), str) else None
        if isinstance(item, Chat):
            return Prompt(row, item.messages[0]["content"], item.messages[:1], None, reference)
        assert isinstance(item, PromptCompletion)
        return Prompt(row, value["instruction"], None, item.prompt, reference)
    if isinstance(value.get("text"), str):
        return Prompt(row, value["text"], None, value["text"], None)
    raise PermanentError(
        f"samples {row}: expected a prompt ({{prompt}}, {{messages}}, {{conversations}}, {{instruction}} or {{text}})"
    )


def read_prompts(cfg: SamplesConfig, fmt: DatasetFormat, tokenizer: Any) -> list[Prompt]:
    from . import data

    has_template = bool(getattr(tokenizer, "chat_template", None))
    prompts: list[Prompt] = []
    for file in data.discover(cfg.path):
        for row in data.read_rows(file):
            if len(prompts) == cfg.max_prompts:
                return prompts
            if isinstance(row.value, data.RowError):
                raise PermanentError(f"samples {row.source} row {row.number}: {row.value}")
            prompts.append(prompt_of(row.value, fmt, has_template, f"{row.source} row {row.number}"))
    return prompts


def answer(model: Any, tokenizer: Any, prompt: Prompt, max_new_tokens: int) -> tuple[str, bool]:
    """The greedy answer (special tokens dropped, spacing collapsed) and whether max_new_tokens cut it short."""
    import torch

    if prompt.messages is not None:
        text = tokenizer.apply_chat_template(list(prompt.messages), tokenize=False, add_generation_prompt=True)
        enc = tokenizer(text, add_special_tokens=False, return_tensors="pt")
    else:
        enc = tokenizer(prompt.text, return_tensors="pt")
    device = next(model.parameters()).device
    enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
    new = out[0, enc["input_ids"].shape[1] :]
    eos = tokenizer.eos_token_id
    finished = eos is not None and bool((new == eos).any())
    return " ".join(tokenizer.decode(new, skip_special_tokens=True).split()), len(
        new
    ) >= max_new_tokens and not finished


def _load(where: str, dtype: Any, device: Any, **kwargs: Any) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, attn_implementation="sdpa", **kwargs)
    return model.to(device).eval()


def generate(cfg: TrainerConfig, out_dir: Path, tokenizer: Any, device: Any) -> list[dict[str, Any]]:
    """Answer every prompt with the base model and with the fine-tune in `out_dir`; write SAMPLES_FILE there."""
    import torch

    from .modeling import compute_dtype, source_kwargs

    samples = cfg.evaluation.samples
    assert samples is not None
    prompts = read_prompts(samples, cfg.dataset.format, tokenizer)
    where, kwargs = source_kwargs(cfg.model)
    dtype = compute_dtype(cfg.training.precision) if device.type == "cuda" else None
    dtype = dtype or torch.float32  # greedy answers on a CPU are quickest without bf16 casts
    base = _load(where, dtype, device, **kwargs)
    before = [answer(base, tokenizer, p, samples.max_new_tokens) for p in prompts]
    if cfg.method.is_peft:
        from peft import PeftModel

        tuned = PeftModel.from_pretrained(base, str(out_dir)).eval()
    else:
        del base
        tuned = _load(str(out_dir), dtype, device, trust_remote_code=cfg.model.trust_remote_code)
    after = [answer(tuned, tokenizer, p, samples.max_new_tokens) for p in prompts]
    records = [
        {
            "row": p.row,
            "prompt": p.shown,
            "reference": p.reference,
            "base": b,
            "tuned": t,
            "truncated": {"base": bt, "tuned": tt},
        }
        for p, (b, bt), (t, tt) in zip(prompts, before, after, strict=True)
    ]
    tmp = out_dir / (SAMPLES_FILE + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    tmp.replace(out_dir / SAMPLES_FILE)
    for r in records:
        log.info("%s%s", SAMPLE_LOG_PREFIX, json.dumps(r, ensure_ascii=False))
    return records
