"""The level-triggered heart of the operator: reconcile(ftj, observed, settings, now) -> Plan. Pure.

Given the FineTuneJob (spec and the status the operator wrote before) and what exists now, it decides the
status to write, the children to create and delete, the events to emit, and when to look again. It never
looks at what happened in between, so a restarted operator, a second replica or a missed watch event all
converge to the same answer. The retry budget lives in status.attempts, never in children, so deleting
children cannot reset it.

Runs and attempts:
- a run trains one spec fingerprint (status.runs[].specHash: every field but runPolicy, budget and
  evaluation) and one kubetune.io/rerun token; a different one starts a new run, at once with
  onSpecChange=Restart, after the current run with Queue;
- an attempt is one Indexed Job of the run; when a worker fails, the attempt ends, its Job is deleted (the other
  workers checkpoint on SIGTERM) and, after a backoff, the next attempt resumes from the run's checkpoint dir,
  until maxRestarts failures; the trainer's exit code 78 fails the run at once;
- suspending deletes the attempt's Job (reason Suspended, not counted); resuming starts the next attempt.

Observability: rank 0's latest report becomes status.progress and status.checkpoint; when the attempt completes,
the final figures rank 0 left in its termination message replace it (they are there even when the run ended
between two polls). The run's cost is measured from its pods on every reconcile (ended attempts keep theirs in
status.attempts, attempts dropped from that bounded list in status.droppedAttempts); the policies (deadline,
budget, stall) judge the run with both; a run whose workers completed still fails its evaluation gate
(EvalGateFailed) when the final eval loss is too high, and its output is kept but not promoted.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from kubetune_operator.api import RERUN_ANNOTATION, FineTuneJob
from kubetune_operator.api.spec import FineTuneJobSpec
from kubetune_operator.api.status import (
    MAX_ATTEMPTS,
    AttemptReason,
    AttemptRecord,
    ConditionType,
    DroppedAttempts,
    FineTuneJobStatus,
    HistoryPoint,
    OutputStatus,
    Phase,
    Progress,
    RunRecord,
    Workers,
    compute_phase,
    record_run,
    set_condition,
)
from kubetune_operator.cost import Spend, pods_spend, run_cost
from kubetune_operator.failures import WorkerFailure, attempt_failure
from kubetune_operator.names import attempt_name, claim_name, run_config_name
from kubetune_operator.observed import FinalReport, JobState, Observed, PodState
from kubetune_operator.policies import RunContext, eval_gate, judge, open_attempt
from kubetune_operator.progress import finite, thin_history, to_status
from kubetune_operator.render import (
    Manifest,
    Owner,
    render_claim,
    render_config_map,
    render_job,
    render_service,
)
from kubetune_operator.settings import OperatorSettings
from kubetune_operator.storage import JOB_DIR, PVC_SCHEME, checkpoint_claim, output_uri

# Fields that say how a run is governed rather than what it trains: changing them never starts a new run.
GOVERNANCE_FIELDS = {"run_policy", "budget", "evaluation"}
# Ended-attempt reasons that do not count against runPolicy.maxRestarts.
NOT_COUNTED: frozenset[AttemptReason] = frozenset({"Suspended", "SpecChanged", "Completed"})
# Kind -> the order children are created in: storage and config first, so pods find them.
CREATION_ORDER = ("PersistentVolumeClaim", "ConfigMap", "Service", "Job")
# A Job is Complete once its pods succeeded, but the pods' watch can deliver that a moment after the Job's: wait
# this long (looking again every FINAL_REPORT_POLL seconds) for rank 0's pod to show its final report.
FINAL_REPORT_WAIT = timedelta(seconds=10)
FINAL_REPORT_POLL = 1.0


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


def reconcile(ftj: FineTuneJob, observed: Observed, settings: OperatorSettings, now: datetime) -> Plan:
    if ftj.metadata.get("deletionTimestamp"):
        # Children go with the job (ownerReferences); there is nothing left to decide.
        return Plan(status=ftj.status or FineTuneJobStatus())
    return _Reconciliation(ftj, observed, settings, now).plan()


class _Reconciliation:
    """One reconcile: works on a copy of the status and collects events, children and wake-up times."""

    def __init__(self, ftj: FineTuneJob, observed: Observed, settings: OperatorSettings, now: datetime) -> None:
        meta = ftj.metadata
        self.ftj = ftj
        self.settings = settings
        self.now = now
        self.owner = Owner(name=meta["name"], namespace=meta["namespace"], uid=meta["uid"])
        self.observed = observed.owned_by(self.owner.uid)
        self.status = (ftj.status or FineTuneJobStatus()).model_copy(deep=True)
        self.generation = int(meta.get("generation") or 1)
        self.spec = ftj.spec
        self.fingerprint = run_fingerprint(self.spec)
        self.rerun_token: str | None = (meta.get("annotations") or {}).get(RERUN_ANNOTATION)
        self.events: list[Event] = []
        self.recheck: list[float] = []
        self.queued_note = ""

    # ------------------------------------------------------------------------------------------
    # the decision
    # ------------------------------------------------------------------------------------------

    def plan(self) -> Plan:
        situation = self._decide()
        self._write_summary(situation)
        create, delete = self._children()
        s = self.settings
        self.recheck.append(s.progress_poll_interval_seconds if situation.in_progress else s.resync_seconds)
        return Plan(
            status=self.status,
            create=tuple(create),
            delete=tuple(delete),
            events=tuple(self.events),
            requeue_after=min(self.recheck) if self.recheck else None,
        )

    def _decide(self) -> Situation:
        run = self._current_run()
        if run is None:
            run = self._start_run(1, why="RunStarted")
        elif run.spec_hash != self.fingerprint or run.rerun_token != self.rerun_token:
            run = self._on_run_change(run)

        if run.result is not None:
            return self._finished(run)
        self._take_report(run)
        if self.observed.rejection and self.observed.rejection.run == run.run:
            return self._fail_run(run, "InvalidSpec", self.observed.rejection.message)
        if self.spec.run_policy.suspend:
            return self._suspended(run)

        running = self._open_attempt() is not None or self._start_next_attempt(run)
        self._measure_cost(run)
        ruling = judge(RunContext(self.spec, self.status, self.observed, self.now))
        if ruling.recheck_at:
            self.recheck.append((ruling.recheck_at - self.now).total_seconds())
        verdict = ruling.verdict
        if verdict and verdict.action == "stop":
            self._close_attempt(verdict.reason, verdict.message)
            return self._fail_run(run, verdict.reason, verdict.message)
        if not running:
            return self._backing_off(run)
        if verdict:
            return self._attempt_failed(run, WorkerFailure(verdict.reason, verdict.message))
        return self._observe_attempt(run)

    # ------------------------------------------------------------------------------------------
    # runs
    # ------------------------------------------------------------------------------------------

    def _current_run(self) -> RunRecord | None:
        return next((r for r in self.status.runs if r.run == self.status.run), None)

    def _run_spec(self, run: RunRecord) -> FineTuneJobSpec | None:
        """The spec the run trains: the live spec, or the run's stored copy while a change waits in the queue."""
        if run.spec_hash == self.fingerprint:
            return self.spec
        stored = self.observed.run_config(run_config_name(self.owner.name, run.run))
        return stored.spec() if stored else None

    def _trained(self, run: RunRecord) -> FineTuneJobSpec:
        """What the run's workers look like: its own spec (governance fields always come from the live one)."""
        return self._run_spec(run) or self.spec

    def _on_run_change(self, run: RunRecord) -> RunRecord:
        why = "SpecChanged" if run.spec_hash != self.fingerprint else "RerunRequested"
        queue = self.spec.run_policy.on_spec_change == "Queue"
        # Queued changes wait for the run, which keeps training its own stored spec; if that copy is gone the
        # run cannot be rendered again, and the newer spec replaces it.
        if run.result is None and queue and self._run_spec(run) is not None:
            what = f"generation {self.generation}" if why == "SpecChanged" else f"rerun {self.rerun_token!r}"
            self.queued_note = f"; {what} is queued and starts when run {run.run} finishes"
            if self.status.observed_generation != self.generation:
                self._event("Normal", "RunQueued", f"{what} starts when run {run.run} finishes (onSpecChange: Queue)")
            return run
        if run.result is None:
            cause = "the spec changed" if why == "SpecChanged" else "a rerun was requested"
            self._close_attempt("SpecChanged", f"run {run.run} was replaced: {cause}")
            self._end_run(run, "Cancelled", why, f"{cause}; run {run.run + 1} replaces it")
        return self._start_run(run.run + 1, why=why)

    def _start_run(self, number: int, why: str) -> RunRecord:
        record = RunRecord(
            run=number, generation=self.generation, rerun_token=self.rerun_token, spec_hash=self.fingerprint
        )
        self.status.runs = record_run(self.status.runs, record)
        self.status.run = number
        self.status.attempt = None
        self.status.attempts = []
        self.status.dropped_attempts = None
        self.status.start_time = None
        self.status.completion_time = None
        self.status.workers = None
        self.status.progress = None
        self.status.checkpoint = None
        self.status.cost = None
        detail = {"SpecChanged": " (the spec changed)", "RerunRequested": " (a rerun was requested)"}.get(why, "")
        self._event("Normal", why, f"run {number} started for generation {self.generation}{detail}")
        return record

    def _end_run(
        self,
        run: RunRecord,
        result: Literal["Succeeded", "Failed", "Cancelled"],
        reason: str,
        msg: str,
        at: datetime | None = None,
        output: str | None = None,
    ) -> RunRecord:
        at = at or self.now
        progress = self.status.progress
        self._measure_cost(run)
        cost = self.status.cost
        ended = run.model_copy(
            update={
                "result": result,
                "reason": reason,
                "completion_time": at,
                "attempts": self.status.attempt,
                "final_loss": progress.loss if progress else None,
                "final_eval_loss": progress.eval_loss if progress else None,
                "output": output,
                "gpu_hours": cost.gpu_hours if cost else None,
                "cost_usd": cost.usd if cost else None,
            }
        )
        self.status.runs = record_run(self.status.runs, ended)
        self.status.completion_time = at
        if result == "Cancelled":
            self._event("Normal", reason, f"run {run.run} cancelled: {msg}")
        return ended

    def _fail_run(
        self, run: RunRecord, reason: str, message: str, at: datetime | None = None, output: str | None = None
    ) -> Situation:
        ended = self._end_run(run, "Failed", reason, message, at=at, output=output)
        self._event("Warning", reason, f"run {run.run} failed: {message}")
        self._recheck_at_ttl(ended)
        return Situation("Failed", reason, message, in_progress=False)

    def _succeed_run(self, run: RunRecord, completed_at: datetime | None) -> Situation:
        uri = output_uri(self.owner.namespace, self.owner.name, self._trained(run), run.run)
        progress = self.status.progress
        # The Job's own completion time, so every replica writes the same status.
        gate = eval_gate(self.spec.evaluation, progress.eval_loss if progress else None)
        if gate is not None:
            self.status.output = OutputStatus(path=uri, promoted=False)
            message = f"{gate}; the output at {uri} is kept, not promoted"
            return self._fail_run(run, "EvalGateFailed", message, at=completed_at, output=uri)
        ended = self._end_run(run, "Succeeded", "Succeeded", "", at=completed_at, output=uri)
        self.status.output = OutputStatus(path=uri, promoted=True)
        self._event("Normal", "Succeeded", f"run {run.run} succeeded; output at {uri}")
        return self._finished(ended)

    def _recheck_at_ttl(self, run: RunRecord) -> None:
        ttl = self.spec.run_policy.ttl_seconds_after_finished
        if ttl is not None and run.completion_time is not None:
            expiry = run.completion_time + timedelta(seconds=ttl)
            if self.now < expiry:
                self.recheck.append((expiry - self.now).total_seconds())

    def _finished(self, run: RunRecord) -> Situation:
        self._recheck_at_ttl(run)
        if run.result == "Succeeded":
            return Situation("Succeeded", "Succeeded", f"run {run.run} succeeded", in_progress=False)
        failed = next((c for c in self.status.conditions if c.type == "Failed" and c.status == "True"), None)
        reason = run.reason or "Failed"
        message = failed.message if failed and failed.reason == reason else self._last_attempt_message(run)
        return Situation("Failed", reason, message, in_progress=False)

    def _last_attempt_message(self, run: RunRecord) -> str:
        last = self.status.attempts[-1] if self.status.attempts else None
        return (last.message if last and last.message else "") or f"run {run.run} failed ({run.reason})"

    # ------------------------------------------------------------------------------------------
    # progress and cost
    # ------------------------------------------------------------------------------------------

    def _take_report(self, run: RunRecord) -> None:
        """The current attempt's latest report from rank 0 into status.progress and status.checkpoint."""
        trainer = self.observed.trainer
        if (
            trainer is None
            or trainer.report is None
            or (trainer.run, trainer.attempt) != (run.run, self.status.attempt)
        ):
            return
        claim = checkpoint_claim(self.owner.name, self._trained(run))
        self.status.progress, self.status.checkpoint = to_status(
            trainer.report,
            previous_checkpoint=self.status.checkpoint,
            checkpoint_root=JOB_DIR,
            checkpoint_uri=f"{PVC_SCHEME}{claim}/{self.owner.namespace}/{self.owner.name}",
        )

    def _take_final_report(self, pods: list[PodState]) -> None:
        """Rank 0's final figures (its termination message) into status.progress, which the evaluation gate and the
        run's record read."""
        ended = next((p.termination for p in pods if p.index == 0 and p.termination and p.termination.final), None)
        if ended is not None and ended.final is not None:
            self.status.progress = final_progress(ended.final, self.status.progress, ended.finished_at)

    def _measure_cost(self, run: RunRecord) -> None:
        """status.cost of the run, from its attempts' records, each first brought up to what its pods used so far
        (pods that are gone, or not seen yet after a restart, never lower a record)."""
        if not self.status.attempts:
            return
        resources = self._trained(run).resources
        pricing, nodes = self.settings.pricing, self.observed.nodes
        dropped = self.status.dropped_attempts
        spent = Spend((dropped.gpu_hours or 0.0) * 3600, dropped.cost_usd or 0.0) if dropped else Spend()
        attempts = []
        for a in self.status.attempts:
            usage = [p.usage for p in self.observed.pods_of(run.run, a.attempt)]
            if usage:
                measured = pods_spend(
                    usage, pricing=pricing, nodes=nodes, gpu_product=resources.gpu_product, now=self.now
                )
                a = _with_spend(a, measured)
            spent += Spend((a.gpu_hours or 0.0) * 3600, a.cost_usd or 0.0)
            attempts.append(a)
        self.status.attempts = attempts
        current = self._open_attempt()
        progress = self.status.progress
        self.status.cost = run_cost(
            spent=spent,
            pods=[p.usage for p in self.observed.pods_of(run.run, current.attempt)] if current else [],
            resources=resources,
            pricing=pricing,
            nodes=nodes,
            eta_seconds=0.0 if run.result is not None else (progress.eta_seconds if progress else None),
        )

    # ------------------------------------------------------------------------------------------
    # attempts
    # ------------------------------------------------------------------------------------------

    def _open_attempt(self) -> AttemptRecord | None:
        return open_attempt(self.status)

    def _start_next_attempt(self, run: RunRecord) -> bool:
        """Open the next attempt if it is due: the first one, one after a suspension, or one whose backoff
        has passed. False while backing off."""
        last = self.status.attempts[-1] if self.status.attempts else None
        if last is not None and last.reason not in NOT_COUNTED:
            wait = backoff_seconds(self.spec, counted_failures(self.status.attempts))
            if self.now < (last.completion_time or self.now) + timedelta(seconds=wait):
                return False
        number = (self.status.attempt or 0) + 1
        kept, dropped = _trimmed([*self.status.attempts, AttemptRecord(attempt=number, start_time=self.now)])
        self.status.attempts = kept
        if dropped:
            self.status.dropped_attempts = _dropped(self.status.dropped_attempts, dropped)
        self.status.attempt = number
        if self.status.start_time is None:
            self.status.start_time = self.now
            self.status.runs = record_run(self.status.runs, run.model_copy(update={"start_time": self.now}))
        workers = self._trained(run).resources.num_nodes
        if last is not None and last.reason == "Suspended":
            self._event("Normal", "Resumed", f"attempt {number} of run {run.run} resumes from the latest checkpoint")
        else:
            self._event("Normal", "AttemptStarted", f"attempt {number} of run {run.run}: creating {workers} workers")
        return True

    def _close_attempt(
        self, reason: AttemptReason, message: str, exit_code: int | None = None, at: datetime | None = None
    ) -> None:
        current = self._open_attempt()
        if current is None:
            return
        closed = current.model_copy(
            update={"reason": reason, "message": message, "completion_time": at or self.now, "exit_code": exit_code}
        )
        self.status.attempts = [*self.status.attempts[:-1], closed]

    def _attempt_failed(self, run: RunRecord, failure: WorkerFailure) -> Situation:
        self._close_attempt(failure.reason, failure.message, failure.exit_code)
        if failure.permanent:
            return self._fail_run(run, "PermanentError", failure.message)
        failures = counted_failures(self.status.attempts)
        allowed = self.spec.run_policy.max_restarts
        attempt = self.status.attempt
        if failures > allowed:
            return self._fail_run(
                run,
                failure.reason,
                f"attempt {attempt}: {failure.message}; no restarts left (runPolicy.maxRestarts={allowed})",
            )
        wait = backoff_seconds(self.spec, failures)
        self._event(
            "Warning",
            failure.reason,
            f"attempt {attempt} of run {run.run} failed: {failure.message}; restart {failures} of {allowed} "
            f"in {wait}s from the latest checkpoint",
        )
        return self._backing_off(run)

    def _backing_off(self, run: RunRecord) -> Situation:
        last = self.status.attempts[-1]
        wait = backoff_seconds(self.spec, counted_failures(self.status.attempts))
        self.recheck.append(max(0.0, wait - ((self.now - (last.completion_time or self.now)).total_seconds())))
        return Situation(
            "Pending",
            "BackingOff",
            f"attempt {last.attempt} of run {run.run} ended ({last.reason}); attempt {last.attempt + 1} starts "
            f"after a {wait}s backoff{self.queued_note}",
            in_progress=True,
        )

    def _suspended(self, run: RunRecord) -> Situation:
        if self._open_attempt() is not None:
            self._close_attempt("Suspended", "suspended by spec.runPolicy.suspend")
            self._event("Normal", "Suspended", f"run {run.run} suspended: its workers checkpoint and stop")
        stopping = [p for p in self.observed.pods if p.run == run.run and p.phase in ("Pending", "Running")]
        if stopping:
            return Situation(
                "Suspended", "Suspending", f"waiting for {len(stopping)} workers to checkpoint and stop", True
            )
        return Situation("Suspended", "Suspended", f"run {run.run} is suspended (spec.runPolicy.suspend)", False)

    def _observe_attempt(self, run: RunRecord) -> Situation:
        attempt = self._open_attempt()
        assert attempt is not None
        job = self.observed.job(attempt_name(self.owner.name, run.run, attempt.attempt))
        pods = self.observed.pods_of(run.run, attempt.attempt)
        workers = self._trained(run).resources.num_nodes
        if job is None or job.deleting:
            return Situation("Pending", "CreatingWorkers", f"creating the Job of attempt {attempt.attempt}", True)
        if job.suspended:
            # Kueue holds the Job until it admits all workers; pods it removes on preemption are not failures.
            queue = self._trained(run).resources.queue_name
            return Situation("Pending", "Queued", f"waiting for Kueue to admit the workers (queue {queue})", True)
        failure = attempt_failure(job, pods)
        if failure:
            return self._attempt_failed(run, failure)
        if job.complete:
            if _rank0_not_seen_ending(job, pods, self.now):
                self.recheck.append(FINAL_REPORT_POLL)
                return Situation("Running", "Finishing", f"all {workers} workers finished{self.queued_note}", True)
            self._take_final_report(pods)
            self._close_attempt("Completed", "all workers finished", exit_code=0, at=job.completion_time)
            return self._succeed_run(run, job.completion_time)
        ready = sum(1 for p in pods if p.ready and not p.deleting)
        finished = sum(1 for p in pods if p.phase == "Succeeded")
        if ready == workers:
            return Situation("Running", "Training", f"all {workers} workers running{self.queued_note}", True)
        if finished and ready + finished == workers:
            # Workers exit one by one at the end; the Job is Complete a moment after the last.
            return Situation(
                "Running", "Finishing", f"{finished} of {workers} workers finished{self.queued_note}", True
            )
        return Situation(
            "Pending",
            "WorkersStarting",
            f"{ready} of {workers} workers running{_first_wait(pods)}{self.queued_note}",
            True,
        )

    # ------------------------------------------------------------------------------------------
    # status summary and children
    # ------------------------------------------------------------------------------------------

    def _write_summary(self, situation: Situation) -> None:
        status, gen, now = self.status, self.generation, self.now
        previous_phase = self.ftj.status.phase if self.ftj.status else None
        conditions = status.conditions

        def put(type_: ConditionType, true: bool, reason: str, message: str) -> None:
            nonlocal conditions
            conditions = set_condition(
                conditions, type_, "True" if true else "False", reason, message, observed_generation=gen, now=now
            )

        s = situation
        put("Ready", s.phase == "Succeeded", s.reason, s.message)
        put("Reconciling", s.in_progress, s.reason, s.message if s.in_progress else "")
        put("Stalled", s.phase == "Failed", s.reason, s.message if s.phase == "Failed" else "")
        for type_ in ("Running", "Succeeded", "Failed", "Suspended"):
            put(type_, s.phase == type_, s.reason, s.message if s.phase == type_ else "")
        status.conditions = conditions
        status.phase = compute_phase(conditions)
        status.observed_generation = gen
        run = self._current_run()
        if run is not None:
            self._measure_cost(run)
            if run.result is not None and status.cost is not None:
                # A finished run's pods may still be checkpointing: its record follows their cost until they go.
                cost = {"gpu_hours": status.cost.gpu_hours, "cost_usd": status.cost.usd}
                status.runs = record_run(status.runs, run.model_copy(update=cost))
        if status.attempt is not None and status.run is not None:
            status.workers = _workers(self.observed.pods_of(status.run, status.attempt))
        if status.phase == "Running" and previous_phase != "Running":
            self._event("Normal", "Running", s.message)

    def _children(self) -> tuple[list[Manifest], list[Deletion]]:
        """What should exist now, created if missing; everything else labelled as ours is deleted."""
        name, run = self.owner.name, self._current_run()
        assert run is not None
        attempt = self._open_attempt()
        active: dict[tuple[str, str], Manifest | None] = {}
        kept: set[tuple[str, str]] = set()
        template = self.spec.checkpoint.volume_claim_template
        if template:
            active[("PersistentVolumeClaim", claim_name(name))] = None

        run_spec = self._trained(run)
        config = ("ConfigMap", run_config_name(name, run.run))
        if attempt is not None:
            attempt_children = attempt_name(name, run.run, attempt.attempt)
            active[config] = None
            active[("Service", attempt_children)] = None
            active[("Job", attempt_children)] = None
        elif run.result is None:
            kept.add(config)
        elif not self._ttl_expired(run):
            kept.add(config)
            last = self.status.attempts[-1] if self.status.attempts else None
            if last is not None and last.reason == "Completed":
                # A Job whose workers finished (run Succeeded, or failed its evaluation gate) and its pods keep
                # the logs until ttlSecondsAfterFinished.
                kept.add(("Job", attempt_name(name, run.run, last.attempt)))

        existing = self._existing()
        create = [
            self._render(key[0], run, run_spec, attempt)
            for key in sorted(active, key=lambda k: CREATION_ORDER.index(k[0]))
            if key not in existing and key not in self.observed.just_created
        ]
        delete = [
            Deletion(*key)
            for key, deleting in existing.items()
            if not deleting
            and key not in active
            and key not in kept
            and key not in self.observed.just_deleted
            # A claim holds checkpoints and perhaps outputs: it goes only with the FineTuneJob itself.
            and key[0] != "PersistentVolumeClaim"
        ]
        if delete and run.result is not None and self._ttl_expired(run):
            self._event("Normal", "CleanedUp", f"deleted the workers of run {run.run} (ttlSecondsAfterFinished)")
        return create, delete

    def _existing(self) -> dict[tuple[str, str], bool]:
        """Every child that exists, with whether it is already being deleted."""
        o = self.observed
        existing = {("Job", j.name): j.deleting for j in o.jobs}
        existing.update({("Service", s.name): s.deleting for s in o.services})
        existing.update({("ConfigMap", c.name): c.deleting for c in o.config_maps})
        existing.update({("PersistentVolumeClaim", c.name): c.deleting for c in o.claims})
        return existing

    def _render(self, kind: str, run: RunRecord, spec: FineTuneJobSpec, attempt: AttemptRecord | None) -> Manifest:
        s, o = self.settings, self.owner
        if kind == "PersistentVolumeClaim":
            template = self.spec.checkpoint.volume_claim_template
            assert template is not None
            return render_claim(o, template)
        if kind == "ConfigMap":
            return render_config_map(o, spec, run.run, run.generation, s)
        assert attempt is not None
        if kind == "Service":
            return render_service(o, run.run, attempt.attempt, s)
        return render_job(o, spec, run.run, attempt.attempt, s)

    def _ttl_expired(self, run: RunRecord) -> bool:
        ttl = self.spec.run_policy.ttl_seconds_after_finished
        return (
            ttl is not None
            and run.completion_time is not None
            and self.now >= run.completion_time + timedelta(seconds=ttl)
        )

    def _event(self, type_: Literal["Normal", "Warning"], reason: str, message: str) -> None:
        self.events.append(Event(type_, reason, message))


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
    history = [h for h in previous.history if h.step < m.steps] if previous else []
    if loss is not None or eval_loss is not None:
        history.append(HistoryPoint(step=m.steps, loss=loss, eval_loss=eval_loss))
    return Progress(
        step=m.steps,
        total_steps=m.steps,
        percent=100,
        epoch=finite(m.epochs, low=0),
        loss=loss,
        eval_loss=eval_loss,
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
