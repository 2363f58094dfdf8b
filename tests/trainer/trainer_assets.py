"""Offline test assets for the trainer: a BPE tokenizer trained in-process, tiny (and wide) random Llama /
Qwen2 models built from configs, a small learnable dataset in every format, and trainer configs."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path
from typing import Any

WORDS = [
    "apple", "river", "stone", "cloud", "maple", "tiger", "ocean", "pepper", "silver", "garden",
    "rocket", "candle", "forest", "winter", "button", "yellow", "planet", "copper", "violet", "harbor",
]  # fmt: skip
CHAT_TEMPLATE = (
    "{% for m in messages %}<|bos|>{{ m['role'] }}: {{ m['content'] }}<|eos|>{% endfor %}"
    "{% if add_generation_prompt %}<|bos|>assistant: {% endif %}"
)


def task(rng: random.Random) -> tuple[str, str]:
    """Repeat a word k times: learnable by a tiny model, and lengths vary a lot (1 to 24 repeats)."""
    word = rng.choice(WORDS)
    k = rng.randint(1, 24)
    return f"repeat {word} {k} times:", " ".join([word] * k)


def rows(n: int, fmt: str, seed: int = 0) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt, completion = task(rng)
        if fmt == "text":
            out.append({"text": f"{prompt} {completion}"})
        elif fmt == "prompt_completion":
            out.append({"prompt": prompt + " ", "completion": completion})
        elif fmt == "messages":
            out.append(
                {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]}
            )
        elif fmt == "alpaca":
            out.append({"instruction": prompt, "input": "", "output": completion})
        elif fmt == "sharegpt":
            out.append({"conversations": [{"from": "human", "value": prompt}, {"from": "gpt", "value": completion}]})
        else:
            raise ValueError(fmt)
    return out


def write_jsonl(path: Path, items: list[Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in items))
    return path


def make_tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(1)
    corpus = [" ".join(task(rng)) for _ in range(300)] + ["user: assistant: system:"] * 20
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=384,
        min_frequency=1,
        special_tokens=["<|pad|>", "<|bos|>", "<|eos|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", bos_token="<|bos|>", eos_token="<|eos|>")
    hf.chat_template = CHAT_TEMPLATE
    return hf


def model_config(arch: str, vocab: int) -> Any:
    from transformers import LlamaConfig, Qwen2Config

    shape = dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    if arch == "llama":
        return LlamaConfig(**shape)
    if arch == "qwen2":
        return Qwen2Config(**shape, tie_word_embeddings=True)
    raise ValueError(arch)


def make_model_dir(path: Path, arch: str = "llama", seed: int = 0) -> Path:
    """A random-initialised model plus the tokenizer, saved the way a PVC would hold a real one."""
    import torch
    from transformers import AutoModelForCausalLM

    tok = make_tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(copy.deepcopy(model_config(arch, len(tok))))
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def wide_llama_dir(path: Path, hidden: int, layers: int) -> Path:
    """A random Llama whose weights, not the Python runtime, dominate a process's memory: hidden // 64 heads, an MLP
    11/4 as wide, the test tokenizer's 384 tokens. Saved in files of at most 1 GB, so saving holds no second copy of
    a big model."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    tok = make_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=hidden * 11 // 4,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path, max_shard_size="1GB")
    tok.save_pretrained(path)
    return path


def trainer_config(tmp: Path, model_dir: Path, data: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """A complete trainer config document (camelCase, as the operator renders it); sections override."""
    cfg: dict[str, Any] = {
        "model": {"source": str(model_dir)},
        "dataset": {"path": str(data), "format": "prompt_completion", "maxSeqLength": 128, "evalSplit": 0.1},
        "method": {"type": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0}},
        "training": {
            "maxSteps": 20,
            "learningRate": 3e-3,
            "batchSizePerDevice": 2,
            "precision": "fp32",
            "warmupRatio": 0.1,
            "logEverySteps": 5,
            "seed": 7,
        },
        "checkpoint": {"dir": str(tmp / "ckpt"), "everySteps": 10, "keepLast": 2},
        "output": {"dir": str(tmp / "out")},
        "metrics": {"port": 0},
    }
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    return cfg


def write_config(tmp: Path, cfg: dict[str, Any]) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "config.json"
    path.write_text(json.dumps(cfg))
    return path


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def worker_env(**extra: str) -> dict[str, str]:
    """The environment for trainer subprocesses: offline, no termination log outside a pod."""
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith(("KUBETUNE_", "RANK", "WORLD_SIZE", "LOCAL_RANK"))}
    # CPU and gloo even where a GPU exists: these tests pin down CPU behaviour (bitwise resume included).
    env.update(
        HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1"
    )
    env.update(extra)
    return env


def run_launcher(tmp: Path, config: Path, nproc: int = 2, timeout: float = 300, **env: str) -> Any:
    """The kubetune-launch console script, as a pod runs it, on one node of `nproc` local ranks (a CompletedProcess)."""
    import shutil
    import subprocess
    import sys

    exe = shutil.which("kubetune-launch", path=str(Path(sys.executable).parent))
    assert exe, "the kubetune-launch console script is not installed in this environment"
    full_env = worker_env(
        KUBETUNE_CONFIG=str(config),
        KUBETUNE_NPROC_PER_NODE=str(nproc),
        KUBETUNE_MASTER_PORT=str(free_port()),
        KUBETUNE_TERMINATION_LOG=str(tmp / "termination-log"),
        **env,
    )
    return subprocess.run([exe], env=full_env, capture_output=True, text=True, timeout=timeout)


def cpu_runtime() -> Any:
    """A single-process CPU runtime for in-process runs, whatever accelerator the machine has."""
    import torch
    from kubetune_trainer.runtime import Runtime

    return Runtime(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def adapter_tensors(out_dir: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(out_dir / "adapter_model.safetensors")


def losses_by_step(out: Path) -> dict[int, float]:
    """The training loss logged at each step (metrics.jsonl of an output directory)."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def checkpoint_at(root: Path, step: int) -> Path:
    """The one finished checkpoint directory of `step` under a checkpoint root (whatever its lineage)."""
    from kubetune_trainer.checkpoint import list_checkpoints

    [path] = [p for s, p in list_checkpoints(root) if s == step]
    return path


def checkpoint_steps(root: Path) -> list[int]:
    from kubetune_trainer.checkpoint import list_checkpoints

    return [s for s, _ in list_checkpoints(root)]
