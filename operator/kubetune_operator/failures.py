"""Why an attempt's workers failed: OOM vs error vs preemption vs eviction vs node loss, and whether retrying
can help at all (the trainer's exit code 78 says it cannot).

One worker failing ends the attempt; the Job controller then terminates the others (they exit 143 after
checkpointing), so the cause is the earliest failure that is not such a consequence.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kubetune_operator.api.status import AttemptReason
from kubetune_operator.observed import JobState, PodState

PERMANENT_EXIT_CODE = 78
SIGTERM_EXIT_CODE = 143
MESSAGE_LIMIT = 1000

# DisruptionTarget condition reasons (k8s.io/api/core/v1) -> attempt reasons.
DISRUPTIONS: dict[str, AttemptReason] = {
    "PreemptionByScheduler": "Preempted",
    "PreemptionByKubeScheduler": "Preempted",
    "EvictionByEvictionAPI": "Evicted",
    "TerminationByKubelet": "Evicted",
    "DeletionByTaintManager": "NodeLost",
    "DeletionByPodGC": "NodeLost",
}
# Pod status.reason values set when the node went away or shut down.
NODE_LOSS_REASONS = frozenset({"NodeLost", "NodeShutdown", "Shutdown", "Terminated"})


@dataclass(frozen=True)
class WorkerFailure:
    reason: AttemptReason
    message: str
    exit_code: int | None = None
    # Exit code 78: bad config or data. The run fails now instead of burning restarts on the same error.
    permanent: bool = False


def attempt_failure(job: JobState, pods: Sequence[PodState]) -> WorkerFailure | None:
    """Why the attempt failed, or None while none of its workers has failed."""
    failed = [p for p in pods if p.phase == "Failed"]
    permanent = [p for p in failed if p.termination and p.termination.exit_code == PERMANENT_EXIT_CODE]
    if permanent:
        pod = _earliest(permanent)
        assert pod.termination is not None
        message = pod.termination.message or f"{_worker(pod)} exited with code {PERMANENT_EXIT_CODE} (permanent error)"
        return WorkerFailure("Error", _bounded(message), PERMANENT_EXIT_CODE, permanent=True)
    causes = [p for p in failed if not _stopped_by_sigterm(p)] or failed
    if causes:
        return _classify(_earliest(causes))
    if job.failed:
        # The Job counted a failure that left no failed pod behind: the pod was deleted (its node is gone, or
        # someone removed it).
        detail = f" ({job.failure_message})" if job.failure_message else ""
        return WorkerFailure("NodeLost", f"a worker pod was deleted or lost with its node{detail}")
    return None


def _classify(pod: PodState) -> WorkerFailure:
    term = pod.termination
    exit_code = term.exit_code if term else None
    if pod.disruption in DISRUPTIONS:
        reason = DISRUPTIONS[pod.disruption]
        text = {"Preempted": "was preempted", "Evicted": "was evicted", "NodeLost": "was lost with its node"}[reason]
        return WorkerFailure(reason, _bounded(f"{_worker(pod)} {text} ({pod.disruption}){_detail(pod)}"), exit_code)
    if pod.reason == "Evicted":
        return WorkerFailure("Evicted", _bounded(f"{_worker(pod)} was evicted{_detail(pod)}"), exit_code)
    if pod.reason in NODE_LOSS_REASONS:
        return WorkerFailure("NodeLost", _bounded(f"{_worker(pod)} was lost with its node{_detail(pod)}"), exit_code)
    if term and term.reason == "OOMKilled":
        return WorkerFailure("OOMKilled", f"{_worker(pod)} was OOMKilled (exit code {term.exit_code})", exit_code)
    if term:
        return WorkerFailure(
            "Error", _bounded(f"{_worker(pod)} failed with exit code {term.exit_code}{_detail(pod)}"), exit_code
        )
    return WorkerFailure("Error", _bounded(f"{_worker(pod)} failed{_detail(pod)}"))


def _stopped_by_sigterm(pod: PodState) -> bool:
    return pod.disruption is None and pod.termination is not None and pod.termination.exit_code == SIGTERM_EXIT_CODE


def _earliest(pods: Sequence[PodState]) -> PodState:
    def key(p: PodState) -> tuple[str, int]:
        finished = p.termination.finished_at if p.termination else None
        return (finished.isoformat() if finished else "~", p.index if p.index is not None else 1 << 30)

    return min(pods, key=key)


def _worker(pod: PodState) -> str:
    return f"worker {pod.index} (pod {pod.name})" if pod.index is not None else f"pod {pod.name}"


def _detail(pod: PodState) -> str:
    text = (pod.termination.message if pod.termination else None) or pod.message
    return f": {text}" if text else ""


def _bounded(text: str) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= MESSAGE_LIMIT else flat[: MESSAGE_LIMIT - 3] + "..."
