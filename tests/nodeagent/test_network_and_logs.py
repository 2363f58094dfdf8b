"""Unit tests for pod addresses, the shared hosts file, and reading container logs."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path

import pytest
from kubetune_dev.nodeagent.logs import containers_with_logs, find_log, find_pod_dir, pod_dir, read_log, tail
from kubetune_dev.nodeagent.network import PodNetwork, pick_address, render_hosts


def test_addresses_are_shared_between_agents_and_reused(tmp_path: Path) -> None:
    node_a, node_b = PodNetwork(tmp_path, "a"), PodNetwork(tmp_path, "b")
    ip0 = node_a.allocate("uid-0", ["rank-0.svc", "rank-0"])
    ip1 = node_b.allocate("uid-1", ["rank-1.svc", "rank-1"])
    assert (ip0, ip1) == ("127.0.0.2", "127.0.0.3")
    assert node_a.allocate("uid-0", ["rank-0.svc", "rank-0"]) == ip0
    inode = os.stat(node_a.hosts).st_ino
    assert "127.0.0.3\trank-1.svc rank-1" in node_a.hosts.read_text()
    node_a.release("uid-0")
    assert "rank-0" not in node_b.hosts.read_text()
    assert node_b.allocate("uid-2", ["x"]) == "127.0.0.2"
    # Containers bind-mount the file: it must be rewritten in place, never replaced.
    assert os.stat(node_a.hosts).st_ino == inode


def test_entries_of_dead_agents_are_dropped(tmp_path: Path) -> None:
    net = PodNetwork(tmp_path, "a")
    net.allocate("uid-0", ["gone"])
    table = net.table.read_text().replace(f'"agent_pid": {os.getpid()}', '"agent_pid": 999999999')
    net.table.write_text(table)
    assert net.allocate("uid-1", ["new"]) == "127.0.0.2"
    assert "gone" not in net.hosts.read_text()


def test_hosts_rendering_and_exhaustion() -> None:
    entries = {"b": {"ip": "127.0.0.10", "names": ["b"]}, "a": {"ip": "127.0.0.9", "names": ["a.s", "a"]}}
    lines = render_hosts(entries).splitlines()
    assert lines[1] == "127.0.0.1\tlocalhost"
    assert lines[-2:] == ["127.0.0.9\ta.s a", "127.0.0.10\tb"]
    full = {str(i): {"ip": f"127.0.0.{i}", "names": []} for i in range(2, 255)}
    with pytest.raises(RuntimeError, match="taken"):
        pick_address(full)


def write_runs(directory: Path, container: str, runs: list[bytes]) -> None:
    logs = directory / "logs" / container
    logs.mkdir(parents=True)
    for i, content in enumerate(runs):
        (logs / f"{i}.log").write_bytes(content)


def collect(path: Path, **kwargs: object) -> bytes:
    async def go() -> bytes:
        return b"".join([chunk async for chunk in read_log(path, **kwargs)])  # type: ignore[arg-type]

    return asyncio.run(go())


def test_find_logs_of_the_newest_pod_and_previous_runs(tmp_path: Path) -> None:
    old = pod_dir(tmp_path, "ns", "p", "uid-old")
    write_runs(old, "main", [b"old\n"])
    time.sleep(0.01)
    new = pod_dir(tmp_path, "ns", "p", "uid-new")
    write_runs(new, "main", [b"first\n", b"second\n"])
    os.utime(new)
    assert find_pod_dir(tmp_path, "ns", "p") == new
    assert find_pod_dir(tmp_path, "ns", "other") is None
    assert containers_with_logs(new) == ["main"]
    assert find_log(new, "main").read_bytes() == b"second\n"
    assert find_log(new, "main", previous=True).read_bytes() == b"first\n"
    assert find_log(old, "main", previous=True) is None


def test_tail_and_limit(tmp_path: Path) -> None:
    assert tail(b"a\nb\nc\n", 2) == b"b\nc\n"
    assert tail(b"a\nb\n", 0) == b""
    write_runs(tmp_path, "c", [b"one\ntwo\nthree\n"])
    path = tmp_path / "logs" / "c" / "0.log"
    assert collect(path, tail_lines=1) == b"three\n"
    assert collect(path, limit_bytes=5) == b"one\nt"


def test_follow_ends_when_the_run_is_done(tmp_path: Path) -> None:
    write_runs(tmp_path, "c", [b"one\n"])
    path = tmp_path / "logs" / "c" / "0.log"

    def writer() -> None:
        time.sleep(0.3)
        with open(path, "ab") as f:
            f.write(b"two\n")
        time.sleep(0.3)
        path.with_suffix(".done").write_text("0")

    thread = threading.Thread(target=writer)
    thread.start()
    assert collect(path, follow=True) == b"one\ntwo\n"
    thread.join()
