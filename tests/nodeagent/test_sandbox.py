"""The sandbox a container starts in (needs root, like the agent): volumes at the pod's paths, read-only
where asked, the pod's hostname, and nothing created on the machine for mount points it lacks; the main
process is PID 1 of a PID namespace of its own, and no process of the container outlives it."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from kubetune_dev.nodeagent.runtime import sandbox_command


def write_plan(tmp_path: Path, mounts: list[dict], argv: list[str], workdir: str, started_fd: int) -> list[str]:
    """The plan the agent writes, and the command line it starts the sandbox with."""
    plan = tmp_path / "plan.json"
    plan.write_text(
        json.dumps(
            {
                "mounts": mounts,
                "hostname": "pod-x",
                "workdir": workdir,
                "argv": argv,
                "env": {"PATH": "/usr/bin:/bin", "GREETING": "hi"},
                "error_file": str(tmp_path / "error"),
                "scratch": str(tmp_path / "scratch"),
                "started_fd": started_fd,
            }
        )
    )
    return sandbox_command(plan)


def run_sandbox(tmp_path: Path, mounts: list[dict], argv: list[str], workdir: str = "/") -> subprocess.CompletedProcess:
    started_read, started_write = os.pipe()
    try:
        cmd = write_plan(tmp_path, mounts, argv, workdir, started_write)
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30, pass_fds=(started_write,))
    finally:
        os.close(started_read)
        os.close(started_write)


@contextlib.contextmanager
def sandbox_running(tmp_path: Path, script: str) -> Iterator[tuple[subprocess.Popen, int]]:
    """The sandbox running `sh -c script`, once the script runs, and the pid of its main process; killed at the end."""
    started_read, started_write = os.pipe()
    proc = subprocess.Popen(
        write_plan(tmp_path, [], ["sh", "-c", script], "/", started_write), pass_fds=(started_write,)
    )
    os.close(started_write)
    with os.fdopen(started_read, "rb") as started:
        main_pid = int(started.read())  # the pid, then end-of-file once the command runs
    try:
        yield proc, main_pid
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(main_pid, signal.SIGKILL)
        proc.wait()


def wait_until(condition: Callable[[], object], what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def processes_with(marker: str) -> list[int]:
    """Live processes whose command line holds `marker` (a zombie's is empty)."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if marker.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def test_volumes_land_at_the_pods_paths_without_touching_the_machine(tmp_path: Path) -> None:
    volume, config, hosts, message = tmp_path / "claim", tmp_path / "config", tmp_path / "hosts", tmp_path / "msg"
    scratch_tmp, shm = tmp_path / "tmp-volume", tmp_path / "shm-volume"
    for directory in (volume, config, scratch_tmp, shm):
        directory.mkdir()
    (config / "setting").write_text("lr=0.1\n")
    hosts.write_text("127.0.0.9\tpeer-0.svc\n")
    message.write_text("")
    top, nested = f"/kt-{uuid.uuid4().hex[:8]}", f"/etc/kt-{uuid.uuid4().hex[:8]}"
    # An emptyDir over /tmp comes first and covers every other source (tmp_path is under /tmp).
    mounts = [
        {"source": str(scratch_tmp), "target": "/tmp", "read_only": False},
        {"source": str(shm), "target": "/dev/shm", "read_only": False},
        {"source": str(volume), "target": f"{top}/data", "read_only": False},
        {"source": str(config), "target": f"{nested}/config", "read_only": True},
        {"source": str(hosts), "target": "/etc/hosts", "read_only": True},
        {"source": str(message), "target": "/kt-termination-log", "read_only": False},
    ]
    script = f"""set -e
echo "$GREETING $(hostname) $(pwd)" > {top}/data/out
mkdir {top}/data/made-inside
cat {nested}/config/setting >> {top}/data/out
getent hosts peer-0.svc >> {top}/data/out
echo bye > /kt-termination-log
echo private > /tmp/file
echo shared > /dev/shm/segment
test "$(ls /tmp)" = file
if touch {nested}/config/x 2>/dev/null; then exit 9; fi
"""
    result = run_sandbox(tmp_path, mounts, ["sh", "-c", script], workdir=f"{top}/work")
    assert result.returncode == 0, result.stderr
    assert (volume / "out").read_text() == f"hi pod-x {top}/work\nlr=0.1\n127.0.0.9       peer-0.svc\n"
    assert (volume / "made-inside").is_dir()
    assert message.read_text() == "bye\n"
    assert (scratch_tmp / "file").read_text() == "private\n"
    assert (shm / "segment").read_text() == "shared\n"
    assert (tmp_path / "error").read_text() == ""
    for path in (top, nested, "/kt-termination-log"):
        assert not Path(path).exists(), f"{path} was created on the machine"


def test_a_missing_executable_is_a_start_error(tmp_path: Path) -> None:
    result = run_sandbox(tmp_path, [], ["kt-no-such-binary", "--flag"])
    assert result.returncode == 128
    assert (tmp_path / "error").read_text() == 'exec: "kt-no-such-binary": executable file not found in $PATH'
    assert not (tmp_path / "plan.json").exists(), "the plan holds secrets: the sandbox removes it"


def test_the_started_pipe_closes_once_the_command_runs(tmp_path: Path) -> None:
    """What the agent waits for before it reports a container running: before the exec, a SIGTERM would end the
    sandbox, not the container's command."""
    marker = f"kt-started-{uuid.uuid4().hex[:8]}"
    with sandbox_running(tmp_path, f"sleep 30 # {marker}") as (proc, main_pid):
        assert main_pid != proc.pid
        cmdline = Path(f"/proc/{main_pid}/cmdline").read_bytes().split(b"\0")
        assert cmdline[:2] == [b"sh", b"-c"] and marker.encode() in cmdline[2]


def test_the_main_process_is_pid_1_and_no_process_outlives_it(tmp_path: Path) -> None:
    """A process in a session of its own (as torchrun starts its workers) ends with the main process."""
    marker = f"kt-session-{uuid.uuid4().hex[:8]}"
    script = f"setsid sh -c 'sleep 60; : {marker}' & echo $$; tr '\\0' ' ' < /proc/1/cmdline"
    result = run_sandbox(tmp_path, [], ["sh", "-c", script])
    assert result.returncode == 0, result.stderr
    # PID 1, and the /proc of its own namespace: its PID 1 is the main process, not the machine's init.
    assert result.stdout == f"1\nsh -c {script} "
    assert not processes_with(marker)


def test_the_sandbox_ends_as_the_main_process_does(tmp_path: Path) -> None:
    assert run_sandbox(tmp_path, [], ["sh", "-c", "exit 3"]).returncode == 3

    trapped = tmp_path / "trapped"
    with sandbox_running(tmp_path, f"trap 'exit 7' TERM; touch {trapped}; while :; do sleep 0.1; done") as (proc, pid):
        wait_until(trapped.exists, "the trap was never set")
        os.kill(pid, signal.SIGTERM)
        assert proc.wait(10) == 7

    marker = f"kt-stubborn-{uuid.uuid4().hex[:8]}"
    script = f"setsid sh -c 'sleep 60; : {marker}' & while :; do sleep 0.1; done"
    with sandbox_running(tmp_path, script) as (proc, pid):
        wait_until(lambda: processes_with(marker), "the session's process never started")
        os.kill(pid, signal.SIGTERM)  # no handler: PID 1 ignores it, as in a container
        time.sleep(0.5)
        assert proc.poll() is None
        os.kill(pid, signal.SIGKILL)
        assert proc.wait(10) == -signal.SIGKILL  # the agent reports 137, and OOMKilled where the kernel killed it
        assert not processes_with(marker)


def test_the_container_dies_with_the_sandbox_process(tmp_path: Path) -> None:
    marker = f"kt-orphan-{uuid.uuid4().hex[:8]}"
    with sandbox_running(tmp_path, f"setsid sh -c 'sleep 60; : {marker}' & sleep 60") as (proc, _):
        wait_until(lambda: processes_with(marker), "the session's process never started")
        proc.kill()
        proc.wait()
        wait_until(lambda: not processes_with(marker), "the container outlived its sandbox process")
