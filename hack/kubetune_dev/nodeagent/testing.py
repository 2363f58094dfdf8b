"""Local node agents for tests and scripts: each a subprocess, Ready before it is handed out, stopped cleanly.

pytest: `from kubetune_dev.nodeagent.testing import local_nodes, node_agent` in a conftest.py makes the
session fixtures available (or list this module in `pytest_plugins` of the root conftest):

    def test_runs(cluster, namespace, node_agent):
        pod = {..., "spec": {**LOCAL_PLACEMENT, "containers": [...]}}    # any local node; or node_agent.placement
        ...
        assert (node_agent.claim_dir(namespace, "data") / "out.txt").exists()
        assert "done" in node_agent.pod_logs(namespace, "my-pod")

`local_nodes` is two agents ("local-node-0", "local-node-1") sharing one root, so pods on either node see
the same claim directories and resolve each other; `node_agent` is the first of them. They are tainted
(LOCAL_NODE_TAINT) so that pods of other tests, meant for kwok's fake nodes, never land on them: a pod for a
local node needs LOCAL_PLACEMENT (node selector + toleration), e.g. a FineTuneJob's
spec.resources.nodeSelector and spec.resources.tolerations.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kubetune_dev.cluster import LocalCluster, free_port
from kubetune_dev.nodeagent import logs
from kubetune_dev.nodeagent.agent import LOCAL_NODE_LABEL, LOCAL_NODE_TAINT

HACK = Path(__file__).resolve().parents[2]
LOCAL_NODE_SELECTOR = {LOCAL_NODE_LABEL: "true"}
LOCAL_NODE_TOLERATION = {"key": LOCAL_NODE_LABEL, "operator": "Equal", "value": "true", "effect": "NoSchedule"}
# Pod spec fields that place a pod on any local node.
LOCAL_PLACEMENT = {"nodeSelector": LOCAL_NODE_SELECTOR, "tolerations": [LOCAL_NODE_TOLERATION]}


@dataclass
class LocalNode:
    name: str
    root: Path  # shared by agents started with the same root: claims, logs, hosts file
    port: int  # the kubelet (logs) port it advertises
    cluster: LocalCluster
    process: subprocess.Popen

    @property
    def node_selector(self) -> dict[str, str]:
        """Pins a pod to this node."""
        return {"kubernetes.io/hostname": self.name}

    @property
    def placement(self) -> dict:
        """Pod spec fields that place a pod on this node."""
        return {"nodeSelector": self.node_selector, "tolerations": [LOCAL_NODE_TOLERATION]}

    @property
    def log(self) -> Path:
        """The agent's own log."""
        return self.root / "nodes" / self.name / "agent.log"

    def claim_dir(self, namespace: str, claim: str) -> Path:
        """Where PersistentVolumeClaim `claim` of `namespace` lives on this machine."""
        return self.root / "volumes" / namespace / claim

    def pod_logs(self, namespace: str, pod: str, container: str | None = None, *, previous: bool = False) -> str:
        """A container's output (the only container's, if `container` is not given), read from the files."""
        directory = logs.find_pod_dir(self.root, namespace, pod)
        if directory is None:
            raise FileNotFoundError(f"pod {namespace}/{pod} has not run under {self.root}")
        names = logs.containers_with_logs(directory)
        path = logs.find_log(directory, container or names[0], previous) if (container or len(names) == 1) else None
        if path is None:
            raise FileNotFoundError(f"no log for container {container!r} of {namespace}/{pod} (have {names})")
        return path.read_text(errors="replace")

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM: the agent stops its pods, marks them Failed and the node NotReady, then exits."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self) -> None:
        """SIGKILL, as a crash would: the agent's pods' processes keep running."""
        self.process.kill()
        self.process.wait()


def start_nodes(
    cluster: LocalCluster,
    names: list[str],
    root: Path,
    *,
    gpus: int = 0,
    labels: dict[str, str] | None = None,
    reserved: bool = True,
    timeout: float = 60.0,
) -> list[LocalNode]:
    """Start one agent per name (in parallel) and return once every Node is Ready on its new port.
    `reserved` taints the nodes with LOCAL_NODE_TAINT."""
    nodes = []
    for name in names:
        port = free_port()
        node_dir = root / "nodes" / name
        node_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "kubetune_dev", "node", "run", "--name", name]
        cmd += ["--kubeconfig", str(cluster.kubeconfig), "--root", str(root), "--gpus", str(gpus), "--port", str(port)]
        cmd += ["--exit-with-parent"]
        for key, value in (labels or {}).items():
            cmd += ["--label", f"{key}={value}"]
        if reserved:
            taint = LOCAL_NODE_TAINT
            cmd += ["--taint", f"{taint['key']}={taint['value']}:{taint['effect']}"]
        pythonpath = os.pathsep.join(p for p in (str(HACK), os.environ.get("PYTHONPATH")) if p)
        with open(node_dir / "agent.log", "ab") as out:
            process = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONPATH": pythonpath},
                start_new_session=True,
            )
        nodes.append(LocalNode(name, root, port, cluster, process))
    try:
        for node in nodes:
            _wait_ready(node, timeout)
    except BaseException:
        for node in nodes:
            node.stop()
        raise
    return nodes


def _wait_ready(node: LocalNode, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if node.process.poll() is not None:
            raise RuntimeError(f"node agent {node.name} exited ({node.process.returncode}):\n{_tail(node.log)}")
        out = node.cluster.kubectl("get", "node", node.name, "-o", "json", check=False)
        if out.returncode == 0:
            status = json.loads(out.stdout).get("status", {})
            ready = any(c["type"] == "Ready" and c["status"] == "True" for c in status.get("conditions", []))
            if ready and status.get("daemonEndpoints", {}).get("kubeletEndpoint", {}).get("Port") == node.port:
                return
        time.sleep(0.2)
    raise TimeoutError(f"node {node.name} not Ready after {timeout}s:\n{_tail(node.log)}")


def _tail(path: Path, size: int = 3000) -> str:
    return path.read_text(errors="replace")[-size:] if path.exists() else "(no log)"


@pytest.fixture(scope="session")
def local_nodes(cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[LocalNode]]:
    """Two local node agents sharing one root, for the whole session."""
    nodes = start_nodes(cluster, ["local-node-0", "local-node-1"], tmp_path_factory.mktemp("nodeagent"))
    yield nodes
    for node in nodes:
        node.stop()


@pytest.fixture(scope="session")
def node_agent(local_nodes: list[LocalNode]) -> LocalNode:
    """The first of the session's local node agents."""
    return local_nodes[0]
