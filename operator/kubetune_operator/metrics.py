"""The operator's Prometheus metrics: its own health, and one set of series per FineTuneJob.

Reconcile metrics follow controller-runtime's semantics (kubetune_operator_reconcile_total{result},
_errors_total, _time_seconds), so its dashboards and alerts translate. Per-job series are built at scrape time
from the jobs the operator currently knows (`JobCollector`), so a deleted job leaves no series behind and
nothing has to be removed by hand. Labels are bounded: namespace and name of a job plus values from small
fixed sets (phase, condition, status, result), one value per job (method, model, gpu_product, run) and the job's
evaluation set names (at most 8, spec.evaluation.sets).

The per-job series carry their own `namespace` label: scrape the operator with honor_labels (ServiceMonitor
`honorLabels: true`, as for kube-state-metrics), or Prometheus renames it `exported_namespace`.

    kubetune_operator_build_info{version}                      gauge    1
    kubetune_operator_reconcile_total{result}                  counter  success|error|requeue|requeue_after
    kubetune_operator_reconcile_errors_total                   counter
    kubetune_operator_reconcile_time_seconds                   histogram
    kubetune_operator_collect_errors_total                     counter  jobs skipped by a failed scrape
    kubetune_jobs{namespace,phase}                             gauge    jobs per phase (all phases present)
    kubetune_job_info{namespace,name,method,model,gpu_product,run}  gauge 1
    kubetune_job_status_phase{namespace,name,phase}            gauge    1 for the current phase, else 0
    kubetune_job_status_condition{namespace,name,condition,status}  gauge 1 for the current status, else 0
    kubetune_job_restarts_total{namespace,name}                counter  restarts over the runs in status.runs
    kubetune_job_gpus{namespace,name}                          gauge    GPUs requested by active worker pods
    kubetune_job_gpu_seconds_total{namespace,name}             counter  of the current run
    kubetune_job_cost_usd_total{namespace,name}                counter  of the current run
    kubetune_job_projected_cost_usd{namespace,name}            gauge
    kubetune_job_budget_usd / _budget_gpu_seconds              gauge    spec.budget, when set
    kubetune_job_stall_timeout_seconds                         gauge    spec.runPolicy.stallTimeoutSeconds
    kubetune_job_progress_ratio                                gauge    step / totalSteps, 0-1
    kubetune_job_loss / _eval_loss                             gauge    last reported
    kubetune_job_base_eval_loss                                gauge    the base model's eval loss (step 0)
    kubetune_job_eval_set_loss{namespace,name,set}             gauge    each evaluation set's latest loss
    kubetune_job_eval_set_base_loss{namespace,name,set}        gauge    the base model's loss on it
    kubetune_job_eval_set_change_ratio{namespace,name,set}     gauge    (loss - base) / base: > 0 is worse
    kubetune_job_tokens_per_second                             gauge    last reported
    kubetune_job_estimated_completion_timestamp_seconds        gauge
    kubetune_job_last_progress_timestamp_seconds               gauge    when rank 0 last reported
    kubetune_job_last_checkpoint_timestamp_seconds             gauge
    kubetune_job_start_timestamp_seconds                       gauge    current run
    kubetune_job_completion_timestamp_seconds                  gauge    current run, once over

Gauges whose value is not known (no budget, no report yet) have no series rather than a made-up 0.
"""

from __future__ import annotations

import logging
import time
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime
from importlib.metadata import PackageNotFoundError, version
from typing import Literal, get_args

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram, Info, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from kubetune_operator.api import FineTuneJob, Phase

log = logging.getLogger(__name__)

ReconcileResult = Literal["success", "error", "requeue", "requeue_after"]
RECONCILE_RESULTS: tuple[ReconcileResult, ...] = get_args(ReconcileResult)
PHASES: tuple[Phase, ...] = get_args(Phase)
CONDITION_STATUSES = ("True", "False", "Unknown")
# controller-runtime's range (5 ms to 60 s), thinned.
RECONCILE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
JOB = ["namespace", "name"]


def _version() -> str:
    try:
        return version("kubetune")
    except PackageNotFoundError:
        return "unknown"


class Reconcile:
    """The outcome of one reconcile, set by the code inside `OperatorMetrics.reconcile()`. Left unset it is success,
    or error when an exception escapes. Set `result` to "requeue" or "requeue_after" when the handler asks to run
    again (also before raising kopf.TemporaryError for an expected wait, which is then not counted as an error)."""

    def __init__(self) -> None:
        self.result: ReconcileResult | None = None


class OperatorMetrics:
    """The operator's registry: reconcile instrumentation, the per-job collector, build info, process metrics."""

    def __init__(self, jobs: Callable[[], Iterable[FineTuneJob]], *, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        Info("kubetune_operator_build", "The running operator.", registry=r).info({"version": _version()})
        self._reconciles = Counter(
            "kubetune_operator_reconcile_total", "Reconciles of FineTuneJobs, by result.", ["result"], registry=r
        )
        for result in RECONCILE_RESULTS:  # every result present from the start, so rate() never misses a series
            self._reconciles.labels(result)
        self._errors = Counter("kubetune_operator_reconcile_errors_total", "Reconciles that failed.", registry=r)
        self._latency = Histogram(
            "kubetune_operator_reconcile_time_seconds",
            "Time one reconcile of a FineTuneJob took.",
            buckets=RECONCILE_BUCKETS,
            registry=r,
        )
        collect_errors = Counter(
            "kubetune_operator_collect_errors_total",
            "FineTuneJobs left out of a scrape because turning them into series failed (a bug; see the log).",
            registry=r,
        )
        r.register(JobCollector(jobs, collect_errors))
        ProcessCollector(registry=r)

    @contextmanager
    def reconcile(self) -> Iterator[Reconcile]:
        """Time and count one reconcile: `with metrics.reconcile() as r: ...`. A cancelled one (operator shutting
        down) had no outcome and is not counted."""
        outcome = Reconcile()
        start = time.perf_counter()
        try:
            yield outcome
        except Exception:
            self._record(outcome.result or "error", start)
            raise
        self._record(outcome.result or "success", start)

    def _record(self, result: ReconcileResult, start: float) -> None:
        self._latency.observe(time.perf_counter() - start)
        self._reconciles.labels(result).inc()
        if result == "error":
            self._errors.inc()


async def serve(registry: CollectorRegistry, host: str, port: int) -> web.AppRunner:
    """Serve GET /metrics on host:port inside the running event loop (so the collector reads the operator's state
    on the loop's thread, never concurrently with it). Stop it with `await runner.cleanup()`."""

    async def metrics(request: web.Request) -> web.Response:
        encode, content_type = choose_encoder(request.headers.get("Accept", ""))
        return web.Response(body=encode(registry), headers={"Content-Type": content_type})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    log.info("serving operator metrics on %s:%d/metrics", host, port)
    return runner


# ----------------------------------------------------------------------------------------------
# per-job series
# ----------------------------------------------------------------------------------------------


def restarts(job: FineTuneJob) -> int:
    """Restarts over the runs the status remembers: attempts beyond the first of each run."""
    status = job.status
    if status is None:
        return 0
    attempts = {r.run: r.attempts or 1 for r in status.runs}
    if status.run is not None:
        attempts[status.run] = max(attempts.get(status.run, 1), status.attempt or 1)
    return sum(a - 1 for a in attempts.values())


def _ts(value: datetime | None) -> float | None:
    return value.timestamp() if value is not None else None


class _Families:
    """Metric families for the per-job series, filled job by job."""

    def __init__(self) -> None:
        self.jobs = GaugeMetricFamily("kubetune_jobs", "FineTuneJobs per phase.", labels=["namespace", "phase"])
        self.info = InfoMetricFamily(
            "kubetune_job",
            "A FineTuneJob and what it trains (1 per job).",
            labels=[*JOB, "method", "model", "gpu_product", "run"],
        )
        self.phase = GaugeMetricFamily(
            "kubetune_job_status_phase", "1 for the job's phase, 0 for the others.", labels=[*JOB, "phase"]
        )
        self.condition = GaugeMetricFamily(
            "kubetune_job_status_condition",
            "1 for the status each condition has, 0 for the other statuses.",
            labels=[*JOB, "condition", "status"],
        )
        self.restarts = CounterMetricFamily(
            "kubetune_job_restarts", "Attempts after the first, over the runs in status.runs.", labels=JOB
        )
        self.gpu_seconds = CounterMetricFamily(
            "kubetune_job_gpu_seconds", "GPU time of the current run's worker pods.", labels=JOB
        )
        self.cost = CounterMetricFamily(
            "kubetune_job_cost_usd", "Accrued cost of the current run, in US dollars.", labels=JOB
        )
        self.gauges: dict[str, GaugeMetricFamily] = {
            name: GaugeMetricFamily(name, doc, labels=JOB)
            for name, doc in (
                ("kubetune_job_gpus", "GPUs requested by the job's active worker pods."),
                ("kubetune_job_projected_cost_usd", "Expected cost of the current run at the current rate, USD."),
                ("kubetune_job_budget_usd", "spec.budget.maxCostUSD."),
                ("kubetune_job_budget_gpu_seconds", "spec.budget.maxGpuHours, in GPU-seconds."),
                ("kubetune_job_stall_timeout_seconds", "spec.runPolicy.stallTimeoutSeconds."),
                ("kubetune_job_progress_ratio", "Optimizer steps done / steps of the run, 0-1."),
                ("kubetune_job_loss", "Latest training loss reported by rank 0."),
                ("kubetune_job_eval_loss", "Latest evaluation loss reported by rank 0."),
                ("kubetune_job_base_eval_loss", "The base model's evaluation loss, before training."),
                ("kubetune_job_tokens_per_second", "Training throughput over all workers, as last reported."),
                ("kubetune_job_estimated_completion_timestamp_seconds", "When training is expected to finish."),
                ("kubetune_job_last_progress_timestamp_seconds", "When rank 0 last reported progress."),
                ("kubetune_job_last_checkpoint_timestamp_seconds", "When the latest checkpoint was saved."),
                ("kubetune_job_start_timestamp_seconds", "When the current run started."),
                ("kubetune_job_completion_timestamp_seconds", "When the current run ended."),
            )
        }
        self.sets = {
            name: GaugeMetricFamily(name, doc, labels=[*JOB, "set"])
            for name, doc in (
                ("kubetune_job_eval_set_loss", "Latest loss on each evaluation set (spec.evaluation.sets)."),
                ("kubetune_job_eval_set_base_loss", "The base model's loss on each evaluation set, before training."),
                (
                    "kubetune_job_eval_set_change_ratio",
                    "Relative change of each evaluation set's loss against the base model's (0.1: 10% higher).",
                ),
            )
        }
        self.per_namespace: dict[str, Tally[str]] = {}

    def add(self, job: FineTuneJob) -> None:
        """Add the job's series; all of them or, when building one fails, none."""
        rows: list[tuple[GaugeMetricFamily | CounterMetricFamily, list[str], float]] = []
        meta = job.metadata
        key = [str(meta.get("namespace", "")), str(meta.get("name", ""))]
        spec, status = job.spec, job.status
        phase = (status.phase if status else None) or "Pending"
        run = str(status.run) if status and status.run is not None else ""
        info = [*key, spec.method.type, spec.model.source, spec.resources.gpu_product or "", run]

        rows += [(self.phase, [*key, p], float(p == phase)) for p in PHASES]
        for condition in status.conditions if status else []:
            rows += [
                (self.condition, [*key, condition.type, s.lower()], float(s == condition.status))
                for s in CONDITION_STATUSES
            ]
        rows.append((self.restarts, key, restarts(job)))

        g = self.gauges
        active = status.workers.active if status and status.workers else 0
        values: dict[str, float | None] = {
            "kubetune_job_gpus": active * spec.resources.gpus_per_node,
            "kubetune_job_stall_timeout_seconds": spec.run_policy.stall_timeout_seconds,
        }
        if spec.budget:
            values["kubetune_job_budget_usd"] = spec.budget.max_cost_usd
            if spec.budget.max_gpu_hours is not None:
                values["kubetune_job_budget_gpu_seconds"] = spec.budget.max_gpu_hours * 3600
        if status is not None:
            values |= {
                "kubetune_job_start_timestamp_seconds": _ts(status.start_time),
                "kubetune_job_completion_timestamp_seconds": _ts(status.completion_time),
            }
        if status and status.cost:
            cost = status.cost
            if cost.gpu_hours is not None:
                rows.append((self.gpu_seconds, key, cost.gpu_hours * 3600))
            if cost.usd is not None:
                rows.append((self.cost, key, cost.usd))
            values["kubetune_job_projected_cost_usd"] = cost.projected_usd
        if status and status.progress:
            p = status.progress
            if p.step is not None and p.total_steps:
                values["kubetune_job_progress_ratio"] = min(1.0, p.step / p.total_steps)
            if p.eta_seconds is not None and p.updated_at is not None:
                values["kubetune_job_estimated_completion_timestamp_seconds"] = p.updated_at.timestamp() + p.eta_seconds
            values |= {
                "kubetune_job_loss": p.loss,
                "kubetune_job_eval_loss": p.eval_loss,
                "kubetune_job_base_eval_loss": p.base_eval_loss,
                "kubetune_job_tokens_per_second": p.tokens_per_second,
                "kubetune_job_last_progress_timestamp_seconds": _ts(p.updated_at),
            }
            for r in p.eval_sets or []:
                for metric, value in (
                    ("kubetune_job_eval_set_loss", r.loss),
                    ("kubetune_job_eval_set_base_loss", r.base_loss),
                    ("kubetune_job_eval_set_change_ratio", r.change),
                ):
                    if value is not None:
                        rows.append((self.sets[metric], [*key, r.name], value))
        if status and status.checkpoint:
            values["kubetune_job_last_checkpoint_timestamp_seconds"] = _ts(status.checkpoint.saved_at)
        rows += [(g[name], key, value) for name, value in values.items() if value is not None]

        self.info.add_metric(info, {})
        for family, labels, value in rows:
            family.add_metric(labels, value)
        self.per_namespace.setdefault(key[0], Tally())[phase] += 1

    def families(self) -> list[Metric]:
        for namespace, phases in sorted(self.per_namespace.items()):
            for p in PHASES:
                self.jobs.add_metric([namespace, p], phases[p])
        counters = [self.restarts, self.gpu_seconds, self.cost]
        return [self.jobs, self.info, self.phase, self.condition, *counters, *self.gauges.values(), *self.sets.values()]


def job_metrics(jobs: Iterable[FineTuneJob], errors: Counter | None = None) -> list[Metric]:
    """The per-job metric families for these jobs. A job that cannot be turned into series is logged, counted in
    `errors` and left out; the others are still reported."""
    families = _Families()
    for job in jobs:
        try:
            families.add(job)
        except Exception:
            log.exception("metrics for FineTuneJob %s/%s", job.metadata.get("namespace"), job.metadata.get("name"))
            if errors is not None:
                errors.inc()
    return families.families()


class JobCollector(Collector):
    """Per-job series at scrape time from `jobs()`, the FineTuneJobs the operator knows now."""

    def __init__(self, jobs: Callable[[], Iterable[FineTuneJob]], errors: Counter | None = None) -> None:
        self._jobs = jobs
        self._errors = errors

    def describe(self) -> list[Metric]:
        # Names only: registering must not call jobs() before the operator has any.
        return job_metrics([])

    def collect(self) -> list[Metric]:
        return job_metrics(self._jobs(), self._errors)
