"""Chaos benchmark: a batch of real trainings while the operator and the workers are killed at random.

    python bench/chaos.py                 # what `make bench-chaos` runs: 6 jobs, a kill every 6-15 s
    python bench/chaos.py --jobs 4 --seed 7 --every 5 12

A local control plane with two real nodes (kubelet + containerd + runc, kubetune_dev.realnodes; workers run the
trainer image built from this checkout: launcher -> torchrun -> trainer on CPU), a tiny random-initialised Llama,
LoRA, 60 steps per job with a checkpoint every 10, half the jobs on two nodes. While any job is unfinished, every
`--every` seconds one of these happens at random: the operator (a host process) is SIGKILLed (and started again a
moment later), or one live trainer process of a random job is SIGKILLed (seen from the host, as the OOM killer
would). A sampler watches the whole time: the trainer processes of every attempt (/proc), the batch Jobs, the
checkpoints on the claims and the step each attempt resumed from (rank 0's log, which goes with its pod).

It prints, per job and in total:
- jobs, and how many succeeded;
- kills: of the operator, of workers (only kills that hit a running trainer count);
- duplicates: trainer processes of two attempts of one job alive at the same moment, a batch Job re-created
  under the same name, an AttemptStarted event more than the attempts;
- lost checkpoints: an attempt that resumed from an earlier step than the newest checkpoint complete on disk
  before it started;
- lost outputs: a succeeded job whose output is missing, incomplete (not all steps), or changed after success;
- restarts beyond the faults: attempts after the first that no worker kill explains (an operator kill must
  cost none).
Every one of the last four must be 0.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
for path in (REPO / "hack", REPO / "tests" / "trainer"):
    sys.path.insert(0, str(path))

import trainer_assets  # noqa: E402
import yaml  # noqa: E402
from kubernetes import client, config  # noqa: E402
from kubetune_dev.cluster import GpuNodePool, LocalCluster  # noqa: E402
from kubetune_dev.realnodes import NODE_SELECTOR, NODE_TOLERATION, RealNodes, readable_by_pods  # noqa: E402
from kubetune_trainer.files import sha256_file  # noqa: E402

GROUP, VERSION, PLURAL = "kubetune.io", "v1alpha1", "finetunejobs"
CRD_FILE = REPO / "crds" / "finetunejobs.kubetune.io.yaml"
NAMESPACE = "chaos"
CLAIMS = ("models", "datasets", "ft-checkpoints", "ft-models")
STEPS = 60
CHECKPOINT_STEP = re.compile(r"step-(\d+)")
RESUMED = re.compile(r"resumed from \S+ at step (\d+)/")
POD_LOG = re.compile(rf"{NAMESPACE}_(.+)-r1-a(\d+)-0-\w+_")  # the kubelet's <namespace>_<pod>_<uid> directories

Obj = dict[str, Any]


def spec(nodes: int) -> Obj:
    return {
        "model": {"source": "pvc://models/tiny-llama"},
        "dataset": {"source": "pvc://datasets/train.jsonl", "format": "prompt_completion", "maxSeqLength": 128},
        "method": {"type": "lora", "lora": {"r": 8, "alpha": 16, "dropout": 0.0}},
        "training": {
            "maxSteps": STEPS,
            "learningRate": 3e-3,
            "batchSizePerDevice": 2,
            "precision": "fp32",
            "logEverySteps": 5,
            "seed": 7,
        },
        "resources": {
            "numNodes": nodes,
            "gpusPerNode": 0,
            "nodeSelector": NODE_SELECTOR,
            "tolerations": [NODE_TOLERATION],
        },
        "checkpoint": {"claimName": "ft-checkpoints", "everySteps": 10, "keepLast": 2},
        "output": {"claimName": "ft-models"},
        "runPolicy": {"maxRestarts": 30, "backoffSeconds": 1, "maxBackoffSeconds": 2},
    }


# ----------------------------------------------------------------------------------------------
# what runs: trainer processes by job and attempt
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Trainer:
    pid: int
    job: str
    attempt: int


def trainers(jobs: set[str]) -> list[Trainer]:
    """The trainer processes (torchrun's workers) of the given jobs, from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"kubetune_trainer" not in cmdline or b"torch.distributed.run" in cmdline:
            continue
        addr = next(
            (e[len(b"KUBETUNE_MASTER_ADDR=") :] for e in environ if e.startswith(b"KUBETUNE_MASTER_ADDR=")), b""
        )
        m = re.match(rb"(.+)-r\d+-a(\d+)-0\.", addr)
        if m and m.group(1).decode() in jobs:
            found.append(Trainer(int(entry.name), m.group(1).decode(), int(m.group(2))))
    return found


# ----------------------------------------------------------------------------------------------
# the sampler: what happened, as seen every half second
# ----------------------------------------------------------------------------------------------


@dataclass
class Seen:
    overlaps: set[tuple[str, frozenset[int]]] = field(default_factory=set)
    job_uids: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    # job -> [(when, newest complete checkpoint step on disk)]
    checkpoints: dict[str, list[tuple[float, int]]] = field(default_factory=lambda: defaultdict(list))


class Sampler(threading.Thread):
    def __init__(self, bench: Bench) -> None:
        super().__init__(daemon=True)
        self.bench = bench
        self.seen = Seen()
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.sample()
            except Exception as e:  # the API server can be busy; the next sample will do
                print(f"  sampler: {type(e).__name__}: {e}", flush=True)
            self.stop.wait(0.5)

    def sample(self) -> None:
        b, now = self.bench, time.time()
        attempts: dict[str, set[int]] = defaultdict(set)
        for t in trainers(set(b.names)):
            attempts[t.job].add(t.attempt)
        for job, live in attempts.items():
            if len(live) > 1:
                self.seen.overlaps.add((job, frozenset(live)))
        for j in b.batch.list_namespaced_job(NAMESPACE, label_selector="kubetune.io/job").items:
            self.seen.job_uids[j.metadata.name].add(j.metadata.uid)
        for name in b.names:
            steps = [
                int(m.group(1)) for p in b.checkpoint_dir(name).glob("step-*") if (m := CHECKPOINT_STEP.match(p.name))
            ]
            if steps:
                self.seen.checkpoints[name].append((now, max(steps)))
        b.read_resumes()


# ----------------------------------------------------------------------------------------------
# the benchmark
# ----------------------------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.state = REPO / ".cache" / "bench-chaos"
        self.names = [f"chaos-{i}-{uuid.uuid4().hex[:4]}" for i in range(args.jobs)]
        self.uids: dict[str, str] = {}
        self.operator: subprocess.Popen[bytes] | None = None
        self.operator_kills = 0
        self.worker_kills: dict[str, list[int]] = defaultdict(list)  # job -> attempts whose trainer was killed
        self.outputs: dict[str, dict[str, str]] = {}  # job -> file -> sha256, when it succeeded
        self.resumes: dict[tuple[str, int], int] = {}  # (job, attempt) -> the step it resumed from (0: afresh)

    # -- setup ------------------------------------------------------------------------------------

    def start(self) -> None:
        shutil.rmtree(self.state, ignore_errors=True)
        self.cluster = LocalCluster(state_dir=self.state, gpu_nodes=GpuNodePool(count=0), cpu_nodes=0).start()
        self.cluster.kubectl("apply", "--server-side", "-f", str(CRD_FILE))
        self.cluster.wait_established("finetunejobs.kubetune.io")
        self.nodes = RealNodes(self.cluster).start()
        self.nodes.create_claims(NAMESPACE, CLAIMS)
        trainer_assets.make_model_dir(self.nodes.claim_dir(NAMESPACE, "models") / "tiny-llama", "llama")
        readable_by_pods(self.nodes.claim_dir(NAMESPACE, "models"))
        rows = trainer_assets.rows(160, "prompt_completion")
        trainer_assets.write_jsonl(self.nodes.claim_dir(NAMESPACE, "datasets") / "train.jsonl", rows)
        api_client = config.new_client_from_config(config_file=str(self.cluster.kubeconfig))
        self.custom = client.CustomObjectsApi(api_client)
        self.batch = client.BatchV1Api(api_client)
        self.core = client.CoreV1Api(api_client)
        settings = {
            **self.nodes.operator_settings(),
            "healthPort": 0,
            "metricsPort": 0,
            "progressPollIntervalSeconds": 5,
            "terminationGracePeriodSeconds": 30,
        }
        (self.state / "operator-settings.yaml").write_text(yaml.safe_dump(settings))
        self.start_operator()

    def start_operator(self) -> None:
        cmd = [sys.executable, "-m", "kubetune_operator", "-n", NAMESPACE]
        cmd += ["--settings", str(self.state / "operator-settings.yaml")]
        with open(self.state / "operator.log", "ab") as log:
            self.operator = subprocess.Popen(
                cmd, env={**self.cluster.env(), "PYTHONUNBUFFERED": "1"}, stdout=log, stderr=subprocess.STDOUT
            )

    def stop(self) -> None:
        if self.operator and self.operator.poll() is None:
            self.operator.terminate()
            try:
                self.operator.wait(30)
            except subprocess.TimeoutExpired:
                self.operator.kill()
        if hasattr(self, "nodes"):
            self.nodes.stop()
        if hasattr(self, "cluster"):
            self.cluster.stop()

    # -- reading ----------------------------------------------------------------------------------

    def status(self, name: str) -> Obj:
        obj = self.custom.get_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, name)
        self.uids[name] = obj["metadata"]["uid"]
        return dict(obj.get("status") or {})

    def checkpoint_dir(self, name: str) -> Path:
        uid = self.uids.get(name, "-")
        return self.nodes.claim_dir(NAMESPACE, "ft-checkpoints") / NAMESPACE / name / uid / "runs" / "1" / "checkpoints"

    def output_dir(self, status: Obj) -> Path:
        claim, _, path = status["output"]["path"].removeprefix("pvc://").partition("/")
        return self.nodes.claim_dir(NAMESPACE, claim) / path

    def read_resumes(self) -> None:
        """Note the step each attempt resumed from, from its rank 0's log on the nodes, while its pod exists (the
        kubelet deletes the log with the pod). 0 until a log shows a resume: it started afresh."""
        for node in self.nodes.nodes:
            for log in node.layout.pod_logs.glob(f"{NAMESPACE}_*/trainer/*.log"):
                m = POD_LOG.match(log.parent.parent.name)
                if not m:
                    continue
                key = (m.group(1), int(m.group(2)))
                found = RESUMED.findall(log.read_text(errors="replace"))
                self.resumes[key] = int(found[-1]) if found else self.resumes.get(key, 0)

    def resumed_step(self, name: str, attempt: int) -> int | None:
        """The step attempt `attempt` resumed from (0: it started afresh; None: its log was never seen)."""
        return self.resumes.get((name, attempt))

    # -- chaos ------------------------------------------------------------------------------------

    def run(self) -> Obj:
        for i, name in enumerate(self.names):
            body = {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "FineTuneJob",
                "metadata": {"name": name, "namespace": NAMESPACE},
                "spec": spec(2 if i % 2 else 1),
            }
            self.custom.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, body)
            self.status(name)
        sampler = Sampler(self)
        sampler.start()
        started = time.monotonic()
        done: dict[str, Obj] = {}
        next_kill = started + self.rng.uniform(*self.args.every)
        while len(done) < len(self.names):
            if time.monotonic() - started > self.args.timeout:
                print(f"  timed out after {self.args.timeout:.0f}s with {len(self.names) - len(done)} jobs unfinished")
                break
            for name in self.names:
                if name in done:
                    continue
                try:
                    status = self.status(name)
                except client.ApiException:
                    continue
                if status.get("phase") in ("Succeeded", "Failed"):
                    done[name] = status
                    if status["phase"] == "Succeeded":
                        self.outputs[name] = files(self.output_dir(status))
                    print(f"  {name}: {status['phase']} after {len(status.get('attempts', []))} attempts", flush=True)
            if self.operator is not None and self.operator.poll() is not None:
                self.start_operator()
            if time.monotonic() >= next_kill and len(done) < len(self.names):
                self.kill_something(set(self.names) - set(done))
                next_kill = time.monotonic() + self.rng.uniform(*self.args.every)
            time.sleep(0.5)
        time.sleep(5)  # late writers, if any, would show now
        sampler.stop.set()
        sampler.join()
        return self.report(done, sampler.seen)

    def kill_something(self, running: set[str]) -> None:
        live = trainers(running)
        if self.rng.random() < 0.4 or not live:
            assert self.operator is not None
            self.operator.send_signal(signal.SIGKILL)
            self.operator.wait()
            self.operator_kills += 1
            print(f"  kill: operator (#{self.operator_kills})", flush=True)
            time.sleep(self.rng.uniform(0.5, 3))
            self.start_operator()
            return
        victim = self.rng.choice(live)
        try:
            os.kill(victim.pid, signal.SIGKILL)
        except OSError:
            return
        self.worker_kills[victim.job].append(victim.attempt)
        print(f"  kill: trainer of {victim.job} attempt {victim.attempt} (pid {victim.pid})", flush=True)

    # -- the verdict ------------------------------------------------------------------------------

    def report(self, done: dict[str, Obj], seen: Seen) -> Obj:
        duplicates, lost_checkpoints, lost_outputs, beyond = 0, 0, 0, 0
        rows = []
        for name in self.names:
            status = done.get(name) or self.status(name)
            attempts = status.get("attempts") or []
            # Duplicates: two attempts' trainers at once, a Job re-created, a start announced twice.
            overlaps = sum(1 for job, _ in seen.overlaps if job == name)
            recreated = sum(len(u) - 1 for job, u in seen.job_uids.items() if job.startswith(f"{name}-r"))
            events = self.core.list_namespaced_event(
                NAMESPACE, field_selector=f"involvedObject.kind=FineTuneJob,involvedObject.name={name}"
            ).items
            starts = sum(1 for e in events if e.reason in ("AttemptStarted", "Resumed"))
            dup = overlaps + recreated + max(0, starts - len(attempts))
            # Lost checkpoints: an attempt that resumed below the newest checkpoint complete before it started.
            lost = 0
            for record in attempts[1:]:
                began = datetime.fromisoformat(record["startTime"]).timestamp()
                before = [step for at, step in seen.checkpoints.get(name, []) if at < began - 1]
                resumed = self.resumed_step(name, record["attempt"])
                if before and resumed is not None and resumed < max(before):
                    lost += 1
                    print(f"  {name} attempt {record['attempt']} resumed from {resumed}, not {max(before)}")
            # Lost outputs: missing, incomplete, or changed after success.
            out_lost = 0
            if status.get("phase") == "Succeeded":
                out = self.output_dir(status)
                manifest = json.loads((out / "manifest.json").read_text()) if (out / "manifest.json").exists() else {}
                if manifest.get("finalMetrics", {}).get("steps") != STEPS or files(out) != self.outputs.get(name):
                    out_lost = 1
            else:
                out_lost = 1
            # Restarts beyond the faults: every worker kill of the current attempt may cost one restart.
            restarts = max(0, len(attempts) - 1)
            faults = len(set(self.worker_kills.get(name, [])))
            over = max(0, restarts - faults)
            duplicates += dup
            lost_checkpoints += lost
            lost_outputs += out_lost
            beyond += over
            rows.append(
                {
                    "job": name,
                    "nodes": spec(2 if self.names.index(name) % 2 else 1)["resources"]["numNodes"],
                    "phase": status.get("phase"),
                    "attempts": len(attempts),
                    "worker_kills": len(self.worker_kills.get(name, [])),
                    "reasons": [a.get("reason") for a in attempts],
                    "duplicates": dup,
                    "lost_checkpoints": lost,
                    "lost_output": out_lost,
                    "restarts_beyond_faults": over,
                }
            )
        return {
            "jobs": len(self.names),
            "succeeded": sum(1 for s in done.values() if s.get("phase") == "Succeeded"),
            "kills": self.operator_kills + sum(len(k) for k in self.worker_kills.values()),
            "operator_kills": self.operator_kills,
            "worker_kills": sum(len(k) for k in self.worker_kills.values()),
            "duplicates": duplicates,
            "lost_checkpoints": lost_checkpoints,
            "lost_outputs": lost_outputs,
            "restarts_beyond_faults": beyond,
            "per_job": rows,
        }


def files(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=6, help="FineTuneJobs in the batch (every other on two nodes)")
    parser.add_argument("--every", type=float, nargs=2, default=(6.0, 15.0), help="seconds between kills (range)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: drawn and printed)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="give up after this long")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.seed is None:
        args.seed = random.randrange(1 << 30)
    print(f"chaos: {args.jobs} jobs, a kill every {args.every[0]:g}-{args.every[1]:g}s, seed {args.seed}", flush=True)
    bench = Bench(args)
    try:
        bench.start()
        result = bench.run()
    finally:
        bench.stop()
    print(json.dumps(result["per_job"], indent=1))
    width = max(len(k) for k in result if k != "per_job")
    for key, value in result.items():
        if key != "per_job":
            print(f"{key.replace('_', ' '):<{width}}  {value}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    clean = all(result[k] == 0 for k in ("duplicates", "lost_checkpoints", "lost_outputs", "restarts_beyond_faults"))
    return 0 if clean and result["succeeded"] == result["jobs"] else 1


if __name__ == "__main__":
    sys.exit(main())
