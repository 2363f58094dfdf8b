"""The run policies the reconcile applies to a healthy run: budget (accrued, GPU-hours, projected), stall
detection, and the evaluation gate of a finished run. Pure: a RunContext in, a Ruling (or a message) out."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import pytest
from ftj_builders import T0, spec
from kubetune_operator.api.spec import Budget, Evaluation, EvaluationSet, FineTuneJobSpec
from kubetune_operator.api.status import AttemptRecord, CostStatus, EvalSetResult, FineTuneJobStatus, Progress
from kubetune_operator.observed import Observed
from kubetune_operator.policies import (
    PROJECTION_MIN_STEPS,
    Ruling,
    RunContext,
    Verdict,
    budget,
    eval_gate,
    judge,
    stall,
)
from kubetune_operator.progress import TrainerReport, TrainerView, advanced, parse_report

HOUR = timedelta(hours=1)


def context(
    *,
    budget_: dict[str, Any] | None = None,
    cost: CostStatus | None = None,
    progress: Progress | None = None,
    attempt_start: datetime = T0,
    trainer: TrainerView | None = None,
    now: datetime = T0,
    stall_timeout: int = 900,
) -> RunContext:
    overrides: dict[str, Any] = {"runPolicy": {"stallTimeoutSeconds": stall_timeout}}
    if budget_ is not None:
        overrides["budget"] = budget_
    status = FineTuneJobStatus(
        run=1,
        attempt=2,
        attempts=[
            AttemptRecord(attempt=1, start_time=T0 - HOUR, completion_time=T0, reason="OOMKilled"),
            AttemptRecord(attempt=2, start_time=attempt_start),
        ],
        progress=progress,
        cost=cost,
    )
    return RunContext(FineTuneJobSpec.model_validate(spec(**overrides)), status, Observed(trainer=trainer), now)


# -- budget -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("limits", "cost", "message"),
    [
        (None, CostStatus(usd=1e6), None),
        ({"maxCostUSD": 50}, None, None),
        ({"maxCostUSD": 50}, CostStatus(usd=49.99, projected_usd=50.0), None),  # projection at the limit: ok
        ({"maxCostUSD": 50}, CostStatus(usd=50.0), "accrued cost $50.00 reached budget.maxCostUSD $50.00"),
        (
            {"maxCostUSD": 50},
            CostStatus(usd=12.0, projected_usd=63.4),
            "projected cost $63.40 ($12.00 so far + the time left at the current rate) is over budget.maxCostUSD "
            "$50.00",
        ),
        ({"maxGpuHours": 800}, CostStatus(gpu_hours=799.9, usd=1e6), None),  # no USD limit: only hours count
        (
            {"maxGpuHours": 800},
            CostStatus(gpu_hours=801.25),
            "801.25 GPU-hours used reached budget.maxGpuHours 800",
        ),
        (
            {"maxCostUSD": 2500, "maxGpuHours": 800},  # both over: the accrued money is named first
            CostStatus(gpu_hours=900, usd=2600, projected_usd=3000),
            "accrued cost $2600.00 reached budget.maxCostUSD $2500.00",
        ),
    ],
)
def test_budget(limits: dict[str, Any] | None, cost: CostStatus | None, message: str | None) -> None:
    ruling = budget(context(budget_=limits, cost=cost, trainer=trained(steps=400, resumed_from=300)))
    expected = Verdict("stop", "BudgetExceeded", message) if message else None
    assert ruling == Ruling(expected)


def trained(steps: int, resumed_from: int | None = None, attempt: int = 2) -> TrainerView:
    """Rank 0 of `attempt` polled at `steps`, having resumed from a checkpoint at `resumed_from`."""
    report = TrainerReport(step=steps, total_steps=4000, resumed_from_step=resumed_from, eta_seconds=3600)
    return TrainerView(run=1, attempt=attempt, watching_since=T0, report=report)


OVER_BY_PROJECTION = CostStatus(usd=0.5, projected_usd=900.0)


@pytest.mark.parametrize(
    ("trainer", "judged"),
    [
        (None, False),  # rank 0 not polled (starting, restarting): no pace of this attempt to project
        (trained(PROJECTION_MIN_STEPS - 1), False),  # the first steps carry the warm-up
        (trained(PROJECTION_MIN_STEPS), True),
        (trained(1200 + PROJECTION_MIN_STEPS - 1, resumed_from=1200), False),  # a resumed attempt warms up too
        (trained(1200 + PROJECTION_MIN_STEPS, resumed_from=1200), True),
        (trained(3000, attempt=1), False),  # the previous attempt's report
    ],
)
def test_the_projection_counts_once_the_attempt_trained_past_its_warm_up(
    trainer: TrainerView | None, judged: bool
) -> None:
    ruling = budget(context(budget_={"maxCostUSD": 50}, cost=OVER_BY_PROJECTION, trainer=trainer))
    assert (ruling.verdict is not None) == judged
    if judged:
        assert ruling.verdict is not None and ruling.verdict.message.startswith("projected cost $900.00")


def test_the_api_documents_the_projection_rule() -> None:
    description = Budget.model_fields["max_cost_usd"].description
    assert description is not None and f"current attempt has trained {PROJECTION_MIN_STEPS} steps" in description


def test_accrued_cost_and_gpu_hours_stop_the_run_from_the_first_step() -> None:
    for limits, cost in (({"maxCostUSD": 50}, CostStatus(usd=50.0)), ({"maxGpuHours": 1}, CostStatus(gpu_hours=1))):
        ruling = budget(context(budget_=limits, cost=cost, trainer=trained(1)))
        assert ruling.verdict is not None and ruling.verdict.reason == "BudgetExceeded"


# -- stall ----------------------------------------------------------------------------------------------


def watched(
    since: datetime = T0,
    run: int = 1,
    attempt: int = 2,
    report: TrainerReport | None = None,
    advanced_at: datetime | None = None,
) -> TrainerView:
    return TrainerView(run=run, attempt=attempt, watching_since=since, report=report, advanced_at=advanced_at)


def reported(**doc: Any) -> TrainerReport:
    parsed = parse_report({"state": "training", "step": 1200, "updatedAt": "2026-11-27T09:00:00Z", **doc})
    assert parsed is not None
    return parsed


@pytest.mark.parametrize(
    ("advanced_at", "attempt_start", "since", "quiet_from"),
    [
        (None, T0, T0, T0),  # nothing reported: from the attempt's start
        (T0 + HOUR, T0, T0, T0 + HOUR),  # from the latest progress the poller saw
        # the progress was the previous attempt's: the new one gets a full timeout from its start
        (T0, T0 + HOUR, T0, T0 + HOUR),
        # this operator started polling later (it was restarted): the time it was away is not judged
        (T0, T0, T0 + 2 * HOUR, T0 + 2 * HOUR),
    ],
)
def test_stall_counts_quiet_time_from_the_latest_progress(
    advanced_at: datetime | None, attempt_start: datetime, since: datetime, quiet_from: datetime
) -> None:
    timeout = timedelta(seconds=900)
    trainer = watched(since, report=reported() if advanced_at else None, advanced_at=advanced_at)

    def rule(now: datetime) -> Ruling:
        return stall(context(attempt_start=attempt_start, trainer=trainer, now=now))

    assert rule(quiet_from + timeout - timedelta(seconds=1)) == Ruling(recheck_at=quiet_from + timeout)
    verdict = rule(quiet_from + timeout).verdict
    assert verdict is not None and (verdict.action, verdict.reason) == ("restart", "Stalled")


@pytest.mark.parametrize(
    ("report", "message"),
    [
        (reported(), "no new training step for 15m (at step 1200; runPolicy.stallTimeoutSeconds is 900)"),
        (None, "no new training step for 15m (no report from this attempt yet; runPolicy.stallTimeoutSeconds is 900)"),
        (
            reported(
                state="loading",
                step=0,
                setup={"stage": "downloading", "done": 3 << 29, "total": 3 << 30, "unit": "bytes"},
            ),
            "no setup progress for 15m (loading: downloading 1.5 GiB of 3.0 GiB; runPolicy.stallTimeoutSeconds is 900)",
        ),
        (
            reported(state="loading", step=0, setup={"stage": "loading model"}),
            "no setup progress for 15m (loading: loading model; runPolicy.stallTimeoutSeconds is 900)",
        ),
    ],
)
def test_stall_message(report: TrainerReport | None, message: str) -> None:
    trainer = watched(report=report, advanced_at=T0 if report else None)
    ruling = stall(context(trainer=trainer, now=T0 + timedelta(seconds=900)))
    assert ruling == Ruling(Verdict("restart", "Stalled", message))


def test_progress_is_a_step_a_state_or_setup_moving_on_not_a_fresher_stamp() -> None:
    loading = {"state": "loading", "step": 0, "setup": {"stage": "downloading", "done": 100, "total": 900}}
    before = reported(**loading)
    later = "2026-11-27T09:05:00Z"
    assert not advanced(before, reported(**loading, updatedAt=later))  # alive, but no further
    assert advanced(before, reported(**{**loading, "setup": {"stage": "downloading", "done": 200, "total": 900}}))
    assert advanced(before, reported(**{**loading, "setup": {"stage": "tokenising", "done": 0, "unit": "rows"}}))
    assert advanced(before, reported(step=1))  # training started
    assert not advanced(reported(step=7), reported(step=7, updatedAt=later))
    assert advanced(reported(step=7), reported(step=8))
    assert advanced(reported(step=7), reported(step=7, state="evaluating"))


@pytest.mark.parametrize(
    "trainer",
    [
        None,  # rank 0 not running (pending, unschedulable): not a stall
        watched(attempt=1),  # the poller still names the previous attempt's rank 0
    ],
)
def test_stall_is_judged_only_while_the_current_rank_0_is_polled(trainer: TrainerView | None) -> None:
    assert stall(context(trainer=trainer, now=T0 + 10 * HOUR)) == Ruling()


def test_a_stop_beats_a_restart_and_the_earliest_recheck_wins() -> None:
    ctx = context(
        budget_={"maxCostUSD": 10},
        cost=CostStatus(usd=11.0),
        trainer=watched(),
        now=T0 + 2 * HOUR,
        stall_timeout=600,
    )
    assert stall(ctx).verdict is not None
    ruling = judge(ctx)
    assert ruling.verdict is not None and ruling.verdict.reason == "BudgetExceeded"
    quiet = context(trainer=watched(), now=T0, stall_timeout=600)
    assert judge(quiet) == Ruling(recheck_at=T0 + timedelta(seconds=600))


# -- evaluation gate -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("evaluation", "eval_loss", "message"),
    [
        (None, 9.0, None),
        (Evaluation(), 9.0, None),
        (Evaluation(max_eval_loss=1.5), 1.5, None),
        (Evaluation(max_eval_loss=1.5), 1.2, None),
        (Evaluation(max_eval_loss=1.5), 1.73, "final evaluation loss 1.73 is above evaluation.maxEvalLoss 1.5"),
        (Evaluation(max_eval_loss=1.5), None, "no final evaluation loss was reported; evaluation.maxEvalLoss is 1.5"),
        (
            Evaluation(max_eval_loss=1.5),
            float("nan"),
            "no final evaluation loss was reported; evaluation.maxEvalLoss is 1.5",
        ),
    ],
)
def test_eval_gate(evaluation: Evaluation | None, eval_loss: float | None, message: str | None) -> None:
    assert eval_gate(evaluation, eval_loss) == message


def test_eval_gate_on_evaluation_sets_names_each_failed_set_with_its_figures() -> None:
    sets = [
        EvaluationSet(name="general", source="pvc://d/general.jsonl", max_increase=0.1),
        EvaluationSet(name="code", source="pvc://d/code.jsonl", max_increase=0.2),
        EvaluationSet(name="math", source="pvc://d/math.jsonl"),  # reported, never gated
    ]
    evaluation = Evaluation(max_eval_loss=1.5, sets=sets)
    fine = [
        EvalSetResult(name="general", loss=2.2, base_loss=2.1, change=0.2 / 2.1 / 2),
        EvalSetResult(name="code", loss=1.0, base_loss=1.2, change=-1 / 6),
        EvalSetResult(name="math", loss=9.0, base_loss=1.0, change=8.0),
    ]
    assert eval_gate(evaluation, 1.2, fine) is None
    forgot = [fine[0].model_copy(update={"loss": 2.52, "change": 0.2}), fine[1], fine[2]]
    assert eval_gate(evaluation, 1.2, forgot) == (
        "evaluation set general: final loss 2.52 is 20.0% above the base model's 2.1; "
        "evaluation.sets[general].maxIncrease is 0.1 (10%)"
    )
    # Every failed gate is named, the in-distribution one first; a gate without its figures fails.
    unmeasured = [fine[0].model_copy(update={"base_loss": None, "change": None})]
    assert eval_gate(evaluation, 1.73, unmeasured) == (
        "final evaluation loss 1.73 is above evaluation.maxEvalLoss 1.5; "
        "the base model's loss on evaluation set general was not measured; evaluation.sets[general].maxIncrease is "
        "0.1; no final loss was reported for evaluation set code; evaluation.sets[code].maxIncrease is 0.2"
    )
