"""Trainer benchmark: `python -m kubetune_trainer.bench` (the `make bench-trainer` target).

Default mode, CPU or GPU: the same random-initialised Llama, the same variable-length prompt/completion data
(lengths spread like real SFT data) and the same LoRA settings, trained for one epoch

- by this trainer (packed rows, exact per-sample attention, no padding), and
- by a plain HF `Trainer` + peft baseline (batches padded to their longest sample),

each in its own process so each gets its own peak memory. Both batches hold about the same number of real
tokens per optimizer step. Printed: real (non-padding) tokens per second of each, their ratio, optimizer
steps, and peak memory (RSS on CPU, CUDA max allocated on GPU).

`--gpu-mfu`: tokens/s and MFU of LoRA on a Llama-3.1-8B-shaped model with random weights on one GPU (packed
rows of variable-length samples, bf16); it exits with code 2 and says so when there is no GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

WORDS = [
    "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet", "kilo", "lima",
    "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango", "uniform", "victor", "whiskey",
]  # fmt: skip
LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "targetModules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
MAX_LEN = 512


# ----------------------------------------------------------------------------------------------
# Shared setup: a model directory and a dataset
# ----------------------------------------------------------------------------------------------


def synthetic_rows(n: int, seed: int) -> list[dict[str, str]]:
    """Prompt/completion pairs whose token lengths follow a long-tailed (log-normal) spread, 10 to ~500."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = max(2, min(480, int(rng.lognormvariate(4.2, 0.8))))
        prompt = f"list {words} words starting with {rng.choice(WORDS)}:"
        rows.append({"prompt": prompt + " ", "completion": " ".join(rng.choice(WORDS) for _ in range(words))})
    return rows


def build_model_dir(path: Path, rows: list[dict[str, str]], hidden: int, layers: int) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    corpus = [r["prompt"] + r["completion"] for r in rows[:2000]]
    trainer = trainers.BpeTrainer(
        vocab_size=1024, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    config = LlamaConfig(
        vocab_size=len(hf_tok),
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=max(1, hidden // 128),
        max_position_embeddings=MAX_LEN,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    hf_tok.save_pretrained(path)


def peak_memory() -> int:
    import torch

    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


# ----------------------------------------------------------------------------------------------
# The two arms (each runs in its own process)
# ----------------------------------------------------------------------------------------------


def arm_ours(work: Path, settings: dict[str, Any]) -> dict[str, Any]:
    from .config import TrainerConfig
    from .runtime import init_runtime
    from .train import run

    cfg = TrainerConfig.model_validate(
        {
            "model": {"source": str(work / "model")},
            "dataset": {"path": str(work / "train.jsonl"), "format": "prompt_completion", "maxSeqLength": MAX_LEN},
            "method": {"type": "lora", "lora": LORA},
            "training": {
                "epochs": 1,
                "learningRate": 2e-4,
                "batchSizePerDevice": settings["packed_batch"],
                "precision": settings["precision"],
                "logEverySteps": 10,
                "seed": 0,
            },
            "checkpoint": {"dir": str(work / "ours" / "ckpt"), "everySteps": 1_000_000},
            "output": {"dir": str(work / "ours" / "out")},
            "metrics": {"port": 0},
        }
    )
    result = run(cfg, init_runtime())
    return {
        "tokens": result["tokensTotal"],
        "seconds": result["trainSeconds"],
        "steps": result["steps"],
        "loss": result["trainLoss"],
        "peak_memory": peak_memory(),
    }


def arm_baseline(work: Path, settings: dict[str, Any]) -> dict[str, Any]:
    import numpy as np
    import peft
    import torch
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from .config import DatasetConfig, ModelConfig
    from .data import IGNORE, prepare
    from .modeling import load_tokenizer

    tokenizer = load_tokenizer(ModelConfig(source=str(work / "model")))
    samples = prepare(
        DatasetConfig(path=str(work / "train.jsonl"), format="prompt_completion", max_seq_length=MAX_LEN), tokenizer, 0
    ).train
    rows = []
    for i in range(len(samples)):
        ids, shifted = samples.get(i)
        labels = np.concatenate([[IGNORE], shifted[:-1]])  # HF shifts inside the model
        rows.append({"input_ids": ids.tolist(), "labels": labels.tolist()})
    bf16 = settings["precision"] == "bf16"
    model = AutoModelForCausalLM.from_pretrained(
        work / "model", attn_implementation="sdpa", dtype=torch.bfloat16 if bf16 else torch.float32
    )
    torch.manual_seed(0)
    model = peft.get_peft_model(
        model,
        peft.LoraConfig(
            r=LORA["r"],
            lora_alpha=LORA["alpha"],
            lora_dropout=0.0,
            target_modules=LORA["targetModules"],
            task_type="CAUSAL_LM",
        ),
    )
    args = TrainingArguments(
        output_dir=str(work / "baseline"),
        per_device_train_batch_size=settings["padded_batch"],
        num_train_epochs=1,
        learning_rate=2e-4,
        lr_scheduler_type="cosine",
        warmup_steps=0.03,
        bf16=bf16,
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        seed=0,
        disable_tqdm=True,
    )
    collator = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=IGNORE)
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collator)
    out = trainer.train()
    return {
        "tokens": samples.num_tokens,
        "seconds": out.metrics["train_runtime"],
        "steps": out.global_step,
        "loss": out.training_loss,
        "peak_memory": peak_memory(),
    }


# ----------------------------------------------------------------------------------------------
# GPU MFU of an 8B-shaped model
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
    )


def measure_mfu(config: Any, device: str, *, seq: int, batch: int, steps: int, warmup: int) -> dict[str, float]:
    """LoRA (r16, attention projections) steps on packed rows of random tokens; tokens/s and MFU."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from . import attention, mfu
    from .config import TrainerConfig
    from .data import IGNORE, Samples
    from .modeling import apply_method, count_params
    from .optim import make_optimizer
    from .packing import collate_packed, pack_bins
    from .train import token_loss_sum

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    backend = attention.choose(config, torch.device(device), dtype if device == "cuda" else None)
    torch.manual_seed(0)
    with torch.device(device):
        base = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attention.register(backend))
    cfg = TrainerConfig.model_validate(
        {
            "model": {"source": "."},
            "dataset": {"path": "."},
            "method": {"type": "lora", "lora": LORA},
            "training": {"precision": "bf16" if device == "cuda" else "fp32"},
            "checkpoint": {"dir": "."},
            "output": {"dir": "."},
        }
    )
    model = apply_method(base, cfg, tokenizer=None)
    counts = count_params(model, base, is_peft=True)
    optimizer = make_optimizer(model, cfg.training, torch.device(device))
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(np.log(seq / 4), 0.8, size=batch * 64), 32, seq).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    ids = rng.integers(0, config.vocab_size, size=int(offsets[-1])).astype(np.int32)
    labels = np.roll(ids, -1)
    labels[offsets[1:] - 1] = IGNORE
    samples = Samples(ids, labels.astype(np.int32), offsets)
    bins = pack_bins(lengths, seq)
    tokens = squares = 0
    started = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            if device == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
        chosen = [bins[(step * batch + k) % len(bins)] for k in range(batch)]
        b = collate_packed(samples, chosen).to(torch.device(device), bounds_on_device=backend.bounds_on_device)
        with torch.autocast(device, dtype=dtype, enabled=device == "cuda"):
            logits = model(**b.model_inputs()).logits
        (token_loss_sum(logits, b.labels) / b.num_targets).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= warmup:
            tokens += b.num_tokens
            squares += b.sum_squared_lengths
    if device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    tps = tokens / elapsed
    span = squares / tokens
    fpt = mfu.flops_per_token(
        counts.matmul, counts.layers, counts.attention_width, span, peft=True, adapter_params=counts.trainable
    )
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    return {
        "tokens_per_second": tps,
        "mfu": mfu.mfu(fpt, tps, mfu.peak_flops(name)),
        "flops_per_token": fpt,
        "mean_attention_span": span,
        "peak_memory": peak_memory(),
        "parameters": counts.total,
        "trainable": counts.trainable,
        "attention": base.config._attn_implementation,
    }


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def compare(args: argparse.Namespace) -> int:
    import torch

    gpu = torch.cuda.is_available()
    settings = {
        "precision": "bf16" if gpu else "fp32",
        "padded_batch": args.batch,
        # Packed rows of up to 512 tokens carrying about as many real tokens as a padded batch.
        "packed_batch": 0,
    }
    with tempfile.TemporaryDirectory(prefix="kubetune-bench-") as tmp:
        work = Path(tmp)
        rows = synthetic_rows(args.samples, seed=0)
        (work / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        build_model_dir(work / "model", rows, args.hidden, args.layers)
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(work / "model")
        mean_len = sum(len(tok(r["prompt"] + r["completion"])["input_ids"]) + 1 for r in rows) / len(rows)
        settings["packed_batch"] = max(1, round(args.batch * mean_len / MAX_LEN))
        runs: dict[str, list[dict[str, Any]]] = {"baseline": [], "ours": []}
        for _ in range(args.repeat):  # alternate the arms so a busy machine slows both alike
            for arm in ("baseline", "ours"):
                shutil.rmtree(work / arm, ignore_errors=True)  # a fresh run, not a resume of the previous one
                cmd = [sys.executable, "-m", "kubetune_trainer.bench", "--arm", arm, "--workdir", str(work)]
                cmd += ["--settings", json.dumps(settings)]
                done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
                if done.returncode != 0:
                    print(done.stderr[-4000:], file=sys.stderr)
                    return 1
                result = json.loads(done.stdout.strip().splitlines()[-1])
                runs[arm].append({**result, "tps": result["tokens"] / result["seconds"]})
    device = torch.cuda.get_device_name() if gpu else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {device}; precision {settings['precision']}; LoRA r16 on q/k/v/o of a random Llama")
    print(f"model: hidden {args.hidden}, {args.layers} layers")
    print(f"data: {args.samples} samples, mean {mean_len:.0f} tokens, one epoch")
    print(
        f"batches: baseline {args.batch} samples padded to the longest; "
        f"ours {settings['packed_batch']} packed row(s) of up to {MAX_LEN} tokens"
    )
    memory = "CUDA max allocated" if gpu else "peak RSS"
    print(f"best of {args.repeat} alternating runs per arm (all runs: tokens/s in brackets)")
    print(f"{'':10} {'tokens/s':>10} {'steps':>6} {'seconds':>8} {'final loss':>10} {memory:>20}   runs")
    best = {arm: max(r, key=lambda x: x["tps"]) for arm, r in runs.items()}
    for arm in ("ours", "baseline"):
        r = best[arm]
        every = ", ".join(f"{x['tps']:.0f}" for x in runs[arm])
        print(
            f"{arm:10} {r['tps']:10.0f} {r['steps']:6d} {r['seconds']:8.1f} {r['loss']:10.3f} "
            f"{gib(max(x['peak_memory'] for x in runs[arm])):>20}   [{every}]"
        )
    print(f"ratio (ours / baseline tokens/s): {best['ours']['tps'] / best['baseline']['tps']:.2f}x")
    return 0


def gpu_mfu(args: argparse.Namespace) -> int:
    import torch

    if not torch.cuda.is_available():
        print("--gpu-mfu needs a CUDA GPU and this machine has none; nothing measured", file=sys.stderr)
        return 2
    result = measure_mfu(llama_8b_config(), "cuda", seq=args.seq, batch=args.gpu_batch, steps=args.steps, warmup=3)
    print(f"device: {torch.cuda.get_device_name()}; Llama-3.1-8B shape, random weights, bf16, LoRA r16 q/k/v/o")
    print(f"packed rows: {args.gpu_batch} x {args.seq} tokens; mean attention span {result['mean_attention_span']:.0f}")
    print(f"parameters {result['parameters']:,}, trainable {result['trainable']:,}")
    print(f"tokens/s: {result['tokens_per_second']:.0f}")
    print(f"MFU: {100 * result['mfu']:.1f}% ({result['flops_per_token'] / 1e9:.1f} GFLOP/token, dense bf16 peak)")
    print(f"CUDA max allocated: {gib(result['peak_memory'])}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kubetune_trainer.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu-mfu", action="store_true", help="MFU of an 8B-shaped model on a GPU")
    parser.add_argument("--samples", type=int, default=384)
    parser.add_argument("--batch", type=int, default=8, help="samples per padded baseline batch")
    parser.add_argument("--repeat", type=int, default=3, help="runs per arm (the best counts)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=4096, help="--gpu-mfu: packed row length")
    parser.add_argument("--gpu-batch", type=int, default=2, help="--gpu-mfu: packed rows per step")
    parser.add_argument("--steps", type=int, default=10, help="--gpu-mfu: measured steps")
    parser.add_argument("--arm", choices=["ours", "baseline"], help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--settings", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if args.arm:
        run_arm = arm_ours if args.arm == "ours" else arm_baseline
        print(json.dumps(run_arm(Path(args.workdir), json.loads(args.settings))))
        return 0
    if args.gpu_mfu:
        return gpu_mfu(args)
    return compare(args)


if __name__ == "__main__":
    sys.exit(main())
