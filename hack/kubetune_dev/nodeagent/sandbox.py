"""Runs inside `unshare --mount --uts` (a private mount and hostname namespace) as the first step of every
container: forks the container's main process into a PID namespace of its own, where it bind-mounts the
container's volumes at the paths the pod asked for, mounts the namespace's /proc, sets the pod's hostname,
changes to the working directory and execs the command. Stdlib only, run as a script by path, so the
container's environment never needs this package on its path.

Usage: python sandbox.py PLAN.json   (PLAN: mounts, hostname, workdir, argv, env, error_file, scratch,
                                     started_fd)

The main process is PID 1 of its namespace, as in a container: it ignores a signal it has no handler for
(SIGKILL aside), and when it ends, however it ends, the kernel kills every other process of the namespace,
those in a session of their own included (torchrun starts its workers so). This process stays outside the
namespace, the main process's parent: it waits for it and ends as it did (same exit code, or killed by the
same signal), so that the agent, which waits for this process, sees the container's exit. If this process
dies first, the main process is SIGKILLed with it (parent-death signal). `unshare --pid --fork` would do the
same but reports a child killed by SIGKILL as exit 1 (util-linux 2.38), and the agent needs the main
process's pid to signal it.

The machine's filesystem is never written to. A mount point (or working directory) missing on the machine
is created in the namespace only: its parent directory is "shadowed" by a tmpfs holding bind mounts of
everything the parent had, and the new entry is made in that tmpfs. For a parent that is `/` itself, the
process changes root into such a tmpfs. Inside one of the container's own volumes, entries are created
in the volume, as a container runtime does.

A failure before the exec is written to error_file (which stays empty otherwise) and the container exits
128, which the agent reports as a StartError like a container runtime does.

started_fd is the write end of a pipe from the agent, inherited open: this process writes the main
process's pid (as this machine numbers it) to it and closes it; the main process's copy is closed by the
exec (or by the exit), so the agent reads end-of-file once the container's command runs, and only then
reports it running.
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import signal
import socket
import sys
import tempfile
from typing import NoReturn, TextIO

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_MOVE = 0x2000
MS_REC = 0x4000
MS_UNBINDABLE = 0x20000
MNT_DETACH = 0x2
CLONE_NEWPID = 0x20000000
PR_SET_PDEATHSIG = 1

_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(source: str | None, target: str, flags: int, fstype: str | None = None) -> None:
    src = source.encode() if source is not None else None
    fs = fstype.encode() if fstype is not None else None
    _check(_libc.mount(src, target.encode(), fs, ctypes.c_ulong(flags), None), f"mount {source} on {target}")


def _within(path: str, directories: list[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in directories)


def _fd_path(path: str, flags: int = 0) -> str:
    """A path that keeps naming what `path` names now, whatever is mounted over it later."""
    return f"/proc/self/fd/{os.open(path, os.O_PATH | flags)}"


class Sandbox:
    def __init__(self, scratch: str) -> None:
        # The agent's per-container directory, where shadow copies are built. Bound onto itself and made
        # unbindable, recursive binds leave it out: a shadow of a directory above it never copies the
        # mounts being built in it. Used through a descriptor, it stays reachable when a volume covers it.
        os.makedirs(scratch, exist_ok=True)
        _mount(scratch, scratch, MS_BIND)
        _mount(None, scratch, MS_UNBINDABLE)
        self.scratch = _fd_path(scratch, os.O_DIRECTORY)
        self.shadowed: list[str] = []  # directories covered by our tmpfs: entries may be added right there
        self.owned: list[str] = []  # writable volumes and directories we made: entries may be added below

    def shadow(self, directory: str) -> None:
        """Cover `directory` with a tmpfs that bind-mounts everything it held, so entries can be added.
        The copy is built in the scratch directory, then moved over `directory` (or, for `/`, made the root)."""
        holder = tempfile.mkdtemp(dir=self.scratch)
        _mount(directory, holder, MS_BIND | MS_REC)
        copy = tempfile.mkdtemp(dir=self.scratch)
        _mount("tmpfs", copy, 0, "tmpfs")
        for name in os.listdir(holder):
            source, entry = os.path.join(holder, name), os.path.join(copy, name)
            if os.path.islink(source):
                os.symlink(os.readlink(source), entry)
            elif os.path.isdir(source):
                os.mkdir(entry)
                _mount(source, entry, MS_BIND | MS_REC)
            else:
                open(entry, "w").close()
                _mount(source, entry, MS_BIND)
        os.chmod(copy, os.stat(holder).st_mode & 0o7777)
        _check(_libc.umount2(holder.encode(), MNT_DETACH), f"umount {holder}")
        if directory == "/":
            os.chroot(copy)
            os.chdir("/")
        else:
            _mount(copy, directory, MS_MOVE)
        self.shadowed.append(directory)

    def ensure(self, path: str, is_file: bool) -> None:
        """Make `path` exist, creating its missing parents the same way."""
        if os.path.lexists(path):
            return
        parent = os.path.dirname(path)
        self.ensure(parent, is_file=False)
        parent = os.path.realpath(parent)
        if parent not in self.shadowed and not _within(parent, self.owned):
            self.shadow(parent)
        path = os.path.join(parent, os.path.basename(path))
        if is_file:
            open(path, "w").close()
        else:
            os.mkdir(path)
            self.owned.append(path)

    def bind(self, source: str, target: str, read_only: bool) -> None:
        """Bind `source` (a path from _fd_path: a volume may since cover where it lives) at `target`."""
        self.ensure(target, os.path.isfile(source))
        _mount(source, target, MS_BIND | MS_REC)
        if read_only:
            _mount(None, target, MS_BIND | MS_REMOUNT | MS_RDONLY)
        elif os.path.isdir(source):
            self.owned.append(os.path.realpath(target))


def main(plan_path: str) -> None:
    with open(plan_path) as f:
        plan = json.load(f)
    os.unlink(plan_path)  # it holds the container's secrets
    # Opened before any mount can hide its path; left empty when the command starts.
    errors = open(plan["error_file"], "w")  # noqa: SIM115 - closed on exec (not inheritable) or on exit
    try:
        _check(_libc.unshare(CLONE_NEWPID), "unshare(CLONE_NEWPID)")  # for the children of this process
    except OSError as e:
        fail(errors, f"failed to create the container: {e}")
    main_pid = os.fork()
    if main_pid == 0:
        run_container(plan, errors)
    errors.close()
    os.write(plan["started_fd"], str(main_pid).encode())
    os.close(plan["started_fd"])
    end_as(main_pid)


def run_container(plan: dict, errors: TextIO) -> NoReturn:
    """The container's main process, PID 1 of the new PID namespace: set up, then exec the command."""
    try:
        # Should this process's parent die, the container goes with it: the agent counts it ended.
        _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL), "prctl(PR_SET_PDEATHSIG)")
        os.set_inheritable(plan["started_fd"], False)  # closed by the exec: the agent's sign that the command runs
        # The namespace's own /proc: the container sees its own processes, and itself as PID 1.
        _mount("proc", "/proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, "proc")
        # Every source is opened before anything is mounted: a volume at /tmp must not hide the others.
        sources = [_fd_path(m["source"]) for m in plan["mounts"]]
        sandbox = Sandbox(plan["scratch"])
        for m, source in zip(plan["mounts"], sources, strict=True):
            sandbox.bind(source, m["target"], m["read_only"])
        socket.sethostname(plan["hostname"])
        sandbox.ensure(plan["workdir"], is_file=False)
        os.chdir(plan["workdir"])
    except OSError as e:
        fail(errors, f"failed to create the container: {e}")
    try:
        os.execvpe(plan["argv"][0], plan["argv"], plan["env"])
    except FileNotFoundError:
        fail(errors, f'exec: "{plan["argv"][0]}": executable file not found in $PATH')
    except OSError as e:
        fail(errors, f'exec: "{plan["argv"][0]}": {e.strerror}')


def end_as(pid: int) -> NoReturn:
    """Wait for child `pid`, then end the same way: its exit code, or death by its signal."""
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # the container dumped its core if it could; not this
        if code != -signal.SIGKILL:  # SIGKILL's action cannot be set, and is the default already
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    sys.exit(code)


def fail(errors: TextIO, message: str) -> NoReturn:
    errors.write(message)
    errors.close()
    print(message, file=sys.stderr)
    sys.exit(128)


if __name__ == "__main__":
    main(sys.argv[1])
