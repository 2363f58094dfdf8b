"""Policies that can end an attempt or a run that is otherwise healthy: the run's deadline here; budget, stall
detection and the evaluation gate (issue 6) join RUN_POLICIES the same way.

A policy looks at the run in progress and returns a Ruling: optionally a Verdict (restart the attempt from its
checkpoint, or stop the run as Failed), and when its answer could change with no new observation (so the
reconcile wakes up then). Policies are pure; the reconcile applies the verdict (SIGTERM via deleting the Job,
so workers checkpoint first).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from kubetune_operator.api.spec import FineTuneJobSpec
from kubetune_operator.api.status import AttemptReason, FineTuneJobStatus
from kubetune_operator.observed import Observed


@dataclass(frozen=True)
class Verdict:
    # restart: end the attempt; the next one resumes from the checkpoint (counts against maxRestarts).
    # stop: end the attempt and fail the run with `reason`.
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
    the latest suspension (a suspended run's clock restarts on resume, as a Kubernetes Job's does)."""
    anchor = None
    resumed = True
    for record in status.attempts:
        if resumed:
            anchor = record.start_time
        resumed = record.reason == "Suspended"
    return anchor


def deadline(ctx: RunContext) -> Ruling:
    limit = ctx.spec.run_policy.active_deadline_seconds
    anchor = deadline_anchor(ctx.status)
    if limit is None or anchor is None:
        return Ruling()
    due = anchor + timedelta(seconds=limit)
    if ctx.now < due:
        return Ruling(recheck_at=due)
    return Ruling(Verdict("stop", "DeadlineExceeded", f"the run exceeded runPolicy.activeDeadlineSeconds ({limit}s)"))


RUN_POLICIES: tuple[Policy, ...] = (deadline,)


def judge(ctx: RunContext, policies: tuple[Policy, ...] = RUN_POLICIES) -> Ruling:
    """All policies' rulings in one: a stop beats a restart; the earliest recheck wins."""
    rulings = [policy(ctx) for policy in policies]
    verdicts = [r.verdict for r in rulings if r.verdict]
    verdict = next((v for v in verdicts if v.action == "stop"), None) or next(iter(verdicts), None)
    rechecks = [r.recheck_at for r in rulings if r.recheck_at]
    return Ruling(verdict, min(rechecks) if rechecks else None)
