"""Checkpoints: atomic, verified, owned, fenced, and complete enough to resume bit for bit.

Layout of `checkpoint.dir` (one run's directory; other trainings may have left files in it too):

    step-00001200-<lineage>/           a finished checkpoint of the training <lineage> (see below)
        state/                         torch.distributed.checkpoint (DCP) of the trainable weights and the optimizer,
                                       sharded per rank under FSDP2 (so it reloads on any world size)
        rng-rank00000.pt ...           python, numpy, torch CPU and CUDA RNG states of every rank
        scheduler.pt                   LR scheduler and fp16 grad-scaler state
        trainer_state.json             global step, epoch, tokens, world size, the progress history
        manifest.json                  who wrote it (identity, lineage, dataset digests) and the sha256 and size of
                                       every other file; written last
    .attempt-<run key>-00000003/       attempt 3's scratch space: checkpoints being written, rotated ones being
                                       deleted. Its existence is also attempt 3's fence (below).
    corrupt-step-...                   own checkpoints found damaged, kept for inspection

Ownership. A checkpoint belongs to the training that wrote it: the FineTuneJob object (uid), the run, the spec
fingerprint and the dataset contents, hashed into its `lineage`. A trainer resumes from, re-uses and rotates only
checkpoints of its own lineage; every other one (another object of the same name, another run, a changed spec or
dataset, or a checkpoint from before checkpoints carried an identity) is a stranger: left untouched and listed in
`ignored` with the reason. The lineage in the directory name keeps two trainings from ever wanting the same name;
the manifest is what decides.

Saving. Each rank writes its share into the attempt's scratch directory, every rank hashes a share of the files,
rank 0 writes the manifest, fsyncs and renames the directory into place, then rotates. A valid checkpoint is never
written again: a save of a step that already has one (a SIGTERM right after a save or right after resuming, or a
late writer that got there first) returns it. Nothing valid is ever deleted before its replacement is in place:
rotation deletes the oldest beyond `keepLast` only after the new one is renamed in, by renaming it into scratch
first (a kill leaves it whole or gone, never half-deleted under its own name).

Fencing (no locks; only atomic mkdir and rename, so it holds on NFS). Each attempt's rank 0 creates its scratch
directory `.attempt-<run key>-<attempt>` before anything else: the fence is the highest attempt with such a
directory. A writer whose attempt is below the fence is superseded: it checks before writing, before the rename and
before rotating, and stops (`Fenced`) without saving, renaming, rotating or deleting anything. Scratch directories
are per attempt, so a new attempt never deletes a live older one's unfinished save; it cleans an older attempt's
scratch only once nothing was written there for STALE_SECONDS (longer than any grace period). A newer attempt
checks the fence before it lists checkpoints, and an older one checks it again before it rotates, so an older
writer's rotation never deletes the checkpoint a newer attempt loads.

The data position needs no state of its own: it is a pure function of the global step (see packing.py).
"""

from __future__ import annotations

import hashlib
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from .config import CheckpointConfig, RunIdentity
from .errors import Terminated
from .files import fsync_dir, sha256_file
from .runtime import Runtime

log = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step-(\d{8})(?:-([0-9a-f]{12}))?$")
ATTEMPT_DIR = re.compile(r"^\.attempt-([0-9a-f]{12})-(\d{8})$")
LEGACY_TMP = ".tmp-step-"
MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"
SCHEDULER = "scheduler.pt"
STATE = "state"
# An older attempt's scratch is cleaned once untouched this long: longer than any pod's grace period (at most 600 s),
# with room for clock skew between nodes and the file server.
STALE_SECONDS = 1800.0
MAX_IGNORED_REPORTED = 20


class Fenced(Terminated):
    """A newer attempt of the run started: this one must not write anything more."""

    def __init__(self, attempt: int, fence: int) -> None:
        super().__init__(
            f"attempt {attempt} is superseded by attempt {fence}: it saves, rotates and exports nothing more"
        )
        self.fence = fence


# ----------------------------------------------------------------------------------------------
# names and ownership (pure)
# ----------------------------------------------------------------------------------------------


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:12]


def run_key(identity: RunIdentity) -> str:
    """The run of one FineTuneJob object: what attempts are counted (and fenced) within."""
    return _digest([identity.namespace, identity.name, identity.uid, identity.run])


def lineage_key(identity: RunIdentity, dataset_sha256: list[str]) -> str:
    """One training: the run, the spec that defines it and the bytes of its data. Equal lineages may resume
    from each other's checkpoints; different ones never do."""
    return _digest([run_key(identity), identity.spec_fingerprint, dataset_sha256])


def stranger_reason(manifest: dict[str, Any], identity: RunIdentity, dataset_sha256: list[str]) -> str | None:
    """Why a checkpoint with this manifest is not this training's, or None when it is."""
    theirs = manifest.get("identity")
    if not isinstance(theirs, dict):
        return "written before checkpoints recorded who wrote them"
    if theirs.get("uid") != identity.uid or theirs.get("namespace", identity.namespace) != identity.namespace:
        return f"another FineTuneJob object (uid {theirs.get('uid') or 'none'}; this one is {identity.uid or 'none'})"
    if theirs.get("run") != identity.run:
        return f"run {theirs.get('run')} (this is run {identity.run})"
    if theirs.get("specFingerprint") != identity.spec_fingerprint:
        return f"another spec (fingerprint {theirs.get('specFingerprint') or 'none'})"
    if manifest.get("datasetSha256") != dataset_sha256:
        return "other dataset contents (the files' sha256 differ)"
    return None


def step_dir(root: Path, step: int, lineage: str) -> Path:
    return root / f"step-{step:08d}-{lineage}"


def list_checkpoints(root: Path, lineage: str | None = None) -> list[tuple[int, Path]]:
    """Finished checkpoint directories (of one lineage if given), oldest first; validity not checked."""
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = STEP_DIR.match(p.name)
        if m and p.is_dir() and (lineage is None or m.group(2) == lineage):
            found.append((int(m.group(1)), p))
    return sorted(found)


def attempt_dirs(root: Path, key: str) -> dict[int, Path]:
    """The scratch directories (fences) of the run `key`, by attempt."""
    if not root.is_dir():
        return {}
    return {int(m.group(2)): p for p in root.iterdir() if (m := ATTEMPT_DIR.match(p.name)) and m.group(1) == key}


def _newest_mtime(path: Path) -> float:
    newest = path.lstat().st_mtime
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            try:
                newest = max(newest, os.lstat(os.path.join(dirpath, name)).st_mtime)
            except FileNotFoundError:
                continue
    return newest


# ----------------------------------------------------------------------------------------------
# files of one checkpoint
# ----------------------------------------------------------------------------------------------


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


def read_manifest(path: Path) -> dict[str, Any] | None:
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


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
    manifest = read_manifest(path)
    files = manifest.get("files") if manifest else None
    if not isinstance(files, dict):
        return problems(path)
    names = sorted(files)
    found = [p for p in rt.gather_objects(problems(path, names[rt.rank :: rt.world_size])) if p]
    return found[0] if found else problems(path, [])


def write(
    tmp: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    extra: dict[str, Any],
    trainer_state: dict[str, Any],
    header: dict[str, Any],
    rt: Runtime,
    peft: bool,
) -> None:
    """Collective: every rank writes its share of one checkpoint into `tmp` (which rank 0 created), then rank 0
    writes the manifest (`header` plus the checksums) and syncs the directory."""
    msd, osd = _state_dicts(model, optimizer, peft)
    with _quiet_single_process():
        dcp.save({"model": msd, "optimizer": osd}, checkpoint_id=str(tmp / STATE))
    _save_file(rng_state(), tmp / f"rng-rank{rt.rank:05d}.pt")
    if rt.is_main:
        _save_file(extra, tmp / SCHEDULER)
        _write_text(tmp / TRAINER_STATE, json.dumps(trainer_state))
    rt.barrier()
    checksums = _hash_share(tmp, _files(tmp), rt)
    if rt.is_main:
        manifest = {**header, "worldSize": rt.world_size, "createdAt": time.time(), "files": checksums}
        _write_text(tmp / MANIFEST, json.dumps(manifest, indent=1))
        fsync_dir(tmp / STATE)
        fsync_dir(tmp)


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


# ----------------------------------------------------------------------------------------------
# the policy
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ignored:
    path: str
    reason: str


class CheckpointManager:
    """Everything about one training's checkpoints: whose they are, when to save, never saving a step twice,
    what to rotate, and the attempt fence. Methods marked collective must be called by every rank."""

    def __init__(self, cfg: CheckpointConfig, identity: RunIdentity, rt: Runtime, peft: bool) -> None:
        self.cfg = cfg
        self.identity = identity
        self.rt = rt
        self.peft = peft
        self.root = Path(cfg.dir)
        self.key = run_key(identity)
        self.scratch = self.root / f".attempt-{self.key}-{identity.attempt:08d}"
        self.lineage: str | None = None
        self.dataset_sha256: list[str] = []
        self.ignored: list[Ignored] = []
        self.saved: tuple[int, Path] | None = None  # the newest valid checkpoint of ours that this process knows
        self.last_save_time = time.time()

    # -- fence ---------------------------------------------------------------------------------------

    def fence(self) -> int:
        """The highest attempt of this run that has started (rank 0's view)."""
        return max(attempt_dirs(self.root, self.key), default=0)

    def superseded(self) -> bool:
        """Rank 0's local view: a newer attempt of the run has started."""
        return self.fence() > self.identity.attempt

    def _agree(self, value: Any) -> Any:
        """Rank 0's value, on every rank (collective)."""
        return self.rt.gather_objects(value)[0]

    def check_fence(self) -> None:
        """Collective: raise Fenced on every rank when a newer attempt of the run has started."""
        fence = self._agree(self.fence() if self.rt.is_main else None)
        if fence > self.identity.attempt:
            raise Fenced(self.identity.attempt, fence)

    def enter(self) -> None:
        """Collective, first thing of an attempt: raise this attempt's fence, so that older attempts' late writers
        stop, and stop at once if a newer attempt already raised its own."""
        if self.rt.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            if self.scratch.is_dir():  # a previous process of this same attempt: nothing in it is alive
                for leftover in self.scratch.iterdir():
                    shutil.rmtree(leftover, ignore_errors=True)
            self.scratch.mkdir(exist_ok=True)
            fsync_dir(self.root)
        self.check_fence()

    def _clean_stale_scratch(self) -> None:
        """Rank 0: remove older attempts' scratch directories that nothing has written to for STALE_SECONDS
        (their writers are gone: killed at the latest at the end of their grace period)."""
        now = time.time()
        for attempt, path in attempt_dirs(self.root, self.key).items():
            if attempt >= self.identity.attempt:
                continue
            try:
                idle = now - _newest_mtime(path)
            except FileNotFoundError:
                continue
            if idle > STALE_SECONDS:
                log.info("removing the scratch of attempt %d (untouched for %.0f s): %s", attempt, idle, path)
                shutil.rmtree(path, ignore_errors=True)

    # -- resume ----------------------------------------------------------------------------------------

    def bind(self, dataset_sha256: list[str]) -> None:
        """What this training is, once its data is known: its lineage (the suffix of its checkpoints' names)."""
        self.dataset_sha256 = list(dataset_sha256)
        self.lineage = lineage_key(self.identity, self.dataset_sha256)

    def _classify(self) -> tuple[list[tuple[int, Path]], list[Ignored]]:
        """Rank 0: this training's finished checkpoints (oldest first) and every stranger, with the reason."""
        mine: list[tuple[int, Path]] = []
        strangers: list[Ignored] = []
        for step, path in list_checkpoints(self.root):
            manifest = read_manifest(path)
            named_ours = path.name.endswith(f"-{self.lineage}")
            if manifest is None:
                if named_ours:  # only a finished save gets this name: damaged since, dealt with as ours
                    mine.append((step, path))
                else:
                    strangers.append(Ignored(str(path), "no readable manifest: not known whose it is"))
                continue
            reason = stranger_reason(manifest, self.identity, self.dataset_sha256)
            if reason is None and manifest.get("lineage") == self.lineage and named_ours:
                mine.append((step, path))
            else:
                strangers.append(Ignored(str(path), reason or "named for another training"))
        for leftover in sorted(self.root.glob(LEGACY_TMP + "*")):
            strangers.append(Ignored(str(leftover), "an unfinished save from before checkpoints recorded their owner"))
        return mine, strangers

    def resume_point(self) -> Path | None:
        """Collective: the newest valid checkpoint of this training, or None. Own checkpoints that fail
        verification are moved aside (`corrupt-...`); strangers are left alone and listed in `ignored`."""
        assert self.lineage is not None, "bind() first"
        self.check_fence()
        classified = self._classify() if self.rt.is_main else None
        mine, strangers = self._agree(classified)
        self.ignored = strangers
        if self.rt.is_main:
            for item in strangers:
                log.warning("ignoring %s: %s", item.path, item.reason)
            self._clean_stale_scratch()
        for step, path in reversed(mine):
            reason = _verify(path, self.rt)
            if reason is None:
                self.saved = (step, path)
                return path
            if self.rt.is_main:
                aside = path.with_name(f"corrupt-{path.name}-{int(time.time())}")
                log.warning("checkpoint %s is not valid (%s); skipping it, moved to %s", path, reason, aside.name)
                os.rename(path, aside)
                self.ignored.append(Ignored(str(aside), f"not valid: {reason}"))
            self.rt.barrier()
        return None

    def load(self, path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        restored = load(path, model, optimizer, self.rt, self.peft)
        self.last_save_time = time.time()
        return restored

    # -- when to save ---------------------------------------------------------------------------------

    def time_due(self, step: int) -> bool:
        """Rank 0's vote for a time-based save (the loop agrees on it with the other ranks): the period passed
        since the last save (or the start), and something was trained since."""
        minutes = self.cfg.every_minutes
        if not minutes or not self.rt.is_main or step == (self.saved[0] if self.saved else 0):
            return False
        return time.time() - self.last_save_time >= minutes * 60

    def step_due(self, step: int, final: bool) -> bool:
        every = self.cfg.every_steps
        return final or bool(every and step % every == 0)

    def saved_at(self, step: int) -> Path | None:
        """The valid checkpoint of `step` this process knows of (saved or resumed from), if any."""
        return self.saved[1] if self.saved and self.saved[0] == step else None

    # -- saving ---------------------------------------------------------------------------------------

    def save(
        self,
        step: int,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        extra: dict[str, Any],
        trainer_state: dict[str, Any],
    ) -> Path:
        """Collective: checkpoint `step` unless it already has a valid checkpoint of ours; returns it.
        Raises Fenced (on every rank) when a newer attempt started, having written nothing outside scratch."""
        assert self.lineage is not None, "bind() first"
        known = self.saved_at(step)
        if known is not None:
            log.info("step %d is already checkpointed in %s; not saving it again", step, known)
            return known
        self.check_fence()
        final = step_dir(self.root, step, self.lineage)
        tmp = self.scratch / final.name
        if self.rt.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / STATE).mkdir(parents=True)
        self.rt.barrier()
        header = {
            "step": step,
            "identity": self.identity.owner(attempt=True),
            "lineage": self.lineage,
            "datasetSha256": self.dataset_sha256,
        }
        write(tmp, model, optimizer, extra, trainer_state, header, self.rt, self.peft)
        outcome = self._commit(tmp, final) if self.rt.is_main else None
        fence = self._agree(outcome)
        if fence is not None:
            raise Fenced(self.identity.attempt, fence)
        self.saved = (step, final)
        self.last_save_time = time.time()
        return final

    def _commit(self, tmp: Path, final: Path) -> int | None:
        """Rank 0: put a written checkpoint in place and rotate. Returns the fence when superseded (having then
        changed nothing: its unfinished save stays in its scratch until the newer attempt finds it stale), else
        None."""
        fence = self.fence()
        if fence > self.identity.attempt:
            return fence
        if final.exists():
            # Another writer of this same training got there first (a late older attempt): keep its valid save.
            reason = problems(final)
            if reason is None:
                log.info("%s was saved meanwhile by another attempt of this training; keeping it", final)
                shutil.rmtree(tmp, ignore_errors=True)
                return None
            aside = final.with_name(f"corrupt-{final.name}-{int(time.time())}")
            log.warning("checkpoint %s is not valid (%s); moved to %s", final, reason, aside.name)
            os.rename(final, aside)
        os.rename(tmp, final)
        fsync_dir(self.root)
        fence = self.fence()
        if fence > self.identity.attempt:  # a newer attempt may be loading what rotation would delete
            return fence
        self._rotate()
        self._clean_stale_scratch()
        return None

    def _rotate(self) -> None:
        """Rank 0: keep the newest `keepLast` checkpoints of this training; others' are not ours to delete."""
        assert self.lineage is not None
        own = [
            (step, path)
            for step, path in list_checkpoints(self.root, self.lineage)
            if (m := read_manifest(path)) is not None
            and m.get("lineage") == self.lineage
            and stranger_reason(m, self.identity, self.dataset_sha256) is None
        ]
        for _, path in own[: -self.cfg.keep_last]:
            trash = self.scratch / f"rotated-{path.name}"
            os.rename(path, trash)  # gone from view at once; the deletion below may be cut short harmlessly
            shutil.rmtree(trash, ignore_errors=True)

    def ignored_report(self) -> list[dict[str, str]]:
        return [{"path": i.path, "reason": i.reason} for i in self.ignored[:MAX_IGNORED_REPORTED]]
