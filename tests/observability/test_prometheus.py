"""THE PROMETHEUS TEST: every dashboard query and every alert rule, run by a real Prometheus.

One Prometheus (/usr/bin/prometheus, the Debian package CI installs) scrapes, every second:
- the operator's /metrics, served by kubetune_operator.metrics.serve with a few FineTuneJobs (built from the
  examples with the API models) whose status is kept up to date as the operator would: progress polled from the
  trainer with kubetune_operator.progress, cost from worker pods with kubetune_operator.cost; plus reconciles,
  some failing. It is scraped with honor_labels and a target `namespace` of its own, as the ServiceMonitor does.
- a trainer: the real kubetune_trainer.progress server, fed by a thread that plays a training loop, with the
  target labels `namespace` and `name` the PodMonitor gives rank 0.
Prometheus loads the alert rules. Then every panel query (template variables substituted, for all jobs and for
one) must be valid and return a finite value, every template variable must list the jobs, every rule must
evaluate without error, and every alert must fire for exactly the jobs the fixture made to deserve it.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import re
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import aiohttp
import pytest
import yaml
from aiohttp import web
from kubetune_dev.system import tool
from kubetune_operator.api import FineTuneJob, FineTuneJobStatus
from kubetune_operator.api.spec import Budget
from kubetune_operator.api.status import CheckpointStatus, Progress
from kubetune_operator.cost import Pricing, Spend, pod_usage, pods_spend, run_cost
from kubetune_operator.metrics import OperatorMetrics, serve
from kubetune_operator.monitoring import ALERTS, DASHBOARD
from kubetune_operator.progress import fetch_progress, parse_report, to_status
from kubetune_trainer import progress as trainer_progress
from observability_helpers import condition, example_job, pod, rfc3339

RATE_INTERVAL = "10s"  # what Grafana's $__rate_interval becomes for a 1 s scrape interval, with margin
DEADLINE = 45.0  # seconds for data to arrive; normally it takes about five

PRICING = Pricing(default_usd_per_gpu_hour=2.0, by_instance_type={"p5.48xlarge": 3.0})
NODES = {"gpu-node-0": {"node.kubernetes.io/instance-type": "p5.48xlarge"}}
CHECKPOINT_ROOT = "/checkpoints"

# Which jobs the fixture makes each alert fire for (namespace, name); () for alerts without job labels.
EXPECTED_ALERTS: dict[str, set[tuple[str, ...]]] = {
    "KubetuneJobFailed": {("ml-team", "support-bot-lora-v0")},
    "KubetuneJobStalled": {("research", "qwen-7b-full")},
    "KubetuneJobOverBudget": {("ml-team", "support-bot-lora-v0")},
    "KubetuneJobOverGpuHoursBudget": {("research", "qwen-7b-full-v1")},
    "KubetuneJobProjectedOverBudget": {("research", "qwen-7b-full")},
    "KubetuneCheckpointTooOld": {("research", "qwen-7b-full")},
    "KubetuneOperatorReconcileErrors": {()},
    "KubetuneOperatorDown": set(),  # only while the operator is down: test_operator_down_fires_...
}
JOBS = {
    ("ml-team", "support-bot-lora"),
    ("ml-team", "support-bot-lora-v0"),
    ("ml-team", "prompt-tuning"),
    ("research", "qwen-7b-full"),
    ("research", "qwen-7b-full-v1"),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- the fake cluster's jobs ------------------------------------------------------------------------------


def now() -> datetime:
    return datetime.now(UTC)


def healthy_job(progress: Progress | None, checkpoint: CheckpointStatus | None) -> FineTuneJob:
    """ml-team/support-bot-lora, attempt 2 of run 1, training; status as the operator derives it. It has every
    optional series (both budgets too), so each panel must show it when it alone is selected."""
    t = now()
    pods = [pod_usage(pod(gpus=1, node="gpu-node-0", started=t - timedelta(hours=1)))]
    job = example_job("lora-single-gpu.yaml", "ml-team")
    job.spec.budget = Budget(max_cost_usd=50, max_gpu_hours=24)
    # attempt 1 (OOMKilled after 30 min) and attempt 2, running
    spent = Spend(gpu_seconds=1800, usd=1.5) + pods_spend(pods, pricing=PRICING, nodes=NODES, gpu_product=None, now=t)
    cost = run_cost(
        spent=spent,
        pods=pods,
        resources=job.spec.resources,
        pricing=PRICING,
        nodes=NODES,
        eta_seconds=progress.eta_seconds if progress else None,
    )
    status = FineTuneJobStatus(
        phase="Running",
        run=1,
        attempt=2,
        start_time=t - timedelta(hours=2),
        conditions=[condition("Running", "True", "Training"), condition("Ready", "False", "Training")],
        workers={"active": 1, "ready": 1},
        progress=progress,
        checkpoint=checkpoint,
        cost=cost,
    )
    return job.model_copy(update={"status": status})


def stuck_job() -> FineTuneJob:
    """research/qwen-7b-full: 16 GPUs for 5 hours, no report for 2 hours (its stall timeout is 20 min), never
    checkpointed, and at its last known pace projected over its $2500 budget."""
    t = now()
    pods = [pod_usage(pod(gpus=8, node="gpu-node-0", started=t - timedelta(hours=5))) for _ in range(2)]
    job = example_job("full-2x8.yaml", "research")
    progress = Progress(
        step=800, total_steps=5000, percent=16, loss=2.1, eta_seconds=200_000, updated_at=t - timedelta(hours=2)
    )
    cost = run_cost(
        spent=pods_spend(pods, pricing=PRICING, nodes=NODES, gpu_product=None, now=t),
        pods=pods,
        resources=job.spec.resources,
        pricing=PRICING,
        nodes=NODES,
        eta_seconds=progress.eta_seconds,
    )
    status = FineTuneJobStatus(
        phase="Running",
        run=1,
        attempt=1,
        start_time=t - timedelta(hours=5),
        conditions=[condition("Running", "True", "Training")],
        workers={"active": 2, "ready": 2},
        progress=progress,
        cost=cost,
    )
    return job.model_copy(update={"status": status})


def finished_jobs() -> list[FineTuneJob]:
    t = now()
    over_budget = example_job(
        "lora-single-gpu.yaml",
        "ml-team",
        "support-bot-lora-v0",
        {
            "phase": "Failed",
            "run": 1,
            "attempt": 1,
            "startTime": rfc3339(t - timedelta(days=1)),
            "completionTime": rfc3339(t - timedelta(hours=3)),
            "conditions": [
                condition("Failed", "True", "BudgetExceeded"),
                condition("Running", "False", "BudgetExceeded"),
                condition("Ready", "False", "BudgetExceeded"),
            ],
            "cost": {"gpuHours": 16.8, "usd": 50.4, "projectedUSD": 50.4},
        },
    )
    over_hours = example_job(
        "full-2x8.yaml",
        "research",
        "qwen-7b-full-v1",
        {
            "phase": "Succeeded",
            "run": 1,
            "attempt": 1,
            "conditions": [condition("Succeeded", "True", "Completed"), condition("Ready", "True", "Completed")],
            "cost": {"gpuHours": 812.0, "usd": 2436.0, "projectedUSD": 2436.0},
        },
    )
    queued = example_job("prompt-tuning.yaml", "ml-team", "prompt-tuning")
    return [over_budget, over_hours, queued]


# -- the operator and the trainer -------------------------------------------------------------------------

T = TypeVar("T")


class EventLoop:
    """An asyncio loop on a thread: the operator side lives there, as in the operator process."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


def play_training(progress: trainer_progress.Progress, stop: threading.Event) -> None:
    """Attempt 2 of a run: resume from step 1000, then a step every 50 ms (reporting 0.3-0.6 s steps)."""
    rng = random.Random(7)
    path = f"{CHECKPOINT_ROOT}/ml-team/support-bot-lora/runs/1/step-%d"
    progress.set_plan(4000)
    progress.resumed(
        1000,
        1000 * 8192,
        [{"step": 1000, "loss": 1.4, "evalLoss": 1.5}],
        {"step": 1000, "path": path % 1000, "savedAt": trainer_progress.rfc3339(time.time() - 60)},
    )
    progress.checkpointed(1000, path % 1000, time.time() - 60, duration=3.5)
    progress.set_state("training")
    step = 1000
    while not stop.wait(0.05):
        step += 1
        progress.step_done(step, epoch=step / 2000, duration=rng.uniform(0.3, 0.6), tokens=8192)
        if step % 5 == 1:
            progress.logged(
                loss=1.4 - step / 10_000,
                learning_rate=2e-4,
                grad_norm=rng.uniform(0.5, 1.0),
                tokens_per_second=rng.uniform(15_000, 17_000),
                mfu=rng.uniform(0.38, 0.42),
                eta_seconds=(4000 - step) * 0.45,
                gpu_memory_peak=61 * 2**30,
            )
        if step % 20 == 0:
            ood = 2.1 + step / 100_000
            sets = {"general": {"loss": ood, "perplexity": math.exp(ood), "baseLoss": 2.1, "change": ood / 2.1 - 1}}
            progress.evaluated(step, eval_loss=1.45 - step / 10_000, perplexity=4.1, sets=sets, base_eval_loss=1.9)
        if step % 40 == 0:
            progress.checkpointed(step, path % step, time.time(), duration=rng.uniform(2.0, 4.0))


@dataclass
class Operator:
    """The operator side: metrics endpoint, reconciles, and the status updates its pollers would make."""

    loop: EventLoop
    trainer_url: str
    port: int = field(default_factory=free_port)
    jobs: dict[tuple[str, str], FineTuneJob] = field(default_factory=dict)
    runner: web.AppRunner | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.metrics = OperatorMetrics(lambda: list(self.jobs.values()))
        for job in [healthy_job(None, None), stuck_job(), *finished_jobs()]:
            self.jobs[(job.metadata["namespace"], job.metadata["name"])] = job

    async def _reconcile_forever(self) -> None:
        for i in range(10**9):
            try:
                with self.metrics.reconcile():
                    await asyncio.sleep(random.uniform(0.002, 0.04))
                    if i % 3 == 0:  # a third fail: enough to fire the error-ratio alert
                        raise RuntimeError("conflict")
            except RuntimeError:
                pass
            await asyncio.sleep(0.05)

    async def _poll_forever(self) -> None:
        async with aiohttp.ClientSession() as session:
            checkpoint: CheckpointStatus | None = None
            while True:
                doc = await fetch_progress(session, self.trainer_url, timeout=2)
                report = parse_report(doc) if doc else None
                if report is not None:
                    progress, checkpoint = to_status(
                        report,
                        previous_checkpoint=checkpoint,
                        checkpoint_root=CHECKPOINT_ROOT,
                        checkpoint_uri="pvc://ft-checkpoints/ml-team/support-bot-lora",
                    )
                    self.jobs[("ml-team", "support-bot-lora")] = healthy_job(progress, checkpoint)
                self.jobs[("research", "qwen-7b-full")] = stuck_job()
                await asyncio.sleep(0.5)

    async def _start(self) -> None:
        self.runner = await serve(self.metrics.registry, "127.0.0.1", self.port)
        self.tasks = [asyncio.create_task(self._reconcile_forever()), asyncio.create_task(self._poll_forever())]

    async def _stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.runner is not None:
            await self.runner.cleanup()

    def start(self) -> None:
        self.loop.run(self._start())

    def stop(self) -> None:
        self.loop.run(self._stop())


# -- Prometheus -----------------------------------------------------------------------------------------


@dataclass
class Prometheus:
    url: str

    def api(self, path: str, **params: str) -> Any:
        data = urllib.parse.urlencode(params).encode() if params else None
        try:
            with urllib.request.urlopen(self.url + path, data=data, timeout=10) as r:
                body = json.load(r)
        except urllib.error.HTTPError as e:  # 400/422: the query is invalid; the body says why
            body = json.load(e)
        if body.get("status") != "success":
            raise QueryError(f"{body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("/api/v1/query", query=expr)
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        result: list[dict[str, Any]] = data["result"]
        return result

    def problems(self, exprs: list[str]) -> dict[str, str]:
        """What is wrong with each query: invalid, no data, or no finite value. Empty when all are fine."""
        found = {}
        for expr in exprs:
            try:
                result = self.query(expr)
            except QueryError as e:
                found[expr] = f"invalid: {e}"
                continue
            if not result:
                found[expr] = "no data"
            elif not any(math.isfinite(float(r["value"][1])) for r in result):
                found[expr] = f"no finite value: {result}"
        return found

    def wait_for(self, exprs: list[str], deadline: float = DEADLINE) -> dict[str, str]:
        """Poll until every query returns data or the deadline passes; what is still wrong then."""
        end = time.monotonic() + deadline
        while True:
            found = self.problems(exprs)
            if not found or time.monotonic() > end:
                return found
            time.sleep(0.5)


class QueryError(Exception):
    pass


@dataclass
class Stack:
    prometheus: Prometheus
    operator: Operator


def prometheus_config(operator_port: int, trainer_port: int) -> dict[str, Any]:
    return {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [
            {
                # As the chart's ServiceMonitor: honorLabels keeps the per-job `namespace` over the target's.
                "job_name": "kubetune-operator",
                "honor_labels": True,
                "static_configs": [
                    {
                        "targets": [f"127.0.0.1:{operator_port}"],
                        "labels": {"namespace": "kubetune-system", "pod": "kubetune-operator-5d8c7b9f4-x2k8p"},
                    }
                ],
            },
            {
                # As the PodMonitor on rank 0: pod label kubetune.io/job -> name, pod namespace -> namespace.
                "job_name": "kubetune-trainers",
                "static_configs": [
                    {
                        "targets": [f"127.0.0.1:{trainer_port}"],
                        "labels": {"namespace": "ml-team", "name": "support-bot-lora", "pod": "support-bot-lora-1-2-0"},
                    }
                ],
            },
        ],
    }


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    prometheus = tool("prometheus")  # before anything starts: a missing package is named, nothing is left running
    tmp = tmp_path_factory.mktemp("prometheus")
    stop_training = threading.Event()
    progress = trainer_progress.Progress(world_size=8)
    trainer = trainer_progress.serve(progress, "127.0.0.1", 0)
    trainer_port = trainer.server_address[1]
    threading.Thread(target=play_training, args=(progress, stop_training), daemon=True).start()
    loop = EventLoop()
    operator = Operator(loop, f"http://127.0.0.1:{trainer_port}/progress")
    operator.start()

    (tmp / "prometheus.yml").write_text(yaml.safe_dump(prometheus_config(operator.port, trainer_port)))
    port = free_port()
    log = (tmp / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [
            prometheus,
            f"--config.file={tmp / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    prom = Prometheus(f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, (tmp / "prometheus.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(prom.url + "/-/ready", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "Prometheus not ready after 30 s"
            time.sleep(0.2)
        # a few scrapes of both targets, so rate() and increase() have samples
        not_ready = prom.wait_for(
            [
                'count_over_time(up{job="kubetune-operator"}[1m]) >= 4',
                'count_over_time(up{job="kubetune-trainers"}[1m]) >= 4',
                "min(up) == 1",
            ]
        )
        assert not not_ready, (not_ready, (tmp / "prometheus.log").read_text()[-3000:])
        yield Stack(prom, operator)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
        operator.stop()
        loop.close()
        stop_training.set()
        trainer.shutdown()


# -- the dashboard ------------------------------------------------------------------------------------------


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for p in panels:
        yield p
        yield from all_panels(p.get("panels", []))


def panel_queries() -> list[tuple[str, str]]:
    """(panel title, expr) for every query of every panel."""
    return [(p["title"], t["expr"]) for p in all_panels(dashboard()["panels"]) for t in p.get("targets", [])]


def substitute(expr: str, namespace: str, name: str) -> str:
    """Grafana's variable substitution, for a Prometheus data source."""
    out = expr.replace("$__rate_interval", RATE_INTERVAL).replace("$namespace", namespace).replace("$name", name)
    assert "$" not in out, f"a template variable the test does not know: {expr}"
    return out


ALL = (".*", ".*")  # what "All" becomes (allValue)
ONE = ("ml-team", "support-bot-lora")


def test_dashboard_shape() -> None:
    d = dashboard()
    panels = list(all_panels(d["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert {"namespace", "name"} <= variables.keys()
    for p in panels:
        assert p["gridPos"]["x"] + p["gridPos"]["w"] <= 24, p["title"]
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        assert all(t["datasource"]["uid"] == "${datasource}" and t["expr"].strip() for t in p["targets"]), p["title"]
    titles = {p["title"] for p in panels}
    for needed in ("Jobs", "Jobs by phase", "Loss", "Tokens per second", "MFU", "GPU memory peak (rank 0)",
                   "Step time", "Time since last checkpoint", "Restarts", "Cost vs budget", "Reconciles",
                   "Reconcile errors", "Reconcile latency"):  # fmt: skip
        assert needed in titles


@pytest.mark.parametrize("selection", [ALL, ONE], ids=["all-jobs", "one-job"])
def test_every_dashboard_query_returns_data(stack: Stack, selection: tuple[str, str]) -> None:
    queries = {substitute(expr, *selection): title for title, expr in panel_queries()}
    problems = stack.prometheus.wait_for(list(queries))
    assert not problems, "\n".join(f"{queries[q]!r}: {q}\n    {why}" for q, why in problems.items())


def test_every_template_variable_lists_the_jobs(stack: Stack) -> None:
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    values = {}
    for name in ("namespace", "name"):
        m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", variables[name]["query"]["query"])
        assert m, variables[name]
        selector = substitute(m.group(1), *ALL)
        series = stack.prometheus.api("/api/v1/series", **{"match[]": selector})
        values[name] = {s[m.group(2)] for s in series}
    assert values["namespace"] == {ns for ns, _ in JOBS}
    assert values["name"] == {n for _, n in JOBS}


def test_a_typo_in_a_panel_is_caught(stack: Stack) -> None:
    problems = stack.prometheus.problems(
        [
            'max by (namespace, name) (kubetune_train_los{namespace=~".*"})',  # misspelt metric
            "sum by (name (kubetune_job_gpus)",  # broken syntax
            'kubetune_job_gpus{nmae="x"}',  # misspelt label
        ]
    )
    assert len(problems) == 3
    assert problems["sum by (name (kubetune_job_gpus)"].startswith("invalid: bad_data")


# -- the alerts ----------------------------------------------------------------------------------------------


def alert_rules() -> dict[str, dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return {r["alert"]: r for g in groups for r in g["rules"]}


def test_promtool_accepts_the_rules() -> None:
    result = subprocess.run([tool("promtool"), "check", "rules", str(ALERTS)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


def test_every_alert_is_tested() -> None:
    assert alert_rules().keys() == EXPECTED_ALERTS.keys()
    for rule in alert_rules().values():
        assert {"summary", "description"} <= rule["annotations"].keys()
        assert rule["labels"]["severity"] in {"info", "warning", "critical"}


def job_of(labels: dict[str, str]) -> tuple[str, ...]:
    return tuple(labels[k] for k in ("namespace", "name") if k in labels)


def firing_for(result: list[dict[str, Any]]) -> set[tuple[str, ...]]:
    return {job_of(r["metric"]) for r in result}


def test_every_alert_fires_for_exactly_the_jobs_that_deserve_it(stack: Stack) -> None:
    prom = stack.prometheus
    rules = alert_rules()
    expected = {a: jobs for a, jobs in EXPECTED_ALERTS.items() if jobs}
    end = time.monotonic() + DEADLINE
    while True:
        got = {alert: firing_for(prom.query(rules[alert]["expr"])) for alert in expected}
        if got == expected or time.monotonic() > end:
            break
        time.sleep(0.5)
    assert got == expected

    # The rule engine agrees: every rule evaluates cleanly, and each of these alerts is pending or firing.
    end = time.monotonic() + DEADLINE
    while True:
        loaded = [r for g in prom.api("/api/v1/rules")["groups"] for r in g["rules"]]
        active = {(a["labels"]["alertname"], *job_of(a["labels"])) for a in prom.api("/api/v1/alerts")["alerts"]}
        wanted = {(alert, *job) for alert, jobs in expected.items() for job in jobs}
        if wanted <= active or time.monotonic() > end:
            break
        time.sleep(0.5)
    assert {r["name"] for r in loaded} == rules.keys()
    assert all(r["health"] == "ok" for r in loaded), [(r["name"], r.get("lastError")) for r in loaded]
    assert wanted <= active, wanted - active
    assert not any(a == "KubetuneOperatorDown" for a, *_ in active)


def test_operator_down_fires_when_its_scrapes_fail(stack: Stack) -> None:
    prom, expr = stack.prometheus, alert_rules()["KubetuneOperatorDown"]["expr"]
    assert prom.query(expr) == []
    stack.operator.stop()
    try:
        # A failed scrape marks the target's series stale at once, so absent() turns true within seconds.
        assert not prom.wait_for([expr], deadline=15)
    finally:
        stack.operator.start()
    assert not prom.wait_for(["kubetune_operator_build_info"], deadline=15)
    end = time.monotonic() + 15
    while prom.query(expr) and time.monotonic() < end:
        time.sleep(0.5)
    assert prom.query(expr) == []
