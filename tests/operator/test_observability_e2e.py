"""Observability through the real operator, API server and kwok GPU nodes: rank 0's progress in the status, in
`kubectl get ftj` and in the operator's /metrics; the budget, stall and evaluation-gate policies ending runs.

kwok's pods run nothing, so rank 0 is a FakeTrainer: the trainer's own progress server on a loopback address,
which the test reports as the rank-0 pod's IP. Prices are high ($1 per GPU-second by default, $2 on the kwok
GPU nodes' instance type) and timeouts short, so budgets and stalls trip within seconds.
"""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from e2e_support import (
    Api,
    FakeTrainer,
    Operator,
    condition,
    free_port,
    hanging,
    running_pods,
    wait_events,
    wait_for,
    wait_phase,
)
from kubetune_dev.cluster import LocalCluster
from kubetune_trainer.errors import final_message
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.e2e

TRAINER_PORT = free_port()
SETTINGS = {
    "progressPollIntervalSeconds": 1,  # requeue running jobs every second; poll rank 0 every 0.75-1.5 s
    "trainerMetricsPort": TRAINER_PORT,
    "pricing": {"defaultUsdPerGpuHour": 3600, "byInstanceType": {"p5.48xlarge": 7200}},
}
P5_USD_PER_GPU_HOUR = 7200  # the kwok GPU nodes are labelled node.kubernetes.io/instance-type=p5.48xlarge


def checkpoints(api: Api, ns: str, name: str) -> str:
    """Where a worker sees run 1's checkpoint directory (under the FineTuneJob's uid)."""
    return f"/kubetune/job/{api.ftj(ns, name)['metadata']['uid']}/runs/1/checkpoints"


def run_dir(api: Api, ns: str, name: str, claim: str = "ft-checkpoints") -> str:
    """Run 1's directory on the claim, as the status names it."""
    return f"pvc://{claim}/{ns}/{name}/{api.ftj(ns, name)['metadata']['uid']}/runs/1"


@pytest.fixture(scope="module")
def operator(crd_cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Operator]:
    """This module's operator: fast polling, a trainer port of its own, GPU time priced high."""
    op = Operator(crd_cluster, tmp_path_factory.mktemp("operator"), ["kto-*"], settings=SETTINGS).start()
    yield op
    op.stop()


@pytest.fixture
def trainer() -> Iterator[FakeTrainer]:
    fake = FakeTrainer(TRAINER_PORT)
    yield fake
    fake.close()


def serve_rank0(api: Api, ns: str, name: str, attempt: int, trainer: FakeTrainer) -> list[Any]:
    """Once the attempt's workers run, rank 0 is reported at the fake trainer's address."""
    pods = running_pods(api, ns, name, attempt)
    api.set_pod_ip(ns, pods[0].metadata.name, trainer.host)
    return pods


def metrics(operator: Operator) -> dict[tuple[str, str, str], float]:
    """The operator's per-job samples: (sample name, namespace, name) -> value; plus reconcile counts under ("", "")."""
    with urllib.request.urlopen(f"http://127.0.0.1:{operator.metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = s.labels.get("result") or s.labels.get("name", "")
            samples[(s.name, s.labels.get("namespace", ""), key)] = s.value
    return samples


def test_progress_reaches_the_status_kubectl_get_and_the_operator_metrics(
    api: Api, operator: Operator, ns: str, trainer: FakeTrainer
) -> None:
    api.apply(ns, "prog", hanging())
    trainer.train(
        120, total=400, loss=1.5, eval_loss=1.6, eta_seconds=600, checkpoint=f"{checkpoints(api, ns, 'prog')}/step-120"
    )
    serve_rank0(api, ns, "prog", 1, trainer)

    def progressed(step: int) -> dict[str, Any]:
        status = api.status(ns, "prog")
        return status if (status.get("progress") or {}).get("step") == step else {}

    status = wait_for(lambda: progressed(120), 30, "the trainer's step 120 in the status", operator.tail)
    progress = status["progress"]
    assert {k: v for k, v in progress.items() if k != "updatedAt"} == {
        "step": 120,
        "totalSteps": 400,
        "percent": 30,
        "epoch": 0.3,
        "loss": 1.5,
        "evalLoss": 1.6,
        "tokensPerSecond": 8192.0,
        "mfu": 0.35,
        "eta": "10m",
        "etaSeconds": 600,
        "history": [{"step": 120, "loss": 1.5, "evalLoss": 1.6}],
        "pinned": [],  # no hf:// sources to pin
    }
    checkpoint = status["checkpoint"]
    assert (checkpoint["latest"], checkpoint["step"]) == (
        f"{run_dir(api, ns, 'prog')}/checkpoints/step-120",
        120,
    )
    cost = status["cost"]
    # 2 GPUs at $2 per GPU-second (the node's instance type): the 10 minutes left add $2400 to what was spent
    assert cost["usd"] > 0 and cost["projectedUSD"] == pytest.approx(cost["usd"] + 2400, abs=60)

    # kubectl get: every printer column filled
    lines = api.cluster.kubectl("get", "ftj", "prog", "-n", ns).stdout.splitlines()
    assert lines[0].split() == ["NAME", "PHASE", "PROGRESS%", "LOSS", "ETA", "COST", "AGE"]
    name, phase, percent, loss, eta, usd, _age = lines[1].split()
    assert (name, phase, percent, loss, eta) == ("prog", "Running", "30", "1.5", "10m")
    assert float(usd) > 0

    # the operator's /metrics: the job's series from the same status, and its own reconciles
    m = metrics(operator)
    assert m[("kubetune_job_info", ns, "prog")] == 1
    assert m[("kubetune_job_progress_ratio", ns, "prog")] == 0.3
    assert (m[("kubetune_job_loss", ns, "prog")], m[("kubetune_job_eval_loss", ns, "prog")]) == (1.5, 1.6)
    assert m[("kubetune_job_gpus", ns, "prog")] == 2
    assert m[("kubetune_job_cost_usd_total", ns, "prog")] > 0
    assert m[("kubetune_job_projected_cost_usd", ns, "prog")] > m[("kubetune_job_cost_usd_total", ns, "prog")]
    assert m[("kubetune_operator_reconcile_total", "", "requeue_after")] > 0

    # training goes on: status and metrics follow
    trainer.train(200, total=400, loss=1.2, eta_seconds=300)
    status = wait_for(lambda: progressed(200), 30, "step 200 in the status", operator.tail)
    assert (status["progress"]["percent"], status["progress"]["eta"]) == (50, "5m")
    wait_for(lambda: metrics(operator).get(("kubetune_job_progress_ratio", ns, "prog")) == 0.5, 30, "ratio 0.5")

    # a deleted job leaves no series behind
    api.delete_ftj(ns, "prog")

    def gone() -> bool:
        return not any(key[1:] == (ns, "prog") for key in metrics(operator))

    wait_for(gone, 30, "the job's series to go")


def test_while_nothing_happens_the_status_stays_and_the_metrics_keep_counting(
    api: Api, operator: Operator, ns: str
) -> None:
    """A running job whose trainer reports nothing new: its cost grows every second, but that is no news. The
    status is not rewritten (the operator reconciles the job every second here); /metrics computes the cost from
    the pods when scraped."""
    api.apply(ns, "idle", hanging())
    running_pods(api, ns, "idle", 1)
    wait_phase(api, operator, ns, "idle", "Running")
    wait_for(lambda: api.status(ns, "idle")["workers"]["ready"] == 2, 30, "both workers ready in the status")
    before = api.ftj(ns, "idle")
    spent = metrics(operator)[("kubetune_job_gpu_seconds_total", ns, "idle")]
    time.sleep(6)
    after = api.ftj(ns, "idle")
    assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"], (
        before["status"],
        after["status"],
    )
    # 2 GPUs for the 6 seconds more
    assert metrics(operator)[("kubetune_job_gpu_seconds_total", ns, "idle")] >= spent + 2 * 5


@pytest.mark.parametrize(
    ("budget", "message"),
    [
        ({"maxCostUSD": 20}, "reached budget.maxCostUSD $20.00"),  # 2 GPUs at $2/s: about 5 s
        ({"maxGpuHours": 0.003}, "GPU-hours used reached budget.maxGpuHours 0.003"),  # 10.8 GPU-seconds: about 5 s
    ],
    ids=["cost", "gpu-hours"],
)
def test_over_budget_the_workers_are_stopped_and_the_run_fails(
    api: Api, operator: Operator, ns: str, budget: dict[str, float], message: str
) -> None:
    api.apply(ns, "budget", hanging(budget=budget))
    status = wait_phase(api, operator, ns, "budget", "Failed")
    failed = condition(status, "Failed")
    assert failed["reason"] == "BudgetExceeded" and message in failed["message"], failed
    assert [a["reason"] for a in status["attempts"]] == ["BudgetExceeded"]
    # asked to checkpoint and stop: the Job is deleted (SIGTERM to the workers)
    wait_for(lambda: api.jobs(ns, "budget") == [], 30, "the attempt's Job to go", operator.tail)
    status = api.status(ns, "budget")
    [attempt], [run] = status["attempts"], status["runs"]
    # priced by the node the pods ran on (the kwok GPU nodes' instance type), not the default price
    assert attempt["costUSD"] / attempt["gpuHours"] == pytest.approx(P5_USD_PER_GPU_HOUR, rel=0.05)
    assert (run["result"], run["reason"]) == ("Failed", "BudgetExceeded")
    assert run["costUSD"] == pytest.approx(attempt["costUSD"], abs=0.01)  # its only attempt (cents in the run)
    wait_events(api, ns, "budget", {"BudgetExceeded"})


def test_a_stalled_trainer_is_restarted_and_stalls_count_as_restarts(
    api: Api, operator: Operator, ns: str, trainer: FakeTrainer
) -> None:
    api.apply(ns, "stall", hanging(runPolicy={"maxRestarts": 1, "backoffSeconds": 1, "stallTimeoutSeconds": 5}))
    trainer.train(40, total=400, loss=2.0, checkpoint=f"{checkpoints(api, ns, 'stall')}/step-40")
    serve_rank0(api, ns, "stall", 1, trainer)

    def checkpointed() -> dict[str, Any]:
        status = api.status(ns, "stall")
        return status if (status.get("checkpoint") or {}).get("step") == 40 else {}

    wait_for(checkpointed, 30, "the step-40 checkpoint in the status", operator.tail)

    # no new step for 5 s: attempt 1 ends Stalled, attempt 2 resumes (from that checkpoint: the same run's directory)
    running_pods(api, ns, "stall", 2)
    status = api.status(ns, "stall")
    stalled = status["attempts"][0]
    assert stalled["reason"] == "Stalled"
    assert "(at step 40; runPolicy.stallTimeoutSeconds is 5)" in stalled["message"]
    assert status["checkpoint"]["latest"] == f"{run_dir(api, ns, 'stall')}/checkpoints/step-40"

    # attempt 2's rank 0 never answers: it stalls too, and that was the last restart
    status = wait_phase(api, operator, ns, "stall", "Failed")
    assert [a["reason"] for a in status["attempts"]] == ["Stalled", "Stalled"]
    failed = condition(status, "Failed")
    assert failed["reason"] == "Stalled" and "no restarts left (runPolicy.maxRestarts=1)" in failed["message"]
    wait_events(api, ns, "stall", {"Stalled"})


def test_over_its_eval_gate_a_finished_run_fails_and_its_output_is_kept(
    api: Api, operator: Operator, ns: str, trainer: FakeTrainer
) -> None:
    api.apply(ns, "gate", hanging(dataset={"evalSplit": 0.1}, evaluation={"maxEvalLoss": 1.0}))
    trainer.train(400, total=400, loss=1.1, eval_loss=1.4, eta_seconds=0)
    pods = serve_rank0(api, ns, "gate", 1, trainer)
    reported = lambda: (api.status(ns, "gate").get("progress") or {}).get("evalLoss") == 1.4  # noqa: E731
    wait_for(reported, 30, "the final eval loss in the status", operator.tail)
    for pod in pods:
        api.end_pod(ns, pod.metadata.name, 0, reason="Completed")

    status = wait_phase(api, operator, ns, "gate", "Failed")
    output = run_dir(api, ns, "gate")
    failed = condition(status, "Failed")
    assert failed["reason"] == "EvalGateFailed"
    assert failed["message"] == (
        f"final evaluation loss 1.4 is above evaluation.maxEvalLoss 1; the output at {output} is kept, not promoted"
    )
    assert status["output"] == {"path": output, "promoted": False}
    assert status["attempts"][-1]["reason"] == "Completed"
    [run] = status["runs"]
    assert (run["result"], run["reason"], run["output"], run["finalEvalLoss"]) == (
        "Failed",
        "EvalGateFailed",
        output,
        1.4,
    )
    wait_events(api, ns, "gate", {"EvalGateFailed"})
    # the workers finished: their Job (and logs) stay, as after a success
    assert [j.metadata.name for j in api.jobs(ns, "gate")] == ["gate-r1-a1"]


def test_final_figures_reach_the_gate_and_the_status_when_the_run_ends_between_polls(
    api: Api, operator: Operator, ns: str, trainer: FakeTrainer
) -> None:
    api.apply(ns, "ends", hanging(dataset={"evalSplit": 0.1}, evaluation={"maxEvalLoss": 1.0}))
    trainer.train(380, total=400, loss=1.3)  # the last poll: before the final evaluation
    pods = serve_rank0(api, ns, "ends", 1, trainer)
    polled = lambda: (api.status(ns, "ends").get("progress") or {}).get("step") == 380  # noqa: E731
    wait_for(polled, 30, "step 380 in the status", operator.tail)
    # the run evaluates, exports and exits before the next poll; rank 0's launcher leaves the final figures
    final = {"steps": 400, "trainLoss": 1.1, "evalLoss": 0.9, "evalPerplexity": 2.46, "tokensTotal": 1638400}
    message = final_message({**final, "epochs": 1.0}, "/kubetune/output/runs/1")
    for pod in pods:
        rank0 = pod.metadata.name == pods[0].metadata.name
        api.end_pod(ns, pod.metadata.name, 0, reason="Completed", message=message if rank0 else "")

    status = wait_phase(api, operator, ns, "ends", "Succeeded")
    progress = status["progress"]
    assert (progress["step"], progress["percent"], progress["loss"], progress["evalLoss"]) == (400, 100, 1.1, 0.9)
    assert progress["history"][-1] == {"step": 400, "loss": 1.1, "evalLoss": 0.9}
    [run] = status["runs"]
    assert (run["result"], run["finalLoss"], run["finalEvalLoss"]) == ("Succeeded", 1.1, 0.9)
    assert status["output"] == {"path": run_dir(api, ns, "ends"), "promoted": True}
