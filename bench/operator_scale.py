"""Operator scale benchmark: N FineTuneJobs of W workers each on fake GPU nodes of a local control plane.

    python bench/operator_scale.py --jobs 200 500           # what `make bench-operator` runs

For each N: a fresh local cluster (kube-apiserver, controller-manager, scheduler, kwok) with enough fake
8-GPU nodes for every worker (one GPU each), the operator as a subprocess, N FineTuneJobs created at once
whose workers run until deleted. Times come from the objects themselves (creation timestamps, the run's
startTime the operator writes, pod start times, condition transition times; one-second resolution), so a
busy benchmark process does not distort them. It reports, from the moment the first job was created:
- when the last Indexed Job was created, the last worker pod was Running, the last FineTuneJob said Running;
- per job, creation to the operator's first status write (the run's startTime), as percentiles;
- the operator's own reconcile durations (p50/p90/p99/max, API calls included), its API requests per job
  (client-side count; kopf's list/watch streams excluded) over the whole run plus an idle period, its peak RSS.

The controller-manager and scheduler get higher client QPS than their defaults (20 and 50), as a cluster of
this size would: otherwise the Job controller's pod creation, not the operator, is what gets measured.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "hack"))

import yaml  # noqa: E402
from kubernetes import client, config  # noqa: E402
from kubetune_dev.cluster import GpuNodePool, LocalCluster  # noqa: E402

GROUP, VERSION, PLURAL = "kubetune.io", "v1alpha1", "finetunejobs"
CRD_FILE = REPO / "crds" / "finetunejobs.kubetune.io.yaml"
NAMESPACE = "bench"
GPUS_PER_NODE = 8

Obj = dict[str, Any]


class FastCluster(LocalCluster):
    """The local cluster with controller-manager and scheduler client limits fit for thousands of pods."""

    def _kcm_args(self, certs: dict[str, Path]) -> list[str]:
        return [*super()._kcm_args(certs), "--kube-api-qps=300", "--kube-api-burst=500", "--concurrent-job-syncs=50"]

    def _scheduler_args(self) -> list[str]:
        return [*super()._scheduler_args(), "--kube-api-qps=300", "--kube-api-burst=500"]


def finetunejob(name: str, workers: int) -> Obj:
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


def ts(value: str) -> float:
    return datetime.fromisoformat(value).timestamp()


def percentiles(values: list[float]) -> dict[str, float]:
    if len(values) < 2:
        return {"max": round(max(values), 1)} if values else {}
    q = statistics.quantiles(values, n=100, method="inclusive")
    return {"p50": round(q[49], 1), "p90": round(q[89], 1), "p99": round(q[98], 1), "max": round(max(values), 1)}


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


class Cluster:
    """What the benchmark reads, as raw JSON (no client models: thousands of pods are listed repeatedly)."""

    def __init__(self, local: LocalCluster) -> None:
        api_client = config.new_client_from_config(config_file=str(local.kubeconfig))
        self.custom = client.CustomObjectsApi(api_client)
        self.batch = client.BatchV1Api(api_client)
        self.core = client.CoreV1Api(api_client)

    def create(self, name: str, workers: int) -> None:
        self.custom.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, finetunejob(name, workers))

    def finetunejobs(self) -> list[Obj]:
        raw = self.custom.list_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, _preload_content=False)
        return list(json.loads(raw.data)["items"])

    def jobs(self) -> list[Obj]:
        return list(json.loads(self.batch.list_namespaced_job(NAMESPACE, _preload_content=False).data)["items"])

    def pods(self) -> list[Obj]:
        return list(json.loads(self.core.list_namespaced_pod(NAMESPACE, _preload_content=False).data)["items"])


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
    settings.write_text(yaml.safe_dump({"healthPort": 0, "metricsPort": 0}))
    with open(state / "operator.log", "wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "kubetune_operator", "-n", NAMESPACE, "--settings", str(settings)],
            env={**cluster.env(), "PYTHONUNBUFFERED": "1"},
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def operator_summary(state: Path) -> Obj:
    """The reconcile summary the operator logs when it stops."""
    lines = (state / "operator.log").read_text().splitlines()
    last = next(line for line in reversed(lines) if "reconcile summary" in line)
    summary: Obj = json.loads(last.split("reconcile summary ", 1)[1])
    return summary


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} after {timeout}s")
        time.sleep(2)


def is_running(ftj: Obj) -> bool:
    return bool((ftj.get("status") or {}).get("phase") == "Running")


def running_since(ftj: Obj) -> float:
    conditions = ftj["status"]["conditions"]
    return ts(next(c["lastTransitionTime"] for c in conditions if c["type"] == "Running"))


def run_once(jobs: int, workers: int, idle: float, timeout: float) -> Obj:
    nodes = math.ceil(jobs * workers / GPUS_PER_NODE)
    state = REPO / ".cache" / f"bench-operator-{jobs}"
    print(f"\n== {jobs} FineTuneJobs x {workers} workers on {nodes} fake GPU nodes ==", flush=True)
    local = FastCluster(state_dir=state, gpu_nodes=GpuNodePool(count=nodes), cpu_nodes=0).start(timeout=600)
    operator: subprocess.Popen[bytes] | None = None
    try:
        prepare(local)
        operator = start_operator(local, state)
        cluster = Cluster(local)
        time.sleep(3)  # the operator lists and starts watching before the burst

        # Server timestamps have one-second resolution: count from the start of the creating second.
        t0 = math.floor(time.time())
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda i: cluster.create(f"ft-{i:04d}", workers), range(jobs)))
        print(f"  created {jobs} FineTuneJobs in {time.time() - t0:.1f}s", flush=True)

        wait_until(lambda: sum(map(is_running, cluster.finetunejobs())) == jobs, timeout, "FineTuneJobs not Running")
        print(f"  all Running; idling {idle:.0f}s (steady-state reconciles)", flush=True)
        time.sleep(idle)
        rss = peak_rss_mib(operator.pid)
        operator.terminate()
        operator.wait(60)
        summary = operator_summary(state)

        ftjs, pods = cluster.finetunejobs(), cluster.pods()
        first_status = [ts(f["status"]["startTime"]) - ts(f["metadata"]["creationTimestamp"]) for f in ftjs]
        result: Obj = {
            "jobs": jobs,
            "workers_per_job": workers,
            "gpu_nodes": nodes,
            "all_jobs_created_s": max(ts(j["metadata"]["creationTimestamp"]) for j in cluster.jobs()) - t0,
            "all_pods_running_s": max(ts(p["status"]["startTime"]) for p in pods) - t0,
            "all_finetunejobs_running_s": max(map(running_since, ftjs)) - t0,
            "pods_running": sum(1 for p in pods if p["status"].get("phase") == "Running"),
            "create_to_first_status_s": percentiles(first_status),
            "reconcile_ms": {k: summary[f"{k}_ms"] for k in ("p50", "p90", "p99", "max")},
            "reconciles": summary["reconciles"],
            "reconcile_errors": summary["errors"],
            "stale_view_retries": summary["conflicts"],
            "api_requests": summary["api_requests"],
            "api_requests_per_job": round(summary["api_requests"] / jobs, 2),
            "api_requests_by_kind": summary["api_requests_by_kind"],
            "operator_peak_rss_mib": rss,
        }
        for key in ("all_jobs_created_s", "all_pods_running_s", "all_finetunejobs_running_s"):
            print(f"  {key}: {result[key]:.0f}", flush=True)
        return result
    finally:
        if operator and operator.poll() is None:
            operator.kill()
        local.stop()
        shutil.rmtree(state, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, nargs="+", default=[200, 500], help="FineTuneJob counts to run")
    parser.add_argument("--workers", type=int, default=4, help="worker pods per job (one GPU each)")
    parser.add_argument("--idle", type=float, default=45.0, help="seconds of steady state counted in the requests")
    parser.add_argument("--timeout", type=float, default=900.0, help="give up after this long")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    results = [run_once(n, args.workers, args.idle, args.timeout) for n in args.jobs]
    print("\n" + json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
