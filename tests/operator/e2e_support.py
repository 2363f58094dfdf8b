"""Support for the operator's e2e tests: the operator as a real subprocess (so SIGKILL is real), the cluster
through the Python client, namespaces with the claims the jobs refer to, job specs for kwok, and polling."""

from __future__ import annotations

import itertools
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml
from kubernetes import client, config
from kubetune_dev.cluster import LocalCluster
from kubetune_operator.api import CRD_NAME, GROUP, PLURAL, VERSION
from kubetune_trainer import progress as trainer_progress

REPO = Path(__file__).resolve().parents[2]
CRD_FILE = REPO / "crds" / f"{CRD_NAME}.yaml"
T = TypeVar("T")

TIMEOUT = 60
# Short intervals for tests; the grace period is irrelevant for kwok pods (they go at once).
TEST_SETTINGS = {"progressPollIntervalSeconds": 5, "resyncSeconds": 30, "terminationGracePeriodSeconds": 30}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Operator:
    """`python -m kubetune_operator` against the local cluster, logging to a file."""

    def __init__(
        self,
        cluster: LocalCluster,
        workdir: Path,
        namespaces: list[str],
        name: str = "operator",
        settings: dict[str, Any] | None = None,
    ) -> None:
        self.cluster = cluster
        self.namespaces = namespaces
        self.log_path = workdir / f"{name}.log"
        self.settings_path = workdir / f"{name}-settings.yaml"
        self.health_port, self.metrics_port = free_port(), free_port()
        ports = {"healthPort": self.health_port, "metricsPort": self.metrics_port}
        self.settings_path.write_text(yaml.safe_dump({**TEST_SETTINGS, **ports, **(settings or {})}))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60, *, wait: bool = True) -> Operator:
        args = [sys.executable, "-m", "kubetune_operator", "--settings", str(self.settings_path)]
        for ns in self.namespaces:
            args += ["--namespace", ns]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                args, env={**self.cluster.env(), "PYTHONUNBUFFERED": "1"}, stdout=log, stderr=subprocess.STDOUT
            )
        if wait:
            wait_for(lambda: self.probe("/readyz") == 200, timeout, "operator ready", self.tail)
        return self

    def probe(self, path: str) -> int | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}{path}", timeout=2) as r:
                return int(r.status)
        except OSError:
            return None

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> dict[str, Any]:
        """SIGTERM, then the reconcile summary the operator logs on its way out."""
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        lines = [line for line in self.log_path.read_text().splitlines() if "reconcile summary" in line]
        return json.loads(lines[-1].split("reconcile summary ", 1)[1]) if lines else {}

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])


def wait_for(
    fn: Callable[[], T], timeout: float, what: str, context: Callable[[], str] | None = None, every: float = 0.25
) -> T:
    """Poll until fn() is truthy; fail with `what` (and `context()`) after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(every)
    pytest.fail(f"timed out after {timeout}s waiting for {what}; last: {last!r}\n{context() if context else ''}")


def wait_phase(api: Api, operator: Operator, ns: str, name: str, phase: str, timeout: float = TIMEOUT) -> dict:
    def reached() -> dict:
        status = api.status(ns, name)
        return status if status.get("phase") == phase else {}

    return wait_for(reached, timeout, f"{name} {phase}", operator.tail)


def condition(status: dict, type_: str) -> dict:
    return next(c for c in status["conditions"] if c["type"] == type_)


def wait_events(api: Api, ns: str, name: str, reasons: set[str]) -> None:
    """Events are posted in the background, a moment after the transition they announce."""
    posted = lambda: {e.reason for e in api.events(ns, name)}  # noqa: E731
    wait_for(lambda: reasons <= posted(), 10, f"events {sorted(reasons)} for {name}", lambda: str(posted()))


def attempt_pods(api: Api, ns: str, name: str, attempt: int) -> list[Any]:
    return api.pods(ns, f"kubetune.io/job={name},kubetune.io/attempt={attempt}")


def running_pods(api: Api, ns: str, name: str, attempt: int, count: int = 2) -> list[Any]:
    def all_running() -> list[Any]:
        pods = attempt_pods(api, ns, name, attempt)
        return pods if len(pods) == count and all(p.status.phase == "Running" for p in pods) else []

    pods = wait_for(all_running, TIMEOUT, f"{count} running pods of {name} attempt {attempt}")
    return sorted(pods, key=lambda p: int(p.metadata.labels["batch.kubernetes.io/job-completion-index"]))


class Api:
    """The cluster through the Python client, for fast polling from the tests."""

    def __init__(self, cluster: LocalCluster) -> None:
        self.cluster = cluster
        api_client = config.new_client_from_config(config_file=str(cluster.kubeconfig))
        self.core = client.CoreV1Api(api_client)
        self.batch = client.BatchV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)

    def apply(self, namespace: str, name: str, spec: dict[str, Any], annotations: dict[str, str] | None = None) -> None:
        body: dict[str, Any] = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "FineTuneJob",
            "metadata": {"name": name, "namespace": namespace, "annotations": annotations or {}},
            "spec": spec,
        }
        self.cluster.kubectl("apply", "--server-side", "-f", "-", input=json.dumps(body))

    def ftj(self, namespace: str, name: str) -> dict[str, Any]:
        obj: dict[str, Any] = self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        return obj

    def status(self, namespace: str, name: str) -> dict[str, Any]:
        return self.ftj(namespace, name).get("status") or {}

    def patch_spec(self, namespace: str, name: str, patch: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name, {"spec": patch})

    def annotate(self, namespace: str, name: str, annotations: dict[str, str]) -> None:
        body = {"metadata": {"annotations": annotations}}
        self.custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name, body)

    def delete_ftj(self, namespace: str, name: str) -> None:
        self.custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)

    def jobs(self, namespace: str, job: str) -> list[Any]:
        return list(self.batch.list_namespaced_job(namespace, label_selector=f"kubetune.io/job={job}").items)

    def pods(self, namespace: str, selector: str) -> list[Any]:
        return list(self.core.list_namespaced_pod(namespace, label_selector=selector).items)

    def events(self, namespace: str, name: str) -> list[Any]:
        selector = f"involvedObject.kind=FineTuneJob,involvedObject.name={name}"
        return list(self.core.list_namespaced_event(namespace, field_selector=selector).items)

    def end_pod(
        self,
        namespace: str,
        pod: str,
        exit_code: int,
        *,
        reason: str = "Error",
        message: str = "",
        disruption: str | None = None,
    ) -> None:
        """What a kubelet reports for a container that exited (kwok runs no containers)."""
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        terminated = {"exitCode": exit_code, "reason": reason, "startedAt": now, "finishedAt": now}
        if message:
            terminated["message"] = message
        status: dict[str, Any] = {
            "phase": "Succeeded" if exit_code == 0 else "Failed",
            "containerStatuses": [
                {
                    "name": "trainer",
                    "image": "trainer",
                    "imageID": "",
                    "ready": False,
                    "restartCount": 0,
                    "state": {"terminated": terminated},
                }
            ],
        }
        if disruption:
            status["conditions"] = [
                {"type": "DisruptionTarget", "status": "True", "reason": disruption, "lastTransitionTime": now}
            ]
        self.core.patch_namespaced_pod_status(pod, namespace, {"status": status})

    def set_pod_ip(self, namespace: str, pod: str, ip: str) -> None:
        """What a kubelet reports once the pod has its address."""
        patch = [
            {"op": "replace", "path": "/status/podIP", "value": ip},
            {"op": "replace", "path": "/status/podIPs", "value": [{"ip": ip}]},
        ]
        self.core.patch_namespaced_pod_status(pod, namespace, patch)  # a JSON patch: the IP list replaced


# Loopback addresses for fake trainers (Linux routes all of 127/8 to the loopback), apart from 127.0.0.x.
_TRAINER_HOSTS = (f"127.42.{i // 250}.{i % 250 + 1}" for i in itertools.count())


class FakeTrainer:
    """Rank 0 as the operator sees it, for kwok's pods (which run nothing): the trainer's own progress server
    (kubetune_trainer.progress, /progress and /metrics) on a loopback address of its own, driven by the test. The
    test reports that address as the rank-0 pod's IP (Api.set_pod_ip), as a kubelet reports its pod's address."""

    def __init__(self, port: int, world_size: int = 2) -> None:
        self.host = next(_TRAINER_HOSTS)
        self.progress = trainer_progress.Progress(world_size)
        self.progress.set_state("training")
        self._server = trainer_progress.serve(self.progress, self.host, port)

    def train(
        self,
        to_step: int,
        *,
        total: int,
        loss: float,
        eval_loss: float | None = None,
        eta_seconds: float = 600.0,
        checkpoint: str | None = None,
    ) -> None:
        """Steps up to `to_step`, a log (and evaluation) there, and a checkpoint at `checkpoint` if given."""
        p = self.progress
        p.set_plan(total)
        p.step_done(to_step, epoch=to_step / total, duration=0.5, tokens=4096)
        p.logged(
            loss=loss,
            learning_rate=2e-4,
            grad_norm=0.7,
            tokens_per_second=8192.0,
            mfu=0.35,
            eta_seconds=eta_seconds,
            gpu_memory_peak=2**30,
        )
        if eval_loss is not None:
            p.evaluated(to_step, eval_loss=eval_loss, perplexity=2.0)
        if checkpoint is not None:
            p.checkpointed(to_step, checkpoint, time.time(), duration=1.0)

    def set_up(self, stage: str, done: int | None = None, total: int | None = None, unit: str | None = None) -> None:
        """Rank 0 before its first step: state loading, how far its setup got (stamped now, as every report)."""
        self.progress.setup(stage, done, total, unit)

    def ignored(self, checkpoints: list[dict[str, str]]) -> None:
        """Checkpoints rank 0 found and left alone as another training's."""
        self.progress.ignored(checkpoints)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def make_namespace(cluster: LocalCluster, prefix: str) -> str:
    """A namespace with the claims the test jobs refer to (kwok binds them at once)."""
    name = f"{prefix}{uuid.uuid4().hex[:8]}"
    cluster.create_namespace_with_claims(name, ("ft-checkpoints", "datasets", "ft-models"))
    return name


def spec(**overrides: Any) -> dict[str, Any]:
    """A small job for kwok: two single-GPU workers that 'train' for a second and succeed. `overrides` are merged
    into the top-level groups."""
    base: dict[str, Any] = {
        "model": {"source": "hf://Qwen/Qwen2.5-0.5B-Instruct", "tokenSecretRef": {"name": "hf", "key": "token"}},
        "dataset": {"source": "pvc://datasets/support/v3.jsonl", "format": "messages"},
        "resources": {
            "numNodes": 2,
            "gpusPerNode": 1,
            "gpuProduct": "NVIDIA-H100-80GB-HBM3",
            "podAnnotations": {"kwok.kubetune.io/run-for": "1s"},
        },
        "checkpoint": {"claimName": "ft-checkpoints", "everySteps": 100},
        "runPolicy": {"backoffSeconds": 1, "maxBackoffSeconds": 2},
    }
    for key, value in overrides.items():
        if isinstance(value, dict):
            # A None drops the field: {"claimName": None, "volumeClaimTemplate": ...} swaps one for the other.
            merged = {**base.get(key, {}), **value}
            base[key] = {k: v for k, v in merged.items() if v is not None}
        else:
            base[key] = value
    return base


def hanging(**overrides: Any) -> dict[str, Any]:
    """Workers that run until something ends them."""
    resources = {**spec()["resources"], **overrides.pop("resources", {})}
    resources["podAnnotations"] = {"kwok.kubetune.io/outcome": "hang"}
    return spec(resources=resources, **overrides)
