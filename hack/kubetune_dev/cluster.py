"""A real, local Kubernetes control plane for tests and the demo.

etcd, kube-apiserver (throwaway CA, client-certificate auth, RBAC authorizer), kube-controller-manager,
kube-scheduler and kwok run as local processes on loopback ports chosen free at start. kwok plays the
kubelet for fake GPU nodes (annotated `kwok.x-k8s.io/node=fake`), with the stages in kwok-stages.yaml.

Each cluster lives in its own state directory (certs, etcd data, logs, kubeconfig, pids.json). Starting a
cluster in a directory first stops whatever a crashed earlier run left there, so nothing blocks a new start;
two clusters in two directories run side by side.

`audit_users` makes the API server write an audit log of those users' requests (one JSON line per request;
`audit_requests` reads it back), so a benchmark can count what each controller asks of the API server. Give
each controller its own user with `user_kubeconfig`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from kubetune_dev import pki
from kubetune_dev.toolchain import toolchain_bin

HERE = Path(__file__).resolve().parent
STAGES = HERE / "kwok-stages.yaml"
FAKE_NODE_ANNOTATION = "kwok.x-k8s.io/node"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
SERVICE_CIDR = "10.96.0.0/16"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _alive(pid: int) -> bool:
    """True while pid runs; a zombie counts as gone (and is reaped when it is our child)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def stop_processes(state_dir: Path, grace: float = 10.0) -> list[str]:
    """Stop every process recorded in state_dir/pids.json (reverse start order). Returns their names.

    A pid is only signalled while its command line still mentions the state directory, so a pid reused
    by an unrelated process after a crash is never touched.
    """
    pid_file = state_dir / "pids.json"
    if not pid_file.exists():
        return []
    procs: dict[str, int] = json.loads(pid_file.read_text())
    marker = str(state_dir)

    def ours(pid: int) -> bool:
        return _alive(pid) and marker in _cmdline(pid)

    stopped = []
    for name, pid in reversed(list(procs.items())):
        if ours(pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGTERM)
                stopped.append(name)
    deadline = time.monotonic() + grace
    for pid in procs.values():
        while ours(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if ours(pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
    pid_file.unlink()
    return stopped


@dataclass
class GpuNodePool:
    count: int = 2
    gpus_per_node: int = 8
    gpu_product: str = "NVIDIA-H100-80GB-HBM3"
    cpu: str = "192"
    memory: str = "2Ti"
    name_prefix: str = "gpu-node"


@dataclass
class LocalCluster:
    state_dir: Path
    gpu_nodes: GpuNodePool = field(default_factory=GpuNodePool)
    cpu_nodes: int = 1
    ports: dict[str, int] = field(default_factory=dict)
    # Users whose requests the API server writes to the audit log (state_dir/audit.log).
    audit_users: tuple[str, ...] = ()
    _ca: pki.CertificateAuthority | None = field(default=None, init=False, repr=False)

    @property
    def kubeconfig(self) -> Path:
        return self.state_dir / "kubeconfig"

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.ports['apiserver']}"

    @property
    def audit_log(self) -> Path:
        return self.state_dir / "audit.log"

    @property
    def ca_cert(self) -> Path:
        return self.state_dir / "pki" / "ca.crt"

    # ------------------------------------------------------------------------------------------
    def start(self, timeout: float = 120.0) -> LocalCluster:
        bin_dir = toolchain_bin()
        stop_processes(self.state_dir)
        if self.state_dir.exists():
            shutil.rmtree(self.state_dir)
        (self.state_dir / "pki").mkdir(parents=True)
        (self.state_dir / "logs").mkdir()
        self.ports = {
            name: free_port() for name in ("etcd", "etcd-peer", "apiserver", "controller-manager", "scheduler", "kwok")
        }
        certs = self._write_certs()
        self._write_kubeconfig(certs)
        procs: dict[str, int] = {}
        try:
            procs["etcd"] = self._spawn("etcd", [str(bin_dir / "etcd"), *self._etcd_args()])
            self._record(procs)
            procs["kube-apiserver"] = self._spawn(
                "kube-apiserver", [str(bin_dir / "kube-apiserver"), *self._apiserver_args(certs)]
            )
            self._record(procs)
            self._wait_ready(certs, timeout)
            procs["kube-controller-manager"] = self._spawn(
                "kube-controller-manager", [str(bin_dir / "kube-controller-manager"), *self._kcm_args(certs)]
            )
            procs["kube-scheduler"] = self._spawn(
                "kube-scheduler", [str(bin_dir / "kube-scheduler"), *self._scheduler_args()]
            )
            procs["kwok"] = self._spawn("kwok", [str(bin_dir / "kwok"), *self._kwok_args()])
            self._record(procs)
            self.kubectl("apply", "-f", "-", input=self._bootstrap_manifests())
            self._wait_for_nodes(timeout)
            self._wait_for_default_service_account(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        stop_processes(self.state_dir)

    # ------------------------------------------------------------------------------------------
    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, kubeconfig: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        cmd = [str(toolchain_bin() / "kubectl"), "--kubeconfig", str(kubeconfig or self.kubeconfig), *args]
        result = subprocess.run(cmd, input=input, text=True, capture_output=True)
        if check and result.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
        return result

    def wait_established(self, crd: str, timeout: float = 60.0) -> None:
        """Wait until a CustomResourceDefinition serves. Not `kubectl wait --for=condition=Established`: on a CRD
        created a moment ago, whose status.conditions is still null, that fails at once."""
        jsonpath = 'jsonpath={.status.conditions[?(@.type=="Established")].status}'
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.kubectl("get", "crd", crd, "-o", jsonpath, check=False).stdout.strip() == "True":
                return
            time.sleep(0.2)
        raise TimeoutError(f"CRD {crd} not Established after {timeout}s")

    def create_namespace_with_claims(self, namespace: str, claims: Iterable[str], size: str = "1Gi") -> None:
        """A namespace and ReadWriteMany claims in it (the default StorageClass binds them)."""
        items = [
            {
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "metadata": {"name": claim, "namespace": namespace},
                "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": size}}},
            }
            for claim in claims
        ]
        self.kubectl(
            "apply",
            "-f",
            "-",
            input=json.dumps({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}),
        )
        if items:
            self.kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))

    def user_kubeconfig(self, user: str, groups: str = "system:masters") -> Path:
        """A kubeconfig for `user` (a client certificate from the cluster's CA; `groups` as its organisation), so
        the API server, its audit log included, tells that client's requests from the others'."""
        pair = self._authority().issue(f"user-{user}", user, organisation=groups)
        config = json.loads(self.kubeconfig.read_text())
        config["users"] = [
            {"name": "admin", "user": {"client-certificate": str(pair.cert), "client-key": str(pair.key)}}
        ]
        path = self.state_dir / f"kubeconfig-{user}"
        path.write_text(json.dumps(config, indent=2))
        path.chmod(0o600)
        return path

    def serving_cert(self, stem: str) -> pki.KeyPair:
        """A serving certificate for 127.0.0.1 and localhost from the cluster's CA, which the API server trusts
        (e.g. for an admission webhook on this host: caBundle = the CA in `ca_cert`)."""
        return self._authority().issue(stem, stem, server_names=["localhost"], server_ips=["127.0.0.1"])

    def _authority(self) -> pki.CertificateAuthority:
        if self._ca is None:
            raise RuntimeError("only the process that started the cluster can issue certificates for it")
        return self._ca

    def token_kubeconfig(self, token: str, path: Path) -> Path:
        """Write a kubeconfig that authenticates with a bearer token only (e.g. a ServiceAccount's)."""
        config = json.loads(self.kubeconfig.read_text())
        config["users"] = [{"name": "admin", "user": {"token": token}}]
        path.write_text(json.dumps(config, indent=2))
        path.chmod(0o600)
        return path

    def env(self) -> dict[str, str]:
        """Environment for a child process that should talk to this cluster."""
        return {**os.environ, "KUBECONFIG": str(self.kubeconfig)}

    # ------------------------------------------------------------------------------------------
    def _record(self, procs: dict[str, int]) -> None:
        (self.state_dir / "pids.json").write_text(json.dumps(procs))
        (self.state_dir / "ports.json").write_text(json.dumps(self.ports))

    def _spawn(self, name: str, cmd: list[str]) -> int:
        log = open(self.state_dir / "logs" / f"{name}.log", "wb")  # noqa: SIM115 - owned by the child
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
        )
        log.close()
        return proc.pid

    def _write_certs(self) -> dict[str, Path]:
        d = self.state_dir / "pki"
        ca = self._ca = pki.CertificateAuthority(d)
        serving = ca.issue(
            "apiserver",
            "kube-apiserver",
            server_names=[
                "localhost",
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
            ],
            server_ips=["127.0.0.1", "10.96.0.1"],
        )
        admin = ca.issue("admin", "kubetune-admin", organisation="system:masters")
        sa = pki.service_account_keys(d)
        return {
            "ca": ca.pair.cert,
            "ca-key": ca.pair.key,
            "serving": serving.cert,
            "serving-key": serving.key,
            "admin": admin.cert,
            "admin-key": admin.key,
            "sa-pub": sa.cert,
            "sa-key": sa.key,
        }

    def _write_kubeconfig(self, certs: dict[str, Path]) -> None:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "kubetune-local",
                    "cluster": {"server": self.server, "certificate-authority": str(certs["ca"])},
                }
            ],
            "users": [
                {
                    "name": "admin",
                    "user": {"client-certificate": str(certs["admin"]), "client-key": str(certs["admin-key"])},
                }
            ],
            "contexts": [{"name": "kubetune-local", "context": {"cluster": "kubetune-local", "user": "admin"}}],
            "current-context": "kubetune-local",
        }
        self.kubeconfig.write_text(json.dumps(config, indent=2))

    def _etcd_args(self) -> list[str]:
        client = f"http://127.0.0.1:{self.ports['etcd']}"
        peer = f"http://127.0.0.1:{self.ports['etcd-peer']}"
        return [
            f"--name=kubetune-{self.ports['etcd']}",
            f"--data-dir={self.state_dir / 'etcd'}",
            f"--listen-client-urls={client}",
            f"--advertise-client-urls={client}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=kubetune-{self.ports['etcd']}={peer}",
            "--unsafe-no-fsync=true",
            "--quota-backend-bytes=4294967296",
            "--log-level=warn",
        ]

    def _apiserver_args(self, certs: dict[str, Path]) -> list[str]:
        return [
            f"--etcd-servers=http://127.0.0.1:{self.ports['etcd']}",
            # Every address: pods on real nodes reach it at the `kubernetes` Service address through a DNAT rule
            # to their bridge's gateway (kubetune_dev.realnodes). Clients authenticate (certificates, tokens).
            "--bind-address=0.0.0.0",
            "--advertise-address=127.0.0.1",
            f"--secure-port={self.ports['apiserver']}",
            f"--cert-dir={self.state_dir / 'pki'}",
            f"--tls-cert-file={certs['serving']}",
            f"--tls-private-key-file={certs['serving-key']}",
            f"--client-ca-file={certs['ca']}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={certs['sa-pub']}",
            f"--service-account-signing-key-file={certs['sa-key']}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--authorization-mode=RBAC",
            "--allow-privileged=true",
            # `kubectl logs` and `exec` for pods of the real nodes: the API server calls their kubelets with a
            # client certificate from the cluster CA, which their x509 authentication accepts.
            f"--kubelet-client-certificate={certs['admin']}",
            f"--kubelet-client-key={certs['admin-key']}",
            # Real nodes' names are not in DNS; their InternalIP is their bridge's gateway on this host.
            "--kubelet-preferred-address-types=InternalIP,Hostname",
            # The `kubernetes` Service endpoints would point at a loopback address, which is invalid.
            "--endpoint-reconciler-type=none",
            "--profiling=false",
            "--v=1",
            *self._audit_args(),
        ]

    def _audit_args(self) -> list[str]:
        if not self.audit_users:
            return []
        # One line per request: at ResponseComplete, or at ResponseStarted for a watch (which completes only
        # when it ends). Other users' requests are not logged.
        policy = {
            "apiVersion": "audit.k8s.io/v1",
            "kind": "Policy",
            "omitStages": ["RequestReceived"],
            "rules": [{"level": "Metadata", "users": list(self.audit_users)}, {"level": "None"}],
        }
        policy_file = self.state_dir / "audit-policy.json"
        policy_file.write_text(json.dumps(policy))
        return [
            f"--audit-policy-file={policy_file}",
            f"--audit-log-path={self.audit_log}",
            "--audit-log-format=json",
            "--audit-log-maxsize=0",
        ]

    def _kcm_args(self, certs: dict[str, Path]) -> list[str]:
        return [
            f"--kubeconfig={self.kubeconfig}",
            "--bind-address=127.0.0.1",
            f"--secure-port={self.ports['controller-manager']}",
            "--leader-elect=false",
            f"--service-account-private-key-file={certs['sa-key']}",
            f"--root-ca-file={certs['ca']}",
            f"--cluster-signing-cert-file={certs['ca']}",
            f"--cluster-signing-key-file={certs['ca-key']}",
            "--use-service-account-credentials=false",
            # Fast reaction to finished Jobs and deleted owners keeps tests short.
            "--concurrent-job-syncs=10",
            "--concurrent-gc-syncs=40",
            "--v=1",
        ]

    def _scheduler_args(self) -> list[str]:
        return [
            f"--kubeconfig={self.kubeconfig}",
            "--bind-address=127.0.0.1",
            f"--secure-port={self.ports['scheduler']}",
            "--leader-elect=false",
            "--v=1",
        ]

    def _kwok_args(self) -> list[str]:
        return [
            f"--kubeconfig={self.kubeconfig}",
            f"--config={STAGES}",
            "--manage-all-nodes=false",
            f"--manage-nodes-with-annotation-selector={FAKE_NODE_ANNOTATION}=fake",
            f"--server-address=127.0.0.1:{self.ports['kwok']}",
            "--cidr=10.244.0.0/16",
            "--node-ip=10.240.0.1",
        ]

    def _wait_ready(self, certs: dict[str, Path], timeout: float) -> None:
        ctx = ssl.create_default_context(cafile=str(certs["ca"]))
        ctx.load_cert_chain(str(certs["admin"]), str(certs["admin-key"]))
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.server}/readyz", context=ctx, timeout=5) as resp:
                    if resp.status == 200:
                        return
            except Exception as e:
                last = str(e)
            time.sleep(0.3)
        log = (self.state_dir / "logs" / "kube-apiserver.log").read_text(errors="replace")[-3000:]
        raise TimeoutError(f"kube-apiserver not ready after {timeout}s ({last}); log tail:\n{log}")

    def _bootstrap_manifests(self) -> str:
        items: list[dict] = [
            {
                "apiVersion": "storage.k8s.io/v1",
                "kind": "StorageClass",
                "metadata": {
                    "name": "kwok-volume",
                    "annotations": {"storageclass.kubernetes.io/is-default-class": "true"},
                },
                "provisioner": "kwok.x-k8s.io/volume",
                "reclaimPolicy": "Delete",
                "volumeBindingMode": "Immediate",
            }
        ]
        pool = self.gpu_nodes
        for i in range(pool.count):
            items.append(
                self._fake_node(
                    f"{pool.name_prefix}-{i}",
                    labels={
                        GPU_PRODUCT_LABEL: pool.gpu_product,
                        "nvidia.com/gpu.count": str(pool.gpus_per_node),
                        "node.kubernetes.io/instance-type": "p5.48xlarge",
                    },
                    resources={
                        "cpu": pool.cpu,
                        "memory": pool.memory,
                        "pods": "110",
                        "nvidia.com/gpu": str(pool.gpus_per_node),
                    },
                )
            )
        for i in range(self.cpu_nodes):
            items.append(
                self._fake_node(
                    f"cpu-node-{i}",
                    labels={"node.kubernetes.io/instance-type": "m5.4xlarge"},
                    resources={"cpu": "16", "memory": "64Gi", "pods": "110"},
                )
            )
        return json.dumps({"apiVersion": "v1", "kind": "List", "items": items})

    @staticmethod
    def _fake_node(name: str, labels: dict[str, str], resources: dict[str, str]) -> dict:
        return {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": name,
                "annotations": {FAKE_NODE_ANNOTATION: "fake", "node.alpha.kubernetes.io/ttl": "0"},
                "labels": {
                    "kubernetes.io/hostname": name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                    "type": "kwok",
                    **labels,
                },
            },
            "status": {"capacity": resources, "allocatable": resources},
        }

    def _wait_for_nodes(self, timeout: float) -> None:
        expected = self.gpu_nodes.count + self.cpu_nodes
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self.kubectl("get", "nodes", "-o", "json", check=False)
            if out.returncode == 0:
                nodes = json.loads(out.stdout)["items"]
                ready = [
                    n
                    for n in nodes
                    if any(
                        c["type"] == "Ready" and c["status"] == "True"
                        for c in n.get("status", {}).get("conditions", [])
                    )
                ]
                if len(ready) >= expected:
                    return
            time.sleep(0.5)
        raise TimeoutError(f"fake nodes not Ready after {timeout}s; see {self.state_dir / 'logs' / 'kwok.log'}")

    def _wait_for_default_service_account(self, timeout: float) -> None:
        # Pods cannot be created in a namespace before the controller-manager made its `default` SA.
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.kubectl("get", "serviceaccount", "default", "-n", "default", check=False).returncode == 0:
                return
            time.sleep(0.3)
        raise TimeoutError("the controller-manager did not create the default ServiceAccount")


@dataclass(frozen=True)
class AuditedRequest:
    user: str
    verb: str
    # "pods", "finetunejobs/status", ...; the path for a non-resource request (/apis, /healthz ...)
    resource: str
    code: int
    received: float  # seconds since the epoch
    # How long the API server took to answer (received to response complete); NaN for a watch, logged when
    # its response starts.
    seconds: float


def audit_requests(log: Path) -> list[AuditedRequest]:
    """The requests in an audit log, one per request (a watch is logged when it starts and when it ends)."""
    seen: set[str] = set()
    requests = []
    with log.open() as lines:
        for line in lines:
            event = json.loads(line)
            if event["auditID"] in seen:
                continue
            seen.add(event["auditID"])
            ref = event.get("objectRef") or {}
            resource = ref.get("resource") or event.get("requestURI", "").split("?")[0]
            if ref.get("subresource"):
                resource += "/" + ref["subresource"]
            received = datetime.fromisoformat(event["requestReceivedTimestamp"]).timestamp()
            code = (event.get("responseStatus") or {}).get("code", 0)
            done = datetime.fromisoformat(event["stageTimestamp"]).timestamp()
            seconds = done - received if event["stage"] == "ResponseComplete" else math.nan
            requests.append(AuditedRequest(event["user"]["username"], event["verb"], resource, code, received, seconds))
    return requests


def running_cluster(state_dir: Path) -> LocalCluster | None:
    """The cluster recorded in state_dir if its API server answers, else None."""
    ports_file = state_dir / "ports.json"
    if not (ports_file.exists() and (state_dir / "pids.json").exists()):
        return None
    cluster = LocalCluster(state_dir=state_dir, ports=json.loads(ports_file.read_text()))
    if cluster.kubectl("get", "--raw", "/readyz", check=False).returncode != 0:
        return None
    return cluster
