"""The node agent's main loop: register the Node, keep it Ready (status + Lease), serve container logs,
watch the pods bound to the node and hand each to a PodWorker; on start, fail what an earlier run left."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import platform
import re
import shutil
import signal
import socket
import sys
from pathlib import Path

import aiohttp
from aiohttp import web

from kubetune_dev import pki
from kubetune_dev.cluster import FAKE_NODE_ANNOTATION
from kubetune_dev.nodeagent import podspec
from kubetune_dev.nodeagent.kube import MERGE_PATCH, STRATEGIC_MERGE_PATCH, ApiError, Kube
from kubetune_dev.nodeagent.logs import log_app, pod_dir, server_ssl
from kubetune_dev.nodeagent.network import PodNetwork
from kubetune_dev.nodeagent.runtime import (
    NodeContext,
    PodWorker,
    delete_pod,
    kill_recorded_processes,
    remove_pod_volumes,
)
from kubetune_dev.nodeagent.status import (
    TERMINAL_PHASES,
    node_conditions,
    node_status,
    now,
    now_micro,
    orphaned_status,
)

log = logging.getLogger("kubetune.nodeagent")

LOCAL_NODE_LABEL = "kubetune.io/local-node"
# The taint tests put on their local nodes, so that pods of other tests (meant for kwok's fake nodes)
# never land on them: pods for a local node tolerate it.
LOCAL_NODE_TAINT = {"key": LOCAL_NODE_LABEL, "value": "true", "effect": "NoSchedule"}
LEASE_NAMESPACE = "kube-node-lease"
LEASE_SECONDS = 40
RENEW_SECONDS = 10.0
STATUS_EVERY = 3  # lease renewals between two node-status heartbeats
FORCE_DELETE_GRACE = 2.0  # the kubelet's minimum when a pod vanishes from the API
SHUTDOWN_GRACE = 10.0
ARCHITECTURES = {"x86_64": "amd64", "aarch64": "arm64"}
PR_SET_PDEATHSIG = 1


def machine_capacity(root: Path, gpus: int) -> dict[str, str]:
    """This machine's CPUs, memory and disk, and `gpus` fake GPUs."""
    mem_kib = re.search(r"^MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.MULTILINE)
    disk = os.statvfs(root)
    capacity = {
        "cpu": str(len(os.sched_getaffinity(0))),
        "memory": f"{mem_kib.group(1) if mem_kib else 0}Ki",
        "ephemeral-storage": str(disk.f_blocks * disk.f_frsize),
        "pods": "110",
    }
    if gpus:
        capacity["nvidia.com/gpu"] = str(gpus)
    return capacity


# Where pods commonly mount emptyDirs (the trainer's pods do both): a container sees its volume there, not the
# machine's directory, so the agent's own environment must not lie beneath.
POD_SCRATCH_MOUNTS = (Path("/tmp"), Path("/dev/shm"))


def hidden_from_containers(paths: list[Path]) -> str | None:
    """Why containers could not reach one of `paths` (the agent's Python environment and code), or None."""
    for path in paths:
        for mount in POD_SCRATCH_MOUNTS:
            if path.resolve().is_relative_to(mount):
                return (
                    f"{path} lies under {mount}, where pods mount an emptyDir that hides it from their containers "
                    "(their commands run from the agent's Python environment): keep the checkout and "
                    "$KUBETUNE_CACHE outside /tmp and /dev/shm"
                )
    return None


def _os_image() -> str:
    with contextlib.suppress(OSError):
        if m := re.search(r'^PRETTY_NAME="?([^"\n]*)', Path("/etc/os-release").read_text(), re.MULTILINE):
            return m.group(1)
    return "linux"


class NodeAgent:
    def __init__(
        self,
        name: str,
        kubeconfig: Path,
        root: Path,
        *,
        gpus: int = 0,
        labels: dict[str, str] | None = None,
        taints: list[dict[str, str]] | None = None,
        address: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.name = name
        self.kubeconfig = kubeconfig
        self.root = root
        self.gpus = gpus
        self.labels = {
            "kubernetes.io/hostname": name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": ARCHITECTURES.get(platform.machine(), platform.machine()),
            LOCAL_NODE_LABEL: "true",
            **(labels or {}),
        }
        self.taints = taints or []
        self.address = address
        self.port = port
        self.workers: dict[str, PodWorker] = {}
        self.worker_tasks: set[asyncio.Task] = set()
        self.finished: set[str] = set()  # uids whose worker is done (their terminal status may lag)
        self.finalizing: set[str] = set()

    # ------------------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        if os.geteuid() != 0:
            raise SystemExit("the local node agent needs root: it bind-mounts volumes in private mount namespaces")
        if shutil.which("unshare") is None:
            raise SystemExit("the local node agent needs `unshare` (util-linux)")
        if hidden := hidden_from_containers([Path(sys.prefix), Path(__file__).parents[2]]):
            raise SystemExit(f"the local node agent cannot run pods here: {hidden}")
        self.root.mkdir(parents=True, exist_ok=True)
        self.kube = Kube(self.kubeconfig)
        self.capacity = machine_capacity(self.root, self.gpus)
        network = PodNetwork(self.root, self.name)
        api_host, api_port = self.kube.server_host_port
        self.ctx = NodeContext(
            kube=self.kube,
            node=self.name,
            root=self.root,
            network=network,
            host_ip=self.address,
            allocatable=self.capacity,
            service_env={"KUBERNETES_SERVICE_HOST": api_host, "KUBERNETES_SERVICE_PORT": str(api_port)},
            base_env={
                # The agent's own interpreter's directory first: console scripts of its environment resolve.
                "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "/usr/bin:/bin")]),
                "HOME": os.environ.get("HOME", "/root"),
                # The packages of the checkout that started the agent, not the environment's editable install.
                "PYTHONPATH": os.environ.get("PYTHONPATH", ""),
            },
        )
        runner = await self._serve_logs()
        try:
            await self._register()
            tasks = [asyncio.create_task(self._heartbeat()), asyncio.create_task(self._watch_pods())]
            log.info("node %s is up: logs on https://%s:%d, root %s", self.name, self.address, self.port, self.root)
            await stop.wait()
            log.info("node %s: stopping", self.name)
            await self._stop_pods()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            with contextlib.suppress(ApiError, aiohttp.ClientError):
                await self._post_status(ready=False)
        finally:
            await runner.cleanup()
            await self.kube.close()

    # ------------------------------------------------------------------------------------------
    # Node, heartbeat, logs endpoint

    async def _serve_logs(self) -> web.AppRunner:
        node_dir = self.root / "nodes" / self.name
        node_dir.mkdir(parents=True, exist_ok=True)
        # A throwaway CA of the node's own signs its serving certificate; the API server does not verify it
        # (kube-apiserver without --kubelet-certificate-authority), but a client could pin it.
        serving = pki.CertificateAuthority(node_dir, name=f"{self.name}-serving-ca").issue(
            "serving", self.name, server_names=[self.name], server_ips=[self.address]
        )
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.address, self.port))
        self.port = sock.getsockname()[1]
        runner = web.AppRunner(log_app(self.root), access_log=None)
        await runner.setup()
        site = web.SockSite(runner, sock, ssl_context=server_ssl(serving.cert, serving.key, self.kube.ca_file))
        await site.start()
        return runner

    async def _register(self) -> None:
        path = f"/api/v1/nodes/{self.name}"
        node = await self.kube.get_or_none(path)
        if node is not None and FAKE_NODE_ANNOTATION in (node["metadata"].get("annotations") or {}):
            raise SystemExit(f"node {self.name} is a kwok fake node; choose another name")
        if node is None:
            body = {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {
                    "name": self.name,
                    "labels": self.labels,
                    "annotations": {"node.alpha.kubernetes.io/ttl": "0"},
                },
                "spec": {"taints": self.taints},
            }
            node = await self.kube.request("POST", "/api/v1/nodes", body)
        else:
            update = {"metadata": {"labels": self.labels}, "spec": {"taints": self.taints}}
            node = await self.kube.request("PATCH", path, update, content_type=MERGE_PATCH)
        self.node_uid = node["metadata"]["uid"]
        await self._post_status(ready=True)
        await self._renew_lease()

    async def _post_status(self, *, ready: bool) -> None:
        path = f"/api/v1/nodes/{self.name}"
        current = await self.kube.get(path)
        status = node_status(
            capacity=self.capacity,
            address=self.address,
            port=self.port,
            conditions=node_conditions((current.get("status") or {}).get("conditions") or [], ready=ready, at=now()),
            architecture=self.labels["kubernetes.io/arch"],
            kernel=platform.release(),
            os_image=_os_image(),
            boot_id=Path("/proc/sys/kernel/random/boot_id").read_text().strip(),
        )
        if not self.gpus:  # a merge patch keeps map keys it does not mention: drop a GPU count of a past run
            for key in ("capacity", "allocatable"):
                status[key]["nvidia.com/gpu"] = None
        await self.kube.request("PATCH", path + "/status", {"status": status}, content_type=MERGE_PATCH)

    async def _renew_lease(self) -> None:
        path = f"/apis/coordination.k8s.io/v1/namespaces/{LEASE_NAMESPACE}/leases/{self.name}"
        spec = {"holderIdentity": self.name, "leaseDurationSeconds": LEASE_SECONDS, "renewTime": now_micro()}
        try:
            await self.kube.request("PATCH", path, {"spec": spec}, content_type=MERGE_PATCH)
        except ApiError as e:
            if e.status != 404:
                raise
            owner = {"apiVersion": "v1", "kind": "Node", "name": self.name, "uid": self.node_uid}
            lease = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": self.name, "namespace": LEASE_NAMESPACE, "ownerReferences": [owner]},
                "spec": spec,
            }
            await self.kube.request("POST", f"/apis/coordination.k8s.io/v1/namespaces/{LEASE_NAMESPACE}/leases", lease)

    async def _heartbeat(self) -> None:
        beats = 0
        while True:
            await asyncio.sleep(RENEW_SECONDS)
            try:
                await self._renew_lease()
                beats += 1
                if beats % STATUS_EVERY == 0:
                    await self._post_status(ready=True)
            except (ApiError, aiohttp.ClientError, TimeoutError) as e:
                log.warning("node %s: heartbeat failed: %s", self.name, e)

    # ------------------------------------------------------------------------------------------
    # Pods

    async def _watch_pods(self) -> None:
        selector = f"spec.nodeName={self.name}"
        first = True
        while True:
            try:
                listing = await self.kube.get("/api/v1/pods", fieldSelector=selector)
                pods = listing["items"]
                if first:
                    await self._recover(pods)
                    first = False
                present = {p["metadata"]["uid"] for p in pods}
                for uid, worker in list(self.workers.items()):
                    if uid not in present:
                        worker.stop(FORCE_DELETE_GRACE)
                for pod in pods:
                    self._on_pod(pod)
                version = listing["metadata"]["resourceVersion"]
                while True:
                    async for event in self.kube.watch(
                        "/api/v1/pods", fieldSelector=selector, resourceVersion=version, timeoutSeconds="300"
                    ):
                        if event["type"] == "ERROR":  # typically 410 Gone: list again
                            raise ApiError(event["object"].get("code", 500), json.dumps(event["object"]))
                        pod = event["object"]
                        version = pod["metadata"]["resourceVersion"]
                        if event["type"] == "DELETED":
                            self._on_deleted(pod)
                        elif event["type"] in ("ADDED", "MODIFIED"):
                            self._on_pod(pod)
            except (ApiError, aiohttp.ClientError, TimeoutError) as e:
                log.warning("node %s: pod watch interrupted (%s); listing again", self.name, e)
                await asyncio.sleep(1)

    def _on_pod(self, pod: dict) -> None:
        meta = pod["metadata"]
        uid = meta["uid"]
        if worker := self.workers.get(uid):
            worker.update(pod)
            return
        deleting = bool(meta.get("deletionTimestamp"))
        phase = (pod.get("status") or {}).get("phase")
        if uid in self.finished or phase in TERMINAL_PHASES or deleting:
            # Nothing runs: a deleted pod only needs its final removal.
            if deleting and uid not in self.finalizing:
                self.finalizing.add(uid)
                self._spawn(self._finalize(pod))
            return
        worker = PodWorker(self.ctx, pod)
        self.workers[uid] = worker
        self._spawn(self._run_worker(worker))

    def _on_deleted(self, pod: dict) -> None:
        uid = pod["metadata"]["uid"]
        if worker := self.workers.get(uid):
            worker.stop(FORCE_DELETE_GRACE)
        else:
            remove_pod_volumes(pod_dir(self.root, pod["metadata"]["namespace"], pod["metadata"]["name"], uid), uid)
        self.finished.discard(uid)
        self.finalizing.discard(uid)

    def _spawn(self, coroutine: object) -> None:
        task = asyncio.ensure_future(coroutine)  # type: ignore[arg-type]
        self.worker_tasks.add(task)
        task.add_done_callback(self.worker_tasks.discard)

    async def _run_worker(self, worker: PodWorker) -> None:
        try:
            await worker.run()
        except Exception as e:
            # A bug must not leave a pod Running forever: kill what it started and fail it, saying why.
            log.exception("pod %s/%s: worker failed", worker.namespace, worker.name)
            kill_recorded_processes(worker.dir)
            await self._fail_pod(worker.pod, "NodeAgentError", f"the local node agent failed: {e!r}")
        finally:
            self.workers.pop(worker.uid, None)
            self.finished.add(worker.uid)

    async def _finalize(self, pod: dict) -> None:
        meta = pod["metadata"]
        try:
            await delete_pod(self.kube, meta["namespace"], meta["name"], meta["uid"])
        except (ApiError, aiohttp.ClientError) as e:
            log.warning("pod %s/%s: final delete failed: %s", meta["namespace"], meta["name"], e)
            self.finalizing.discard(meta["uid"])
        remove_pod_volumes(pod_dir(self.root, meta["namespace"], meta["name"], meta["uid"]), meta["uid"])

    async def _recover(self, pods: list[dict]) -> None:
        """An earlier run of this agent may have left pods: processes it started are not adopted. Survivors
        are killed, and pods it had started (they have a startTime) are marked Failed. Pods it never got
        to start run normally. Directories of this node's pods that no longer exist are removed."""
        present = {p["metadata"]["uid"] for p in pods}
        for directory in (self.root / "pods").glob("*_*_*"):
            state = directory / "state.json"
            if state.exists() and json.loads(state.read_text()).get("node") == self.name:
                kill_recorded_processes(directory)
                if directory.name.rsplit("_", 1)[1] not in present:
                    shutil.rmtree(directory, ignore_errors=True)
        for pod in pods:
            status = pod.get("status") or {}
            if status.get("phase") in TERMINAL_PHASES or not status.get("startTime"):
                continue
            meta = pod["metadata"]
            log.info("pod %s/%s: started by an earlier agent run; marking it Failed", meta["namespace"], meta["name"])
            await self._fail_pod(
                pod,
                "NodeAgentRestarted",
                "The local node agent restarted; it does not adopt the processes of its earlier run.",
            )
            self.finished.add(meta["uid"])

    async def _fail_pod(self, pod: dict, reason: str, message: str) -> None:
        meta = pod["metadata"]
        path = f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}"
        with contextlib.suppress(ApiError, aiohttp.ClientError):
            current = await self.kube.get(path)
            phase = (current.get("status") or {}).get("phase")
            if current["metadata"]["uid"] == meta["uid"] and phase not in TERMINAL_PHASES:
                final = orphaned_status(current, at=now(), reason=reason, message=message)
                await self.kube.request(
                    "PATCH", path + "/status", {"status": final}, content_type=STRATEGIC_MERGE_PATCH
                )

    async def _stop_pods(self) -> None:
        for worker in self.workers.values():
            worker.stop(
                min(podspec.grace_period(worker.pod), SHUTDOWN_GRACE),
                reason="Terminated",
                message="Pod was terminated because its local node agent stopped.",
            )
        if self.worker_tasks:
            await asyncio.wait(set(self.worker_tasks), timeout=SHUTDOWN_GRACE + 10)


def parse_taint(text: str) -> dict[str, str]:
    """`key=value:Effect` or `key:Effect`, as kubectl taint writes them."""
    spec, _, effect = text.rpartition(":")
    key, _, value = spec.partition("=")
    if not key or effect not in ("NoSchedule", "PreferNoSchedule", "NoExecute"):
        raise ValueError(f"taint {text!r}: expected key[=value]:NoSchedule|PreferNoSchedule|NoExecute")
    return {"key": key, "value": value, "effect": effect} if value else {"key": key, "effect": effect}


def run_agent(agent: NodeAgent, *, exit_with_parent: bool = False) -> None:
    """Run until SIGTERM or SIGINT (or, with exit_with_parent, until the parent process dies), then stop
    the pods and mark the node NotReady."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if exit_with_parent:
        # A test session that dies without tearing down must not leave agents behind.
        parent = os.getppid()
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:
            return

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await agent.run(stop)

    asyncio.run(main())
