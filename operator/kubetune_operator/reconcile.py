"""The level-triggered heart of the operator: reconcile(ftj, observed, settings, now) -> Plan. Pure.

Given the FineTuneJob (spec and the status the operator wrote before) and what exists now, it decides the
status to write, the children to create and delete, the events to emit, and when to look again. It never
looks at what happened in between, so a restarted operator, a second replica or a missed watch event all
converge to the same answer. The retry budget lives in status.attempts, never in children, so deleting
children cannot reset it.

A pass, in order:
1. `account`: what this pass observed goes into the status first: rank 0's latest report (status.progress,
   status.checkpoint) and what the run's pods used (attempt records, status.cost; measured once per pass).
2. `advance`: the run/attempt state machine below, one transition or a few, each a small pure function that
   returns the new status and its effects (a `Step`: events, when to look again), and where the run now
   stands (a `Situation`).
3. `summarize`: the conditions, phase and workers follow from the Situation; `children`: what should exist
   follows from the status.

The state machine:

    run      (none) --start_run--> active --end_run--> Succeeded | Failed | Cancelled
    attempt  active run:  between attempts --start_attempt--> open --close_attempt--> between attempts

- a run trains one spec fingerprint (status.runs[].specHash: every field but runPolicy, budget and
  evaluation) and one kubetune.io/rerun token; a different one ends it (Cancelled) and starts a new run, at
  once with onSpecChange=Restart, after the current run with Queue (`settle_run`);
- the policies (deadline, budget, stall) judge an active run before anything else happens to it: a stop ends
  the run (no new attempt is opened for it), a restart closes the open attempt;
- between attempts, the next one opens when it is due (the first one, one after a suspension, or one whose
  backoff has passed) and no worker of an earlier attempt can still write: every one is gone or terminated
  (`fenced`); it resumes from the run's checkpoint dir, until maxRestarts failures;
- an open attempt is one Indexed Job of the run; when a worker fails, the attempt closes, its Job is deleted
  (the other workers checkpoint on SIGTERM); the trainer's exit code 78 fails the run at once; when the Job
  completes, rank 0's final report (its termination message, there even when the run ended between two
  polls) replaces the last polled one, and the run succeeds, or fails its evaluation gate (EvalGateFailed:
  the output is kept but not promoted);
- suspending closes the open attempt (reason Suspended, not counted); resuming opens the next one.

Ended attempts keep their cost in status.attempts, attempts dropped from that bounded list in
status.droppedAttempts. Checkpoints found in the run's directory that are not its own (rank 0 reports them, or a
run checkpointed before paths carried the job's uid) are listed in status.checkpoint.ignored, with the condition
CheckpointsIgnored and a Warning naming them. The claim of checkpoint.volumeClaimTemplate that receives the
outputs has no owner, so it outlives the job (storage.py has the layout).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from kubetune_trainer import evalsets

from kubetune_operator.api import RERUN_ANNOTATION, FineTuneJob
from kubetune_operator.api.spec import FineTuneJobSpec
from kubetune_operator.api.status import (
    MAX_ATTEMPTS,
    MAX_IGNORED_CHECKPOINTS,
    AttemptReason,
    AttemptRecord,
    CheckpointStatus,
    ConditionType,
    CostStatus,
    DroppedAttempts,
    FineTuneJobStatus,
    HistoryPoint,
    IgnoredCheckpoint,
    OutputStatus,
    Phase,
    Progress,
    RunRecord,
    Workers,
    compute_phase,
    format_eta,
    record_run,
    set_condition,
    setup_text,
)
from kubetune_operator.cost import Spend, pods_spend, run_cost
from kubetune_operator.failures import WorkerFailure, attempt_failure
from kubetune_operator.names import attempt_name, claim_name
from kubetune_operator.observed import FinalReport, JobState, Observed, PodState
from kubetune_operator.policies import RunContext, eval_gate, judge, open_attempt
from kubetune_operator.progress import ReportedSet, eval_set_results, finite, in_claim, thin_history, to_status
from kubetune_operator.render import (
    Manifest,
    Owner,
    render_attempt_config,
    render_claim,
    render_job,
    render_service,
)
from kubetune_operator.settings import OperatorSettings
from kubetune_operator.storage import JOB_DIR, checkpoint_uri, output_uri, outputs_on_checkpoint_claim, run_dir

# Fields that say how a run is governed rather than what it trains: changing them never starts a new run.
GOVERNANCE_FIELDS = {"run_policy", "budget", "evaluation"}
# Ended-attempt reasons that do not count against runPolicy.maxRestarts.
NOT_COUNTED: frozenset[AttemptReason] = frozenset({"Suspended", "SpecChanged", "Completed"})
# The Reconciling reason while the next attempt waits for a worker of the previous one that is past its grace period.
WORKERS_NOT_STOPPING = "WorkersNotStopping"
# Kind -> the order children are created in: storage and config first, so pods find them.
CREATION_ORDER = ("PersistentVolumeClaim", "ConfigMap", "Service", "Job")
# A Job is Complete once its pods succeeded, but the pods' watch can deliver that a moment after the Job's: wait
# this long (looking again every FINAL_REPORT_POLL seconds) for rank 0's pod to show its final report.
FINAL_REPORT_WAIT = timedelta(seconds=10)
FINAL_REPORT_POLL = 1.0

RunResult = Literal["Succeeded", "Failed", "Cancelled"]


@dataclass(frozen=True)
class Event:
    type: Literal["Normal", "Warning"]
    reason: str
    message: str


@dataclass(frozen=True)
class Deletion:
    kind: str
    name: str


@dataclass(frozen=True)
class Plan:
    status: FineTuneJobStatus
    create: tuple[Manifest, ...] = ()
    delete: tuple[Deletion, ...] = ()
    # Claims created owned by the job that now hold its outputs: their ownerReferences go, so they outlive it.
    release: tuple[str, ...] = ()
    events: tuple[Event, ...] = ()
    requeue_after: float | None = None


@dataclass(frozen=True)
class Situation:
    """Where the current run stands, from which every condition and the phase follow."""

    phase: Phase
    reason: str
    message: str
    # True while the operator still has work to do (kstatus Reconciling).
    in_progress: bool


@dataclass(frozen=True)
class Step:
    """What a transition leads to: the new status, the events that announce it, and in how many seconds to look
    again (a backoff ending, a deadline, a TTL)."""

    status: FineTuneJobStatus
    events: tuple[Event, ...] = ()
    recheck: tuple[float, ...] = ()

    def then(self, later: Step) -> Step:
        """This step followed by `later` (which started from this step's status)."""
        return Step(later.status, self.events + later.events, self.recheck + later.recheck)


# Where a transition leaves the run: its step, and the situation the conditions are written from.
Outcome = tuple[Step, Situation]


@dataclass(frozen=True)
class Pass:
    """What one reconcile knows and no transition changes: the job, its children, the settings, the time."""

    spec: FineTuneJobSpec
    owner: Owner
    observed: Observed
    settings: OperatorSettings
    now: datetime
    generation: int
    fingerprint: str
    rerun_token: str | None

    @classmethod
    def of(cls, ftj: FineTuneJob, observed: Observed, settings: OperatorSettings, now: datetime) -> Pass:
        meta = ftj.metadata
        owner = Owner(name=meta["name"], namespace=meta["namespace"], uid=meta["uid"])
        return cls(
            spec=ftj.spec,
            owner=owner,
            observed=observed.owned_by(owner.uid),
            settings=settings,
            now=now,
            generation=int(meta.get("generation") or 1),
            fingerprint=run_fingerprint(ftj.spec),
            rerun_token=(meta.get("annotations") or {}).get(RERUN_ANNOTATION),
        )

    def run_spec(self, run: RunRecord) -> FineTuneJobSpec | None:
        """The spec the run trains: the live spec, or the run's stored copy while a change waits in the queue."""
        if run.spec_hash == self.fingerprint:
            return self.spec
        return self.observed.run_spec(run.run)

    def trained(self, run: RunRecord) -> FineTuneJobSpec:
        """What the run's workers look like: its own spec (governance fields always come from the live one)."""
        return self.run_spec(run) or self.spec

    def queued_note(self, run: RunRecord) -> str:
        """A change of spec or rerun token that waits for the run (onSpecChange: Queue), as a note for messages."""
        if run.spec_hash != self.fingerprint:
            return f"; generation {self.generation} is queued and starts when run {run.run} finishes"
        if run.rerun_token != self.rerun_token:
            return f"; rerun {self.rerun_token!r} is queued and starts when run {run.run} finishes"
        return ""

    def event(self, status: FineTuneJobStatus, type_: Literal["Normal", "Warning"], reason: str, msg: str) -> Step:
        return Step(status, (Event(type_, reason, msg),))

    def recheck_at(self, status: FineTuneJobStatus, at: datetime | None) -> Step:
        """Look again at `at`, if it is still to come."""
        return Step(status, recheck=((at - self.now).total_seconds(),)) if at and at > self.now else Step(status)


def run_fingerprint(spec: FineTuneJobSpec) -> str:
    """A short hash of what the run trains. Defaults are left out, so a new optional API field (stored with
    its default by the API server) does not look like a spec change."""
    trained = spec.model_dump(mode="json", by_alias=True, exclude_defaults=True, exclude=GOVERNANCE_FIELDS)
    return hashlib.sha256(json.dumps(trained, sort_keys=True).encode()).hexdigest()[:16]


def backoff_seconds(spec: FineTuneJobSpec, failures: int) -> int:
    """Wait before the attempt after the `failures`-th failure of a run."""
    policy = spec.run_policy
    if policy.backoff_policy == "Fixed":
        return policy.backoff_seconds
    return min(policy.backoff_seconds * (1 << max(0, failures - 1)), policy.max_backoff_seconds)


def counted_failures(attempts: list[AttemptRecord]) -> int:
    return sum(1 for a in attempts if a.reason is not None and a.reason not in NOT_COUNTED)


def current_run(status: FineTuneJobStatus) -> RunRecord | None:
    return next((r for r in status.runs if r.run == status.run), None)


def reconcile(ftj: FineTuneJob, observed: Observed, settings: OperatorSettings, now: datetime) -> Plan:
    if ftj.metadata.get("deletionTimestamp"):
        # Children go with the job (ownerReferences); there is nothing left to decide.
        return Plan(status=ftj.status or FineTuneJobStatus())
    p = Pass.of(ftj, observed, settings, now)
    step = account(p, ftj.status or FineTuneJobStatus())
    step, situation = _after(step, advance(p, step.status))
    step = step.then(summarize(p, step.status, situation))
    create, delete, release, cleanup = children(p, step.status)
    step = step.then(cleanup)
    s = settings
    poll = s.progress_poll_interval_seconds if situation.in_progress else s.resync_seconds
    return Plan(
        status=step.status,
        create=tuple(create),
        delete=tuple(delete),
        release=tuple(release),
        events=step.events,
        requeue_after=min((*step.recheck, poll)),
    )


def with_running_figures(
    ftj: FineTuneJob, observed: Observed, settings: OperatorSettings, now: datetime
) -> FineTuneJob:
    """The job with its running figures as of `now`: the cost so far and the worker counts, from its pods. The
    status holds them as of its last write, which may be minutes old (settings.figuresWriteIntervalSeconds)."""
    status = ftj.status
    if status is None or ftj.metadata.get("deletionTimestamp"):
        return ftj
    p = Pass.of(ftj, observed, settings, now)
    status = account(p, status).status
    if status.attempt is not None and status.run is not None:
        status = status.model_copy(update={"workers": _workers(p.observed.pods_of(status.run, status.attempt))})
    return ftj.model_copy(update={"status": status})


# ----------------------------------------------------------------------------------------------
# 1. what the pass observed
# ----------------------------------------------------------------------------------------------


def account(p: Pass, status: FineTuneJobStatus) -> Step:
    """The current run's latest report from rank 0 and its cost so far, into the status: what every decision of
    the pass sees. A finished run's pods may still be checkpointing: its record follows their cost until they go."""
    run = current_run(status)
    if run is None:
        return Step(status)
    step = take_report(p, status, run) if run.result is None else Step(status)
    status = measure_cost(p, step.status, run)
    if run.result is not None and status.cost is not None:
        cost = {"gpu_hours": status.cost.gpu_hours, "cost_usd": status.cost.usd}
        status = status.model_copy(update={"runs": record_run(status.runs, run.model_copy(update=cost))})
    return step.then(Step(status))


def take_report(p: Pass, status: FineTuneJobStatus, run: RunRecord) -> Step:
    """The current attempt's latest report from rank 0 into status.progress and status.checkpoint, with the
    checkpoints it found and left alone as not its own."""
    trainer = p.observed.trainer
    if trainer is None or trainer.report is None or (trainer.run, trainer.attempt) != (run.run, status.attempt):
        return Step(status)
    where = checkpoint_uri(p.owner.namespace, p.owner.name, p.trained(run))
    report = trainer.report
    progress, checkpoint = to_status(
        report, previous_checkpoint=status.checkpoint, checkpoint_root=JOB_DIR, checkpoint_uri=where
    )
    status = status.model_copy(update={"progress": progress, "checkpoint": checkpoint})
    found = [
        IgnoredCheckpoint(path=in_claim(i.path, JOB_DIR, where), reason=i.reason) for i in report.ignored_checkpoints
    ]
    return note_ignored(p, status, found)


def note_ignored(p: Pass, status: FineTuneJobStatus, found: list[IgnoredCheckpoint]) -> Step:
    """Checkpoints not this training's, added to status.checkpoint.ignored (bounded); a Warning names the new ones."""
    known = status.checkpoint.ignored if status.checkpoint else []
    new = [i for i in found if i.path not in {k.path for k in known}]
    if not new:
        return Step(status)
    checkpoint = status.checkpoint or CheckpointStatus()
    ignored = [*known, *new][:MAX_IGNORED_CHECKPOINTS]
    status = status.model_copy(update={"checkpoint": checkpoint.model_copy(update={"ignored": ignored})})
    listed = "; ".join(f"{i.path} ({i.reason})" for i in new)
    message = f"left untouched and not resumed from, as not this training's: {listed}"
    return p.event(status, "Warning", "CheckpointsIgnored", message)


def elsewhere_checkpoint(p: Pass, status: FineTuneJobStatus, run: RunRecord) -> Step:
    """A run that checkpointed before checkpoint paths carried the job's uid (an operator upgrade in the middle of
    it): its next attempt cannot find that checkpoint, which is left where it is and listed as ignored."""
    latest = status.checkpoint.latest if status.checkpoint else None
    own = f"{checkpoint_uri(p.owner.namespace, p.owner.name, p.trained(run))}/{run_dir(p.owner.uid, run.run)}/"
    if latest is None or status.checkpoint is None or latest.startswith(own):
        return Step(status)
    reason = "written before checkpoint paths carried the job's uid; the run starts its checkpoints afresh"
    forgotten = status.model_copy(
        update={"checkpoint": status.checkpoint.model_copy(update={"latest": None, "step": None, "saved_at": None})}
    )
    return note_ignored(p, forgotten, [IgnoredCheckpoint(path=latest, reason=reason)])


def measure_cost(p: Pass, status: FineTuneJobStatus, run: RunRecord) -> FineTuneJobStatus:
    """status.cost of the run, from its attempts' records, each first brought up to what its pods used so far
    (pods that are gone, or not seen yet after a restart, never lower a record)."""
    if not status.attempts:
        return status
    resources = p.trained(run).resources
    pricing, nodes = p.settings.pricing, p.observed.nodes
    dropped = status.dropped_attempts
    spent = Spend((dropped.gpu_hours or 0.0) * 3600, dropped.cost_usd or 0.0) if dropped else Spend()
    attempts = []
    for a in status.attempts:
        usage = [pod.usage for pod in p.observed.pods_of(run.run, a.attempt)]
        if usage:
            measured = pods_spend(usage, pricing=pricing, nodes=nodes, gpu_product=resources.gpu_product, now=p.now)
            a = _with_spend(a, measured)
        spent += Spend((a.gpu_hours or 0.0) * 3600, a.cost_usd or 0.0)
        attempts.append(a)
    current = open_attempt(status)
    progress = status.progress
    cost = run_cost(
        spent=spent,
        pods=[pod.usage for pod in p.observed.pods_of(run.run, current.attempt)] if current else [],
        resources=resources,
        pricing=pricing,
        nodes=nodes,
        eta_seconds=0.0 if run.result is not None else (progress.eta_seconds if progress else None),
    )
    return status.model_copy(update={"attempts": attempts, "cost": cost})


# ----------------------------------------------------------------------------------------------
# 2. the state machine
# ----------------------------------------------------------------------------------------------


def advance(p: Pass, status: FineTuneJobStatus) -> Outcome:
    """Move the run and its attempts on from where the status left them."""
    step = settle_run(p, status)
    status = step.status
    run = current_run(status)
    assert run is not None
    if run.result is not None:
        return _after(step, finished(p, status, run))
    if p.observed.rejection and p.observed.rejection.run == run.run:
        return _after(step, fail_run(p, status, run, "InvalidSpec", p.observed.rejection.message))
    if p.spec.run_policy.suspend:
        return _after(step, suspended(p, status, run))

    ruling = judge(RunContext(p.spec, status, p.observed, p.now))
    step = step.then(p.recheck_at(status, ruling.recheck_at))
    verdict = ruling.verdict
    if verdict and verdict.action == "stop":
        closed = close_attempt(p, status, verdict.reason, verdict.message)
        return _after(step, fail_run(p, closed, run, verdict.reason, verdict.message))
    if open_attempt(status) is None:
        if not next_attempt_due(p, status):
            return _after(step, backing_off(p, status, run))
        stopping = p.observed.still_running(run.run, before_attempt=(status.attempt or 0) + 1)
        if stopping:
            return _after(step, fenced(p, status, run, stopping))
        step = step.then(start_attempt(p, status, run))
        return _after(step, observe_attempt(p, step.status, run))
    if verdict:
        return _after(step, attempt_failed(p, status, run, WorkerFailure(verdict.reason, verdict.message)))
    return _after(step, observe_attempt(p, status, run))


def _after(step: Step, outcome: Outcome) -> Outcome:
    later, situation = outcome
    return step.then(later), situation


# -- runs ---------------------------------------------------------------------------------------


def settle_run(p: Pass, status: FineTuneJobStatus) -> Step:
    """The run this pass works on: the first one; the current one; or, when the spec or the rerun token
    changed, a new one (the current one cancelled if it was active), unless the change waits in the queue."""
    run = current_run(status)
    if run is None:
        return start_run(p, status, 1, why="RunStarted")
    if run.spec_hash == p.fingerprint and run.rerun_token == p.rerun_token:
        return Step(status)
    why = "SpecChanged" if run.spec_hash != p.fingerprint else "RerunRequested"
    queue = p.spec.run_policy.on_spec_change == "Queue"
    # Queued changes wait for the run, which keeps training its own stored spec; if that copy is gone the run
    # cannot be rendered again, and the newer spec replaces it.
    if run.result is None and queue and p.run_spec(run) is not None:
        if status.observed_generation == p.generation:
            return Step(status)
        what = f"generation {p.generation}" if why == "SpecChanged" else f"rerun {p.rerun_token!r}"
        return p.event(
            status, "Normal", "RunQueued", f"{what} starts when run {run.run} finishes (onSpecChange: Queue)"
        )
    step = Step(status)
    if run.result is None:
        cause = "the spec changed" if why == "SpecChanged" else "a rerun was requested"
        closed = close_attempt(p, status, "SpecChanged", f"run {run.run} was replaced: {cause}")
        step = end_run(p, closed, run, "Cancelled", why, f"{cause}; run {run.run + 1} replaces it")
    return step.then(start_run(p, step.status, run.run + 1, why=why))


def start_run(p: Pass, status: FineTuneJobStatus, number: int, why: str) -> Step:
    record = RunRecord(run=number, generation=p.generation, rerun_token=p.rerun_token, spec_hash=p.fingerprint)
    started = status.model_copy(
        update={
            "runs": record_run(status.runs, record),
            "run": number,
            "attempt": None,
            "attempts": [],
            "dropped_attempts": None,
            "start_time": None,
            "completion_time": None,
            "workers": None,
            "progress": None,
            "checkpoint": None,
            "cost": None,
        }
    )
    detail = {"SpecChanged": " (the spec changed)", "RerunRequested": " (a rerun was requested)"}.get(why, "")
    return p.event(started, "Normal", why, f"run {number} started for generation {p.generation}{detail}")


def end_run(
    p: Pass,
    status: FineTuneJobStatus,
    run: RunRecord,
    result: RunResult,
    reason: str,
    msg: str,
    at: datetime | None = None,
    output: str | None = None,
) -> Step:
    """The run's record closed with its result and final figures. Nothing is left to spend: the projected cost is
    what it cost."""
    at = at or p.now
    progress, cost = status.progress, status.cost
    ended = run.model_copy(
        update={
            "result": result,
            "reason": reason,
            "completion_time": at,
            "attempts": status.attempt,
            "final_loss": progress.loss if progress else None,
            "final_eval_loss": progress.eval_loss if progress else None,
            "final_eval_sets": progress.eval_sets if progress else None,
            "output": output,
            "gpu_hours": cost.gpu_hours if cost else None,
            "cost_usd": cost.usd if cost else None,
        }
    )
    status = status.model_copy(
        update={
            "runs": record_run(status.runs, ended),
            "completion_time": at,
            "cost": cost.model_copy(update={"projected_usd": cost.usd}) if cost else None,
        }
    )
    if result == "Cancelled":
        return p.event(status, "Normal", reason, f"run {run.run} cancelled: {msg}")
    return Step(status)


def fail_run(
    p: Pass,
    status: FineTuneJobStatus,
    run: RunRecord,
    reason: str,
    message: str,
    at: datetime | None = None,
    output: str | None = None,
) -> Outcome:
    step = end_run(p, status, run, "Failed", reason, message, at=at, output=output)
    step = step.then(p.event(step.status, "Warning", reason, f"run {run.run} failed: {message}"))
    ended = current_run(step.status)
    assert ended is not None
    return step.then(ttl_recheck(p, step.status, ended)), Situation("Failed", reason, message, in_progress=False)


def succeed_run(p: Pass, status: FineTuneJobStatus, run: RunRecord, completed_at: datetime | None) -> Outcome:
    """The run's workers all finished: it succeeds, or fails its evaluation gate with its output kept, not
    promoted. Times are the Job's own completion time, so every replica writes the same status."""
    uri = output_uri(p.owner.namespace, p.owner.name, p.owner.uid, p.trained(run), run.run)
    progress = status.progress
    gate = eval_gate(
        p.spec.evaluation, progress.eval_loss if progress else None, (progress.eval_sets if progress else None) or []
    )
    if gate is not None:
        kept = status.model_copy(update={"output": OutputStatus(path=uri, promoted=False)})
        message = f"{gate}; the output at {uri} is kept, not promoted"
        return fail_run(p, kept, run, "EvalGateFailed", message, at=completed_at, output=uri)
    step = end_run(p, status, run, "Succeeded", "Succeeded", "", at=completed_at, output=uri)
    promoted = step.status.model_copy(update={"output": OutputStatus(path=uri, promoted=True)})
    step = step.then(p.event(promoted, "Normal", "Succeeded", f"run {run.run} succeeded; output at {uri}"))
    ended = current_run(step.status)
    assert ended is not None
    return _after(step, finished(p, step.status, ended))


def ttl_recheck(p: Pass, status: FineTuneJobStatus, run: RunRecord) -> Step:
    """Look again when the finished run's workers are due for deletion (runPolicy.ttlSecondsAfterFinished)."""
    ttl = p.spec.run_policy.ttl_seconds_after_finished
    if ttl is None or run.completion_time is None:
        return Step(status)
    return p.recheck_at(status, run.completion_time + timedelta(seconds=ttl))


def finished(p: Pass, status: FineTuneJobStatus, run: RunRecord) -> Outcome:
    step = ttl_recheck(p, status, run)
    if run.result == "Succeeded":
        return step, Situation("Succeeded", "Succeeded", f"run {run.run} succeeded", in_progress=False)
    failed = next((c for c in status.conditions if c.type == "Failed" and c.status == "True"), None)
    reason = run.reason or "Failed"
    message = failed.message if failed and failed.reason == reason else _last_attempt_message(status, run)
    return step, Situation("Failed", reason, message, in_progress=False)


def _last_attempt_message(status: FineTuneJobStatus, run: RunRecord) -> str:
    last = status.attempts[-1] if status.attempts else None
    return (last.message if last and last.message else "") or f"run {run.run} failed ({run.reason})"


def suspended(p: Pass, status: FineTuneJobStatus, run: RunRecord) -> Outcome:
    step = Step(status)
    if open_attempt(status) is not None:
        closed = close_attempt(p, status, "Suspended", "suspended by spec.runPolicy.suspend")
        step = p.event(closed, "Normal", "Suspended", f"run {run.run} suspended: its workers checkpoint and stop")
    stopping = p.observed.still_running(run.run)
    if stopping:
        return step, Situation(
            "Suspended", "Suspending", f"waiting for {len(stopping)} workers to checkpoint and stop", True
        )
    return step, Situation("Suspended", "Suspended", f"run {run.run} is suspended (spec.runPolicy.suspend)", False)


# -- attempts -----------------------------------------------------------------------------------


def next_attempt_due(p: Pass, status: FineTuneJobStatus) -> bool:
    """Between attempts: the next one may open (the first one, one after a suspension, or one whose backoff has
    passed)."""
    last = status.attempts[-1] if status.attempts else None
    if last is None or last.reason in NOT_COUNTED:
        return True
    wait = backoff_seconds(p.spec, counted_failures(status.attempts))
    return p.now >= (last.completion_time or p.now) + timedelta(seconds=wait)


def start_attempt(p: Pass, status: FineTuneJobStatus, run: RunRecord) -> Step:
    """Open the run's next attempt: its record, the run's start time on its first, and a cost from then on."""
    last = status.attempts[-1] if status.attempts else None
    number = (status.attempt or 0) + 1
    kept, dropped = _trimmed([*status.attempts, AttemptRecord(attempt=number, start_time=p.now)])
    update: dict[str, Any] = {"attempts": kept, "attempt": number}
    if dropped:
        update["dropped_attempts"] = _dropped(status.dropped_attempts, dropped)
    if status.start_time is None:
        update["start_time"] = p.now
        update["runs"] = record_run(status.runs, run.model_copy(update={"start_time": p.now}))
    if status.cost is None:
        update["cost"] = CostStatus(gpu_hours=0.0, usd=0.0)
    step = elsewhere_checkpoint(p, status.model_copy(update=update), run)
    if last is None:
        return step  # the run's first attempt: RunStarted announced it
    if last.reason == "Suspended":
        resumed = f"attempt {number} of run {run.run} resumes from the latest checkpoint"
        return step.then(p.event(step.status, "Normal", "Resumed", resumed))
    workers = p.trained(run).resources.num_nodes
    started = f"attempt {number} of run {run.run}: creating {workers} workers"
    return step.then(p.event(step.status, "Normal", "AttemptStarted", started))


def close_attempt(
    p: Pass,
    status: FineTuneJobStatus,
    reason: AttemptReason,
    message: str,
    exit_code: int | None = None,
    at: datetime | None = None,
) -> FineTuneJobStatus:
    """The open attempt's record ended with `reason` (no change when none is open)."""
    current = open_attempt(status)
    if current is None:
        return status
    closed = current.model_copy(
        update={"reason": reason, "message": message, "completion_time": at or p.now, "exit_code": exit_code}
    )
    return status.model_copy(update={"attempts": [*status.attempts[:-1], closed]})


def attempt_failed(p: Pass, status: FineTuneJobStatus, run: RunRecord, failure: WorkerFailure) -> Outcome:
    status = close_attempt(p, status, failure.reason, failure.message, failure.exit_code)
    if failure.permanent:
        return fail_run(p, status, run, "PermanentError", failure.message)
    failures = counted_failures(status.attempts)
    allowed = p.spec.run_policy.max_restarts
    attempt = status.attempt
    if failures > allowed:
        why = f"attempt {attempt}: {failure.message}; no restarts left (runPolicy.maxRestarts={allowed})"
        return fail_run(p, status, run, failure.reason, why)
    wait = backoff_seconds(p.spec, failures)
    step = p.event(
        status,
        "Warning",
        failure.reason,
        f"attempt {attempt} of run {run.run} failed: {failure.message}; restart {failures} of {allowed} "
        f"in {wait}s from the latest checkpoint",
    )
    return _after(step, backing_off(p, status, run))


def backing_off(p: Pass, status: FineTuneJobStatus, run: RunRecord) -> Outcome:
    last = status.attempts[-1]
    wait = backoff_seconds(p.spec, counted_failures(status.attempts))
    left = max(0.0, wait - (p.now - (last.completion_time or p.now)).total_seconds())
    return Step(status, recheck=(left,)), Situation(
        "Pending",
        "BackingOff",
        f"attempt {last.attempt} of run {run.run} ended ({last.reason}); attempt {last.attempt + 1} starts "
        f"after a {wait}s backoff{p.queued_note(run)}",
        in_progress=True,
    )


def fenced(p: Pass, status: FineTuneJobStatus, run: RunRecord, stopping: list[PodState]) -> Outcome:
    """The next attempt is due, but workers of an earlier one may still write (checkpointing after SIGTERM, or
    not reached yet): it opens only once they are gone or terminated, never beside them. A pod past its grace
    period stays only while its kubelet cannot be reached; Kubernetes removes it once the node is declared gone
    (the Node deleted, or tainted node.kubernetes.io/out-of-service), and the run's activeDeadlineSeconds still
    applies while it waits."""
    last = status.attempts[-1]
    pod = min(stopping, key=lambda pod: (pod.deletion_due is None, pod.deletion_due or p.now, pod.name))
    node = pod.usage.node_name
    on = f" on node {node}" if node else ""
    doing = "terminating" if pod.deleting else "running"
    message = (
        f"attempt {last.attempt + 1} of run {run.run} starts when the workers of earlier attempts have stopped: "
        f"{len(stopping)} still {doing} (pod {pod.name}{on})"
    )
    overdue = pod.deletion_due is not None and p.now > pod.deletion_due
    if not overdue:
        return Step(status), Situation("Pending", "WaitingForWorkers", message + p.queued_note(run), True)
    late = format_eta((p.now - pod.deletion_due).total_seconds()) if pod.deletion_due else ""
    message += (
        f", {late} past its grace period: its node does not answer. If {node or 'the node'} is lost for good, "
        "delete its Node or taint it node.kubernetes.io/out-of-service=nodeshutdown:NoExecute, and Kubernetes "
        "removes the pod"
    )
    step = Step(status)
    if _reconciling_reason(status) != WORKERS_NOT_STOPPING:
        step = p.event(status, "Warning", WORKERS_NOT_STOPPING, message)
    return step, Situation("Pending", WORKERS_NOT_STOPPING, message + p.queued_note(run), True)


def _reconciling_reason(status: FineTuneJobStatus) -> str | None:
    condition = next((c for c in status.conditions if c.type == "Reconciling" and c.status == "True"), None)
    return condition.reason if condition else None


def observe_attempt(p: Pass, status: FineTuneJobStatus, run: RunRecord) -> Outcome:
    """The open attempt as its Job and pods show it: starting, training, finishing, failed or complete."""
    attempt = open_attempt(status)
    assert attempt is not None
    job = p.observed.job(attempt_name(p.owner.name, run.run, attempt.attempt))
    pods = p.observed.pods_of(run.run, attempt.attempt)
    workers = p.trained(run).resources.num_nodes
    queued = p.queued_note(run)
    if job is not None and job.deleting:
        return Step(status), Situation(
            "Pending", "CreatingWorkers", f"creating the Job of attempt {attempt.attempt}", True
        )
    if job is None:
        # Being created (by this pass, or the last one while the cache does not show it yet): the same words as
        # once it shows, so the status is not rewritten just for that.
        return Step(status), Situation("Pending", "WorkersStarting", f"{workers} workers starting{queued}", True)
    if job.suspended:
        # Kueue holds the Job until it admits all workers; pods it removes on preemption are not failures.
        queue = p.trained(run).resources.queue_name
        return Step(status), Situation(
            "Pending", "Queued", f"waiting for Kueue to admit the workers (queue {queue})", True
        )
    failure = attempt_failure(job, pods)
    if failure:
        return attempt_failed(p, status, run, failure)
    if job.complete:
        if _rank0_not_seen_ending(job, pods, p.now):
            return Step(status, recheck=(FINAL_REPORT_POLL,)), Situation(
                "Running", "Finishing", f"all {workers} workers finished{queued}", True
            )
        status = take_final_report(status, pods)
        status = close_attempt(p, status, "Completed", "all workers finished", exit_code=0, at=job.completion_time)
        return succeed_run(p, status, run, job.completion_time)
    ready = sum(1 for pod in pods if pod.ready and not pod.deleting)
    finished_pods = sum(1 for pod in pods if pod.phase == "Succeeded")
    if ready == workers:
        setup = status.progress.setup if status.progress else None
        doing = f"; setting up: {setup_text(setup)}" if setup else ""
        return Step(status), Situation("Running", "Training", f"all {workers} workers running{doing}{queued}", True)
    if finished_pods and ready + finished_pods == workers:
        # Workers exit one by one at the end; the Job is Complete a moment after the last.
        return Step(status), Situation(
            "Running", "Finishing", f"{finished_pods} of {workers} workers finished{queued}", True
        )
    # How many are ready is in status.workers (a running figure, written at its own pace); what one waits for is news.
    return Step(status), Situation(
        "Pending",
        "WorkersStarting",
        f"{workers} workers starting{_first_wait(pods)}{queued}",
        True,
    )


def take_final_report(status: FineTuneJobStatus, pods: list[PodState]) -> FineTuneJobStatus:
    """Rank 0's final figures (its termination message) into status.progress, which the evaluation gate and the
    run's record read."""
    ended = next((p.termination for p in pods if p.index == 0 and p.termination and p.termination.final), None)
    if ended is None or ended.final is None:
        return status
    return status.model_copy(update={"progress": final_progress(ended.final, status.progress, ended.finished_at)})


# ----------------------------------------------------------------------------------------------
# 3. status summary and children
# ----------------------------------------------------------------------------------------------


def summarize(p: Pass, status: FineTuneJobStatus, situation: Situation) -> Step:
    """The conditions and phase from where the run stands, and the current attempt's workers."""
    conditions = status.conditions

    def put(type_: ConditionType, true: bool, reason: str, message: str) -> None:
        nonlocal conditions
        conditions = set_condition(
            conditions,
            type_,
            "True" if true else "False",
            reason,
            message,
            observed_generation=p.generation,
            now=p.now,
        )

    s = situation
    put("Ready", s.phase == "Succeeded", s.reason, s.message)
    put("Reconciling", s.in_progress, s.reason, s.message if s.in_progress else "")
    put("Stalled", s.phase == "Failed", s.reason, s.message if s.phase == "Failed" else "")
    for type_ in ("Running", "Succeeded", "Failed", "Suspended"):
        put(type_, s.phase == type_, s.reason, s.message if s.phase == type_ else "")
    ignored = status.checkpoint.ignored if status.checkpoint else []
    if ignored:
        listed = "; ".join(f"{i.path} ({i.reason})" for i in ignored)
        put("CheckpointsIgnored", True, "NotThisTraining", f"left untouched, never resumed from: {listed}")
    elif any(c.type == "CheckpointsIgnored" for c in conditions):
        put("CheckpointsIgnored", False, "NoneFound", "")
    update: dict[str, Any] = {
        "conditions": conditions,
        "phase": compute_phase(conditions),
        "observed_generation": p.generation,
    }
    if status.attempt is not None and status.run is not None:
        update["workers"] = _workers(p.observed.pods_of(status.run, status.attempt))
    # No event on entering Running: the Running condition's transition time says when, and an event per job
    # would be one more API write than anything a reader needs.
    return Step(status.model_copy(update=update))


def children(p: Pass, status: FineTuneJobStatus) -> tuple[list[Manifest], list[Deletion], list[str], Step]:
    """What should exist now, created if missing; everything else labelled as ours is deleted; an owned claim that
    holds outputs is released."""
    name, run = p.owner.name, current_run(status)
    assert run is not None
    attempt = open_attempt(status)
    active: dict[tuple[str, str], None] = {}
    kept: set[tuple[str, str]] = set()
    release = []
    if p.spec.checkpoint.volume_claim_template:
        claim = claim_name(name)
        active[("PersistentVolumeClaim", claim)] = None
        owned = any(c.name == claim and c.owner_uid == p.owner.uid for c in p.observed.claims)
        if owned and outputs_on_checkpoint_claim(name, p.spec):
            release.append(claim)

    # The run's attempts' ConfigMaps hold the spec the run trains: kept with the run (a few, immutable).
    configs = {("ConfigMap", attempt_name(name, run.run, a.attempt)) for a in status.attempts}
    if attempt is not None:
        attempt_children = attempt_name(name, run.run, attempt.attempt)
        active[("ConfigMap", attempt_children)] = None
        active[("Service", attempt_children)] = None
        active[("Job", attempt_children)] = None
        kept |= configs
    elif run.result is None:
        kept |= configs
    elif not _ttl_expired(p, run):
        kept |= configs
        last = status.attempts[-1] if status.attempts else None
        if last is not None and last.reason == "Completed":
            # A Job whose workers finished (run Succeeded, or failed its evaluation gate) and its pods keep
            # the logs until ttlSecondsAfterFinished.
            kept.add(("Job", attempt_name(name, run.run, last.attempt)))

    existing = _existing(p.observed)
    create = [
        _render(p, kind, child, run, attempt)
        for kind, child in sorted(active, key=lambda k: CREATION_ORDER.index(k[0]))
        if (kind, child) not in existing and (kind, child) not in p.observed.just_created
    ]
    delete = [
        Deletion(*key)
        for key, deleting in existing.items()
        if not deleting
        and key not in active
        and key not in kept
        and key not in p.observed.just_deleted
        # A claim holds checkpoints and perhaps outputs: it goes only with the FineTuneJob itself.
        and key[0] != "PersistentVolumeClaim"
    ]
    if delete and run.result is not None and _ttl_expired(p, run):
        cleaned = f"deleted the workers of run {run.run} (ttlSecondsAfterFinished)"
        return create, delete, release, p.event(status, "Normal", "CleanedUp", cleaned)
    return create, delete, release, Step(status)


def _existing(o: Observed) -> dict[tuple[str, str], bool]:
    """Every child that exists, with whether it is already being deleted."""
    existing = {("Job", j.name): j.deleting for j in o.jobs}
    existing.update({("Service", s.name): s.deleting for s in o.services})
    existing.update({("ConfigMap", c.name): c.deleting for c in o.config_maps})
    existing.update({("PersistentVolumeClaim", c.name): c.deleting for c in o.claims})
    return existing


def _render(p: Pass, kind: str, name: str, run: RunRecord, attempt: AttemptRecord | None) -> Manifest:
    s, o, spec = p.settings, p.owner, p.trained(run)
    if kind == "PersistentVolumeClaim":
        template = p.spec.checkpoint.volume_claim_template
        assert template is not None
        # A claim that receives the outputs must outlive the job: it gets no owner.
        return render_claim(o, template, owned=not outputs_on_checkpoint_claim(o.name, p.spec))
    assert attempt is not None
    if kind == "ConfigMap":
        return render_attempt_config(o, spec, run.run, attempt.attempt, run.generation, s)
    if kind == "Service":
        return render_service(o, run.run, attempt.attempt, s)
    return render_job(o, spec, run.run, attempt.attempt, s)


def _ttl_expired(p: Pass, run: RunRecord) -> bool:
    ttl = p.spec.run_policy.ttl_seconds_after_finished
    return ttl is not None and run.completion_time is not None and p.now >= run.completion_time + timedelta(seconds=ttl)


def _workers(pods: list[PodState]) -> Workers:
    live = [p for p in pods if not p.deleting]
    return Workers(
        active=sum(1 for p in live if p.phase in ("Pending", "Running")),
        ready=sum(1 for p in live if p.ready),
        succeeded=sum(1 for p in pods if p.phase == "Succeeded"),
        failed=sum(1 for p in pods if p.phase == "Failed"),
    )


def _first_wait(pods: list[PodState]) -> str:
    waiting = next((p for p in sorted(pods, key=lambda p: p.index or 0) if p.waiting), None)
    return f"; worker {waiting.index} waits: {waiting.waiting}" if waiting else ""


def _rank0_not_seen_ending(job: JobState, pods: list[PodState], now: datetime) -> bool:
    """The Job is Complete but its rank-0 pod, as cached, has not ended yet (its watch event is late)."""
    rank0 = next((p for p in pods if p.index == 0 and not p.deleting), None)
    return (
        rank0 is not None
        and rank0.phase not in ("Succeeded", "Failed")
        and job.completion_time is not None
        and now < job.completion_time + FINAL_REPORT_WAIT
    )


def final_progress(final: FinalReport, previous: Progress | None, at: datetime | None) -> Progress:
    """status.progress of a run that finished, from rank 0's final report. Its figures are the final ones (a
    figure it leaves out, or could not compute, is no figure: the evaluation gate must not pass on an older
    evaluation); the curve so far ends with the final point; MFU stays the last one polled."""
    m = final.final_metrics
    loss, eval_loss = finite(m.train_loss), finite(m.eval_loss)
    sets = eval_set_results(
        {
            name: ReportedSet(
                loss=f.loss,
                perplexity=evalsets.perplexity(f.loss) if f.loss is not None else None,
                base_loss=f.base_loss,
                change=evalsets.change(f.loss, f.base_loss),
            )
            for name, f in m.eval_sets.items()
        }
    )
    point_sets = {r.name: r.loss for r in sets if r.loss is not None} or None
    history = [h for h in previous.history if h.step < m.steps] if previous else []
    if loss is not None or eval_loss is not None or point_sets:
        history.append(HistoryPoint(step=m.steps, loss=loss, eval_loss=eval_loss, eval_sets=point_sets))
    return Progress(
        step=m.steps,
        total_steps=m.steps,
        percent=100,
        epoch=finite(m.epochs, low=0),
        loss=loss,
        eval_loss=eval_loss,
        base_eval_loss=finite(m.base_eval_loss),
        eval_sets=sets or None,
        data_report=previous.data_report if previous else None,
        tokens_per_second=finite(m.tokens_per_second, low=0),
        mfu=previous.mfu if previous else None,
        eta="0s",
        eta_seconds=0,
        updated_at=at or (previous.updated_at if previous else None),
        history=thin_history(history),
    )


def _with_spend(attempt: AttemptRecord, spent: Spend) -> AttemptRecord:
    """The attempt's record with its measured spend; never lower than recorded (pods that are gone no longer
    count when measured again)."""
    hours = max(attempt.gpu_hours or 0.0, round(spent.gpu_seconds / 3600, 4))
    usd = max(attempt.cost_usd or 0.0, round(spent.usd, 4))
    return attempt.model_copy(update={"gpu_hours": hours, "cost_usd": usd})


def _trimmed(attempts: list[AttemptRecord]) -> tuple[list[AttemptRecord], list[AttemptRecord]]:
    """The list within the API's bound, and what was dropped: the oldest suspensions go (failures are what
    maxRestarts counts, and there are at most maxRestarts + 1 of them)."""
    kept, dropped = list(attempts), []
    while len(kept) > MAX_ATTEMPTS:
        dropped.append(kept.pop(next(i for i, a in enumerate(kept) if a.reason == "Suspended")))
    return kept, dropped


def _dropped(before: DroppedAttempts | None, attempts: list[AttemptRecord]) -> DroppedAttempts:
    """`before` with `attempts` added: how many, and what they used (ended attempts' records are final)."""
    before = before or DroppedAttempts(count=0, gpu_hours=0.0, cost_usd=0.0)
    return DroppedAttempts(
        count=before.count + len(attempts),
        gpu_hours=round((before.gpu_hours or 0.0) + sum(a.gpu_hours or 0.0 for a in attempts), 4),
        cost_usd=round((before.cost_usd or 0.0) + sum(a.cost_usd or 0.0 for a in attempts), 4),
    )


def status_wire(status: FineTuneJobStatus | None) -> dict[str, Any]:
    return status.model_dump(mode="json", by_alias=True, exclude_none=True) if status else {}
