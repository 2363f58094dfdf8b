"""The real node tier: kubelet + containerd + runc nodes in the local cluster, running this checkout's images.

What a real node enforces and provides, checked with plain pods: the image built from this checkout (its digest
in the pod status, its code inside), one network namespace per pod, pod-to-pod traffic and cluster DNS across the
two nodes, the API server at the `kubernetes` Service, `kubectl logs` and `exec`, hostPath claims shared by both
nodes, memory limits. And that stopping nodes, or reaping the nodes of a run that crashed, leaves nothing on the
host while another cluster's nodes keep running.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubetune_dev import realnodes
from kubetune_dev.cluster import GpuNodePool, LocalCluster
from kubetune_dev.realnodes import RealNodes

pytestmark = [pytest.mark.e2e]

REPO = Path(__file__).resolve().parents[2]
TIMEOUT = 120


def wait_for(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.5)
    pytest.fail(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


def pod(name: str, image: str, command: list[str], placement: dict[str, Any], **spec: Any) -> dict[str, Any]:
    container: dict[str, Any] = {"name": "main", "image": image, "command": command}
    container.update(spec.pop("container", {}))
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": name.split("-")[0]}},
        "spec": {"restartPolicy": "Never", **placement, **spec, "containers": [container]},
    }


def apply(cluster: LocalCluster, ns: str, *objects: dict[str, Any]) -> None:
    items = {"apiVersion": "v1", "kind": "List", "items": list(objects)}
    cluster.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(items))


def get_pod(cluster: LocalCluster, ns: str, name: str) -> dict[str, Any]:
    return dict(json.loads(cluster.kubectl("get", "pod", name, "-n", ns, "-o", "json").stdout))


def wait_phase(cluster: LocalCluster, ns: str, name: str, *phases: str) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        item = get_pod(cluster, ns, name)
        return item if item["status"].get("phase") in phases else None

    return dict(wait_for(reached, TIMEOUT, f"pod {name} {'/'.join(phases)}"))


@pytest.fixture
def ns(crd_cluster: LocalCluster, real_nodes: RealNodes) -> Iterator[str]:
    name = f"rn-{uuid.uuid4().hex[:8]}"
    real_nodes.create_claims(name, ["data"])
    crd_cluster.kubectl("wait", "--for=create", "serviceaccount/default", "-n", name, "--timeout=60s")
    yield name
    crd_cluster.kubectl("delete", "namespace", name, "--wait=false")
    real_nodes.delete_claims(name)


def test_nodes_run_containerd_and_pods_run_the_image_built_from_this_checkout(
    crd_cluster: LocalCluster, real_nodes: RealNodes, ns: str
) -> None:
    nodes = json.loads(crd_cluster.kubectl("get", "nodes", "-l", "kubetune.io/real-node=true", "-o", "json").stdout)
    runtimes = {n["metadata"]["name"]: n["status"]["nodeInfo"]["containerRuntimeVersion"] for n in nodes["items"]}
    assert runtimes == {"real-node-0": "containerd://1.6.20", "real-node-1": "containerd://1.6.20"}
    versions = {n["status"]["nodeInfo"]["kubeletVersion"] for n in nodes["items"]}
    assert versions == {"v1.34.4"}

    source = "operator/kubetune_operator/render.py"
    script = "import hashlib, kubetune_operator.render as r; print(hashlib.sha256(open(r.__file__, 'rb').read()).hexdigest())"  # noqa: E501
    apply(crd_cluster, ns, pod("code", real_nodes.image("trainer"), ["python", "-c", script], real_nodes.placement))
    status = wait_phase(crd_cluster, ns, "code", "Succeeded", "Failed")["status"]
    assert status["phase"] == "Succeeded", status
    # The code inside is this checkout's...
    assert real_nodes.pod_logs(ns, "code").strip() == hashlib.sha256((REPO / source).read_bytes()).hexdigest()
    # ...and the pod ran the image the registry serves under this checkout's content key.
    [container] = status["containerStatuses"]
    image = real_nodes.images["trainer"]
    assert real_nodes.registry is not None
    assert container["imageID"] == f"{image.ref.rsplit(':', 1)[0]}@{real_nodes.registry.digest(image)}"


def test_pods_on_both_nodes_reach_each_other_by_service_dns_and_the_api_server(
    crd_cluster: LocalCluster, real_nodes: RealNodes, ns: str
) -> None:
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "peers"},
        "spec": {"clusterIP": "None", "selector": {"app": "peer"}, "publishNotReadyAddresses": True},
    }
    server = "import http.server as h; h.HTTPServer(('', 29500), h.SimpleHTTPRequestHandler).serve_forever()"
    client = (
        "import socket, ssl, urllib.request as u, time\n"
        "time.sleep(1)\n"
        f"ip = socket.gethostbyname('peer-1.peers.{ns}.svc.cluster.local')\n"
        "print('peer', ip, u.urlopen('http://peer-1.peers:29500/', timeout=10).status)\n"
        "token = open('/var/run/secrets/kubernetes.io/serviceaccount/token').read()\n"
        "ctx = ssl.create_default_context(cafile='/var/run/secrets/kubernetes.io/serviceaccount/ca.crt')\n"
        "req = u.Request('https://kubernetes.default.svc/version', headers={'Authorization': 'Bearer ' + token})\n"
        "print('api', u.urlopen(req, context=ctx, timeout=10).status)\n"
    )
    image = real_nodes.image("trainer")
    first, second = real_nodes.nodes
    apply(
        crd_cluster,
        ns,
        service,
        pod("peer-1", image, ["python", "-c", server], second.placement, hostname="peer-1", subdomain="peers"),
        pod("peer-0", image, ["python", "-c", client], first.placement, hostname="peer-0", subdomain="peers"),
    )
    status = wait_phase(crd_cluster, ns, "peer-0", "Succeeded", "Failed")["status"]
    logs = real_nodes.pod_logs(ns, "peer-0")
    assert status["phase"] == "Succeeded", logs
    peer_ip = get_pod(crd_cluster, ns, "peer-1")["status"]["podIP"]
    assert f"peer {peer_ip} 200" in logs and "api 200" in logs
    # One network per node: the pods' addresses are on the two bridges' subnets.
    assert peer_ip.startswith(real_nodes.slot.subnet(1).rsplit(".", 1)[0] + ".") if real_nodes.slot else False


def test_logs_exec_and_claims_shared_by_both_nodes(crd_cluster: LocalCluster, real_nodes: RealNodes, ns: str) -> None:
    claim = {"volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "data"}}]}
    mount = {"volumeMounts": [{"name": "data", "mountPath": "/data"}]}
    (real_nodes.claim_dir(ns, "data") / "from-host.txt").write_text("hello from the host\n")
    writer = "cat /data/from-host.txt && echo written-on-node-0 > /data/from-pod.txt && sleep 300"
    image = real_nodes.image("operator")
    apply(
        crd_cluster,
        ns,
        pod("writer", image, ["sh", "-c", writer], real_nodes.nodes[0].placement, container=mount, **claim),
    )
    wait_phase(crd_cluster, ns, "writer", "Running")
    wait_for(lambda: (real_nodes.claim_dir(ns, "data") / "from-pod.txt").exists(), 30, "the pod's file on the host")
    assert "hello from the host" in real_nodes.pod_logs(ns, "writer")
    # The pod runs as the image's user (1000), so its file belongs to it.
    assert (real_nodes.claim_dir(ns, "data") / "from-pod.txt").stat().st_uid == 1000
    out = crd_cluster.kubectl("exec", "-n", ns, "writer", "--", "id", "-u").stdout
    assert out.strip() == "1000"

    reader = "cat /data/from-pod.txt"
    apply(
        crd_cluster,
        ns,
        pod("reader", image, ["sh", "-c", reader], real_nodes.nodes[1].placement, container=mount, **claim),
    )
    assert wait_phase(crd_cluster, ns, "reader", "Succeeded", "Failed")["status"]["phase"] == "Succeeded"
    assert real_nodes.pod_logs(ns, "reader").strip() == "written-on-node-0"


def test_a_container_over_its_memory_limit_is_oom_killed(
    crd_cluster: LocalCluster, real_nodes: RealNodes, ns: str
) -> None:
    """A job sized too small fails here as on any cluster (examples/demo-lora.yaml's memory is sized to this)."""
    grow = "x = bytearray(300 * 2**20); print('allocated', flush=True)"
    limits = {"resources": {"limits": {"memory": "128Mi"}, "requests": {"memory": "128Mi"}}}
    apply(
        crd_cluster,
        ns,
        pod("oom", real_nodes.image("operator"), ["python", "-c", grow], real_nodes.placement, container=limits),
    )
    status = wait_phase(crd_cluster, ns, "oom", "Succeeded", "Failed")["status"]
    [container] = status["containerStatuses"]
    assert container["state"]["terminated"]["reason"] == "OOMKilled", container


def test_two_pods_on_one_node_each_listen_on_the_rendezvous_port(
    crd_cluster: LocalCluster, real_nodes: RealNodes, ns: str
) -> None:
    """Each pod has its own network namespace: two jobs' rank 0 on one node both bind torchrun's default port
    (with node-agent pods, which shared the host's, the second failed with EADDRINUSE)."""
    bind = "import socket, time; s = socket.socket(); s.bind(('', 29500)); s.listen(); print('bound'); time.sleep(5)"
    node = real_nodes.nodes[0].placement
    image = real_nodes.image("operator")
    apply(
        crd_cluster,
        ns,
        pod("bind-a", image, ["python", "-c", bind], node),
        pod("bind-b", image, ["python", "-c", bind], node),
    )
    for name in ("bind-a", "bind-b"):
        assert wait_phase(crd_cluster, ns, name, "Succeeded", "Failed")["status"]["phase"] == "Succeeded"
        assert "bound" in real_nodes.pod_logs(ns, name)


def test_a_container_can_be_killed_from_the_host(crd_cluster: LocalCluster, real_nodes: RealNodes, ns: str) -> None:
    """RealNodes.kill: what fault-injection tests use to crash a worker or the operator."""
    apply(crd_cluster, ns, pod("victim", real_nodes.image("operator"), ["sleep", "300"], real_nodes.placement))
    wait_phase(crd_cluster, ns, "victim", "Running")
    pids = real_nodes.kill(ns, "victim", "main", signal.SIGKILL)
    assert pids
    status = wait_phase(crd_cluster, ns, "victim", "Failed")["status"]
    assert status["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 137


# ----------------------------------------------------------------------------------------------
# stopping and reaping leave nothing on the host, while the session's nodes keep running
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def second_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    state = REPO / ".cache" / f"test-cluster-second-{os.getpid()}"  # reaped like the session's if the run dies
    cluster = LocalCluster(state_dir=state, gpu_nodes=GpuNodePool(count=0), cpu_nodes=0).start()
    try:
        yield cluster
    finally:
        realnodes.stop_for_cluster(state)
        cluster.stop()


def run_pause_pods(cluster: LocalCluster, nodes: RealNodes) -> None:
    cluster.kubectl("create", "namespace", "held")
    cluster.kubectl("wait", "--for=create", "serviceaccount/default", "-n", "held", "--timeout=60s")
    pause = nodes.images["pause"].ref
    objects = [pod(f"held-{i}", pause, ["/pause"], n.placement) for i, n in enumerate(nodes.nodes)]
    apply(cluster, "held", *objects)
    for i in range(len(nodes.nodes)):
        wait_phase(cluster, "held", f"held-{i}", "Running")


def leftovers(slot: realnodes.Slot, state: Path) -> dict[str, list[str]]:
    return {kind: found for kind, found in realnodes.footprint(slot, state).items() if found}


def start_in_a_process(cluster: LocalCluster) -> tuple[subprocess.Popen[str], RealNodes]:
    """Real nodes for `cluster`, started by a separate process that then waits (as a test session would)."""
    script = (
        "import sys, time; from pathlib import Path; from kubetune_dev.cluster import running_cluster\n"
        "from kubetune_dev.realnodes import RealNodes\n"
        "RealNodes(running_cluster(Path(sys.argv[1])), pull=False).start(); print('started', flush=True)\n"
        "time.sleep(3600)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    owner = subprocess.Popen(
        [sys.executable, "-c", script, str(cluster.state_dir)], stdout=subprocess.PIPE, text=True, env=env
    )
    assert owner.stdout is not None
    for line in owner.stdout:
        if line.strip() == "started":
            break
    else:
        pytest.fail(f"the nodes did not start (exit {owner.wait()})")
    slot = realnodes.Slot(json.loads((cluster.state_dir / realnodes.RECORD).read_text())["slot"])
    nodes = RealNodes(cluster, pull=False, slot=slot)
    record = json.loads(slot.record_path.read_text())
    nodes.pids = record["pids"]
    nodes.images = realnodes.ensure_images((), pause=True)
    nodes.nodes = [realnodes.RealNode(layout, 0, 0) for layout in nodes.layouts()]
    return owner, nodes


@pytest.mark.parametrize("how", ["stop", "crash-then-reap"])
def test_stopping_or_reaping_nodes_leaves_nothing_and_spares_the_other_clusters_nodes(
    how: str, second_cluster: LocalCluster, crd_cluster: LocalCluster, real_nodes: RealNodes, ns: str
) -> None:
    owner, nodes = start_in_a_process(second_cluster)
    assert nodes.slot is not None and real_nodes.slot is not None and nodes.slot != real_nodes.slot
    slot, state = nodes.slot, nodes.state_dir
    run_pause_pods(second_cluster, nodes)
    held = leftovers(slot, state)
    assert {"processes", "mounts", "links", "iptables", "cgroups", "cni", "record"} <= set(held), held

    if how == "stop":
        owner.kill()
        nodes.stop()
    else:
        # A run killed with everything it started: its processes die, its pods' processes and host state stay.
        # The next session's reap() finds the slot free and cleans it.
        owner.kill()
        for pid in nodes.pids.values():
            os.kill(pid, signal.SIGKILL)
        owner.wait()
        wait_for(lambda: not realnodes._slot_busy(slot), 30, "the slot free")
        assert leftovers(slot, state).get("mounts"), "the pods' mounts outlive their node processes"
        assert slot.index in realnodes.reap()
    owner.wait()
    assert leftovers(slot, state) == {}
    # The session's nodes were not touched: a pod still runs there.
    apply(crd_cluster, ns, pod("after", real_nodes.image("operator"), ["true"], real_nodes.placement))
    assert wait_phase(crd_cluster, ns, "after", "Succeeded", "Failed")["status"]["phase"] == "Succeeded"
