"""`make gpu-check` (hack/gpu-check.sh): what only a GPU can prove, on one GPU, in under 8 minutes.

1. qlora, varlen: the GPU tests (pytest -m gpu): QLoRA trains (bitsandbytes 4-bit), and the varlen flash kernel
   equals the per-sample reference with no device-to-host copy (sliding window included).
2. fsdp2-full, fsdp2-lora: FSDP2 in bf16 over a one-rank NCCL group, loaded the sharded way (meta device, stand-ins,
   each rank's rows read from the safetensors files) against the same model loaded whole: the losses of a few
   AdamW steps must agree. The model is a random ~1B-parameter Llama built from a config and saved locally.
3. mfu: `python -m kubetune_trainer.bench --gpu`: tokens/s and MFU of LoRA r16 on a Llama-3.1-8B-shaped model.

Nothing is downloaded: every model is random-initialised from a config. Each check prints one line,
"PASS|FAIL <check>: <figures>", and the exit code is the number of failures.

`--dry-run` runs the same code on the CPU with a tiny model (gloo instead of NCCL, fp32): the GPU tests skip, and
the figures mean nothing; it proves that the script and the code paths it drives run.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def report(name: str, ok: bool, figures: str) -> bool:
    print(f"{'PASS' if ok else 'FAIL'} {name}: {figures}", flush=True)
    return ok


def gpu_tests(dry_run: bool) -> bool:
    """QLoRA and the varlen kernel, through the tests that need a GPU; on a GPU none may skip."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-rs", "-p", "no:cacheprovider"]
    cmd += ["tests/trainer/test_methods.py", "tests/trainer/test_attention.py"]
    started = time.monotonic()
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    summary = (done.stdout.strip().splitlines() or ["(no output)"])[-1]
    skipped = "skipped" in summary
    ok = done.returncode == 0 and (dry_run or not skipped)
    if not ok:
        print(done.stdout[-4000:] + done.stderr[-2000:], file=sys.stderr)
    return report("qlora+varlen", ok, f"{summary} in {time.monotonic() - started:.0f}s")


def model_config(dry_run: bool) -> Any:
    from transformers import LlamaConfig

    if dry_run:
        shape: dict[str, int] = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2)
        shape.update(num_attention_heads=4, num_key_value_heads=2, vocab_size=512)
    else:  # ~1.1B parameters, Llama-3 proportions
        shape = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16)
        shape.update(num_attention_heads=16, num_key_value_heads=8, vocab_size=32000)
    return LlamaConfig(**shape, max_position_embeddings=4096)


def trainer_config(model_dir: Path, method: str, precision: str) -> Any:
    from kubetune_trainer.config import TrainerConfig

    return TrainerConfig.model_validate(
        {
            "model": {"source": str(model_dir)},
            "dataset": {"path": "unused"},
            "method": {"type": method, "lora": {"r": 16, "alpha": 32, "dropout": 0.0}},
            "training": {"precision": precision, "learningRate": 1e-4},
            "checkpoint": {"dir": "unused"},
            "output": {"dir": "unused"},
        }
    )


def losses(model: Any, batch: Any, dtype: Any, device: Any, steps: int) -> list[float]:
    import torch

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    out = []
    for _ in range(steps):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        out.append(loss.item())
    return out


def fsdp2(dry_run: bool) -> bool:
    """Sharded loading and FSDP2 training (bf16 on a GPU) against the model loaded whole, full and LoRA."""
    import torch
    import torch.distributed as dist
    from kubetune_trainer import modeling
    from kubetune_trainer.runtime import Runtime
    from transformers import AutoModelForCausalLM

    device = torch.device("cpu" if dry_run else "cuda", 0)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29531")
    dist.init_process_group("gloo" if dry_run else "nccl", rank=0, world_size=1)
    rt = Runtime(0, 1, 0, device, dist.group.WORLD)
    precision = "fp32" if dry_run else "bf16"
    dtype = modeling.compute_dtype(precision)
    ok = True
    try:
        with tempfile.TemporaryDirectory(prefix="kubetune-gpu-check-") as tmp:
            config = model_config(dry_run)
            torch.manual_seed(0)
            with device:  # random initialisation of a 1B model is quick on the GPU
                AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(tmp)
            g = torch.Generator().manual_seed(1)
            batch = torch.randint(0, config.vocab_size, (2, 64 if dry_run else 1024), generator=g).to(device)
            for method in ("full", "lora"):
                cfg = trainer_config(Path(tmp), method, precision)
                config = modeling.load_config(cfg.model)
                started = time.monotonic()
                torch.manual_seed(0)
                whole = modeling.apply_method(modeling.load_model(cfg, config, device, None), cfg, None)
                expected = losses(whole, batch, dtype, device, 3)
                del whole
                torch.manual_seed(0)
                skeleton = modeling.empty_model(cfg, config, None)
                standing_in = modeling.stand_ins(skeleton)
                model = modeling.apply_method(skeleton, cfg, None)
                modeling.shard(model, cfg, config, rt, standing_in)
                got = losses(model, batch, dtype, device, 3)
                del model
                close = all(abs(a - b) <= 2e-2 * abs(b) + 1e-3 for a, b in zip(got, expected, strict=True))
                memory = f", peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device.type == "cuda" else ""
                figures = f"losses {[round(x, 4) for x in got]} vs whole {[round(x, 4) for x in expected]}"
                ok &= report(f"fsdp2-{method}", close, f"{figures}{memory} in {time.monotonic() - started:.0f}s")
    finally:
        dist.destroy_process_group()
    return ok


def mfu(dry_run: bool) -> bool:
    cmd = [sys.executable, "-m", "kubetune_trainer.bench", "--gpu"] + (["--dry-run"] if dry_run else [])
    started = time.monotonic()
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if "tokens/s" in line or line.startswith("ratio")]
    if done.returncode != 0:
        print(done.stdout[-3000:] + done.stderr[-3000:], file=sys.stderr)
    return report("mfu", done.returncode == 0, " | ".join(lines) + f" ({time.monotonic() - started:.0f}s)")


CHECKS: dict[str, Callable[[bool], bool]] = {"gpu-tests": gpu_tests, "fsdp2": fsdp2, "mfu": mfu}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hack/gpu-check.sh", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="on the CPU, tiny model: the code paths, no figures")
    parser.add_argument("--only", default=",".join(CHECKS), help=f"comma-separated: {', '.join(CHECKS)}")
    args = parser.parse_args(argv)
    names = [n for n in args.only.split(",") if n]
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        parser.error(f"--only: unknown check(s) {', '.join(unknown)}")
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu-check needs a CUDA GPU and this machine has none (--dry-run runs it on the CPU)", file=sys.stderr)
        return 2
    os.environ["HF_HUB_OFFLINE"] = "1"  # nothing is downloaded
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    print(f"device: {torch.cuda.get_device_name() if not args.dry_run else 'CPU (dry run)'}", flush=True)
    failures = 0
    for name in names:
        try:
            failures += not CHECKS[name](args.dry_run)
        except Exception as e:  # one broken check must not hide the others' results
            failures += not report(name, False, f"{type(e).__name__}: {e}")
    return failures


if __name__ == "__main__":
    sys.exit(main())
