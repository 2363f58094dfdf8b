"""Checkpoints: atomic, verified, rotated, and complete enough to resume bit for bit.

Layout of `<checkpoint.dir>/step-00001200/`:

    state/                 torch.distributed.checkpoint (DCP) of the trainable weights and the optimizer,
                           sharded per rank under FSDP2 (so it reloads on any world size)
    rng-rank00000.pt ...   python, numpy, torch CPU and CUDA RNG states of every rank
    scheduler.pt           LR scheduler and fp16 grad-scaler state
    trainer_state.json     global step, epoch, tokens, world size, the progress history
    manifest.json          sha256 and size of every other file; written last

A save writes everything into `.tmp-step-XXXXXXXX` (DCP fsyncs its files, the rest is fsynced too), lets
every rank hash a share of the files, writes the manifest, fsyncs and renames the directory into place. A
checkpoint is valid when its manifest parses and every listed file has the listed size and sha256, so a
process killed mid-save leaves only a `.tmp-` directory (removed at the next start) and a damaged file is
caught at resume. Invalid checkpoints newer than the one resumed from are renamed `corrupt-step-...` and
kept for inspection. After each save only the newest `keepLast` checkpoints stay.

The data position needs no state of its own: it is a pure function of the global step (see packing.py).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from .files import fsync_dir, sha256_file
from .runtime import Runtime

log = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step-(\d{8})$")
MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"
SCHEDULER = "scheduler.pt"
STATE = "state"


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:08d}"


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Finished checkpoint directories, oldest first (validity not checked)."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return sorted(found)


def _save_file(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _write_text(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)


def _dcp_options(peft: bool) -> StateDictOptions:
    # A PEFT checkpoint holds the adapter only; the frozen base comes from the model source again.
    return StateDictOptions(ignore_frozen_params=peft, strict=not peft)


def _state_dicts(model: nn.Module, optimizer: torch.optim.Optimizer, peft: bool) -> tuple[dict[str, Any], Any]:
    msd, osd = get_state_dict(model, optimizer, options=_dcp_options(peft))
    if peft:  # frozen buffers (e.g. bitsandbytes quantisation constants) are not ours to save either
        trained = {name for name, p in model.named_parameters() if p.requires_grad}
        msd = {k: v for k, v in msd.items() if k in trained}
    return msd, osd


@contextmanager
def _quiet_single_process() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to .* in a single process.*")
        yield


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _hash_share(root: Path, files: list[str], rt: Runtime) -> dict[str, dict[str, Any]]:
    """Every rank hashes every world_size-th file; the union is returned to all."""
    mine = {
        f: {"sha256": sha256_file(root / f), "bytes": (root / f).stat().st_size}
        for f in files[rt.rank :: rt.world_size]
    }
    merged: dict[str, dict[str, Any]] = {}
    for part in rt.gather_objects(mine):
        merged.update(part)
    return merged


def save(
    root: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    extra: dict[str, Any],
    trainer_state: dict[str, Any],
    rt: Runtime,
    peft: bool,
    keep_last: int,
) -> Path:
    """Collective: every rank must call it. Returns the final checkpoint directory."""
    tmp = root / f".tmp-step-{step:08d}"
    if rt.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / STATE).mkdir(parents=True)
    rt.barrier()
    msd, osd = _state_dicts(model, optimizer, peft)
    with _quiet_single_process():
        dcp.save({"model": msd, "optimizer": osd}, checkpoint_id=str(tmp / STATE))
    _save_file(rng_state(), tmp / f"rng-rank{rt.rank:05d}.pt")
    if rt.is_main:
        _save_file(extra, tmp / SCHEDULER)
        _write_text(tmp / TRAINER_STATE, json.dumps(trainer_state))
    rt.barrier()
    checksums = _hash_share(tmp, _files(tmp), rt)
    final = step_dir(root, step)
    if rt.is_main:
        manifest = {"step": step, "worldSize": rt.world_size, "createdAt": time.time(), "files": checksums}
        _write_text(tmp / MANIFEST, json.dumps(manifest, indent=1))
        fsync_dir(tmp / STATE)
        fsync_dir(tmp)
        if final.exists():  # an invalid leftover at this step (valid ones are never re-saved)
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync_dir(root)
        rotate(root, keep_last)
    rt.barrier()
    return final


def rotate(root: Path, keep_last: int) -> None:
    for _, path in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)


def problems(path: Path, files: list[str] | None = None) -> str | None:
    """Why a checkpoint is not usable (checking only `files` of its manifest if given), or None."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        listed: dict[str, dict[str, Any]] = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"no readable manifest ({type(e).__name__})"
    for name in sorted(listed) if files is None else files:
        entry = listed[name]
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != entry["bytes"]:
            return f"{name} has {f.stat().st_size} bytes, the manifest says {entry['bytes']}"
        if sha256_file(f) != entry["sha256"]:
            return f"{name} does not match its sha256"
    if TRAINER_STATE not in listed or SCHEDULER not in listed:
        return "incomplete manifest"
    return None


def _verify(path: Path, rt: Runtime) -> str | None:
    """Collective check of one checkpoint, the hashing shared between ranks."""
    try:
        names = sorted(json.loads((path / MANIFEST).read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        names = None
    if names is None:
        return problems(path)
    found = [p for p in rt.gather_objects(problems(path, names[rt.rank :: rt.world_size])) if p]
    return found[0] if found else problems(path, [])


def find_latest_valid(root: Path, rt: Runtime) -> Path | None:
    """Collective: the newest valid checkpoint; half-written and invalid newer ones are cleared away."""
    if rt.is_main and root.is_dir():
        for leftover in root.glob(".tmp-step-*"):
            log.warning("removing half-written checkpoint %s", leftover)
            shutil.rmtree(leftover, ignore_errors=True)
    rt.barrier()
    for _, path in reversed(list_checkpoints(root)):
        reason = _verify(path, rt)
        if reason is None:
            return path
        if rt.is_main:
            aside = path.with_name(f"corrupt-{path.name}-{int(time.time())}")
            log.warning("checkpoint %s is not valid (%s); skipping it, moved to %s", path, reason, aside.name)
            os.rename(path, aside)
        rt.barrier()
    return None


def load(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, rt: Runtime, peft: bool) -> dict[str, Any]:
    """Restore weights, optimizer and this rank's RNG; return the trainer state and the scheduler extras."""
    options = _dcp_options(peft)
    msd, osd = _state_dicts(model, optimizer, peft)
    state = {"model": msd, "optimizer": osd}
    with _quiet_single_process():
        dcp.load(state, checkpoint_id=str(path / STATE))
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"], options=options
    )
    rng_file = path / f"rng-rank{rt.rank:05d}.pt"
    trainer_state = json.loads((path / TRAINER_STATE).read_text())
    if rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=False))
    else:
        log.warning("checkpoint %s has no RNG state for rank %d (world size changed); reseeding", path, rt.rank)
        torch.manual_seed(trainer_state["step"] * 1_000_003 + rt.rank)
    extra = torch.load(path / SCHEDULER, weights_only=False)
    return {"trainer": trainer_state, "extra": extra}
