"""Policies that can end an attempt or a run that is otherwise healthy: the run's deadline, its budget and stall
detection (RUN_POLICIES), and the evaluation gate on a finished run (`eval_gate`).

A policy looks at the run in progress and returns a Ruling: optionally a Verdict (restart the attempt from its
checkpoint, or stop the run as Failed), and when its answer could change with no new observation (so the
reconcile wakes up then). Policies are pure; the reconcile applies the verdict (SIGTERM via deleting the Job,
so workers checkpoint first). They see the status as this reconcile updated it: the trainer's latest report
and the run's cost up to now.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from kubetune_operator.api.spec import Evaluation, FineTuneJobSpec
from kubetune_operator.api.status import (
    AttemptReason,
    AttemptRecord,
    EvalSetResult,
    FineTuneJobStatus,
    format_eta,
    setup_text,
)
from kubetune_operator.observed import Observed

# Steps an attempt trains before its pace projects the run's cost (see `projection_counts`): five of the trainer's
# 10-step log intervals, the first of which carries the warm-up.
PROJECTION_MIN_STEPS = 50


@dataclass(frozen=True)
class Verdict:
    """What a policy requires, with the reason (attempt and condition reason) and a message naming the figures.

    restart: end the attempt; the next one resumes from the checkpoint (counts against maxRestarts).
    stop: end the attempt and fail the run with `reason`.
    """

    action: Literal["restart", "stop"]
    reason: AttemptReason
    message: str


@dataclass(frozen=True)
class Ruling:
    verdict: Verdict | None = None
    recheck_at: datetime | None = None


@dataclass(frozen=True)
class RunContext:
    """A run in progress (not finished, not suspended) as a policy sees it."""

    spec: FineTuneJobSpec
    status: FineTuneJobStatus
    observed: Observed
    now: datetime


Policy = Callable[[RunContext], Ruling]


def deadline_anchor(status: FineTuneJobStatus) -> datetime | None:
    """Where runPolicy.activeDeadlineSeconds counts from: the run's first attempt, or the first attempt after
    the latest suspension (a suspended run's clock restarts on resume, as a Kubernetes Job's does). None before
    that attempt opens."""
    anchor = None
    resumed = True
    for record in status.attempts:
        if resumed:
            anchor = record.start_time
        resumed = record.reason == "Suspended"
    return None if resumed else anchor


def deadline(ctx: RunContext) -> Ruling:
    limit = ctx.spec.run_policy.active_deadline_seconds
    anchor = deadline_anchor(ctx.status)
    if limit is None or anchor is None:
        return Ruling()
    due = anchor + timedelta(seconds=limit)
    if ctx.now < due:
        return Ruling(recheck_at=due)
    return Ruling(Verdict("stop", "DeadlineExceeded", f"the run exceeded runPolicy.activeDeadlineSeconds ({limit}s)"))


def projection_counts(ctx: RunContext) -> bool:
    """Whether the projected cost rests on the run's steady pace: the current attempt's rank 0 reports having trained
    PROJECTION_MIN_STEPS steps itself, since it started or resumed. The trainer's time left is the latest log
    interval's pace times the steps left; the first intervals of an attempt carry its warm-up (the first step's
    compilation and allocations, a cold page cache), which projected over the whole run can be many times the
    real cost."""
    trainer, attempt = ctx.observed.trainer, open_attempt(ctx.status)
    if trainer is None or trainer.report is None or attempt is None:
        return False
    if (trainer.run, trainer.attempt) != (ctx.status.run, attempt.attempt):
        return False
    report = trainer.report
    return report.step - (report.resumed_from_step or 0) >= PROJECTION_MIN_STEPS


def budget(ctx: RunContext) -> Ruling:
    """BudgetExceeded when the run's accrued cost reaches budget.maxCostUSD or its GPU-hours reach maxGpuHours (at
    once), or its projected cost passes maxCostUSD once the projection counts (`projection_counts`); stopping then
    saves the money a run bound to overspend would burn."""
    limits, cost = ctx.spec.budget, ctx.status.cost
    if limits is None or cost is None:
        return Ruling()
    usd, hours = limits.max_cost_usd, limits.max_gpu_hours
    if usd is not None and cost.usd is not None and cost.usd >= usd:
        message = f"accrued cost ${cost.usd:.2f} reached budget.maxCostUSD ${usd:.2f}"
    elif hours is not None and cost.gpu_hours is not None and cost.gpu_hours >= hours:
        message = f"{cost.gpu_hours:g} GPU-hours used reached budget.maxGpuHours {hours:g}"
    elif usd is not None and cost.projected_usd is not None and cost.projected_usd > usd and projection_counts(ctx):
        message = (
            f"projected cost ${cost.projected_usd:.2f} (${cost.usd or 0:.2f} so far + the time left at the current "
            f"rate) is over budget.maxCostUSD ${usd:.2f}"
        )
    else:
        return Ruling()
    return Ruling(Verdict("stop", "BudgetExceeded", message))


def open_attempt(status: FineTuneJobStatus) -> AttemptRecord | None:
    last = status.attempts[-1] if status.attempts else None
    return last if last is not None and last.reason is None else None


def stall(ctx: RunContext) -> Ruling:
    """Stalled when rank 0 made no progress for runPolicy.stallTimeoutSeconds: neither a new step, state, evaluation
    or checkpoint, nor its setup (downloading, tokenising, loading) moving on, as the poller saw it
    (TrainerView.advanced_at); a report that only says the trainer is alive is no progress. Counted from the later
    of the attempt's start (a restarted run gets a full timeout to load) and when this operator began polling it (a
    restarted operator does not judge the time it was away). Judged only while rank 0 runs and is polled."""
    trainer, attempt = ctx.observed.trainer, open_attempt(ctx.status)
    if trainer is None or attempt is None or attempt.start_time is None:
        return Ruling()
    if (trainer.run, trainer.attempt) != (ctx.status.run, attempt.attempt):
        return Ruling()
    since = max(attempt.start_time, trainer.watching_since, trainer.advanced_at or trainer.watching_since)
    timeout = ctx.spec.run_policy.stall_timeout_seconds
    due = since + timedelta(seconds=timeout)
    if ctx.now < due:
        return Ruling(recheck_at=due)
    quiet = format_eta((ctx.now - since).total_seconds())
    report = trainer.report
    if report is not None and report.state == "loading":
        what, at = "no setup progress", f"loading: {setup_text(report.setup)}" if report.setup else "loading"
    elif report is not None:
        what, at = "no new training step", f"at step {report.step}"
    else:
        what, at = "no new training step", "no report from this attempt yet"
    return Ruling(
        Verdict("restart", "Stalled", f"{what} for {quiet} ({at}; runPolicy.stallTimeoutSeconds is {timeout})")
    )


RUN_POLICIES: tuple[Policy, ...] = (deadline, budget, stall)


def judge(ctx: RunContext, policies: tuple[Policy, ...] = RUN_POLICIES) -> Ruling:
    """All policies' rulings in one: a stop beats a restart; the earliest recheck wins."""
    rulings = [policy(ctx) for policy in policies]
    verdicts = [r.verdict for r in rulings if r.verdict]
    verdict = next((v for v in verdicts if v.action == "stop"), None) or next(iter(verdicts), None)
    rechecks = [r.recheck_at for r in rulings if r.recheck_at]
    return Ruling(verdict, min(rechecks) if rechecks else None)


def eval_gate(
    evaluation: Evaluation | None, final_eval_loss: float | None, eval_sets: Sequence[EvalSetResult] = ()
) -> str | None:
    """Why a finished run fails its evaluation gates (reason EvalGateFailed), or None when it passes: the final
    evaluation loss is above evaluation.maxEvalLoss, or an evaluation set's final loss rose more than its
    maxIncrease above the base model's; a gate whose figures were not reported fails too (an output that could
    not be judged is not promoted). Every failed gate is named, with its figures."""
    if evaluation is None:
        return None
    failed = []
    limit = evaluation.max_eval_loss
    if limit is not None:
        if final_eval_loss is None or not math.isfinite(final_eval_loss):
            failed.append(f"no final evaluation loss was reported; evaluation.maxEvalLoss is {limit:g}")
        elif final_eval_loss > limit:
            failed.append(f"final evaluation loss {final_eval_loss:.4g} is above evaluation.maxEvalLoss {limit:g}")
    results = {r.name: r for r in eval_sets}
    for s in evaluation.sets:
        if s.max_increase is None:
            continue
        gate = f"evaluation.sets[{s.name}].maxIncrease is {s.max_increase:g}"
        r = results.get(s.name)
        if r is None or r.loss is None:
            failed.append(f"no final loss was reported for evaluation set {s.name}; {gate}")
        elif r.base_loss is None or r.change is None:
            failed.append(f"the base model's loss on evaluation set {s.name} was not measured; {gate}")
        elif r.change > s.max_increase:
            failed.append(
                f"evaluation set {s.name}: final loss {r.loss:.4g} is {100 * r.change:.1f}% above the base model's "
                f"{r.base_loss:.4g}; {gate} ({100 * s.max_increase:g}%)"
            )
    return "; ".join(failed) or None
