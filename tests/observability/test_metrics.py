"""Operator metrics: reconcile instrumentation, per-job series built at scrape time, the /metrics endpoint."""

from __future__ import annotations

import asyncio
import socket
from datetime import timedelta
from typing import Any

import aiohttp
import pytest
from kubetune_operator.api import FineTuneJob, FineTuneJobStatus
from kubetune_operator.metrics import OperatorMetrics, restarts, serve
from observability_helpers import T0, ago, condition, example_job, rfc3339
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families


def running_status(**overrides: Any) -> dict[str, Any]:
    status: dict[str, Any] = {
        "phase": "Running",
        "run": 2,
        "attempt": 2,
        "startTime": ago(T0, hours=3),
        "conditions": [condition("Running", "True", "Training"), condition("Ready", "False", "Training")],
        "workers": {"active": 1, "ready": 1},
        "progress": {
            "step": 1200,
            "totalSteps": 4000,
            "loss": 1.2,
            "evalLoss": 1.3,
            "baseEvalLoss": 1.9,
            "evalSets": [
                {"name": "general", "loss": 2.31, "perplexity": 10.07, "baseLoss": 2.1, "change": 0.1},
                {"name": "code", "loss": 1.5},
            ],
            "tokensPerSecond": 4000.0,
            "etaSeconds": 5400,
            "updatedAt": rfc3339(T0),
        },
        "checkpoint": {"latest": "runs/2/step-1200", "step": 1200, "savedAt": ago(T0, minutes=10)},
        "cost": {"gpuHours": 2.5, "usd": 10.0, "projectedUSD": 18.0},
        "runs": [{"run": 1, "generation": 1, "result": "Succeeded", "attempts": 3}, {"run": 2, "generation": 2}],
    }
    return status | overrides


def series(registry: CollectorRegistry) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in registry.collect()
        for s in family.samples
        if s.name.startswith("kubetune_job")
    }


def job_series(registry: CollectorRegistry, namespace: str, name: str) -> dict[str, float]:
    """The job's series as name{extra labels} -> value."""
    out = {}
    for (metric, labels), value in series(registry).items():
        d = dict(labels)
        if d.pop("namespace", None) == namespace and d.pop("name", None) == name:
            extra = ",".join(f"{k}={v}" for k, v in sorted(d.items()))
            out[f"{metric}{{{extra}}}" if extra else metric] = value
    return out


def test_a_running_job_has_the_documented_series() -> None:
    job = example_job("lora-single-gpu.yaml", "ml-team", status=running_status())
    m = OperatorMetrics(lambda: [job])
    got = job_series(m.registry, "ml-team", "support-bot-lora")
    assert got == {
        "kubetune_job_info{gpu_product=NVIDIA-H100-80GB-HBM3,method=lora,model=hf://Qwen/Qwen2.5-7B-Instruct,run=2}": 1,
        "kubetune_job_status_phase{phase=Pending}": 0,
        "kubetune_job_status_phase{phase=Running}": 1,
        "kubetune_job_status_phase{phase=Succeeded}": 0,
        "kubetune_job_status_phase{phase=Failed}": 0,
        "kubetune_job_status_phase{phase=Suspended}": 0,
        "kubetune_job_status_condition{condition=Running,status=true}": 1,
        "kubetune_job_status_condition{condition=Running,status=false}": 0,
        "kubetune_job_status_condition{condition=Running,status=unknown}": 0,
        "kubetune_job_status_condition{condition=Ready,status=true}": 0,
        "kubetune_job_status_condition{condition=Ready,status=false}": 1,
        "kubetune_job_status_condition{condition=Ready,status=unknown}": 0,
        "kubetune_job_restarts_total": 3,  # run 1 used 3 attempts, run 2 is on its second
        "kubetune_job_gpu_seconds_total": 2.5 * 3600,
        "kubetune_job_cost_usd_total": 10.0,
        "kubetune_job_gpus": 1,
        "kubetune_job_projected_cost_usd": 18.0,
        "kubetune_job_budget_usd": 50.0,
        "kubetune_job_stall_timeout_seconds": 1800,
        "kubetune_job_progress_ratio": 0.3,
        "kubetune_job_loss": 1.2,
        "kubetune_job_eval_loss": 1.3,
        "kubetune_job_base_eval_loss": 1.9,
        "kubetune_job_eval_set_loss{set=general}": 2.31,
        "kubetune_job_eval_set_base_loss{set=general}": 2.1,
        "kubetune_job_eval_set_change_ratio{set=general}": 0.1,
        "kubetune_job_eval_set_loss{set=code}": 1.5,  # no base figure yet: no made-up one
        "kubetune_job_tokens_per_second": 4000.0,
        "kubetune_job_estimated_completion_timestamp_seconds": T0.timestamp() + 5400,
        "kubetune_job_last_progress_timestamp_seconds": T0.timestamp(),
        "kubetune_job_last_checkpoint_timestamp_seconds": (T0 - timedelta(minutes=10)).timestamp(),
        "kubetune_job_start_timestamp_seconds": (T0 - timedelta(hours=3)).timestamp(),
    }


def test_a_new_job_has_only_what_is_known() -> None:
    job = example_job("full-2x8.yaml", "research")  # no status yet: Pending, nothing measured
    m = OperatorMetrics(lambda: [job])
    assert job_series(m.registry, "research", "qwen-7b-full") == {
        "kubetune_job_info{gpu_product=NVIDIA-H100-80GB-HBM3,method=full,model=hf://Qwen/Qwen2.5-7B,run=}": 1,
        "kubetune_job_status_phase{phase=Pending}": 1,
        "kubetune_job_status_phase{phase=Running}": 0,
        "kubetune_job_status_phase{phase=Succeeded}": 0,
        "kubetune_job_status_phase{phase=Failed}": 0,
        "kubetune_job_status_phase{phase=Suspended}": 0,
        "kubetune_job_restarts_total": 0,
        "kubetune_job_gpus": 0,
        "kubetune_job_budget_usd": 2500.0,
        "kubetune_job_budget_gpu_seconds": 800 * 3600,
        "kubetune_job_stall_timeout_seconds": 1200,
    }


def test_series_follow_the_jobs_the_operator_knows() -> None:
    jobs = {
        ("ml-team", "a"): example_job("lora-single-gpu.yaml", "ml-team", "a", running_status()),
        ("ml-team", "b"): example_job("qlora.yaml", "ml-team", "b", running_status(phase="Failed")),
        ("research", "c"): example_job("full-2x8.yaml", "research", "c"),
    }
    m = OperatorMetrics(lambda: jobs.values())
    named = [dict(labels) for (_, labels) in series(m.registry)]
    assert {(d["namespace"], d["name"]) for d in named if "name" in d} == set(jobs)
    assert m.registry.get_sample_value("kubetune_jobs", {"namespace": "ml-team", "phase": "Running"}) == 1
    assert m.registry.get_sample_value("kubetune_jobs", {"namespace": "ml-team", "phase": "Failed"}) == 1
    assert m.registry.get_sample_value("kubetune_jobs", {"namespace": "research", "phase": "Pending"}) == 1
    assert m.registry.get_sample_value("kubetune_jobs", {"namespace": "research", "phase": "Running"}) == 0

    del jobs[("ml-team", "b")]
    assert job_series(m.registry, "ml-team", "b") == {}
    assert m.registry.get_sample_value("kubetune_jobs", {"namespace": "ml-team", "phase": "Failed"}) == 0
    del jobs[("research", "c")]
    assert job_series(m.registry, "research", "c") == {}
    # no job left in the namespace: its per-phase counts go too
    assert m.registry.get_sample_value("kubetune_jobs", {"namespace": "research", "phase": "Pending"}) is None
    assert job_series(m.registry, "ml-team", "a") != {}


BOUNDED_LABELS = {
    "kubetune_jobs": {"namespace", "phase"},
    "kubetune_job_info": {"namespace", "name", "method", "model", "gpu_product", "run"},
    "kubetune_job_status_phase": {"namespace", "name", "phase"},
    "kubetune_job_status_condition": {"namespace", "name", "condition", "status"},
    # at most 8 per job: spec.evaluation.sets
    "kubetune_job_eval_set_loss": {"namespace", "name", "set"},
    "kubetune_job_eval_set_base_loss": {"namespace", "name", "set"},
    "kubetune_job_eval_set_change_ratio": {"namespace", "name", "set"},
}


def test_labels_are_bounded_and_progress_never_adds_series() -> None:
    status = running_status()
    job = example_job("lora-single-gpu.yaml", "ml-team", status=status)
    current = [job]
    m = OperatorMetrics(lambda: current)
    before = series(m.registry)
    for metric, labels in before:
        assert {k for k, _ in labels} <= BOUNDED_LABELS.get(metric, {"namespace", "name"}), metric
        d = dict(labels)
        assert d.get("phase", "Running") in {"Pending", "Running", "Succeeded", "Failed", "Suspended"}
        assert d.get("status", "true") in {"true", "false", "unknown"}
    # thousands of steps, new losses, a new checkpoint and more cost: the same series, other values
    later = running_status(
        progress={**status["progress"], "step": 3900, "loss": 0.7, "updatedAt": ago(T0, hours=-2)},
        checkpoint={"latest": "runs/2/step-3800", "step": 3800, "savedAt": rfc3339(T0)},
        cost={"gpuHours": 9.0, "usd": 36.0, "projectedUSD": 37.0},
    )
    current[0] = example_job("lora-single-gpu.yaml", "ml-team", status=later)
    after = series(m.registry)
    assert after.keys() == before.keys()
    assert after != before


def test_restarts_count_every_remembered_run() -> None:
    job = example_job("lora-single-gpu.yaml", "ns")
    assert restarts(job) == 0
    cases = [
        ({"run": 1, "attempt": 1}, 0),
        ({"run": 1, "attempt": 4}, 3),
        ({"run": 3, "attempt": 2, "runs": [{"run": 1, "generation": 1, "attempts": 2}]}, 2),
        # the run's record may lag behind status.attempt or run ahead of it: the larger counts
        ({"run": 2, "attempt": 1, "runs": [{"run": 2, "generation": 2, "attempts": 3}]}, 2),
    ]
    for status, expected in cases:
        with_status = job.model_copy(update={"status": FineTuneJobStatus.model_validate(status)})
        assert restarts(with_status) == expected, status


def test_a_job_that_cannot_be_turned_into_series_is_left_out_and_counted() -> None:
    good = example_job("lora-single-gpu.yaml", "ml-team", status=running_status())
    broken = FineTuneJob.model_construct(metadata={"namespace": "ml-team", "name": "broken"}, spec=None, status=None)
    m = OperatorMetrics(lambda: [broken, good])
    assert job_series(m.registry, "ml-team", "broken") == {}
    assert job_series(m.registry, "ml-team", "support-bot-lora") != {}
    assert m.registry.get_sample_value("kubetune_operator_collect_errors_total") == 2  # two scrapes so far
    assert m.registry.get_sample_value("kubetune_jobs", {"namespace": "ml-team", "phase": "Running"}) == 1


def test_registering_does_not_ask_for_jobs() -> None:
    def jobs() -> list[FineTuneJob]:
        raise AssertionError("asked for jobs before a scrape")

    OperatorMetrics(jobs)


# -- reconcile instrumentation ------------------------------------------------------------------------


class Retry(Exception):
    pass


def test_reconcile_counts_results_errors_and_latency() -> None:
    m = OperatorMetrics(list)
    with m.reconcile():
        pass
    with pytest.raises(RuntimeError), m.reconcile():
        raise RuntimeError("API server said no")
    with m.reconcile() as r:
        r.result = "requeue_after"
    with pytest.raises(Retry), m.reconcile() as r:  # an announced wait, raised as kopf.TemporaryError would be
        r.result = "requeue"
        raise Retry

    def value(name: str, **labels: str) -> float | None:
        return m.registry.get_sample_value(name, labels)

    assert value("kubetune_operator_reconcile_total", result="success") == 1
    assert value("kubetune_operator_reconcile_total", result="error") == 1
    assert value("kubetune_operator_reconcile_total", result="requeue_after") == 1
    assert value("kubetune_operator_reconcile_total", result="requeue") == 1
    assert value("kubetune_operator_reconcile_errors_total") == 1
    assert value("kubetune_operator_reconcile_time_seconds_count") == 4
    assert value("kubetune_operator_reconcile_time_seconds_bucket", le="+Inf") == 4
    assert value("kubetune_operator_build_info", version="0.1.0") == 1


def test_a_cancelled_reconcile_is_not_counted() -> None:
    m = OperatorMetrics(list)

    async def handler() -> None:
        with m.reconcile():
            await asyncio.sleep(10)

    async def cancel() -> None:
        task = asyncio.create_task(handler())
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancel())
    assert m.registry.get_sample_value("kubetune_operator_reconcile_time_seconds_count") == 0


def test_every_result_exists_before_the_first_reconcile() -> None:
    m = OperatorMetrics(list)
    for result in ("success", "error", "requeue", "requeue_after"):
        assert m.registry.get_sample_value("kubetune_operator_reconcile_total", {"result": result}) == 0


# -- the endpoint ---------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_serve_exposes_the_registry_and_drops_deleted_jobs() -> None:
    jobs = [example_job("lora-single-gpu.yaml", "ml-team", status=running_status())]
    m = OperatorMetrics(lambda: jobs)
    port = free_port()

    async def scenario() -> tuple[str, str, str]:
        runner = await serve(m.registry, "127.0.0.1", port)
        try:
            async with aiohttp.ClientSession() as session:
                url = f"http://127.0.0.1:{port}/metrics"
                async with session.get(url) as r:
                    plain = await r.text()
                jobs.clear()
                async with session.get(url) as r:
                    after_delete = await r.text()
                headers = {"Accept": "application/openmetrics-text; version=1.0.0"}
                async with session.get(url, headers=headers) as r:
                    return plain, after_delete, r.headers["Content-Type"]
        finally:
            await runner.cleanup()

    plain, after_delete, openmetrics_type = asyncio.run(scenario())
    families = {f.name: f for f in text_string_to_metric_families(plain)}
    assert families["kubetune_job_cost_usd"].type == "counter"
    assert families["kubetune_job_info"].samples[0].labels["name"] == "support-bot-lora"
    assert "process_resident_memory_bytes" in families
    assert 'name="support-bot-lora"' in plain
    assert 'name="support-bot-lora"' not in after_delete
    assert "kubetune_operator_reconcile_total" in after_delete
    assert openmetrics_type.startswith("application/openmetrics-text")
