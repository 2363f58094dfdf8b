"""Real nodes for the local cluster: kubelet v1.34 with containerd and runc, running the images `make images` built.

Two nodes (`real-node-0`, `real-node-1`) join a LocalCluster next to kwok's fake nodes. Each has its own containerd
(root, state, socket, runc root), kubelet (port, cgroup root, root dir, pod logs) and Linux bridge with a /24 of
its own (Debian's bridge + host-local CNI plugins); the host routes between the bridges, so pods reach each other
across nodes by pod IP. CoreDNS (built from Go modules) serves cluster.local on the first bridge's address, so a
Job's headless Service names its workers as in any cluster. Pods reach the API server at the `kubernetes` Service
address (10.96.0.1:443) through one DNAT rule per bridge: the operator runs in-cluster from its image, as the Helm
chart installs it. A registry process serves the images' storage (kubetune_dev.images) on a loopback port; each
containerd resolves `kubetune.local` to it. Claims are static hostPath PersistentVolumes under the cluster's state
directory (`create_claims`), the same directory on both nodes as an RWX volume would be.

Several clusters may run real nodes at once on one host (other checkouts' test sessions): each takes a *slot*, a
record under /run/kubetune/nodes of the processes it started (the slot is busy while one of them, or the process
starting them, lives; a lock orders those who take, stop and reap slots). The slot names the nodes' bridges,
subnets (10.<200+slot>.<node>.0/24), cgroup roots, iptables chain and CNI networks; ports are chosen free.
The kubelet's iptables helper chains are turned off (makeIPTablesUtilChains: false) and its pod logs go to the
state directory, so the host-global paths left are /var/log/containers (symlinks, removed at stop),
/var/lib/kubelet/device-plugins (one socket, shared by all kubelets: no device plugins here), /run/containerd/s
(shim sockets, removed once dead) and /var/lib/cni/results (libcni's cache, removed per pod).

`stop()` leaves nothing: pods are deleted, processes stopped (the containers' by their cgroups), mounts, network
namespaces, bridges, the DNAT chain, cgroups and CNI state removed, and net.ipv4.ip_forward restored when no other
slot needs it. `reap()` does the same for slots whose processes died with a crashed session.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune_dev import pki
from kubetune_dev.cluster import LocalCluster, _alive, _cmdline, free_port
from kubetune_dev.images import PAUSE, REGISTRY, Image, Registry, ensure_images
from kubetune_dev.toolchain import toolchain_bin

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "kubetune"
RUN_ROOT = Path("/run/kubetune/nodes")
CGROUP_FS = Path("/sys/fs/cgroup")
CNI_BIN = Path("/usr/lib/cni")
CNI_CACHE = Path("/var/lib/cni/results")  # libcni's cache: hard-coded in containerd 1.6
CONTAINER_LOG_LINKS = Path("/var/log/containers")  # the kubelet's symlinks: hard-coded
SHIM_SOCKETS = Path("/run/containerd/s")  # containerd 1.6's shim sockets: hard-coded
DEVICE_PLUGINS = Path("/var/lib/kubelet/device-plugins")  # the kubelet's device-plugin socket: hard-coded
SERVICE_IP = "10.96.0.1"  # the `kubernetes` Service: the first address of cluster.SERVICE_CIDR
CLUSTER_DOMAIN = "cluster.local"
NODE_PREFIX = "real-node"
# Label and taint of the real nodes: pods of other tests (for kwok's fake nodes) never land on them.
NODE_LABEL = "kubetune.io/real-node"
NODE_SELECTOR = {NODE_LABEL: "true"}
NODE_TOLERATION = {"key": NODE_LABEL, "operator": "Equal", "value": "true", "effect": "NoSchedule"}
PLACEMENT = {"nodeSelector": NODE_SELECTOR, "tolerations": [NODE_TOLERATION]}
STORAGE_CLASS = "kubetune-local"
STORES = Path(os.environ.get("KUBETUNE_CACHE", Path.home() / ".cache" / "kubetune")) / "nodes"
PERSISTENT_SLOTS = 2  # the demo and one test session at a time keep their image stores; more run from scratch
RECORD = "real-nodes.json"  # in the cluster's state directory: which slot its nodes hold
MAX_SLOTS = 50


def log(text: str) -> None:
    print(f"[real-nodes] {text}", flush=True)


# ----------------------------------------------------------------------------------------------
# names and addresses: one slot per cluster with real nodes
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Slot:
    index: int

    def bridge(self, node: int) -> str:
        return f"kt{self.index}n{node}"  # at most 15 characters for Linux

    def subnet(self, node: int) -> str:
        return f"10.{200 + self.index}.{node}.0/24"

    def gateway(self, node: int) -> str:
        return f"10.{200 + self.index}.{node}.1"

    def network(self, node: int) -> str:
        return f"kubetune-s{self.index}-n{node}"

    def cgroup_root(self, node: int) -> str:
        return f"/kubetune-s{self.index}-n{node}"

    @property
    def chain(self) -> str:
        return f"KUBETUNE-S{self.index}"

    @property
    def bridges(self) -> str:
        """iptables' wildcard for every bridge of the slot."""
        return f"kt{self.index}n+"

    @property
    def runtime_dir(self) -> Path:
        """Sockets and runtime state (tmpfs; unix socket paths must stay short)."""
        return RUN_ROOT / f"slot-{self.index}"

    @property
    def lock_path(self) -> Path:
        return RUN_ROOT / f"slot-{self.index}.lock"

    @property
    def record_path(self) -> Path:
        return RUN_ROOT / f"slot-{self.index}.json"


def image_store(slot: Slot, node: int) -> Path | None:
    """The kept containerd root of a node of this slot, or None for a slot whose stores go with the cluster."""
    return STORES / f"slot-{slot.index}" / f"node-{node}" if slot.index < PERSISTENT_SLOTS else None


@dataclass(frozen=True)
class NodeLayout:
    """Where one node's processes keep their files."""

    name: str
    index: int
    slot: Slot
    state: Path  # on disk: configs, certs, kubelet root, logs, containerd root
    run: Path  # tmpfs: sockets, containerd state, runc root

    @property
    def socket(self) -> Path:
        return self.run / "containerd.sock"

    @property
    def containerd_root(self) -> Path:
        """The node's containerd root: its image store. Kept across runs for the first slots (STORES), so a new
        cluster's nodes start with the images unpacked (pulling and deleting the trainer's GBs per node takes
        minutes); deleted with the cluster for the others."""
        return image_store(self.slot, self.index) or self.state / "containerd"

    @property
    def kubelet_root(self) -> Path:
        return self.state / "kubelet"

    @property
    def pod_logs(self) -> Path:
        return self.state / "pods"

    @property
    def cni_conf_dir(self) -> Path:
        return self.state / "cni"

    @property
    def hosts_dir(self) -> Path:
        return self.state / "registry-hosts"


# ----------------------------------------------------------------------------------------------
# configuration files (pure)
# ----------------------------------------------------------------------------------------------


def containerd_config(node: NodeLayout, pause: str) -> str:
    slot = node.slot
    return f"""version = 2
root = "{node.containerd_root}"
state = "{node.run / "containerd"}"
# Lowering it needs CAP_SYS_RESOURCE, which root lacks on some hosts.
oom_score = 0
[grpc]
  address = "{node.socket}"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "{node.state / "opt"}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause}"
  # The kubelet sets -998 for pod sandboxes; without CAP_SYS_RESOURCE runc could not apply it.
  restrict_oom_score_adj = true
  disable_apparmor = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    # Once unpacked, a layer's compressed copy goes: each node keeps one copy of the trainer's GBs.
    discard_unpacked_layers = true
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "/usr/bin/runc"
        Root = "{node.run / "runc"}"
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN}"
    conf_dir = "{node.cni_conf_dir}"
    max_conf_num = 1
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "{node.hosts_dir}"
# slot {slot.index}
"""


def registry_hosts(registry_address: str) -> str:
    """containerd's hosts.toml for kubetune.local: the slot's registry process, plain HTTP."""
    return f"""server = "http://{registry_address}"
[host."http://{registry_address}"]
  capabilities = ["pull", "resolve"]
"""


def cni_config(node: NodeLayout) -> dict[str, Any]:
    slot = node.slot
    return {
        "cniVersion": "1.0.0",
        "name": slot.network(node.index),
        "plugins": [
            {
                "type": "bridge",
                "bridge": slot.bridge(node.index),
                "isGateway": True,
                "ipMasq": False,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "dataDir": str(node.state / "ipam"),
                    "ranges": [[{"subnet": slot.subnet(node.index), "gateway": slot.gateway(node.index)}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }


def kubelet_config(node: NodeLayout, port: int, healthz_port: int, dns: str, certs: dict[str, Path]) -> dict:
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": "0.0.0.0",
        "port": port,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": healthz_port,
        "tlsCertFile": str(certs["serving"]),
        "tlsPrivateKeyFile": str(certs["serving-key"]),
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": True},
            "x509": {"clientCAFile": str(certs["ca"])},
        },
        "authorization": {"mode": "Webhook"},
        "containerRuntimeEndpoint": f"unix://{node.socket}",
        "imageServiceEndpoint": f"unix://{node.socket}",
        "cgroupDriver": "cgroupfs",
        # Two kubelets on one host: each its own cgroup tree (created beforehand in every hierarchy).
        "cgroupRoot": node.slot.cgroup_root(node.index),
        "failCgroupV1": False,
        "failSwapOn": False,
        "clusterDomain": CLUSTER_DOMAIN,
        "clusterDNS": [dns],
        "resolvConf": "/etc/resolv.conf",
        "podLogsDir": str(node.pod_logs),
        "volumePluginDir": str(node.state / "volume-plugins"),
        # No KUBE-FIREWALL / KUBE-IPTABLES-HINT chains in the host's iptables: nothing here reads them.
        "makeIPTablesUtilChains": False,
        "serializeImagePulls": False,
        # The trainer image is several GB: pulling and unpacking it takes minutes on 2 cores.
        "runtimeRequestTimeout": "20m",
        # Never garbage-collect images: the next test session would pull them again.
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "evictionHard": {
            "memory.available": "100Mi",
            "nodefs.available": "1%",
            "imagefs.available": "1%",
            "nodefs.inodesFree": "1%",
        },
        "registerWithTaints": [{"key": NODE_LABEL, "value": "true", "effect": "NoSchedule"}],
        "maxPods": 50,
        "shutdownGracePeriod": "0s",
    }


def corefile(listen: str, kubeconfig: Path) -> str:
    return f""".:53 {{
    bind {listen}
    errors
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
        kubeconfig {kubeconfig}
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
    }}
    forward . /etc/resolv.conf
    cache 10
}}
"""


def kubeconfig(server: str, ca: Path, cert: Path, key: Path) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "local", "cluster": {"server": server, "certificate-authority": str(ca)}}],
        "users": [{"name": "node", "user": {"client-certificate": str(cert), "client-key": str(key)}}],
        "contexts": [{"name": "local", "context": {"cluster": "local", "user": "node"}}],
        "current-context": "local",
    }


def dnat_rules(slot: Slot, apiserver_port: int) -> list[list[str]]:
    """iptables arguments (nat table) that send pods' connections to the `kubernetes` Service to the API server,
    which listens on every address of the host."""
    destination = f"{slot.gateway(0)}:{apiserver_port}"
    return [
        ["-A", slot.chain, "-d", f"{SERVICE_IP}/32", "-p", "tcp", "--dport", "443", "-j", "DNAT", "--to", destination]
    ]


def operator_values(images: dict[str, Image], watch: Iterable[str], over: dict[str, Any]) -> dict[str, Any]:
    """Chart values for an operator from this checkout's images, on the real nodes, watching `watch`; `over` is
    merged over them. The CRD is left out unless `over` says crds.install: it is applied apart."""
    operator, trainer = images["operator"], images["trainer"]
    trainer_image = {"repository": f"{REGISTRY}/{trainer.repository}", "tag": trainer.key}
    base: dict[str, Any] = {
        "crds": {"install": False},
        "watchNamespaces": list(watch),
        "image": {"repository": f"{REGISTRY}/{operator.repository}", "tag": operator.key},
        "trainerImages": {"peft": trainer_image, "full": trainer_image},
        **PLACEMENT,
    }
    return _merge(base, over)


def readable_by_pods(root: Path) -> None:
    """chmod a+rX under `root`: what an admin does to files put on a volume for workers of another uid to read
    (save_pretrained writes model.safetensors 0600, which a worker running as uid 1000 cannot open)."""
    for path in [root, *root.rglob("*")]:
        path.chmod(path.stat().st_mode | (0o555 if path.is_dir() else 0o444))


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` merged into `base` recursively (as Helm merges values files)."""
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


# ----------------------------------------------------------------------------------------------
# host state: slots, processes, mounts, network, cgroups
# ----------------------------------------------------------------------------------------------


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(cmd, capture_output=True, text=True)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


@contextlib.contextmanager
def _slot_lock(slot: Slot, *, wait: bool) -> Iterator[bool]:
    """Hold the slot's lock for a short while (taking, stopping or reaping it). Yields False if not waiting and
    another process holds it."""
    RUN_ROOT.mkdir(parents=True, exist_ok=True)
    with open(slot.lock_path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True


def _start_time(pid: int) -> int | None:
    """The process's start time (clock ticks since boot): with the pid, it names one process for good."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _slot_alive(record: dict[str, Any]) -> bool:
    """Whether the process that took the slot, or one it started, still runs."""
    marker = record["state_dir"]
    owner, started = record.get("owner", (0, None))
    return (_alive(owner) and _start_time(owner) == started) or any(
        _alive(pid) and marker in _cmdline(pid) for pid in record.get("pids", {}).values()
    )


def _slot_busy(slot: Slot) -> bool:
    return slot.record_path.exists() and _slot_alive(json.loads(slot.record_path.read_text()))


def acquire_slot(record: dict[str, Any]) -> Slot:
    """The first free slot, claimed with `record` (cleaned first if a crashed run left state in it)."""
    for index in range(MAX_SLOTS):
        slot = Slot(index)
        with _slot_lock(slot, wait=False) as locked:
            if not locked or _slot_busy(slot):
                continue
            if slot.record_path.exists():
                log(f"cleaning slot {index}, left by a run that stopped without cleaning up")
                teardown(json.loads(slot.record_path.read_text()))
            slot.record_path.write_text(json.dumps({**record, "slot": index}))
            return slot
    raise RuntimeError(f"all {MAX_SLOTS} real-node slots of this host are in use")


def _stop_pids(pids: Iterable[int], marker: str, grace: float) -> None:
    """SIGTERM, then SIGKILL after `grace`, each pid whose command line still names `marker`."""
    ours = [pid for pid in pids if _alive(pid) and marker in _cmdline(pid)]
    for pid in ours:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(_alive(pid) for pid in ours):
        time.sleep(0.1)
    for pid in ours:
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    for pid in ours:
        while _alive(pid):
            time.sleep(0.05)


def _processes_naming(marker: str) -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit() and marker in _cmdline(int(p.name))]


def _cgroup_dirs(root: str) -> list[Path]:
    """The cgroup directory `root` in every hierarchy that has it."""
    return [h / root.lstrip("/") for h in CGROUP_FS.iterdir() if (h / root.lstrip("/")).is_dir()]


def _kill_cgroup(root: str) -> None:
    """SIGKILL every process in the cgroup tree (the containers of a node whose runtime is gone or going)."""
    for _ in range(50):
        pids = set()
        for hierarchy in _cgroup_dirs(root):
            for procs in hierarchy.rglob("cgroup.procs"):
                with contextlib.suppress(OSError):
                    pids |= {int(p) for p in procs.read_text().split()}
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)


def _remove_cgroup(root: str) -> None:
    for hierarchy in _cgroup_dirs(root):
        for directory in sorted((d for d in hierarchy.rglob("*") if d.is_dir()), key=lambda d: -len(d.parts)):
            with contextlib.suppress(OSError):
                directory.rmdir()
        with contextlib.suppress(OSError):
            hierarchy.rmdir()


def _unmount_under(prefixes: Iterable[Path]) -> None:
    """Unmount every mount point under the prefixes, deepest first (lazily when busy)."""
    roots = [str(p).rstrip("/") + "/" for p in prefixes]
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if any((point + "/").startswith(root) for root in roots):
            points.append(point)
    for point in sorted(set(points), key=lambda p: -p.count("/")):
        if _run("umount", point, check=False).returncode != 0:
            _run("umount", "-l", point, check=False)


def _cni_cache_entries(slot: Slot, nodes: Iterable[int]) -> list[tuple[Path, list[str]]]:
    """libcni's cache files of the slot's pods, with the network namespaces they name: the pod networks' (by network
    name) and containerd's loopback ones (by the slot's DNS server, which only its pods are given)."""
    networks = {slot.network(i) for i in nodes}
    found = []
    for path in CNI_CACHE.glob("*") if CNI_CACHE.exists() else []:
        with contextlib.suppress(OSError, ValueError):
            entry = json.loads(path.read_text())
            dns = entry.get("capabilityArgs", {}).get("dns", {}).get("Servers", [])
            if entry.get("networkName") in networks or (
                entry.get("networkName") == "cni-loopback" and slot.gateway(0) in dns
            ):
                sandboxes = [i.get("sandbox", "") for i in entry.get("result", {}).get("interfaces", [])]
                found.append((path, [s for s in sandboxes if s]))
    return found


def _iptables_chain(slot: Slot, rules: list[list[str]] | None) -> None:
    """Install the slot's DNAT chain with `rules`, or remove it (None). Idempotent."""
    jump = ["PREROUTING", "-i", slot.bridges, "-j", slot.chain]
    while _run("iptables", "-t", "nat", "-D", *jump, check=False).returncode == 0:
        pass
    _run("iptables", "-t", "nat", "-F", slot.chain, check=False)
    _run("iptables", "-t", "nat", "-X", slot.chain, check=False)
    if rules is None:
        return
    _run("iptables", "-t", "nat", "-N", slot.chain)
    for rule in rules:
        _run("iptables", "-t", "nat", *rule)
    _run("iptables", "-t", "nat", "-I", *jump)


def _other_kubelets(marker: str) -> bool:
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            cmd = _cmdline(int(p.name))
            if cmd.split(" ", 1)[0].endswith("/kubelet") and marker not in cmd:
                return True
    return False


IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")
IP_FORWARD_SAVED = RUN_ROOT / "ip_forward.before"


def _enable_ip_forward() -> None:
    """The host routes between the nodes' bridges. The value found before the first slot is kept to restore."""
    if not IP_FORWARD_SAVED.exists():
        IP_FORWARD_SAVED.write_text(IP_FORWARD.read_text())
    IP_FORWARD.write_text("1\n")


def _restore_ip_forward(own: Slot) -> None:
    others = [Slot(i) for i in range(MAX_SLOTS) if i != own.index]
    if IP_FORWARD_SAVED.exists() and not any(_slot_busy(s) for s in others):
        IP_FORWARD.write_text(IP_FORWARD_SAVED.read_text())
        IP_FORWARD_SAVED.unlink()


def _kubectl(kubeconfig: Path, *args: str) -> None:
    """Best effort, bounded: the cluster may be gone already."""
    if kubeconfig.is_file():
        command = [str(toolchain_bin() / "kubectl"), f"--kubeconfig={kubeconfig}", "--request-timeout=10s", *args]
        with contextlib.suppress(subprocess.TimeoutExpired):
            subprocess.run(command, capture_output=True, timeout=30)


def _ctr(socket: Path, *args: str) -> str:
    out = subprocess.run(["ctr", f"--address={socket}", "--namespace=k8s.io", *args], capture_output=True, text=True)
    return out.stdout


def _clean_store(socket: Path, wanted: dict[str, str]) -> None:
    """Leave a kept image store as the next run wants it: no containers, and of each image repository the run
    used only the version it used (by manifest digest), so a store holds one copy of the trainer's layers."""
    for task in _ctr(socket, "tasks", "ls", "-q").split():
        _ctr(socket, "tasks", "rm", "-f", task)
    containers = _ctr(socket, "containers", "ls", "-q").split()
    if containers:
        _ctr(socket, "containers", "rm", *containers)
    refs = [line.split()[:3:2] for line in _ctr(socket, "images", "ls").splitlines()[1:] if line.strip()]
    stale = {
        digest
        for ref, digest in refs
        if (repository := ref.split("@", 1)[0].rsplit(":", 1)[0]) in wanted and digest != wanted[repository]
    }
    # An image's references: tag, repository@digest and the CRI's sha256:<config> (whose target is the same).
    stale_refs = [ref for ref, digest in refs if digest in stale and digest not in wanted.values()]
    if stale_refs:
        _ctr(socket, "images", "rm", *stale_refs)


def teardown(record: dict[str, Any]) -> None:
    """Remove everything a slot's nodes put on the host, whether their processes still run or not."""
    slot = Slot(record["slot"])
    state = Path(record["state_dir"])
    marker = str(state)
    nodes = range(record["nodes"])
    kubeconfig_path = Path(record["kubeconfig"])
    start, marks = time.monotonic(), []

    def mark(phase: str) -> None:
        marks.append(f"{phase} {time.monotonic() - start:.0f}s")

    # 1. Pods first, while the kubelets run: they stop the containers and tear the pod networks down.
    names = [f"{NODE_PREFIX}-{i}" for i in nodes]
    for name in names:
        _kubectl(
            kubeconfig_path,
            "delete",
            "pods",
            "-A",
            "--force",
            "--grace-period=0",
            f"--field-selector=spec.nodeName={name}",
        )
    mark("pods")
    # 2. The kubelets, then whatever still runs in the nodes' cgroups, then containerd and its shims.
    pids = record.get("pids", {})
    _stop_pids([pid for name, pid in pids.items() if name.startswith("kubelet")], marker, grace=10)
    for i in nodes:
        _kill_cgroup(slot.cgroup_root(i))
    for i in nodes:
        if image_store(slot, i) and _alive(pids.get(f"containerd-{i}", 0)):
            _clean_store(slot.runtime_dir / f"node-{i}" / "containerd.sock", record.get("images", {}))
    _stop_pids([pid for name, pid in pids.items() if name.startswith("containerd")], marker, grace=10)
    _stop_pids(_processes_naming(str(slot.runtime_dir) + "/"), str(slot.runtime_dir) + "/", grace=5)
    _stop_pids(pids.values(), marker, grace=5)
    mark("processes")
    # 3. Network: the pods' network namespaces CNI's cache names (left when a pod was not torn down), bridges,
    #    the DNAT chain.
    for cached, namespaces in _cni_cache_entries(slot, nodes):
        for netns in namespaces:
            if Path(netns).exists():
                _run("umount", netns, check=False)
                Path(netns).unlink(missing_ok=True)
        cached.unlink(missing_ok=True)
    for i in nodes:
        _run("ip", "link", "delete", slot.bridge(i), check=False)
    _iptables_chain(slot, None)
    mark("network")
    # 4. Mounts (the kubelet's volumes, containerd's snapshots and sandboxes), then the files.
    stores = [store for i in nodes if (store := image_store(slot, i))]
    _unmount_under([state, slot.runtime_dir, *stores])
    for store in stores:
        # Per-run state that a containerd killed before its cleanup leaves (sandbox files; mounts are gone).
        for kind in ("sandboxes", "containers"):
            shutil.rmtree(store / "io.containerd.grpc.v1.cri" / kind, ignore_errors=True)
    for i in nodes:
        _remove_cgroup(slot.cgroup_root(i))
    if CONTAINER_LOG_LINKS.exists():
        for link in CONTAINER_LOG_LINKS.iterdir():
            if link.is_symlink() and os.readlink(link).startswith(marker):
                link.unlink(missing_ok=True)
    if SHIM_SOCKETS.exists():
        listening = _run("ss", "-xlnH", check=False).stdout
        for sock in SHIM_SOCKETS.iterdir():
            if str(sock) not in listening and time.time() - sock.lstat().st_mtime > 60:
                sock.unlink(missing_ok=True)
    if not _other_kubelets(marker):
        # Shared with any other kubelet of the host: only the last one out removes them (when empty).
        (DEVICE_PLUGINS / "kubelet.sock").unlink(missing_ok=True)
        for directory in (DEVICE_PLUGINS, DEVICE_PLUGINS.parent, CONTAINER_LOG_LINKS, CNI_CACHE, CNI_CACHE.parent):
            with contextlib.suppress(OSError):
                directory.rmdir()
        for directory in (SHIM_SOCKETS, SHIM_SOCKETS.parent, Path("/run/netns")):
            with contextlib.suppress(OSError):
                directory.rmdir()
    mark("mounts")
    shutil.rmtree(slot.runtime_dir, ignore_errors=True)
    shutil.rmtree(state, ignore_errors=True)
    mark("files")
    _kubectl(kubeconfig_path, "delete", "nodes", *names, "--ignore-not-found")
    _restore_ip_forward(slot)
    slot.record_path.unlink(missing_ok=True)
    mark("done")
    log(f"slot {slot.index} cleaned up (after {', '.join(marks)})")


def footprint(slot: Slot, state_dir: Path) -> dict[str, list[str]]:
    """What the slot's nodes hold on the host, by kind (empty lists once they are stopped): processes, mounts,
    network namespaces, links, iptables rules, cgroups, CNI cache files, log links, its record."""
    marker, run = str(state_dir), str(slot.runtime_dir)
    mounts = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    links = json.loads(_run("ip", "-j", "link", "show").stdout or "[]")
    bridges = {slot.bridge(i) for i in range(8)}
    return {
        "processes": [_cmdline(p) for p in _processes_naming(marker) + _processes_naming(run + "/")],
        "mounts": [m for m in mounts if m.startswith((marker, run))],
        "links": [link["ifname"] for link in links if link["ifname"] in bridges or link.get("master") in bridges],
        "iptables": [r for r in _run("iptables-save", "-t", "nat").stdout.splitlines() if slot.chain in r],
        "cgroups": [str(d) for i in range(8) for d in _cgroup_dirs(slot.cgroup_root(i))],
        "cni": [f"{path.name} {' '.join(ns)}" for path, ns in _cni_cache_entries(slot, range(8))],
        "log-links": [
            str(link)
            for link in (CONTAINER_LOG_LINKS.iterdir() if CONTAINER_LOG_LINKS.exists() else [])
            if link.is_symlink() and os.readlink(link).startswith(marker)
        ],
        "record": [str(slot.record_path)] if slot.record_path.exists() else [],
    }


def reap() -> list[int]:
    """Clean every slot whose processes are all gone but whose host state a crashed run left. Returns the slots."""
    cleaned = []
    for record_path in RUN_ROOT.glob("slot-*.json") if RUN_ROOT.exists() else []:
        slot = Slot(int(record_path.stem.split("-")[1]))
        with _slot_lock(slot, wait=False) as locked:
            if locked and slot.record_path.exists() and not _slot_busy(slot):
                teardown(json.loads(slot.record_path.read_text()))
                cleaned.append(slot.index)
    return cleaned


def stop_for_cluster(cluster_state: Path) -> bool:
    """Stop the real nodes of the cluster whose state directory this is, if it has any. True if it had."""
    record_file = cluster_state / RECORD
    if not record_file.exists():
        return False
    slot = Slot(json.loads(record_file.read_text())["slot"])
    with _slot_lock(slot, wait=True):
        if slot.record_path.exists():
            record = json.loads(slot.record_path.read_text())
            if record.get("cluster_state") == str(cluster_state):
                teardown(record)
    record_file.unlink(missing_ok=True)
    return True


# ----------------------------------------------------------------------------------------------
# the nodes
# ----------------------------------------------------------------------------------------------


@dataclass
class RealNode:
    layout: NodeLayout
    port: int
    healthz_port: int

    @property
    def name(self) -> str:
        return self.layout.name

    @property
    def node_selector(self) -> dict[str, str]:
        """Pins a pod to this node (with NODE_TOLERATION)."""
        return {"kubernetes.io/hostname": self.name}

    @property
    def placement(self) -> dict[str, Any]:
        return {"nodeSelector": self.node_selector, "tolerations": [NODE_TOLERATION]}


@dataclass
class RealNodes:
    """Real nodes of one LocalCluster. `start()` returns them Ready, with the images pulled; `stop()` removes all."""

    cluster: LocalCluster
    count: int = 2
    pull: bool = True  # pull the operator and trainer images at start (False: only the pause image is needed)
    slot: Slot | None = None
    nodes: list[RealNode] = field(default_factory=list)
    images: dict[str, Image] = field(default_factory=dict)
    registry: Registry | None = None
    pids: dict[str, int] = field(default_factory=dict)
    digests: dict[str, str] = field(default_factory=dict)  # repository -> manifest digest of the images in use

    @property
    def state_dir(self) -> Path:
        return self.cluster.state_dir / "real-nodes"

    @property
    def volumes(self) -> Path:
        return self.state_dir / "volumes"

    @property
    def logs(self) -> Path:
        return self.state_dir / "logs"

    @property
    def placement(self) -> dict[str, Any]:
        """Pod spec fields that place a pod on any of the real nodes (a FineTuneJob: spec.resources)."""
        return {"nodeSelector": dict(NODE_SELECTOR), "tolerations": [dict(NODE_TOLERATION)]}

    def layouts(self) -> list[NodeLayout]:
        assert self.slot is not None
        slot = self.slot
        return [
            NodeLayout(f"{NODE_PREFIX}-{i}", i, slot, self.state_dir / f"node-{i}", slot.runtime_dir / f"node-{i}")
            for i in range(self.count)
        ]

    def image(self, target: str) -> str:
        """The reference pods use for a Dockerfile target's image built from this checkout."""
        return self.images[target].ref

    # ------------------------------------------------------------------------------------------
    def start(self, timeout: float = 120.0) -> RealNodes:
        start = time.monotonic()
        stop_for_cluster(self.cluster.state_dir)
        reap()
        self.images = ensure_images(pause=True) if self.pull else ensure_images((), pause=True)
        self.slot = acquire_slot(self._record_body())
        try:
            self._record()
            self._start(timeout)
        except BaseException:
            self.stop()
            raise
        log(f"{self.count} nodes Ready in {time.monotonic() - start:.0f}s (slot {self.slot.index})")
        return self

    def stop(self) -> None:
        if self.slot is not None:
            with _slot_lock(self.slot, wait=True):
                if self.slot.record_path.exists():
                    teardown(json.loads(self.slot.record_path.read_text()))
        (self.cluster.state_dir / RECORD).unlink(missing_ok=True)

    def _record_body(self) -> dict[str, Any]:
        return {
            "nodes": self.count,
            "state_dir": str(self.state_dir),
            "cluster_state": str(self.cluster.state_dir),
            "kubeconfig": str(self.cluster.kubeconfig),
            # Busy while this process starts the nodes, before any of theirs runs.
            "owner": (os.getpid(), _start_time(os.getpid())),
            "pids": self.pids,
            "images": self.digests,
        }

    def _record(self) -> None:
        assert self.slot is not None
        self.slot.record_path.write_text(json.dumps({**self._record_body(), "slot": self.slot.index}))
        (self.cluster.state_dir / RECORD).write_text(json.dumps({"slot": self.slot.index}))

    def _spawn(self, name: str, cmd: list[str]) -> None:
        with open(self.logs / f"{name}.log", "ab") as out:
            proc = subprocess.Popen(
                cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.pids[name] = proc.pid
        self._record()

    def _start(self, timeout: float) -> None:
        assert self.slot is not None
        slot = self.slot
        shutil.rmtree(self.state_dir, ignore_errors=True)
        self.logs.mkdir(parents=True)
        self.volumes.mkdir()
        bin_dir = toolchain_bin()
        layouts = self.layouts()
        # Host network: one bridge per node with its gateway address (the node's IP), routing between them.
        _enable_ip_forward()
        for layout in layouts:
            bridge = slot.bridge(layout.index)
            _run("ip", "link", "delete", bridge, check=False)
            _run("ip", "link", "add", bridge, "type", "bridge")
            _run("ip", "addr", "add", f"{slot.gateway(layout.index)}/24", "dev", bridge)
            _run("ip", "link", "set", bridge, "up")
        _iptables_chain(slot, dnat_rules(slot, self.cluster.ports["apiserver"]))
        # The registry with this checkout's images, and cluster DNS on the first bridge.
        self.registry = Registry(self.state_dir / "registry")
        self._spawn("registry", self.registry.command())
        self.registry.wait_ready()
        for image in self.images.values():
            self.digests[image.ref.rsplit(":", 1)[0]] = self.registry.digest(image) or ""
        self._record()
        dns = slot.gateway(0)
        (self.state_dir / "Corefile").write_text(corefile(dns, self.cluster.kubeconfig))
        self._spawn("coredns", [str(bin_dir / "coredns"), "-conf", str(self.state_dir / "Corefile")])
        self.cluster.kubectl("apply", "-f", "-", input=json.dumps(self._cluster_objects()))
        for layout in layouts:
            for d in (layout.state, layout.run, layout.cni_conf_dir, layout.hosts_dir / REGISTRY, layout.pod_logs):
                d.mkdir(parents=True, exist_ok=True)
            (layout.state / "containerd.toml").write_text(containerd_config(layout, self.images[PAUSE].ref))
            (layout.hosts_dir / REGISTRY / "hosts.toml").write_text(registry_hosts(self.registry.address))
            (layout.cni_conf_dir / "10-kubetune.conflist").write_text(json.dumps(cni_config(layout), indent=1))
            for hierarchy in CGROUP_FS.iterdir():
                if (hierarchy / "cgroup.procs").exists():
                    (hierarchy / slot.cgroup_root(layout.index).lstrip("/")).mkdir(exist_ok=True)
            self._spawn(f"containerd-{layout.index}", ["containerd", "--config", str(layout.state / "containerd.toml")])
        for layout in layouts:
            deadline = time.monotonic() + 30
            while not layout.socket.exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            certs = self._node_certs(layout)
            node = RealNode(layout, free_port(), free_port())
            config = kubelet_config(layout, node.port, node.healthz_port, dns, certs)
            (layout.state / "kubelet.yaml").write_text(json.dumps(config, indent=1))
            kubelet = [
                str(bin_dir / "kubelet"),
                f"--config={layout.state / 'kubelet.yaml'}",
                f"--kubeconfig={layout.state / 'kubeconfig'}",
                f"--root-dir={layout.kubelet_root}",
                f"--hostname-override={layout.name}",
                f"--node-ip={slot.gateway(layout.index)}",
                f"--node-labels={NODE_LABEL}=true",
                "--v=1",
            ]
            self._spawn(f"kubelet-{layout.index}", kubelet)
            self.nodes.append(node)
        self._wait_ready(timeout)
        if self.pull:
            self._pull_images(timeout=1200)

    def _cluster_objects(self) -> dict[str, Any]:
        items: list[dict[str, Any]] = [
            # The API server authorizes with RBAC only (no Node authorizer): kubelets get the built-in node role.
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "ClusterRoleBinding",
                "metadata": {"name": "kubetune-real-nodes"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "system:node"},
                "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": "system:nodes"}],
            },
            {
                "apiVersion": "storage.k8s.io/v1",
                "kind": "StorageClass",
                "metadata": {"name": STORAGE_CLASS},
                "provisioner": "kubernetes.io/no-provisioner",
                "reclaimPolicy": "Retain",
                "volumeBindingMode": "Immediate",
            },
        ]
        return {"apiVersion": "v1", "kind": "List", "items": items}

    def _node_certs(self, layout: NodeLayout) -> dict[str, Path]:
        """The node's identity from the cluster CA: a client certificate in group system:nodes (its kubeconfig)
        and the kubelet's serving certificate."""
        d = layout.state / "pki"
        d.mkdir(exist_ok=True)
        issuer = pki.CertificateAuthority.load(self.cluster.state_dir / "pki", out=d)
        client = issuer.issue("kubelet-client", f"system:node:{layout.name}", organisation="system:nodes")
        gateway = layout.slot.gateway(layout.index)
        serving = issuer.issue(
            "kubelet-serving", layout.name, server_names=[layout.name, "localhost"], server_ips=[gateway, "127.0.0.1"]
        )
        ca_cert = self.cluster.state_dir / "pki" / "ca.crt"
        (layout.state / "kubeconfig").write_text(
            json.dumps(kubeconfig(self.cluster.server, ca_cert, client.cert, client.key))
        )
        return {"serving": serving.cert, "serving-key": serving.key, "ca": ca_cert}

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        pending = {n.name for n in self.nodes}
        while pending and time.monotonic() < deadline:
            for name, pid in self.pids.items():
                if not _alive(pid):
                    raise RuntimeError(f"{name} exited:\n{self._tail(name)}")
            out = self.cluster.kubectl("get", "nodes", *pending, "-o", "json", check=False)
            if out.returncode == 0:
                for item in json.loads(out.stdout).get("items", [json.loads(out.stdout)]):
                    conditions = item.get("status", {}).get("conditions", [])
                    if any(c["type"] == "Ready" and c["status"] == "True" for c in conditions):
                        pending.discard(item["metadata"]["name"])
            time.sleep(0.3)
        if pending:
            raise TimeoutError(f"nodes {sorted(pending)} not Ready after {timeout}s:\n{self._tail('kubelet-0')}")

    def _pull_images(self, timeout: float) -> None:
        """Every node pulls the operator and trainer images now, through its kubelet (a pod per node and image
        that exits at once), so that no test or demo waits minutes for a first pull."""
        start = time.monotonic()
        pods = []
        for node in self.nodes:
            for target in ("operator", "trainer"):
                name = f"pull-{target}-{node.name}"
                pods.append(name)
                pod = {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": {"name": name, "namespace": "kube-system"},
                    "spec": {
                        "nodeName": node.name,
                        "tolerations": [{"operator": "Exists"}],
                        "restartPolicy": "Never",
                        "automountServiceAccountToken": False,
                        "containers": [
                            {
                                "name": "pull",
                                "image": self.image(target),
                                "command": ["python", "-c", "pass"],
                                "imagePullPolicy": "IfNotPresent",
                            }
                        ],
                    },
                }
                self.cluster.kubectl("delete", "pod", name, "-n", "kube-system", "--ignore-not-found", "--wait")
                self.cluster.kubectl("apply", "-f", "-", input=json.dumps(pod))
        deadline = time.monotonic() + timeout
        pending = set(pods)
        while pending and time.monotonic() < deadline:
            out = json.loads(self.cluster.kubectl("get", "pods", "-n", "kube-system", "-o", "json").stdout)
            for item in out["items"]:
                name, phase = item["metadata"]["name"], item["status"].get("phase")
                if name in pending and phase == "Succeeded":
                    pending.discard(name)
                elif name in pending and phase == "Failed":
                    raise RuntimeError(f"pod {name} failed: {json.dumps(item['status'])}")
            time.sleep(1)
        if pending:
            raise TimeoutError(f"images not pulled after {timeout}s: {sorted(pending)}")
        self.cluster.kubectl("delete", "pods", "-n", "kube-system", *pods, "--wait=false")
        log(f"images on every node in {time.monotonic() - start:.0f}s")

    def _tail(self, name: str, size: int = 3000) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace")[-size:] if path.exists() else "(no log)"

    # ------------------------------------------------------------------------------------------
    # what tests and the demo use
    # ------------------------------------------------------------------------------------------
    def claim_dir(self, namespace: str, claim: str) -> Path:
        """The host directory behind PersistentVolumeClaim `claim` of `namespace` (made by create_claims)."""
        return self.volumes / namespace / claim

    def create_claims(self, namespace: str, claims: Iterable[str], size: str = "10Gi", owner: int = 1000) -> None:
        """The namespace and ReadWriteMany claims in it, each bound to a hostPath volume (claim_dir), whose root
        belongs to `owner`: what a cluster admin prepares for workers on a volume type that ignores fsGroup."""
        items: list[dict[str, Any]] = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}]
        for claim in claims:
            path = self.claim_dir(namespace, claim)
            path.mkdir(parents=True, exist_ok=True)
            os.chown(path, owner, owner)
            items.append(
                {
                    "apiVersion": "v1",
                    "kind": "PersistentVolume",
                    "metadata": {"name": f"{namespace}-{claim}", "labels": {"kubetune.dev/namespace": namespace}},
                    "spec": {
                        "capacity": {"storage": size},
                        "accessModes": ["ReadWriteMany"],
                        "persistentVolumeReclaimPolicy": "Retain",
                        "storageClassName": STORAGE_CLASS,
                        "claimRef": {"namespace": namespace, "name": claim},
                        "hostPath": {"path": str(path), "type": "Directory"},
                    },
                }
            )
            items.append(
                {
                    "apiVersion": "v1",
                    "kind": "PersistentVolumeClaim",
                    "metadata": {"name": claim, "namespace": namespace},
                    "spec": {
                        "accessModes": ["ReadWriteMany"],
                        "storageClassName": STORAGE_CLASS,
                        "volumeName": f"{namespace}-{claim}",
                        "resources": {"requests": {"storage": size}},
                    },
                }
            )
        self.cluster.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))
        names = [f"pvc/{c}" for c in claims]
        self.cluster.kubectl("wait", "--for=jsonpath={.status.phase}=Bound", *names, "-n", namespace, "--timeout=60s")

    def delete_claims(self, namespace: str) -> None:
        """The namespace's volumes (after its claims): the PersistentVolumes and their directories."""
        self.cluster.kubectl("delete", "pv", "-l", f"kubetune.dev/namespace={namespace}", "--wait=false", check=False)
        shutil.rmtree(self.volumes / namespace, ignore_errors=True)

    def container_pids(self, namespace: str, pod: str, container: str | None = None) -> list[int]:
        """Host pids of a container's processes (all of the pod's containers when None), from the pod's cgroup."""
        item = json.loads(self.cluster.kubectl("get", "pod", pod, "-n", namespace, "-o", "json").stdout)
        uid = item["metadata"]["uid"]
        ids = [
            s["containerID"].split("://", 1)[1]
            for s in item["status"].get("containerStatuses", [])
            if s.get("containerID") and (container is None or s["name"] == container)
        ]
        pids: set[int] = set()
        assert self.slot is not None
        for node in range(self.count):
            for hierarchy in _cgroup_dirs(self.slot.cgroup_root(node)):
                if hierarchy.parent.name != "pids":
                    continue
                for pod_dir in hierarchy.rglob(f"pod{uid}"):
                    for cid in ids:
                        for procs in (pod_dir / cid).rglob("cgroup.procs"):
                            pids |= {int(p) for p in procs.read_text().split()}
        return sorted(pids)

    def memory_use(self, pod_uid: str) -> dict[str, int] | None:
        """A running pod's memory cgroup (bytes): `working_set`, its usage less inactive page cache (what the kubelet
        reports and what must fit under the limit), and `max_usage`, the kernel's peak of the usage, page cache
        included. None when the pod has no cgroup on these nodes (yet, or any more)."""
        assert self.slot is not None
        for node in range(self.count):
            memory = CGROUP_FS / "memory" / self.slot.cgroup_root(node).lstrip("/")
            for pod_dir in memory.rglob(f"pod{pod_uid}") if memory.is_dir() else []:
                with contextlib.suppress(OSError, ValueError):
                    stat = dict(line.split() for line in (pod_dir / "memory.stat").read_text().splitlines())
                    usage = int((pod_dir / "memory.usage_in_bytes").read_text())
                    return {
                        "working_set": max(0, usage - int(stat.get("total_inactive_file", 0))),
                        "max_usage": int((pod_dir / "memory.max_usage_in_bytes").read_text()),
                    }
        return None

    def kill(self, namespace: str, pod: str, container: str | None = None, sig: int = signal.SIGKILL) -> list[int]:
        """Send `sig` to every process of a container (SIGKILL: as the OOM killer or a crash would). Returns pids."""
        pids = self.container_pids(namespace, pod, container)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        return pids

    def pod_logs(self, namespace: str, pod: str, container: str | None = None, *, previous: bool = False) -> str:
        args = ["logs", pod, "-n", namespace]
        if container:
            args += ["-c", container]
        if previous:
            args.append("--previous")
        return self.cluster.kubectl(*args).stdout

    def install_operator(
        self,
        watch: Iterable[str] = (),
        *,
        namespace: str = "kubetune-system",
        release: str = "kubetune",
        values: dict[str, Any] | None = None,
        timeout: float = 180.0,
    ) -> str:
        """Install the Helm chart with this checkout's operator image, on the real nodes, watching `watch` (empty:
        every namespace; in namespaced mode they must exist); `values` are merged over these. Returns the operator
        pod's name once it is Ready. The CRD is left out unless values say crds.install: the test session's
        crd_cluster has it."""
        values_file = self.state_dir / f"values-{namespace}-{release}.json"
        values_file.write_text(json.dumps(operator_values(self.images, watch, values or {}), indent=1))
        self._helm(
            "upgrade", "--install", release, str(CHART), "--namespace", namespace, "--create-namespace",
            "-f", str(values_file), "--wait", f"--timeout={int(timeout)}s",
        )  # fmt: skip
        selector = f"app.kubernetes.io/instance={release},app.kubernetes.io/component=operator"
        out = self.cluster.kubectl("get", "pods", "-n", namespace, "-l", selector, "-o", "json").stdout
        ready = [
            p["metadata"]["name"]
            for p in json.loads(out)["items"]
            if any(c["type"] == "Ready" and c["status"] == "True" for c in p["status"].get("conditions", []))
        ]
        assert ready, f"no Ready operator pod in {namespace}"
        return str(ready[0])

    def uninstall_operator(self, *, namespace: str = "kubetune-system", release: str = "kubetune") -> None:
        self._helm("uninstall", release, "--namespace", namespace, "--wait", "--ignore-not-found")

    def _helm(self, *args: str) -> None:
        home = self.state_dir / "helm"
        env = {**self.cluster.env(), **{f"HELM_{k}_HOME": str(home / k.lower()) for k in ("CACHE", "CONFIG", "DATA")}}
        result = subprocess.run([str(toolchain_bin() / "helm"), *args], env=env, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"helm {args[0]} failed ({result.returncode}): {result.stderr.strip()}")

    def operator_settings(self, **overrides: Any) -> dict[str, Any]:
        """Operator settings (settings.yaml keys) that run workers from this checkout's trainer image."""
        trainer = self.image("trainer")
        return {"images": {"peft": trainer, "full": trainer}, "imagePullPolicy": "IfNotPresent", **overrides}
