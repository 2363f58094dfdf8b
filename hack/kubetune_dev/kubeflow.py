"""Kubeflow Trainer v2 and the JobSet controller it runs on, on a LocalCluster: the baseline of the operator benchmark.

Both controllers are built from their Go modules (hack/toolchain.sh kubeflow) and run as local processes; their
CRDs, admission webhook configurations and the `torch-distributed` ClusterTrainingRuntime are read from the source
trees of the same module versions, as their kustomizations assemble them, with two local changes:
- the webhooks are served on 127.0.0.1 with a certificate from the cluster's CA (each controller's own certificate
  management needs a Service the API server could route to; a local control plane has no such routing), and the
  webhook configurations point at them by URL;
- each controller talks to the API server as its own user, so the audit log tells their requests apart.

Settings are the shipped ones except where the benchmark needs a change (no leader election, local ports) and the
client: Trainer's QPS and TrainJob concurrency are raised to JobSet's shipped QPS and kubetune's worker count, so
the baseline is not throttled by its defaults (see CONTROLLER_SETTINGS).
"""

from __future__ import annotations

import base64
import copy
import json
import os
import shutil
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kubetune_dev.cluster import LocalCluster, free_port
from kubetune_dev.toolchain import kubeflow_bin, module_source, version

TRAINER_MODULE = "github.com/kubeflow/trainer/v2"
JOBSET_MODULE = "sigs.k8s.io/jobset"
TRAINER_USER = "kubeflow-trainer"
JOBSET_USER = "jobset-controller"
USERS = (TRAINER_USER, JOBSET_USER)
RUNTIME = "torch-distributed"
# Changes to the shipped controller configurations that are not about running locally.
TRAINER_QPS, TRAINER_BURST = 500, 500  # shipped: 50 / 100; JobSet ships 500 / 500
TRAINJOB_CONCURRENCY = 32  # shipped: 5; kubetune reconciles 32 jobs at a time

Obj = dict[str, Any]


def _docs(path: Path) -> list[Obj]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _pointer_set(doc: Obj, pointer: str, value: Any) -> None:
    """JSON-patch add/replace at `pointer` (the forms kustomize patches of webhook configurations use)."""
    *parents, last = pointer.strip("/").split("/")
    node: Any = doc
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


def _patched(doc: Obj, patch_file: Path) -> Obj:
    doc = copy.deepcopy(doc)
    for op in yaml.safe_load(patch_file.read_text()):
        if op["op"] not in ("add", "replace"):
            raise ValueError(f"{patch_file}: unexpected patch operation {op['op']}")
        _pointer_set(doc, op["path"], op["value"])
    return doc


def _served_at(doc: Obj, name: str, base_url: str, ca_bundle: str) -> Obj:
    """The webhook configuration under `name`, calling `base_url` + each webhook's path."""
    doc = copy.deepcopy(doc)
    doc["metadata"] = {"name": name}
    for hook in doc["webhooks"]:
        path = hook["clientConfig"]["service"]["path"]
        hook["clientConfig"] = {"url": base_url + path, "caBundle": ca_bundle}
    return doc


@dataclass
class KubeflowTrainer:
    """Trainer + JobSet controllers on `cluster` (started with USERS among its audit users, if counted)."""

    cluster: LocalCluster
    state_dir: Path
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)

    @property
    def trainer_source(self) -> Path:
        return module_source(TRAINER_MODULE, version("KUBEFLOW_TRAINER"))

    @property
    def jobset_source(self) -> Path:
        return module_source(JOBSET_MODULE, version("JOBSET"))

    def install_crds(self) -> None:
        crds = [self.jobset_source / "config/components/crd/bases/jobset.x-k8s.io_jobsets.yaml"]
        crds += sorted((self.trainer_source / "manifests/base/crds").glob("trainer.kubeflow.org_*.yaml"))
        for crd in crds:
            self.cluster.kubectl("apply", "--server-side", "-f", str(crd))
            for doc in _docs(crd):
                self.cluster.wait_established(doc["metadata"]["name"])

    def start(self, timeout: float = 120.0) -> None:
        """Start JobSet, then Trainer (whose JobSets JobSet's webhooks admit); then their webhook configurations and
        the runtime (Trainer's webhook validates it)."""
        bin_dir = kubeflow_bin()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.ports = {
            name: free_port()
            for name in ("jobset-webhook", "jobset-health", "trainer-webhook", "trainer-health", "trainer-metrics")
        }
        try:
            self._start("jobset", [str(bin_dir / "jobset"), f"--config={self._jobset_config()}"], JOBSET_USER)
            self._wait_ready("jobset", self.ports["jobset-health"], timeout)
            trainer = [str(bin_dir / "trainer-controller-manager"), f"--config={self._trainer_config()}"]
            self._start("trainer", trainer, TRAINER_USER)
            self._wait_ready("trainer", self.ports["trainer-health"], timeout)
            webhooks = {"apiVersion": "v1", "kind": "List", "items": self._webhook_configurations()}
            self.cluster.kubectl("apply", "-f", "-", input=json.dumps(webhooks))
            runtime = self.trainer_source / "manifests/base/runtimes/torch_distributed.yaml"
            self.cluster.kubectl("apply", "--server-side", "-f", str(runtime))
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for name in ("trainer", "jobset"):
            proc = self.processes.pop(name, None)
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        names = [d["metadata"]["name"] for d in self._webhook_configurations(ca_bundle="")]
        for kind in ("mutatingwebhookconfiguration", "validatingwebhookconfiguration"):
            self.cluster.kubectl("delete", kind, *names, "--ignore-not-found", check=False)

    def pid(self, name: str) -> int:
        return self.processes[name].pid

    def metrics(self) -> str:
        """Trainer's controller-runtime metrics (Prometheus text)."""
        url = f"http://127.0.0.1:{self.ports['trainer-metrics']}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            return str(response.read().decode())

    def train_job(
        self, name: str, namespace: str, num_nodes: int, pod_annotations: dict[str, str], gpu_product: str
    ) -> Obj:
        """A TrainJob of the shipped torch-distributed runtime: `num_nodes` pods with one GPU each, on nodes of
        `gpu_product`, with the pod annotations through a runtime patch."""
        pod = {
            "metadata": {"annotations": pod_annotations},
            "spec": {"nodeSelector": {"nvidia.com/gpu.product": gpu_product}},
        }
        return {
            "apiVersion": "trainer.kubeflow.org/v1alpha1",
            "kind": "TrainJob",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {
                "runtimeRef": {"name": RUNTIME},
                "trainer": {"numNodes": num_nodes, "resourcesPerNode": {"limits": {"nvidia.com/gpu": "1"}}},
                "runtimePatches": [
                    {
                        "manager": "kubetune.io/benchmark",
                        "trainingRuntimeSpec": {
                            "template": {
                                "spec": {"replicatedJobs": [{"name": "node", "template": {"spec": {"template": pod}}}]}
                            }
                        },
                    }
                ],
            },
        }

    # ------------------------------------------------------------------------------------------

    def _start(self, name: str, cmd: list[str], user: str) -> None:
        # Both serve their webhooks from <temp dir>/k8s-webhook-server/serving-certs (controller-runtime's default).
        tmp = self.state_dir / f"{name}-tmp"
        certs = tmp / "k8s-webhook-server" / "serving-certs"
        certs.mkdir(parents=True, exist_ok=True)
        pair = self.cluster.serving_cert(f"{name}-webhook")
        shutil.copy(pair.cert, certs / "tls.crt")
        shutil.copy(pair.key, certs / "tls.key")
        env = {**os.environ, "KUBECONFIG": str(self.cluster.user_kubeconfig(user)), "TMPDIR": str(tmp)}
        with open(self.state_dir / f"{name}.log", "wb") as log:
            self.processes[name] = subprocess.Popen(
                cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )

    def _wait_ready(self, name: str, port: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.processes[name].poll() is not None:
                tail = (self.state_dir / f"{name}.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{name} exited ({self.processes[name].returncode}); log tail:\n{tail}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"{name} not ready after {timeout}s; see {self.state_dir / (name + '.log')}")

    def _jobset_config(self) -> Path:
        shipped = _docs(self.jobset_source / "config/components/manager/controller_manager_config.yaml")[0]
        config = {
            **shipped,
            "leaderElection": {"leaderElect": False},
            "internalCertManagement": {"enable": False},
            "webhook": {"port": self.ports["jobset-webhook"], "host": "127.0.0.1"},
            # Its metrics are served only with authentication; not read here.
            "metrics": {"bindAddress": "0"},
            "health": {"healthProbeBindAddress": f"127.0.0.1:{self.ports['jobset-health']}"},
        }
        path = self.state_dir / "jobset-config.yaml"
        path.write_text(yaml.safe_dump(config))
        return path

    def _trainer_config(self) -> Path:
        shipped = _docs(self.trainer_source / "manifests/base/manager/controller_manager_config.yaml")[0]
        concurrency = dict(shipped["controller"]["groupKindConcurrency"])
        concurrency["TrainJob.trainer.kubeflow.org"] = TRAINJOB_CONCURRENCY
        config = {
            **shipped,
            "health": {**shipped["health"], "healthProbeBindAddress": f"127.0.0.1:{self.ports['trainer-health']}"},
            "metrics": {"bindAddress": f"127.0.0.1:{self.ports['trainer-metrics']}", "secureServing": False},
            "webhook": {"port": self.ports["trainer-webhook"], "host": "127.0.0.1"},
            "leaderElection": {"leaderElect": False},
            "controller": {"groupKindConcurrency": concurrency},
            "certManagement": {"enable": False},
            "clientConnection": {"qps": TRAINER_QPS, "burst": TRAINER_BURST},
        }
        path = self.state_dir / "trainer-config.yaml"
        path.write_text(yaml.safe_dump(config))
        return path

    def _webhook_configurations(self, ca_bundle: str | None = None) -> list[Obj]:
        """Both controllers' webhook configurations, as their kustomizations patch them, served locally."""
        if ca_bundle is None:
            ca_bundle = base64.b64encode(self.cluster.ca_cert.read_bytes()).decode()
        trainer_dir = self.trainer_source / "manifests/base/webhook"
        jobset_dir = self.jobset_source / "config/components/webhook"
        trainer_url = f"https://127.0.0.1:{self.ports.get('trainer-webhook', 0)}"
        jobset_url = f"https://127.0.0.1:{self.ports.get('jobset-webhook', 0)}"
        out = []
        for doc in _docs(trainer_dir / "manifests.yaml"):
            mutating = doc["kind"] == "MutatingWebhookConfiguration"
            doc = _patched(doc, trainer_dir / ("patch_mutating.yaml" if mutating else "patch_validating.yaml"))
            out.append(_served_at(doc, doc["metadata"]["name"], trainer_url, ca_bundle))
        for doc in _docs(jobset_dir / "manifests.yaml"):
            mutating = doc["kind"] == "MutatingWebhookConfiguration"
            doc = _patched(
                doc, jobset_dir / "patches" / ("mutating-patch.yaml" if mutating else "validating-patch.yaml")
            )
            out.append(_served_at(doc, "jobset-" + doc["metadata"]["name"], jobset_url, ca_bundle))
        return out
