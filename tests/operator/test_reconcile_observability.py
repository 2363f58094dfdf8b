"""The pure reconcile with what observability adds: rank 0's reports in status.progress / status.checkpoint,
the run's cost from its pods across attempts, and the budget, stall and evaluation-gate policies acting on a
run (which Job is deleted, which reason the run ends with, what is kept)."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime
from typing import Any

import pytest
from ftj_builders import SETTINGS, T0, UID, condition, edited, exited, ftj, job_state, later, pod, reasons, spec, step
from kubetune_operator.api import FineTuneJob
from kubetune_operator.api.status import (
    MAX_ATTEMPTS,
    CheckpointStatus,
    CostStatus,
    EvalSetResult,
    HistoryPoint,
    OutputStatus,
    Progress,
    SetupProgress,
)
from kubetune_operator.cost import PodUsage, Pricing
from kubetune_operator.observed import FinalMetrics, FinalReport, FinalSet, Observed
from kubetune_operator.progress import TrainerReport, TrainerView, parse_report
from kubetune_operator.reconcile import Deletion, with_running_figures
from kubetune_operator.settings import OperatorSettings

OUTPUT = f"pvc://ft-checkpoints/ml/sft/{UID}/runs/1"
RUNNING = Observed(jobs=(job_state("sft-r1-a1"),), pods=(pod(0), pod(1)))  # 2 pods x 8 GPUs since T0
JOB_1 = Deletion("Job", "sft-r1-a1")


def started(spec_: dict[str, Any] | None = None) -> FineTuneJob:
    _, job = step(ftj(spec_))
    return job


def report(**fields: Any) -> TrainerReport:
    doc = {
        "state": "training",
        "step": 120,
        "totalSteps": 400,
        "epoch": 0.3,
        "loss": 1.5,
        "evalLoss": 1.6,
        "tokensPerSecond": 900.0,
        "mfu": 0.4,
        "etaSeconds": 1800,
        "updatedAt": "2026-11-27T09:05:00Z",
        "checkpoint": {
            "step": 100,
            "path": f"/kubetune/job/{UID}/runs/1/checkpoints/step-100",
            "savedAt": "2026-11-27T09:04:00Z",
        },
        "history": [{"step": 100, "loss": 1.6, "evalLoss": 1.7}, {"step": 120, "loss": 1.5}],
    }
    parsed = parse_report({**doc, **fields})
    assert parsed is not None
    return parsed


def polled(rep: TrainerReport | None, observed: Observed = RUNNING, attempt: int = 1, since: datetime = T0) -> Observed:
    """Rank 0 polled, its latest report `rep` seen as progress when it was stamped."""
    advanced_at = rep.updated_at if rep else None
    view = TrainerView(run=1, attempt=attempt, watching_since=since, report=rep, advanced_at=advanced_at)
    return replace(observed, trainer=view)


def completed(at: datetime, final: FinalReport | None = None) -> Observed:
    """The attempt's Job complete; rank 0 left `final` as its termination message."""
    finished = exited(0, "Completed", at=at)
    return Observed(
        jobs=(job_state("sft-r1-a1", complete=True, completion_time=at),),
        pods=(
            pod(0, phase="Succeeded", termination=replace(finished, final=final)),
            pod(1, phase="Succeeded", termination=finished),
        ),
    )


def final(**figures: Any) -> FinalReport:
    metrics = {"steps": 400, "train_loss": 1.1, "eval_loss": 0.8, "tokens_total": 10**6, "epochs": 1.0, **figures}
    return FinalReport(final_metrics=FinalMetrics(**metrics), output="/kubetune/output/runs/1")


# ----------------------------------------------------------------------------------------------
# progress
# ----------------------------------------------------------------------------------------------


def test_rank_0_report_lands_in_the_status_and_a_new_run_starts_afresh() -> None:
    _, job = step(started(), polled(report()), later(300))
    assert job.status is not None
    assert job.status.progress == Progress(
        step=120,
        total_steps=400,
        percent=30,
        epoch=0.3,
        loss=1.5,
        eval_loss=1.6,
        tokens_per_second=900.0,
        mfu=0.4,
        eta="30m",
        eta_seconds=1800,
        updated_at=later(300),
        history=[HistoryPoint(step=100, loss=1.6, eval_loss=1.7), HistoryPoint(step=120, loss=1.5)],
    )
    assert job.status.checkpoint == CheckpointStatus(
        latest=f"pvc://ft-checkpoints/ml/sft/{UID}/runs/1/checkpoints/step-100", step=100, saved_at=later(240)
    )
    # 16 GPUs for 5 minutes at the default $2, and half an hour more at that rate
    assert job.status.cost == CostStatus(gpu_hours=1.333, usd=2.67, projected_usd=18.67)

    # a report from another attempt's rank 0 (the poller has not caught up) changes nothing
    _, after = step(job, polled(report(step=5), attempt=2), later(310))
    assert after.status is not None and after.status.progress == job.status.progress

    _, job = step(edited(job, spec(training={"epochs": 2})), Observed(), later(320))
    assert job.status is not None
    assert (job.status.progress, job.status.checkpoint) == (None, None)
    assert job.status.cost == CostStatus(gpu_hours=0.0, usd=0.0)  # run 2's attempt 1 was just created
    first = job.status.runs[0]
    assert (first.result, first.final_loss, first.final_eval_loss) == ("Cancelled", 1.5, 1.6)
    assert (first.gpu_hours, first.cost_usd) == (1.333, 2.67)  # 16 GPUs for 300 s, when its pods were last seen


# ----------------------------------------------------------------------------------------------
# cost
# ----------------------------------------------------------------------------------------------


def test_cost_over_attempts_follows_the_pods_and_survives_them() -> None:
    job = started(spec(runPolicy={"maxRestarts": 2, "backoffSeconds": 300}))
    _, job = step(job, RUNNING, later(1800))
    assert job.status is not None and job.status.cost == CostStatus(gpu_hours=8.0, usd=16.0)

    # worker 1 fails after an hour: attempt 1 ends with what its pods used
    failed = exited(1, at=later(3600))
    ending = replace(RUNNING, pods=(pod(0), pod(1, phase="Failed", termination=failed)))
    _, job = step(job, ending, later(3600))
    assert job.status is not None
    first = job.status.attempts[0]
    assert (first.reason, first.gpu_hours, first.cost_usd) == ("Error", 16.0, 32.0)

    # worker 0 checkpoints for a minute after SIGTERM: the record follows it, and keeps that once it is gone
    terminating = replace(ending, pods=(replace(pod(0), deleting=True), ending.pods[1]))
    _, job = step(job, terminating, later(3660))
    _, job = step(job, Observed(), later(3700))
    assert job.status is not None
    assert (job.status.attempts[0].gpu_hours, job.status.attempts[0].cost_usd) == (16.1333, 32.2667)
    assert job.status.cost == CostStatus(gpu_hours=16.133, usd=32.27)

    # attempt 2 runs an hour on p5 nodes priced by their instance type
    priced = OperatorSettings(pricing=Pricing(by_instance_type={"p5.48xlarge": 3.0}))
    _, job = step(job, Observed(), later(3900), priced)
    assert job.status is not None and job.status.attempt == 2
    pods = tuple(
        pod(i, attempt=2, usage=PodUsage(gpus=8, node_name=f"gpu-node-{i}", start=later(3900), end=None))
        for i in (0, 1)
    )
    p5 = {f"gpu-node-{i}": {"node.kubernetes.io/instance-type": "p5.48xlarge"} for i in (0, 1)}
    running = Observed(jobs=(job_state("sft-r1-a2", attempt=2),), pods=pods, nodes=p5)
    _, job = step(job, running, later(7500), priced)
    assert job.status is not None
    assert job.status.cost == CostStatus(gpu_hours=32.133, usd=80.27)  # + 16 GPU-hours at $3


def test_running_figures_are_computed_from_the_pods_when_asked_not_read_from_the_status() -> None:
    """What the metrics report: the status holds the cost as of its last write, minutes old perhaps."""
    _, job = step(started(), RUNNING, later(60))
    assert job.status is not None and job.status.cost == CostStatus(gpu_hours=0.267, usd=0.53)
    now = with_running_figures(job, RUNNING, SETTINGS, later(1800))
    assert now.status is not None and now.status.cost == CostStatus(gpu_hours=8.0, usd=16.0)
    assert now.status.workers is not None and (now.status.workers.active, now.status.workers.ready) == (2, 2)
    assert now.status.conditions == job.status.conditions  # nothing else is decided
    assert with_running_figures(ftj(), RUNNING, SETTINGS, T0) == ftj()  # nothing started, nothing to count


# ----------------------------------------------------------------------------------------------
# budget
# ----------------------------------------------------------------------------------------------


def test_over_budget_the_workers_are_stopped_and_the_run_fails_with_budget_exceeded() -> None:
    job = started(spec(budget={"maxCostUSD": 30}))
    plan, job = step(job, RUNNING, later(3000))
    assert JOB_1 not in plan.delete  # $26.67 so far

    plan, job = step(job, RUNNING, later(3600))
    assert job.status is not None
    assert job.status.phase == "Failed"
    assert condition(job, "Failed") == (
        "True",
        "BudgetExceeded",
        "accrued cost $32.00 reached budget.maxCostUSD $30.00",
    )
    assert JOB_1 in plan.delete  # SIGTERM: the workers checkpoint, then stop
    attempt = job.status.attempts[0]
    assert (attempt.reason, attempt.cost_usd) == ("BudgetExceeded", 32.0)
    run = job.status.runs[0]
    assert (run.result, run.reason, run.cost_usd, run.gpu_hours) == ("Failed", "BudgetExceeded", 32.0, 16.0)
    assert "BudgetExceeded" in reasons(plan)


def test_gpu_hours_and_projected_cost_are_budgets_too() -> None:
    job = started(spec(budget={"maxGpuHours": 10}))
    _, job = step(job, RUNNING, later(2250))  # 10 GPU-hours
    assert condition(job, "Failed")[1:] == ("BudgetExceeded", "10 GPU-hours used reached budget.maxGpuHours 10")

    job = started(spec(budget={"maxCostUSD": 100}))
    _, job = step(job, polled(report(etaSeconds=4 * 3600)), later(60))  # $0.53 so far, 4 h x $32/h to go
    assert condition(job, "Failed")[1:] == (
        "BudgetExceeded",
        "projected cost $128.53 ($0.53 so far + the time left at the current rate) is over budget.maxCostUSD $100.00",
    )
    assert job.status is not None and job.status.cost == CostStatus(gpu_hours=0.267, usd=0.53, projected_usd=0.53)


# ----------------------------------------------------------------------------------------------
# stall
# ----------------------------------------------------------------------------------------------


def test_a_stalled_attempt_restarts_from_its_checkpoint_and_stalls_count_as_restarts() -> None:
    job = started(spec(runPolicy={"maxRestarts": 1, "backoffSeconds": 10, "stallTimeoutSeconds": 600}))
    quiet = polled(report(updatedAt="2026-11-27T09:01:00Z"))  # step 120, last at T0 + 60 s
    plan, job = step(job, quiet, later(659))
    assert job.status is not None and job.status.phase != "Failed" and JOB_1 not in plan.delete

    plan, job = step(job, quiet, later(660))
    assert job.status is not None
    stalled = job.status.attempts[0]
    assert stalled.reason == "Stalled"
    assert stalled.message == "no new training step for 10m (at step 120; runPolicy.stallTimeoutSeconds is 600)"
    assert JOB_1 in plan.delete
    assert condition(job, "Reconciling")[1] == "BackingOff"
    assert "Stalled" in reasons(plan)

    # attempt 2 resumes; its rank 0 never reports: it stalls too, and no restart is left
    _, job = step(job, Observed(), later(700))
    assert job.status is not None and job.status.attempt == 2
    second = replace(RUNNING, jobs=(job_state("sft-r1-a2", attempt=2),), pods=(pod(0, attempt=2), pod(1, attempt=2)))
    _, job = step(job, polled(None, second, attempt=2, since=later(710)), later(1309))
    assert job.status is not None and job.status.phase != "Failed"
    _, job = step(job, polled(None, second, attempt=2, since=later(710)), later(1310))
    assert job.status is not None and job.status.phase == "Failed"
    assert condition(job, "Failed")[1] == "Stalled"
    assert "no restarts left (runPolicy.maxRestarts=1)" in condition(job, "Failed")[2]


def test_no_stall_while_rank_0_is_not_running() -> None:
    job = started(spec(runPolicy={"stallTimeoutSeconds": 60}))
    pending = replace(RUNNING, pods=(pod(0, phase="Pending"), pod(1, phase="Pending")))
    _, job = step(job, pending, later(3600))  # no trainer view: the poller has nothing to poll
    assert job.status is not None and job.status.attempts[0].reason is None


# ----------------------------------------------------------------------------------------------
# evaluation gate
# ----------------------------------------------------------------------------------------------

GATED = spec(dataset={"evalSplit": 0.1}, evaluation={"maxEvalLoss": 1.0})


def test_a_run_over_its_eval_gate_fails_and_keeps_its_output_unpromoted() -> None:
    _, job = step(started(GATED), polled(report(evalLoss=1.5)), later(60))
    plan, job = step(job, completed(later(120)), later(121))
    assert job.status is not None
    assert job.status.phase == "Failed"
    failed = condition(job, "Failed")
    assert failed[:2] == ("True", "EvalGateFailed")
    assert failed[2] == (
        f"final evaluation loss 1.5 is above evaluation.maxEvalLoss 1; the output at {OUTPUT} is kept, not promoted"
    )
    assert job.status.output == OutputStatus(path=OUTPUT, promoted=False)
    assert job.status.attempts[-1].reason == "Completed"
    run = job.status.runs[0]
    assert (run.result, run.reason, run.output, run.final_eval_loss) == (
        "Failed",
        "EvalGateFailed",
        OUTPUT,
        1.5,
    )
    assert run.completion_time == later(120)
    assert JOB_1 not in plan.delete  # the finished workers keep their logs, as for a success
    assert "EvalGateFailed" in reasons(plan)

    # it stays failed
    plan, again = step(job, completed(later(120)), later(500))
    assert again.status is not None and condition(again, "Failed")[1] == "EvalGateFailed" and plan.events == ()


def test_a_run_within_its_eval_gate_succeeds_and_is_promoted() -> None:
    _, job = step(started(GATED), polled(report(evalLoss=0.8)), later(60))
    _, job = step(job, completed(later(120)), later(121))
    assert job.status is not None and job.status.phase == "Succeeded"
    assert job.status.output == OutputStatus(path=OUTPUT, promoted=True)
    assert job.status.runs[0].cost_usd == job.status.cost.usd if job.status.cost else False
    assert SETTINGS.pricing.default_usd_per_gpu_hour == 2.0


@pytest.mark.parametrize(
    ("final_eval_loss", "phase"),
    [(0.8, "Succeeded"), (1.5, "Failed")],
)
def test_the_gate_judges_rank_0s_final_report_when_the_run_ended_between_polls(
    final_eval_loss: float, phase: str
) -> None:
    # the last poll saw step 380, before the final evaluation; the run then ended before the next poll
    _, job = step(
        started(GATED), polled(report(step=380, evalLoss=1.2, history=[{"step": 380, "loss": 1.3}])), later(60)
    )
    _, job = step(job, completed(later(120), final(eval_loss=final_eval_loss)), later(121))
    assert job.status is not None and job.status.phase == phase
    assert job.status.progress == Progress(
        step=400,
        total_steps=400,
        percent=100,
        epoch=1.0,
        loss=1.1,
        eval_loss=final_eval_loss,
        mfu=0.4,
        eta="0s",
        eta_seconds=0,
        updated_at=later(120),
        history=[HistoryPoint(step=380, loss=1.3), HistoryPoint(step=400, loss=1.1, eval_loss=final_eval_loss)],
    )
    run = job.status.runs[0]
    assert (run.final_loss, run.final_eval_loss) == (1.1, final_eval_loss)
    if phase == "Failed":
        assert condition(job, "Failed")[1] == "EvalGateFailed"


def test_a_final_report_without_an_evaluation_loss_fails_the_gate() -> None:
    _, job = step(started(GATED), polled(report(evalLoss=None)), later(60))
    _, job = step(job, completed(later(120), final(eval_loss=None)), later(121))  # e.g. a NaN eval loss
    assert job.status is not None and job.status.progress is not None and job.status.progress.eval_loss is None
    assert condition(job, "Failed")[1:] == (
        "EvalGateFailed",
        "no final evaluation loss was reported; evaluation.maxEvalLoss is 1; "
        f"the output at {OUTPUT} is kept, not promoted",
    )


def test_a_complete_job_waits_briefly_for_rank_0s_pod_to_show_its_report() -> None:
    _, job = step(started(GATED), polled(report(evalLoss=None)), later(60))
    done = completed(later(120), final(eval_loss=0.8))
    late = replace(done, pods=(pod(0), done.pods[1]))  # the Job's event came first; rank 0's is on its way
    plan, job = step(job, late, later(121))
    assert job.status is not None and job.status.phase == "Running"
    assert condition(job, "Running")[1] == "Finishing" and plan.requeue_after == 1.0
    _, finished = step(job, done, later(122))
    assert finished.status is not None and finished.status.phase == "Succeeded"
    assert finished.status.runs[0].final_eval_loss == 0.8
    # a pod event that never comes holds the result up 10 s at most
    _, given_up = step(job, late, later(131))
    assert given_up.status is not None and condition(given_up, "Failed")[1] == "EvalGateFailed"


def test_the_runs_cost_counts_the_attempts_dropped_from_its_bounded_list() -> None:
    job = started()
    unsuspended, suspended = spec(runPolicy={"suspend": False}), spec(runPolicy={"suspend": True})
    cycles = MAX_ATTEMPTS + 49
    for n in range(1, cycles + 1):
        t = (n - 1) * 100
        # attempt n's two 8-GPU workers run for a minute, then the run is suspended and they go
        pods = tuple(
            pod(i, attempt=n, usage=PodUsage(gpus=8, node_name=f"gpu-node-{i}", start=later(t), end=None))
            for i in (0, 1)
        )
        _, job = step(job, Observed(jobs=(job_state(f"sft-r1-a{n}", attempt=n),), pods=pods), later(t + 60))
        _, job = step(edited(job, suspended), Observed(), later(t + 61))
        _, job = step(edited(job, unsuspended), Observed(), later(t + 62))
    assert job.status is not None and job.status.attempt == cycles + 1
    assert len(job.status.attempts) == MAX_ATTEMPTS and job.status.attempts[0].attempt == cycles + 1 - MAX_ATTEMPTS + 1
    dropped = job.status.dropped_attempts
    assert dropped is not None and dropped.count == cycles + 1 - MAX_ATTEMPTS
    # every attempt's minute on 16 GPUs at $2 per GPU-hour is still in the run's cost
    assert job.status.cost is not None
    assert job.status.cost.gpu_hours == pytest.approx(cycles * 16 / 60, abs=0.01)
    assert job.status.cost.usd == pytest.approx(cycles * 16 / 60 * 2, abs=0.02)

    # a new run starts afresh
    _, job = step(edited(job, spec(training={"epochs": 2})), Observed(), later(cycles * 100))
    assert job.status is not None and job.status.dropped_attempts is None
    first = job.status.runs[0]
    assert first.attempts == cycles + 1 and first.cost_usd == pytest.approx(cycles * 16 / 60 * 2, abs=0.02)


# ----------------------------------------------------------------------------------------------
# setup progress and the stall clock
# ----------------------------------------------------------------------------------------------


def loading(done: int, stamped: datetime) -> TrainerReport:
    setup = {"stage": "downloading", "done": done, "total": 8 << 30, "unit": "bytes"}
    return report(state="loading", step=0, totalSteps=None, setup=setup, updatedAt=stamped.isoformat(), history=[])


def test_a_setup_that_advances_is_shown_and_never_judged_a_stall() -> None:
    job = started(spec(runPolicy={"stallTimeoutSeconds": 600}))
    # A download that takes 50 minutes, 10 % every 5 minutes: far past the stall timeout, always advancing.
    for minute in range(5, 55, 5):
        at = later(minute * 60)
        _, job = step(job, polled(loading((minute // 5) * (8 << 30) // 10, at)), at)
        assert job.status is not None and job.status.attempts[0].reason is None, minute
    assert job.status is not None and job.status.progress is not None
    assert job.status.progress.setup == SetupProgress(stage="downloading", done=8 << 30, total=8 << 30, unit="bytes")
    assert condition(job, "Running")[2] == "all 2 workers running; setting up: downloading 8.0 GiB of 8.0 GiB"


def test_a_setup_that_stops_advancing_is_a_stall_though_the_trainer_still_answers() -> None:
    job = started(spec(runPolicy={"stallTimeoutSeconds": 600, "maxRestarts": 1}))
    stuck = loading(1 << 30, later(60))
    seen = replace(polled(stuck), trainer=TrainerView(1, 1, T0, stuck, advanced_at=later(60)))
    _, job = step(job, seen, later(659))
    assert job.status is not None and job.status.attempts[0].reason is None
    # Its reports keep a fresh stamp (it is alive), but the download is where it was: the poller saw no progress.
    alive = replace(seen, trainer=TrainerView(1, 1, T0, loading(1 << 30, later(650)), advanced_at=later(60)))
    plan, job = step(job, alive, later(660))
    assert job.status is not None
    attempt = job.status.attempts[0]
    assert attempt.reason == "Stalled"
    assert attempt.message == (
        "no setup progress for 10m (loading: downloading 1.0 GiB of 8.0 GiB; runPolicy.stallTimeoutSeconds is 600)"
    )
    assert JOB_1 in plan.delete


# ----------------------------------------------------------------------------------------------
# checkpoints that are not this training's
# ----------------------------------------------------------------------------------------------


def test_checkpoints_the_trainer_ignored_are_listed_named_in_a_condition_and_announced_once() -> None:
    strangers = [
        {"path": "/kubetune/job/x/runs/1/checkpoints/step-00000200", "reason": "another FineTuneJob object (uid x)"},
        {"path": "/kubetune/job/x/runs/1/checkpoints/.tmp-step-00000300", "reason": "an unfinished save"},
    ]
    plan, job = step(started(), polled(report(ignoredCheckpoints=strangers)), later(60))
    assert job.status is not None and job.status.checkpoint is not None
    uri = "pvc://ft-checkpoints/ml/sft/x/runs/1/checkpoints"
    assert [(i.path, i.reason) for i in job.status.checkpoint.ignored] == [
        (f"{uri}/step-00000200", "another FineTuneJob object (uid x)"),
        (f"{uri}/.tmp-step-00000300", "an unfinished save"),
    ]
    status, reason, message = condition(job, "CheckpointsIgnored")
    assert (status, reason) == ("True", "NotThisTraining")
    assert f"{uri}/step-00000200 (another FineTuneJob object (uid x))" in message
    warnings = [e for e in plan.events if e.reason == "CheckpointsIgnored"]
    assert len(warnings) == 1 and warnings[0].type == "Warning" and f"{uri}/.tmp-step-00000300" in warnings[0].message
    plan, job = step(job, polled(report(ignoredCheckpoints=strangers)), later(90))
    assert "CheckpointsIgnored" not in reasons(plan)
    # A new run starts afresh.
    _, job = step(edited(job, spec(training={"epochs": 2})), Observed(), later(120))
    assert job.status is not None and job.status.checkpoint is None
    assert condition(job, "CheckpointsIgnored")[0] == "False"


FORGETTING_GATE = spec(
    evaluation={"sets": [{"name": "general", "source": "pvc://datasets/general.jsonl", "maxIncrease": 0.1}]}
)


def test_an_evaluation_set_that_rose_past_its_limit_fails_the_run_naming_the_set_and_figures() -> None:
    base = {"general": {"loss": 2.0, "perplexity": 7.389, "baseLoss": 2.0, "change": 0.0}}
    _, job = step(started(FORGETTING_GATE), polled(report(evalLoss=None, evalSets=base)), later(60))
    assert job.status is not None and job.status.progress is not None
    assert job.status.progress.eval_sets == [
        EvalSetResult(name="general", loss=2.0, perplexity=7.389, base_loss=2.0, change=0.0)
    ]
    ended = final(eval_loss=None, eval_sets={"general": FinalSet(loss=2.5, base_loss=2.0)})
    _, job = step(job, completed(later(120), ended), later(121))
    assert job.status is not None and job.status.phase == "Failed"
    assert condition(job, "Failed")[1:] == (
        "EvalGateFailed",
        "evaluation set general: final loss 2.5 is 25.0% above the base model's 2; "
        f"evaluation.sets[general].maxIncrease is 0.1 (10%); the output at {OUTPUT} is kept, not promoted",
    )
    run = job.status.runs[0]
    assert run.final_eval_sets == [
        EvalSetResult(name="general", loss=2.5, perplexity=12.1825, base_loss=2.0, change=0.25)
    ]
    assert job.status.progress is not None and job.status.progress.history[-1].eval_sets == {"general": 2.5}


def test_an_evaluation_set_within_its_limit_passes() -> None:
    _, job = step(started(FORGETTING_GATE), polled(report(evalLoss=None)), later(60))
    ended = final(eval_loss=None, eval_sets={"general": FinalSet(loss=2.1, base_loss=2.0)})
    _, job = step(job, completed(later(120), ended), later(121))
    assert job.status is not None and job.status.phase == "Succeeded"
