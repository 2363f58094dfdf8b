"""Fault injection into trainer subprocesses, for tests (the trainer itself has no test hooks).

A test puts this directory first on PYTHONPATH and describes the faults in $KUBETUNE_TEST_FAULTS (JSON); Python
imports `sitecustomize` at start-up, and this one wraps os.fsync, os.rename, os.replace and shutil.rmtree. A call on
a checkpoint (a path below `root` with "step-" in it) is an event:

    write     an fsync of a checkpoint's file or directory (DCP fsyncs every file it writes, so these mark the
              progress of the writing part of a save)
    dir-op    a rename or deletion of a whole checkpoint directory (putting one in place, moving one aside,
              rotating one out, clearing a leftover), counted twice: just before and just after the call
    rename    a checkpoint directory renamed into place in root (counted after the call)
    event     any of them, and renames of files inside a checkpoint (DCP's metadata)

The document: {"root": path, "log": path (optional), "faults": [{"on": kind, "nth": n, "signal": name}, ...]}.
A fault sends the signal (TERM, KILL or STOP) to the process at the n-th event of its kind; "after-term" counts
the dir-op events that follow the first SIGTERM (a grace period running out at a chosen point of the stop).
The log gets every event and signal as a JSON line.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
from typing import Any

CHECKPOINT_DIR = re.compile(r"^(\.tmp-|rotated-|corrupt-)?step-\d{8}")


def _install(cfg: dict[str, Any]) -> None:
    root = os.path.realpath(cfg["root"])
    counts: dict[str, int] = {}
    termed = [False]
    log = open(cfg["log"], "a", buffering=1) if cfg.get("log") else None  # noqa: SIM115 (lives with the process)

    def ours(path: Any) -> bool:
        real = os.path.realpath(os.fspath(path))
        return real.startswith(root + os.sep) and "step-" in real[len(root) :]

    def is_checkpoint_dir(path: Any) -> bool:
        return bool(CHECKPOINT_DIR.match(os.path.basename(os.fspath(path))))

    def write(record: dict[str, Any]) -> None:
        if log:
            log.write(json.dumps(record) + "\n")

    def happened(kinds: list[str], record: dict[str, Any]) -> None:
        write(record)
        if termed[0] and "dir-op" in kinds:
            kinds = [*kinds, "after-term"]
        for kind in kinds:
            counts[kind] = counts.get(kind, 0) + 1
        for fault in cfg.get("faults", []):
            if fault["on"] in kinds and counts[fault["on"]] == fault["nth"]:
                sig = signal.Signals[f"SIG{fault['signal']}"]
                write({"signal": sig.name, "on": fault["on"], "nth": fault["nth"]})
                termed[0] = termed[0] or sig == signal.SIGTERM
                os.kill(os.getpid(), sig)

    real_fsync, real_rename, real_replace, real_rmtree = os.fsync, os.rename, os.replace, shutil.rmtree

    def fsync(fd: Any) -> None:
        real_fsync(fd)
        try:
            path = os.readlink(f"/proc/self/fd/{fd if isinstance(fd, int) else fd.fileno()}")
        except OSError:
            return
        if ours(path):
            happened(["event", "write"], {"op": "fsync", "path": path})

    def renamer(real: Any, op: str) -> Any:
        def rename(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
            if not (ours(src) or ours(dst)):
                real(src, dst, *args, **kwargs)
                return
            dir_op = is_checkpoint_dir(src) and is_checkpoint_dir(dst)
            kinds = ["event", "dir-op"] if dir_op else ["event"]
            record = {"op": op, "source": os.fspath(src), "path": os.fspath(dst)}
            happened(kinds, {**record, "when": "before"})
            real(src, dst, *args, **kwargs)
            placed = os.path.realpath(os.fspath(dst))
            into_place = dir_op and os.path.dirname(placed) == root and os.path.basename(placed).startswith("step-")
            after = {**record, "when": "after", "inode": os.stat(dst).st_ino}
            happened([*kinds, "rename"] if into_place else kinds, after)

        return rename

    def rmtree(path: Any, *args: Any, **kwargs: Any) -> None:
        if not ours(path):
            real_rmtree(path, *args, **kwargs)
            return
        kinds = ["event", "dir-op"] if is_checkpoint_dir(path) else ["event"]
        happened(kinds, {"op": "rmtree", "path": os.fspath(path), "when": "before"})
        real_rmtree(path, *args, **kwargs)
        happened(kinds, {"op": "rmtree", "path": os.fspath(path), "when": "after"})

    os.fsync = fsync
    os.rename = renamer(real_rename, "rename")
    os.replace = renamer(real_replace, "replace")
    shutil.rmtree = rmtree  # type: ignore[assignment]


_spec = os.environ.get("KUBETUNE_TEST_FAULTS")
if _spec:
    _install(json.loads(_spec))
