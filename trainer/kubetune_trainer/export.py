"""What a run leaves in `output.dir`.

adapter_model.safetensors + adapter_config.json   PEFT methods (the adapter only)
model.safetensors (or shards) + config.json        full fine-tuning, in the compute dtype
tokenizer files
merged/                                            output.mergeAdapter: base + adapter merged, with tokenizer
metrics.jsonl                                      one record per log step (appended while training)
data-report.json                                   the data report, written before training (datareport.py)
samples.jsonl                                      base and fine-tuned answers to evaluation.samples (samples.py)
loss.png                                           training, eval and evaluation set loss curves
manifest.json                                      written last: who trained it (identity), base model, dataset
                                                   hashes, downloaded sources (ETags, commits), config, final
                                                   metrics, world size, versions, output checksums
.kubetune-owner.json                               the training the directory belongs to, claimed at the start

An output directory belongs to one training (FineTuneJob uid, run, spec fingerprint): the first trainer to find it
empty claims it; any other finds it taken and stops with a permanent error before training, so no output is ever
overwritten by, or mixed with, another training's files. The checkpoint directory may live inside the output
directory (the operator's default layout); it is not part of the output.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import RunIdentity, TrainerConfig
from .data import SourceFile
from .files import fsync_dir, sha256_file
from .modeling import DTYPES, compute_dtype, source_kwargs
from .progress import rfc3339

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
LOSS_PLOT = "loss.png"
MANIFEST = "manifest.json"
MERGED = "merged"
OWNER = ".kubetune-owner.json"


def _not_output(out_dir: Path, checkpoint_dir: Path) -> set[str]:
    """Top-level names in `out_dir` that are not part of the output: the owner record, and the checkpoint
    directory when it lives inside."""
    names = {OWNER}
    if checkpoint_dir.resolve().is_relative_to(out_dir.resolve()) and checkpoint_dir.resolve() != out_dir.resolve():
        names.add(checkpoint_dir.resolve().relative_to(out_dir.resolve()).parts[0])
    return names


def describe_owner(owner: dict[str, Any]) -> str:
    return ", ".join(f"{k} {owner.get(k) or 'none'}" for k in ("namespace", "name", "uid", "run", "specFingerprint"))


def claim_output(out_dir: Path, identity: RunIdentity, checkpoint_dir: Path) -> str | None:
    """Claim `out_dir` for this training, or say why it cannot be: it holds another training's files (another
    object of the same name, another run or spec, or files from before outputs recorded their owner)."""
    mine = identity.owner(attempt=False)
    record = out_dir / OWNER
    if not record.exists():
        if out_dir.is_dir():
            stray = sorted(p.name for p in out_dir.iterdir() if p.name not in _not_output(out_dir, checkpoint_dir))
            if stray:
                shown = ", ".join(stray[:5]) + (", ..." if len(stray) > 5 else "")
                return (
                    f"output directory {out_dir} already holds files that no training claimed ({shown}); not writing "
                    "over them: move them away, or give this run another output path"
                )
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = out_dir / f"{OWNER}.{os.getpid()}"
        tmp.write_text(json.dumps(mine, indent=1))
        try:
            os.link(tmp, record)  # atomic, and fails if another trainer claimed it meanwhile
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
        fsync_dir(out_dir)
    try:
        theirs = json.loads(record.read_text())
    except (OSError, ValueError):
        theirs = None
    if theirs != mine:
        owner = describe_owner(theirs) if isinstance(theirs, dict) else "an unreadable owner record"
        return (
            f"output directory {out_dir} belongs to another training ({owner}); this one is "
            f"{describe_owner(mine)}: not writing over it: give each run its own output path"
        )
    return None


def write_json(path: Path, doc: Any) -> None:
    """Write a JSON document whole or not at all (a temporary file renamed over it)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(path)


def append_metrics(out_dir: Path, record: dict[str, Any]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / METRICS_FILE, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_metrics(out_dir: Path) -> list[dict[str, Any]]:
    path = out_dir / METRICS_FILE
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue  # a line cut short by a kill
    return records


def keep_metrics_until(out_dir: Path, step: int) -> None:
    """Drop records past the step a run resumes from (they will be produced again)."""
    records = [r for r in read_metrics(out_dir) if r.get("step", 0) <= step]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in records))


def plot_loss(records: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    train = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
    evals = [(r["step"], r["evalLoss"]) for r in records if r.get("evalLoss") is not None]
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss")
    if evals:
        ax.plot(*zip(*evals, strict=True), marker="o", label="eval loss")
    sets: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        for name, figures in (r.get("evalSets") or {}).items():
            if figures.get("loss") is not None:
                sets.setdefault(name, []).append((r["step"], figures["loss"]))
    for name, points in sets.items():
        ax.plot(*zip(*points, strict=True), marker="s", linestyle="--", label=f"{name} (evaluation set)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def save_model(model: nn.Module, cfg: TrainerConfig, out_dir: Path, sharded: bool, is_main: bool) -> None:
    """Collective under FSDP2 (every rank gathers its shards); only rank 0 writes."""
    out_dir.mkdir(parents=True, exist_ok=True)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if cfg.method.is_peft:
        # A sharded adapter is gathered first (only its trained tensors: the frozen base is the source's).
        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        adapter = get_model_state_dict(model, options=options) if sharded else None
        if is_main:
            model.save_pretrained(out_dir, state_dict=adapter)
        return
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=sharded, cpu_offload=sharded))
    if not is_main:
        return
    dtype = compute_dtype(cfg.training.precision) or torch.float32
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in full.items()}
    model.config.dtype = dtype
    model.save_pretrained(out_dir, state_dict=state)


def merge_adapter(cfg: TrainerConfig, out_dir: Path, tokenizer: Any) -> Path:
    """Load the base again on the CPU, apply the saved adapter and write the merged weights."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    where, kwargs = source_kwargs(cfg.model)
    q = cfg.method.qlora
    dtype = DTYPES[q.compute_dtype] if cfg.method.type == "qlora" else compute_dtype(cfg.training.precision)
    base = AutoModelForCausalLM.from_pretrained(where, dtype=dtype or torch.float32, **kwargs)
    merged = PeftModel.from_pretrained(base, str(out_dir)).merge_and_unload()
    target = out_dir / MERGED
    merged.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("kubetune", "torch", "transformers", "peft", "accelerate", "datasets", "bitsandbytes"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            continue
    return out


def write_manifest(
    out_dir: Path,
    cfg: TrainerConfig,
    *,
    files: list[SourceFile],
    eval_files: list[SourceFile],
    sources: dict[str, dict[str, Any]],
    final_metrics: dict[str, Any],
    world_size: int,
    parameters: dict[str, int],
    resumed_from_step: int | None,
    replica_digests: list[str] | None,
    checkpoint_dir: Path,
    memory: list[dict[str, int]],
) -> dict[str, Any]:
    skip = _not_output(out_dir, checkpoint_dir) | {MANIFEST, METRICS_FILE}
    outputs = {
        str(p.relative_to(out_dir)): sha256_file(p)
        for p in sorted(out_dir.rglob("*"))
        if p.is_file() and p.relative_to(out_dir).parts[0] not in skip
    }
    manifest = {
        "kind": "adapter" if cfg.method.is_peft else "model",
        "method": cfg.method.type,
        "baseModel": {"source": cfg.model.source, "revision": cfg.model.revision, "ggufFile": cfg.model.gguf_file},
        "dataset": {
            "format": cfg.dataset.format,
            "files": [vars(f) for f in files],
            "evalFiles": [vars(f) for f in eval_files],
        },
        # s3:// and hf:// dataset sources: where the bytes came from (object ETags, or the commit) and the local copy.
        "sources": sources,
        "config": json.loads(cfg.dump()),
        "finalMetrics": final_metrics,
        "worldSize": world_size,
        "replicaDigests": replica_digests,  # weight checksum on each DDP rank (all equal); null under FSDP
        "parameters": parameters,
        # Per rank: parameter bytes held, peak RSS (whole process, ru_maxrss) before and once the model was built,
        # after training, and after the final evaluation and the export.
        "memory": memory,
        "resumedFromStep": resumed_from_step,
        "identity": cfg.identity.model_dump(by_alias=True),
        "versions": _versions(),
        "merged": MERGED if (out_dir / MERGED).is_dir() else None,
        "outputs": outputs,
        "createdAt": rfc3339(time.time()),
    }
    tmp = out_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2))
    tmp.replace(out_dir / MANIFEST)
    return manifest
