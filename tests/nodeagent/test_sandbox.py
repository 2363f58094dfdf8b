"""The sandbox a container starts in (needs root, like the agent): volumes at the pod's paths, read-only
where asked, the pod's hostname, and nothing created on the machine for mount points it lacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

from kubetune_dev.nodeagent.runtime import SANDBOX


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
    return ["unshare", "--mount", "--uts", "--", sys.executable, str(SANDBOX), str(plan)]


def run_sandbox(tmp_path: Path, mounts: list[dict], argv: list[str], workdir: str = "/") -> subprocess.CompletedProcess:
    started_read, started_write = os.pipe()
    try:
        cmd = write_plan(tmp_path, mounts, argv, workdir, started_write)
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30, pass_fds=(started_write,))
    finally:
        os.close(started_read)
        os.close(started_write)


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
    started_read, started_write = os.pipe()
    cmd = write_plan(tmp_path, [], ["sh", "-c", f"sleep 30 # {marker}"], "/", started_write)
    proc = subprocess.Popen(cmd, pass_fds=(started_write,))
    os.close(started_write)
    try:
        assert os.read(started_read, 1) == b""  # end-of-file: every writer closed it
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
        assert cmdline[:2] == [b"sh", b"-c"] and marker.encode() in cmdline[2]
    finally:
        os.close(started_read)
        proc.kill()
        proc.wait()
