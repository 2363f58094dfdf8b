"""Operator scale benchmark: N FineTuneJobs of W workers each on fake GPU nodes of a local control plane.

    python bench/operator_scale.py --jobs 200 500           # what `make bench-operator` runs

For each N: a fresh local cluster (kube-apiserver, controller-manager, scheduler, kwok) with enough fake
8-GPU nodes for every worker (one GPU each), the operator as a subprocess, N FineTuneJobs created at once
whose workers run until deleted. It reports, from the moment the first job is created:
- time until every job's Indexed Job exists, until every worker pod is Running, until every FineTuneJob
  says Running;
- per-job latency from creation to the operator's first status write (what a user waits to see anything);
- the operator's own reconcile durations (p50/p90/p99/max), its API requests per job (client-side count,
  watches excluded) over the whole run including an idle period, and its peak RSS.

The controller-manager and scheduler get higher client QPS than their defaults (20 and 50), as a real
cluster of this size would: otherwise the Job controller's pod creation, not the operator, is measured.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "hack"))

import yaml  # noqa: E402
from kubernetes import client, config, watch  # noqa: E402
from kubetune_dev.cluster import GpuNodePool, LocalCluster  # noqa: E402

GROUP, VERSION, PLURAL = "kubetune.io", "v1alpha1", "finetunejobs"
CRD_FILE = REPO / "crds" / "finetunejobs.kubetune.io.yaml"
NAMESPACE = "bench"
GPUS_PER_NODE = 8


class FastCluster(LocalCluster):
    """The local cluster with controller-manager and scheduler client limits fit for thousands of pods."""

    def _kcm_args(self, certs: dict[str, Path]) -> list[str]:
        return [*super()._kcm_args(certs), "--kube-api-qps=300", "--kube-api-burst=500", "--concurrent-job-syncs=50"]

    def _scheduler_args(self) -> list[str]:
        return [*super()._scheduler_args(), "--kube-api-qps=300", "--kube-api-burst=500"]


@dataclass
class Firsts:
    """When each object was first seen in some state (monotonic seconds)."""

    seen: dict[str, float] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def mark(self, name: str) -> None:
        with self.lock:
            self.seen.setdefault(name, time.monotonic())

    def count(self) -> int:
        with self.lock:
            return len(self.seen)


def finetunejob(name: str, workers: int) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "model": {"source": "hf://Qwen/Qwen2.5-0.5B-Instruct"},
            "dataset": {"source": "pvc://datasets/support/v3.jsonl"},
            "resources": {
                "numNodes": workers,
                "gpusPerNode": 1,
                "gpuProduct": "NVIDIA-H100-80GB-HBM3",
                "podAnnotations": {"kwok.kubetune.io/outcome": "hang"},
            },
            "checkpoint": {"claimName": "ft-checkpoints", "everySteps": 100},
        },
    }


def watch_forever(list_fn: Any, on_event: Any, stop: threading.Event, **kwargs: Any) -> None:
    while not stop.is_set():
        w = watch.Watch()
        try:
            for event in w.stream(list_fn, timeout_seconds=30, **kwargs):
                on_event(event["object"])
                if stop.is_set():
                    break
        except Exception as e:  # a dropped watch is restarted; the benchmark only counts first sightings
            if not stop.is_set():
                print(f"  (watch restarted: {type(e).__name__})", file=sys.stderr)
        finally:
            w.stop()


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    q = statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 else values * 99
    return {"p50": round(q[49], 3), "p90": round(q[89], 3), "p99": round(q[98], 3), "max": round(max(values), 3)}


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def prepare(cluster: LocalCluster) -> None:
    cluster.kubectl("apply", "--server-side", "-f", str(CRD_FILE))
    established = "jsonpath={.status.conditions[?(@.type=='Established')].status}=True"
    cluster.kubectl("wait", f"--for={established}", "crd/finetunejobs.kubetune.io", "--timeout=60s")
    cluster.kubectl("create", "namespace", NAMESPACE)
    for claim in ("ft-checkpoints", "datasets"):
        pvc = {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": claim, "namespace": NAMESPACE},
            "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "1Gi"}}},
        }
        cluster.kubectl("apply", "-f", "-", input=json.dumps(pvc))


def start_operator(cluster: LocalCluster, state: Path) -> subprocess.Popen[bytes]:
    settings = state / "operator-settings.yaml"
    settings.write_text(yaml.safe_dump({"healthPort": 0}))
    with open(state / "operator.log", "wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "kubetune_operator", "-n", NAMESPACE, "--settings", str(settings)],
            env={**cluster.env(), "PYTHONUNBUFFERED": "1"},
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def operator_summary(state: Path) -> dict[str, Any]:
    """The reconcile summary the operator logs when it stops."""
    lines = (state / "operator.log").read_text().splitlines()
    last = next(line for line in reversed(lines) if "reconcile summary" in line)
    summary: dict[str, Any] = json.loads(last.split("reconcile summary ", 1)[1])
    return summary


class Observer:
    """Watches FineTuneJobs, Jobs and pods and notes when each first reached the states the benchmark times."""

    def __init__(self, cluster: LocalCluster, stop: threading.Event) -> None:
        api_client = config.new_client_from_config(config_file=str(cluster.kubeconfig))
        self.custom = client.CustomObjectsApi(api_client)
        batch, core = client.BatchV1Api(api_client), client.CoreV1Api(api_client)
        self.created, self.first_status, self.ftj_running = Firsts(), Firsts(), Firsts()
        self.job_seen, self.pod_running = Firsts(), Firsts()
        ftjs = {"group": GROUP, "version": VERSION, "namespace": NAMESPACE, "plural": PLURAL}
        for fn, handler, kwargs in (
            (self.custom.list_namespaced_custom_object, self._on_ftj, ftjs),
            (batch.list_namespaced_job, lambda j: self.job_seen.mark(j.metadata.name), {"namespace": NAMESPACE}),
            (core.list_namespaced_pod, self._on_pod, {"namespace": NAMESPACE}),
        ):
            threading.Thread(target=watch_forever, args=(fn, handler, stop), kwargs=kwargs, daemon=True).start()

    def _on_ftj(self, obj: dict[str, Any]) -> None:
        status = obj.get("status") or {}
        if status.get("observedGeneration"):
            self.first_status.mark(obj["metadata"]["name"])
        if status.get("phase") == "Running":
            self.ftj_running.mark(obj["metadata"]["name"])

    def _on_pod(self, pod: Any) -> None:
        if pod.status.phase == "Running":
            self.pod_running.mark(pod.metadata.name)

    def create(self, name: str, workers: int) -> None:
        self.custom.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, finetunejob(name, workers))
        self.created.mark(name)

    def status_latencies(self) -> list[float]:
        return [self.first_status.seen[n] - t for n, t in self.created.seen.items() if n in self.first_status.seen]


def wait_all(what: Firsts, target: int, since: float, timeout: float, label: str) -> float:
    deadline = time.monotonic() + timeout
    while what.count() < target:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{label}: {what.count()} of {target} after {timeout}s")
        time.sleep(0.2)
    elapsed = max(what.seen.values()) - since
    print(f"  {label}: {elapsed:.1f}s", flush=True)
    return elapsed


def run_once(jobs: int, workers: int, idle: float, timeout: float) -> dict[str, Any]:
    nodes = math.ceil(jobs * workers / GPUS_PER_NODE)
    state = REPO / ".cache" / f"bench-operator-{jobs}"
    print(f"\n== {jobs} FineTuneJobs x {workers} workers on {nodes} fake GPU nodes ==", flush=True)
    cluster = FastCluster(state_dir=state, gpu_nodes=GpuNodePool(count=nodes), cpu_nodes=0).start(timeout=600)
    stop = threading.Event()
    operator: subprocess.Popen[bytes] | None = None
    try:
        prepare(cluster)
        operator = start_operator(cluster, state)
        observer = Observer(cluster, stop)
        time.sleep(3)  # the operator lists and starts watching before the burst

        t0 = time.monotonic()
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda i: observer.create(f"ft-{i:04d}", workers), range(jobs)))
        created = time.monotonic() - t0
        print(f"  created {jobs} FineTuneJobs in {created:.1f}s", flush=True)
        all_jobs = wait_all(observer.job_seen, jobs, t0, timeout, "all Jobs created")
        all_pods = wait_all(observer.pod_running, jobs * workers, t0, timeout, "all pods Running")
        all_ftjs = wait_all(observer.ftj_running, jobs, t0, timeout, "all FineTuneJobs Running")
        print(f"  idling {idle:.0f}s (steady-state reconciles)", flush=True)
        time.sleep(idle)
        rss = peak_rss_mib(operator.pid)
        operator.terminate()
        operator.wait(60)
        summary = operator_summary(state)
        return {
            "jobs": jobs,
            "workers_per_job": workers,
            "gpu_nodes": nodes,
            "create_seconds": round(created, 1),
            "all_jobs_created_seconds": round(all_jobs, 1),
            "all_pods_running_seconds": round(all_pods, 1),
            "all_finetunejobs_running_seconds": round(all_ftjs, 1),
            "create_to_first_status_seconds": percentiles(observer.status_latencies()),
            "reconcile_ms": {k: summary[f"{k}_ms"] for k in ("p50", "p90", "p99", "max")},
            "reconciles": summary["reconciles"],
            "reconcile_errors": summary["errors"],
            "stale_view_retries": summary["conflicts"],
            "api_requests": summary["api_requests"],
            "api_requests_per_job": round(summary["api_requests"] / jobs, 2),
            "api_requests_by_kind": summary["api_requests_by_kind"],
            "operator_peak_rss_mib": rss,
        }
    finally:
        stop.set()
        if operator and operator.poll() is None:
            operator.kill()
        cluster.stop()
        shutil.rmtree(state, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, nargs="+", default=[200, 500], help="FineTuneJob counts to run")
    parser.add_argument("--workers", type=int, default=4, help="worker pods per job (one GPU each)")
    parser.add_argument("--idle", type=float, default=45.0, help="seconds of steady state counted in the requests")
    parser.add_argument("--timeout", type=float, default=900.0, help="give up on a phase after this long")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    results = [run_once(n, args.workers, args.idle, args.timeout) for n in args.jobs]
    print("\n" + json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
