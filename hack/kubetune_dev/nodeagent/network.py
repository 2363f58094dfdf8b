"""Pod addresses and names, shared by every agent that uses the same root directory.

Each running pod gets a loopback address 127.0.0.x. The table of addresses (network.json) and the hosts
file rendered from it live in the root and change under an exclusive flock, so agents playing several
nodes on one machine see each other's pods. Containers get the hosts file bind-mounted over /etc/hosts;
it is rewritten in place (never replaced) because a bind mount pins the inode it was made from.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

FIRST_HOST, LAST_HOST = 2, 254  # 127.0.0.1 stays the machine's own


def render_hosts(entries: Mapping[str, dict]) -> str:
    lines = [
        "# Written by the kubetune local node agent (test tooling): the pods running on this machine.",
        "127.0.0.1\tlocalhost",
        "::1\tlocalhost ip6-localhost ip6-loopback",
    ]
    for entry in sorted(entries.values(), key=lambda e: tuple(int(p) for p in e["ip"].split("."))):
        lines.append(f"{entry['ip']}\t{' '.join(entry['names'])}")
    return "\n".join(lines) + "\n"


def pick_address(entries: Mapping[str, dict]) -> str:
    used = {e["ip"] for e in entries.values()}
    for host in range(FIRST_HOST, LAST_HOST + 1):
        ip = f"127.0.0.{host}"
        if ip not in used:
            return ip
    raise RuntimeError(f"all {LAST_HOST - FIRST_HOST + 1} loopback pod addresses are taken")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class PodNetwork:
    def __init__(self, root: Path, node: str) -> None:
        self.root = root
        self.node = node
        self.table = root / "network.json"
        self.hosts = root / "hosts"
        self._lock = root / "network.lock"
        root.mkdir(parents=True, exist_ok=True)
        with self._locked():
            pass

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, dict]]:
        """The address table (pod uid -> entry), locked; written back with the hosts file on exit."""
        with open(self._lock, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            entries: dict[str, dict] = json.loads(self.table.read_text()) if self.table.exists() else {}
            # Entries of agents that are gone (crashed, killed) free their addresses.
            entries = {uid: e for uid, e in entries.items() if _pid_alive(e["agent_pid"])}
            yield entries
            self.table.write_text(json.dumps(entries, indent=1))
            text = render_hosts(entries).encode()
            fd = os.open(self.hosts, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                os.pwrite(fd, text, 0)
                os.ftruncate(fd, len(text))
            finally:
                os.close(fd)

    def allocate(self, uid: str, names: list[str]) -> str:
        """The pod's address (the same one if it already has one), published under `names`."""
        with self._locked() as entries:
            if uid not in entries:
                entries[uid] = {"ip": pick_address(entries), "node": self.node, "agent_pid": os.getpid()}
            entries[uid]["names"] = names
            return str(entries[uid]["ip"])

    def release(self, uid: str) -> None:
        with self._locked() as entries:
            entries.pop(uid, None)
