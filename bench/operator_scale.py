"""Operator scale benchmark: kubetune and Kubeflow Trainer side by side, N jobs of W workers on fake GPU nodes.

    python bench/operator_scale.py --jobs 200 500           # what `make bench-operator` runs

For each N, one local control plane (kube-apiserver, controller-manager, scheduler, kwok) with enough fake 8-GPU
nodes for every worker (one GPU each), and on it, back to back, one phase per tool (the order alternates with N):
- kubetune: the operator as a subprocess, N FineTuneJobs created at once;
- Kubeflow Trainer v2.3.0 + JobSet v0.12.0 (built from their Go modules, hack/kubetune_dev/kubeflow.py), N
  TrainJobs of the shipped torch-distributed runtime created at once;
whose workers run until deleted. A phase starts the tool's controllers, creates the jobs, waits until every worker
pod is Running (and, for kubetune, every FineTuneJob says so), keeps watching for --idle seconds of steady state,
then stops the controllers and deletes the namespace before the next phase.

Per phase, counted from the first second of the burst of creations (server timestamps, one-second resolution, so a
busy benchmark process does not distort them):
- when the last Job was created and the last worker pod was Running, and when the median worker pod was created,
  scheduled and Running (a backlog before the scheduler shows as the gap between the first two);
- API requests per job by verb and resource, from the API server's audit log: every request of the controllers'
  own users (each controller has its own client certificate) received during the phase, watches included;
- reconcile latency: kubetune's own (every reconcile, API calls included); Trainer's TrainJob reconciles from its
  controller-runtime histogram (bucket-interpolated);
- how long the API server took to answer the controllers' writes (audit log: received to response complete);
- the controllers' peak RSS (VmHWM) and CPU time; the machine's load average.

The controller-manager and scheduler get higher client QPS than their defaults (20 and 50), as a cluster of this
size would: otherwise the Job controller's pod creation, not the operators, is what gets measured.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "hack"))

import yaml  # noqa: E402
from kubernetes import config  # noqa: E402
from kubetune_dev.cluster import GpuNodePool, LocalCluster, audit_requests, free_port  # noqa: E402
from kubetune_dev.kubeflow import USERS as KUBEFLOW_USERS  # noqa: E402
from kubetune_dev.kubeflow import KubeflowTrainer  # noqa: E402

CRD_FILE = REPO / "crds" / "finetunejobs.kubetune.io.yaml"
OPERATOR_USER = "kubetune-operator"
GPUS_PER_NODE = 8
GPU_PRODUCT = "NVIDIA-H100-80GB-HBM3"
HANG = {"kwok.kubetune.io/outcome": "hang"}  # kwok keeps these pods Running until they are deleted
# The Done line of the benchmark: what kubetune must show at every N.
MAX_P99_MS, MAX_RSS_MIB = 250.0, 150.0

Obj = dict[str, Any]


class BenchCluster(LocalCluster):
    """The local cluster with controller-manager and scheduler client limits fit for thousands of pods."""

    def _kcm_args(self, certs: dict[str, Path]) -> list[str]:
        # One kwok process heartbeats every fake node; on a loaded 2-core machine a beat can come later than the
        # default 50 s grace, and the node lifecycle controller then marks that node's pods not Ready for good
        # (kwok does not replay the Ready stage): a FineTuneJob waiting for its rank 0 would never be Running.
        return [
            *super()._kcm_args(certs),
            "--kube-api-qps=300",
            "--kube-api-burst=500",
            "--concurrent-job-syncs=50",
            "--node-monitor-grace-period=10m",
        ]

    def _scheduler_args(self) -> list[str]:
        return [*super()._scheduler_args(), "--kube-api-qps=300", "--kube-api-burst=500"]


# ----------------------------------------------------------------------------------------------
# figures
# ----------------------------------------------------------------------------------------------


def ts(value: str) -> float:
    return datetime.fromisoformat(value).timestamp()


def became_true(objects: list[Obj], condition: str, t0: float) -> list[float]:
    """Seconds after t0 at which each object's `condition` last became True (objects without it left out)."""
    return [
        ts(c["lastTransitionTime"]) - t0
        for o in objects
        for c in (o.get("status") or {}).get("conditions") or []
        if c["type"] == condition and c["status"] == "True"
    ]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else math.nan


def histogram_quantile(text: str, metric: str, labels: str, q: float) -> float:
    """Prometheus' histogram_quantile over the `metric`_bucket series whose labels contain `labels`."""
    buckets: list[tuple[float, float]] = []
    for line in text.splitlines():
        if line.startswith(f"{metric}_bucket{{") and labels in line:
            le = line.split('le="', 1)[1].split('"', 1)[0]
            buckets.append((math.inf if le == "+Inf" else float(le), float(line.rsplit(" ", 1)[1])))
    buckets.sort()
    if not buckets or buckets[-1][1] == 0:
        return math.nan
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / max(count - lower_count, 1e-9)
        lower_bound, lower_count = bound, count
    return math.nan


def process_figures(pid: int) -> tuple[float, float]:
    """(peak RSS in MiB, CPU seconds) of a running process."""
    status = Path(f"/proc/{pid}/status").read_text()
    hwm = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return hwm / 1024, cpu


@dataclass
class Load:
    """The machine's 1-minute load average, sampled while a phase runs."""

    samples: list[float] = field(default_factory=list)

    def sample(self) -> None:
        self.samples.append(os.getloadavg()[0])

    def summary(self) -> Obj:
        return {"mean": round(statistics.fmean(self.samples), 2), "max": round(max(self.samples), 2)}


# ----------------------------------------------------------------------------------------------
# the cluster, as the benchmark reads it (raw JSON: thousands of pods)
# ----------------------------------------------------------------------------------------------


class Api:
    def __init__(self, local: LocalCluster) -> None:
        self.client = config.new_client_from_config(config_file=str(local.kubeconfig))

    def call(self, method: str, path: str, body: Obj | None = None, query: list[tuple[str, str]] | None = None) -> Obj:
        method, url, headers, data, _ = self.client.param_serialize(
            method,
            path,
            query_params=query or [],
            header_params={"Content-Type": "application/json", "Accept": "application/json"},
            body=body,
            auth_settings=["BearerToken"],
        )
        response = self.client.call_api(method, url, header_params=headers, body=data, _request_timeout=60)
        raw = response.read()
        if not 200 <= response.status < 300:
            raise RuntimeError(f"{method} {path}: {response.status} {raw[:300]!r}")
        return dict(json.loads(raw))

    def items(self, path: str) -> list[Obj]:
        return list(self.call("GET", path)["items"])

    def all_running(self, path: str, expected: int) -> bool:
        """Whether exactly `expected` pods are at `path`, all Running, without reading them all (a field selector
        leaves out remainingItemCount, so the total is counted without one)."""
        total = self.call("GET", path, query=[("limit", "1")])
        count = len(total["items"]) + int(total["metadata"].get("remainingItemCount") or 0)
        waiting = self.call("GET", path, query=[("fieldSelector", "status.phase!=Running"), ("limit", "1")])
        return count == expected and not waiting["items"]


def wait_ready(url: str, process: subprocess.Popen[bytes], log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the operator exited; see {log}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"the operator was not ready after {timeout}s; see {log}")


def wait_until(check: Callable[[], bool], timeout: float, what: str, load: Load, missed: list[str]) -> None:
    """Until check() holds; after `timeout` seconds, note `what` in `missed` and go on (the phase's figures then
    show how far it got)."""
    deadline = time.monotonic() + timeout
    while not check():
        load.sample()
        if time.monotonic() > deadline:
            missed.append(f"{what} after {timeout:.0f}s")
            print(f"  gave up waiting: {missed[-1]}", flush=True)
            return
        time.sleep(2)


def create_namespace(local: LocalCluster, namespace: str, claims: tuple[str, ...] = ()) -> None:
    local.create_namespace_with_claims(namespace, claims)
    deadline = time.monotonic() + 60
    while local.kubectl("get", "serviceaccount", "default", "-n", namespace, check=False).returncode != 0:
        if time.monotonic() > deadline:
            raise TimeoutError(f"no default ServiceAccount in {namespace}")
        time.sleep(0.3)


def delete_namespace(local: LocalCluster, api: Api, namespace: str, timeout: float) -> None:
    local.kubectl("delete", "namespace", namespace, "--wait=false")
    deadline = time.monotonic() + timeout
    while local.kubectl("get", "namespace", namespace, check=False).returncode == 0:
        if time.monotonic() > deadline:
            raise TimeoutError(f"namespace {namespace} not gone after {timeout}s")
        time.sleep(2)


def burst(create: Callable[[int], None], jobs: int) -> float:
    """Create the jobs from 16 threads; returns the start of the second the first was sent in."""
    t0 = math.floor(time.time())
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(create, range(jobs)))
    print(f"  created {jobs} jobs in {time.time() - t0:.1f}s", flush=True)
    return t0


def workload_figures(api: Api, namespace: str, t0: float) -> Obj:
    jobs = api.items(f"/apis/batch/v1/namespaces/{namespace}/jobs")
    pods = api.items(f"/api/v1/namespaces/{namespace}/pods")
    started = [ts(p["status"]["startTime"]) - t0 for p in pods if p["status"].get("startTime")]
    return {
        "all_jobs_created_s": max((ts(j["metadata"]["creationTimestamp"]) for j in jobs), default=math.nan) - t0,
        "pods_created_p50_s": percentile([ts(p["metadata"]["creationTimestamp"]) - t0 for p in pods], 0.5),
        "pods_scheduled_p50_s": percentile(became_true(pods, "PodScheduled", t0), 0.5),
        "pods_running_p50_s": percentile(started, 0.5),
        "all_pods_running_s": max(started, default=math.nan),
        "pods_running": sum(1 for p in pods if p["status"].get("phase") == "Running"),
    }


def request_figures(local: LocalCluster, users: tuple[str, ...], start: float, end: float, jobs: int) -> Obj:
    requests = [r for r in audit_requests(local.audit_log) if r.user in users and start <= r.received < end]
    by_kind = Counter(f"{r.verb} {r.resource}" for r in requests)
    # How long the API server took to answer the controllers' writes: what a reconcile that writes waits for at
    # least, and what a burst of the controllers' own requests (or of the pods they cause) drives up.
    writes = [r.seconds * 1000 for r in requests if r.verb in ("create", "update", "patch", "delete")]
    return {
        "api_write_p50_ms": round(percentile(writes, 0.50), 1),
        "api_write_p90_ms": round(percentile(writes, 0.90), 1),
        "api_requests": len(requests),
        "api_requests_per_job": round(len(requests) / jobs, 2),
        "api_requests_by_user": dict(Counter(r.user for r in requests)),
        "api_requests_by_kind": dict(by_kind.most_common()),
        "api_errors": dict(Counter(f"{r.code} {r.verb} {r.resource}" for r in requests if r.code >= 400)),
    }


# ----------------------------------------------------------------------------------------------
# the phases
# ----------------------------------------------------------------------------------------------


def finetunejob(name: str, namespace: str, workers: int) -> Obj:
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "model": {"source": "hf://Qwen/Qwen2.5-0.5B-Instruct"},
            "dataset": {"source": "pvc://datasets/support/v3.jsonl"},
            "resources": {"numNodes": workers, "gpusPerNode": 1, "gpuProduct": GPU_PRODUCT, "podAnnotations": HANG},
            "checkpoint": {"claimName": "ft-checkpoints", "everySteps": 100},
        },
    }


def operator_summary(log: Path) -> Obj:
    """The reconcile summary the operator logs when it stops."""
    last = next(line for line in reversed(log.read_text().splitlines()) if "reconcile summary" in line)
    summary: Obj = json.loads(last.split("reconcile summary ", 1)[1])
    return summary


def run_kubetune(local: LocalCluster, api: Api, jobs: int, workers: int, args: argparse.Namespace) -> Obj:
    namespace = "bench-kubetune"
    local.kubectl("apply", "--server-side", "-f", str(CRD_FILE))
    local.wait_established("finetunejobs.kubetune.io")
    create_namespace(local, namespace, ("ft-checkpoints", "datasets"))
    settings = local.state_dir / "operator-settings.yaml"
    health = free_port()
    settings.write_text(yaml.safe_dump({"healthPort": health, "metricsPort": 0}))
    log = local.state_dir / "operator.log"
    env = {**os.environ, "KUBECONFIG": str(local.user_kubeconfig(OPERATOR_USER)), "PYTHONUNBUFFERED": "1"}
    profiled = ["-m", "cProfile", "-o", str(args.profile)] if args.profile else []
    with open(log, "wb") as out:
        operator = subprocess.Popen(
            [sys.executable, *profiled, "-m", "kubetune_operator", "-n", namespace, "--settings", str(settings)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    load = Load()
    try:
        wait_ready(f"http://127.0.0.1:{health}/readyz", operator, log)
        time.sleep(3)  # the operator lists and starts watching before the burst
        path = f"/apis/kubetune.io/v1alpha1/namespaces/{namespace}/finetunejobs"
        t0 = burst(lambda i: api.call("POST", path, finetunejob(f"ft-{i:04d}", namespace, workers)), jobs)
        pods = f"/api/v1/namespaces/{namespace}/pods"
        missed: list[str] = []
        wait_until(lambda: api.all_running(pods, jobs * workers), args.timeout, "pods not Running", load, missed)

        def all_running() -> bool:
            return all((f.get("status") or {}).get("phase") == "Running" for f in api.items(path))

        wait_until(all_running, args.timeout, "FineTuneJobs not Running", load, missed)
        print(f"  all Running; {args.idle:.0f}s of steady state", flush=True)
        idle(args.idle, load)
        end = time.time()
        rss, cpu = process_figures(operator.pid)
        operator.terminate()
        operator.wait(60)
        summary = operator_summary(log)
        running_since = became_true(api.items(path), "Running", t0)
        return {
            "tool": "kubetune",
            "missed": missed,
            **workload_figures(api, namespace, t0),
            "all_finetunejobs_running_s": max(running_since, default=math.nan),
            "finetunejobs_running": len(running_since),
            **request_figures(local, (OPERATOR_USER,), t0, end, jobs),
            "reconcile_p50_ms": summary["p50_ms"],
            "reconcile_p99_ms": summary["p99_ms"],
            "reconcile_max_ms": summary["max_ms"],
            "reconciles": summary["reconciles"],
            "reconcile_errors": summary["errors"],
            "peak_rss_mib": round(rss, 1),
            "cpu_s": round(cpu, 1),
            "load_1m": load.summary(),
        }
    finally:
        if operator.poll() is None:
            operator.kill()
        delete_namespace(local, api, namespace, args.timeout)


def run_kubeflow(local: LocalCluster, api: Api, jobs: int, workers: int, args: argparse.Namespace) -> Obj:
    namespace = "bench-kubeflow"
    kubeflow = KubeflowTrainer(local, local.state_dir / "kubeflow")
    kubeflow.install_crds()
    create_namespace(local, namespace)
    kubeflow.start()
    load = Load()
    try:
        time.sleep(3)
        path = f"/apis/trainer.kubeflow.org/v1alpha1/namespaces/{namespace}/trainjobs"
        t0 = burst(
            lambda i: api.call("POST", path, kubeflow.train_job(f"tj-{i:04d}", namespace, workers, HANG, GPU_PRODUCT)),
            jobs,
        )
        pods = f"/api/v1/namespaces/{namespace}/pods"
        missed: list[str] = []
        wait_until(lambda: api.all_running(pods, jobs * workers), args.timeout, "pods not Running", load, missed)
        print(f"  all Running; {args.idle:.0f}s of steady state", flush=True)
        idle(args.idle, load)
        end = time.time()
        metrics = kubeflow.metrics()
        figures = {name: process_figures(kubeflow.pid(name)) for name in ("trainer", "jobset")}
        reconcile = "controller_runtime_reconcile_time_seconds"
        trainjobs = 'controller="trainjob_controller"'
        return {
            "tool": "kubeflow",
            "missed": missed,
            **workload_figures(api, namespace, t0),
            **request_figures(local, KUBEFLOW_USERS, t0, end, jobs),
            "reconcile_p50_ms": round(histogram_quantile(metrics, reconcile, trainjobs, 0.5) * 1000, 2),
            "reconcile_p99_ms": round(histogram_quantile(metrics, reconcile, trainjobs, 0.99) * 1000, 2),
            "peak_rss_mib": round(sum(rss for rss, _ in figures.values()), 1),
            "peak_rss_mib_by_process": {name: round(rss, 1) for name, (rss, _) in figures.items()},
            "cpu_s": round(sum(cpu for _, cpu in figures.values()), 1),
            "load_1m": load.summary(),
        }
    finally:
        kubeflow.stop()
        delete_namespace(local, api, namespace, args.timeout)


def idle(seconds: float, load: Load) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        load.sample()
        time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))


PHASES = {"kubetune": run_kubetune, "kubeflow": run_kubeflow}


def run_size(index: int, jobs: int, args: argparse.Namespace) -> list[Obj]:
    nodes = math.ceil(jobs * args.workers / GPUS_PER_NODE)
    order = args.tools if index % 2 == 0 else list(reversed(args.tools))
    state = REPO / ".cache" / f"bench-operator-{jobs}"
    print(f"\n== N={jobs} jobs x {args.workers} workers on {nodes} fake GPU nodes; order: {', '.join(order)} ==")
    local = BenchCluster(
        state_dir=state,
        gpu_nodes=GpuNodePool(count=nodes, gpu_product=GPU_PRODUCT),
        cpu_nodes=0,
        audit_users=(OPERATOR_USER, *KUBEFLOW_USERS),
    ).start(timeout=600)
    results = []
    try:
        api = Api(local)
        for tool in order:
            print(f"-- {tool} (load average {os.getloadavg()[0]:.2f})", flush=True)
            result = PHASES[tool](local, api, jobs, args.workers, args)
            results.append({"jobs": jobs, "workers_per_job": args.workers, "gpu_nodes": nodes, **result})
            if args.json:
                args.json.write_text(json.dumps([*args.done, *results], indent=2))
            running, per_job = result["all_pods_running_s"], result["api_requests_per_job"]
            print(f"  all pods Running after {running:.0f}s; {per_job} API requests per job", flush=True)
    finally:
        local.stop()
        if not args.keep:
            shutil.rmtree(state, ignore_errors=True)
    return results


# ----------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------


def report(results: list[Obj]) -> str:
    lines = []
    for jobs in sorted({r["jobs"] for r in results}):
        by_tool = {r["tool"]: r for r in results if r["jobs"] == jobs}
        if len(by_tool) < len(PHASES):
            lines.append(f"\nN = {jobs}: only {', '.join(by_tool)} ran; see the JSON for its figures")
            continue
        ours, theirs = by_tool["kubetune"], by_tool["kubeflow"]
        rows = [
            ("all Jobs created (s)", "all_jobs_created_s", "{:.0f}"),
            ("pods created, median (s)", "pods_created_p50_s", "{:.0f}"),
            ("pods scheduled, median (s)", "pods_scheduled_p50_s", "{:.0f}"),
            ("pods Running, median (s)", "pods_running_p50_s", "{:.0f}"),
            ("all pods Running (s)", "all_pods_running_s", "{:.0f}"),
            ("API requests per job", "api_requests_per_job", "{:.2f}"),
            ("reconcile p50 (ms)", "reconcile_p50_ms", "{:.1f}"),
            ("reconcile p99 (ms)", "reconcile_p99_ms", "{:.1f}"),
            ("API server time per write p50 (ms)", "api_write_p50_ms", "{:.1f}"),
            ("API server time per write p90 (ms)", "api_write_p90_ms", "{:.1f}"),
            ("peak RSS (MiB)", "peak_rss_mib", "{:.0f}"),
            ("controller CPU (s)", "cpu_s", "{:.0f}"),
        ]
        lines.append(f"\nN = {jobs} jobs x {ours['workers_per_job']} workers")
        lines.append(f"  {'':36} {'kubetune':>14} {'Kubeflow+JobSet':>16}")
        for label, key, fmt in rows:
            lines.append(f"  {label:36} {fmt.format(ours[key]):>14} {fmt.format(theirs[key]):>16}")
        lines.append(f"  {'load average 1m (mean/max)':36} {_load(ours):>14} {_load(theirs):>16}")
        lines.append("  API requests per job by verb and resource:")
        kinds = sorted(set(ours["api_requests_by_kind"]) | set(theirs["api_requests_by_kind"]))
        kinds.sort(key=lambda k: -(ours["api_requests_by_kind"].get(k, 0) + theirs["api_requests_by_kind"].get(k, 0)))
        for kind in kinds:
            a, b = (r["api_requests_by_kind"].get(kind, 0) / jobs for r in (ours, theirs))
            lines.append(f"    {kind:42} {a:>8.2f} {b:>16.2f}")
        for r in (ours, theirs):
            lines += [f"  incomplete ({r['tool']}): {what}" for what in r["missed"]]
        complete = not ours["missed"]
        checks = [
            ("kubetune's jobs and pods all Running", complete),
            ("API requests per job <= Kubeflow's", ours["api_requests_per_job"] <= theirs["api_requests_per_job"]),
            (
                "all pods Running no later than Kubeflow's",
                complete and ours["all_pods_running_s"] <= theirs["all_pods_running_s"],
            ),
            (f"reconcile p99 < {MAX_P99_MS:.0f} ms", ours["reconcile_p99_ms"] < MAX_P99_MS),
            (f"operator RSS <= {MAX_RSS_MIB:.0f} MiB", ours["peak_rss_mib"] <= MAX_RSS_MIB),
        ]
        lines += [f"  [{'pass' if ok else 'FAIL'}] {what}" for what, ok in checks]
    return "\n".join(lines)


def _load(r: Obj) -> str:
    return f"{r['load_1m']['mean']:.1f}/{r['load_1m']['max']:.1f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, nargs="+", default=[200, 500], help="job counts to run")
    parser.add_argument("--workers", type=int, default=4, help="worker pods per job (one GPU each)")
    parser.add_argument("--idle", type=float, default=45.0, help="seconds of steady state counted in the requests")
    parser.add_argument("--timeout", type=float, default=900.0, help="give up on a phase after this long")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--keep", action="store_true", help="keep the clusters' state directories (logs, audit log)")
    parser.add_argument("--profile", type=Path, help="run the operator under cProfile, writing its stats here")
    parser.add_argument("--tools", nargs="+", choices=list(PHASES), default=list(PHASES), help="run only these")
    args = parser.parse_args()
    # Stopped with SIGTERM (e.g. by timeout), still stop the clusters and controllers it started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    args.done = []
    for i, n in enumerate(args.jobs):
        args.done += run_size(i, n, args)
        print(report([r for r in args.done if r["jobs"] == n]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
