"""Runs inside `unshare --mount --uts` (a private mount and hostname namespace) as the first step of every
container: bind-mounts the container's volumes at the paths the pod asked for, sets the pod's hostname,
changes to the working directory and execs the command. Stdlib only, run as a script by path, so the
container's environment never needs this package on its path.

Usage: python sandbox.py PLAN.json   (PLAN: mounts, hostname, workdir, argv, env, error_file)

A failure before the exec is written to error_file and the process exits 128, which the agent reports
as a StartError like a container runtime does.
"""

from __future__ import annotations

import ctypes
import json
import os
import socket
import sys

MS_RDONLY = 0x1
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000

_libc = ctypes.CDLL(None, use_errno=True)


def _mount(source: str | None, target: str, flags: int) -> None:
    src = source.encode() if source is not None else None
    if _libc.mount(src, target.encode(), None, ctypes.c_ulong(flags), None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {source} on {target}: {os.strerror(err)}")


def _ensure_target(target: str, is_file: bool) -> None:
    # A missing mount point is created on the machine's filesystem (empty; nothing is written through it).
    if is_file:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if not os.path.exists(target):
            open(target, "a").close()
    else:
        os.makedirs(target, exist_ok=True)


def bind(source: str, target: str, read_only: bool) -> None:
    _ensure_target(target, os.path.isfile(source))
    _mount(source, target, MS_BIND | MS_REC)
    if read_only:
        _mount(None, target, MS_BIND | MS_REMOUNT | MS_RDONLY)


def main(plan_path: str) -> None:
    with open(plan_path) as f:
        plan = json.load(f)
    os.unlink(plan_path)  # it holds the container's secrets
    try:
        for m in plan["mounts"]:
            bind(m["source"], m["target"], m["read_only"])
        socket.sethostname(plan["hostname"])
        os.makedirs(plan["workdir"], exist_ok=True)
        os.chdir(plan["workdir"])
    except OSError as e:
        fail(plan, f"failed to create the container: {e}")
    try:
        os.execvpe(plan["argv"][0], plan["argv"], plan["env"])
    except FileNotFoundError:
        fail(plan, f'exec: "{plan["argv"][0]}": executable file not found in $PATH')
    except OSError as e:
        fail(plan, f'exec: "{plan["argv"][0]}": {e.strerror}')


def fail(plan: dict, message: str) -> None:
    with open(plan["error_file"], "w") as f:
        f.write(message)
    print(message, file=sys.stderr)
    sys.exit(128)


if __name__ == "__main__":
    main(sys.argv[1])
