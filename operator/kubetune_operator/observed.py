"""What the operator observed about one FineTuneJob: its children, their pods and nodes, and what the progress
poller last heard from the current attempt's rank 0. The input of the pure reconcile.

The `summarize_*` functions turn a raw API object into the few fields the decisions need. The watch caches
hold only these summaries (not whole objects with managedFields), which keeps the operator's memory flat.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

from kubetune_operator.api.spec import FineTuneJobSpec
from kubetune_operator.cost import NodeLabels, PodUsage, pod_usage
from kubetune_operator.names import COMPLETION_INDEX_LABEL, LABEL_ATTEMPT, LABEL_RUN
from kubetune_operator.progress import TrainerView
from kubetune_operator.render import CONTAINER, SPEC_KEY, run_spec_from_json


@dataclass(frozen=True)
class ChildRef:
    """A child that matters only by existing (Service, PersistentVolumeClaim)."""

    kind: str
    name: str
    owner_uid: str | None
    run: int | None = None
    attempt: int | None = None
    deleting: bool = False


@dataclass(frozen=True)
class RunConfig:
    """An attempt's ConfigMap, with the spec its run trains."""

    name: str
    owner_uid: str | None
    run: int | None
    spec_json: str | None
    deleting: bool = False
    attempt: int | None = None

    def spec(self) -> FineTuneJobSpec | None:
        return run_spec_from_json(self.spec_json)


@dataclass(frozen=True)
class JobState:
    name: str
    uid: str
    owner_uid: str | None
    run: int | None
    attempt: int | None
    suspended: bool
    complete: bool
    failed: bool
    failure_message: str | None
    start_time: datetime | None
    completion_time: datetime | None
    deleting: bool


class _Message(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore", frozen=True)


class FinalSet(_Message):
    loss: float | None = None
    base_loss: float | None = None


class FinalMetrics(_Message):
    """The run's final figures, as in the trainer's manifest (kubetune_trainer.errors.final_message)."""

    steps: int = Field(ge=0)
    train_loss: float | None = None
    eval_loss: float | None = None
    eval_perplexity: float | None = None
    base_eval_loss: float | None = None
    # {name: {loss, baseLoss}}: each evaluation set's final and base losses (kubetune_trainer.evalsets.compact)
    eval_sets: dict[str, FinalSet] = {}
    tokens_total: int | None = None
    tokens_per_second: float | None = None
    epochs: float | None = None


class FinalReport(_Message):
    """What rank 0 leaves as its termination message when training succeeded."""

    final_metrics: FinalMetrics
    output: str | None = None


def parse_final_report(message: str | None) -> FinalReport | None:
    """Rank 0's final report, or None when the message is not one (a failure reason, a log tail, nothing)."""
    if not message or not message.startswith("{"):
        return None
    try:
        return FinalReport.model_validate_json(message)
    except ValidationError:
        return None


@dataclass(frozen=True)
class Termination:
    """How the trainer container of a pod ended."""

    exit_code: int
    reason: str | None
    message: str | None
    finished_at: datetime | None
    # Rank 0's final figures, from the message of a successful exit.
    final: FinalReport | None = None


@dataclass(frozen=True)
class PodState:
    name: str
    # Pods belong to their Job; the job's uid tells this incarnation's pods from a re-created job's leftovers.
    job_uid: str | None
    run: int | None
    attempt: int | None
    index: int | None
    phase: str
    ready: bool
    deleting: bool
    # A pod being deleted: when its grace period ends (metadata.deletionTimestamp); past it, only a kubelet that
    # cannot be reached keeps it.
    deletion_due: datetime | None
    # Where rank 0 serves /progress and /metrics.
    pod_ip: str | None
    # GPUs, node and when it held them: what it costs.
    usage: PodUsage
    reason: str | None
    message: str | None
    # Reason of a true DisruptionTarget condition: PreemptionByScheduler, DeletionByTaintManager, ...
    disruption: str | None
    termination: Termination | None
    # Why a pod that is not running yet waits, e.g. "Unschedulable: 0/3 nodes are available: ...".
    waiting: str | None


@dataclass(frozen=True)
class Rejection:
    """The API server refused to create a child of this run as invalid: retrying cannot help."""

    run: int
    message: str


@dataclass(frozen=True)
class Observed:
    jobs: tuple[JobState, ...] = ()
    pods: tuple[PodState, ...] = ()
    services: tuple[ChildRef, ...] = ()
    config_maps: tuple[RunConfig, ...] = ()
    claims: tuple[ChildRef, ...] = ()
    rejection: Rejection | None = None
    # (kind, name) of children this operator created or deleted moments ago, which the caches may not show
    # yet: not to be created, or deleted, a second time.
    just_created: frozenset[tuple[str, str]] = frozenset()
    just_deleted: frozenset[tuple[str, str]] = frozenset()
    # The current attempt's rank 0 while it runs and is polled.
    trainer: TrainerView | None = None
    # Labels of the nodes the pods run on (for their price).
    nodes: NodeLabels = field(default_factory=dict)

    def owned_by(self, uid: str) -> Observed:
        """Only the children of this incarnation of the job (a deleted and re-created job's leftovers are
        the garbage collector's)."""
        job_uids = {j.uid for j in self.jobs if j.owner_uid == uid}
        return Observed(
            jobs=tuple(j for j in self.jobs if j.owner_uid == uid),
            pods=tuple(p for p in self.pods if p.job_uid in job_uids),
            services=tuple(s for s in self.services if s.owner_uid == uid),
            config_maps=tuple(c for c in self.config_maps if c.owner_uid == uid),
            # A claim kept beyond the job (it holds outputs) has no owner; by its name it is this job's.
            claims=tuple(c for c in self.claims if c.owner_uid in (uid, None)),
            rejection=self.rejection,
            just_created=self.just_created,
            just_deleted=self.just_deleted,
            trainer=self.trainer,
            nodes=self.nodes,
        )

    def pods_of(self, run: int, attempt: int) -> list[PodState]:
        return [p for p in self.pods if p.run == run and p.attempt == attempt]

    def still_running(self, run: int, before_attempt: int | None = None) -> list[PodState]:
        """Pods of the run (of its attempts before `before_attempt`) that may still write: every one not yet
        terminated, whether or not it is being deleted."""
        return [
            p
            for p in self.pods
            if p.run == run
            and (before_attempt is None or (p.attempt or 0) < before_attempt)
            and p.phase not in ("Succeeded", "Failed")
        ]

    def job(self, name: str) -> JobState | None:
        return next((j for j in self.jobs if j.name == name), None)

    def run_spec(self, run: int) -> FineTuneJobSpec | None:
        """The spec the run trains, as its latest attempt's ConfigMap stores it."""
        stored = [c for c in self.config_maps if c.run == run and c.spec_json]
        latest = max(stored, key=lambda c: c.attempt or 0, default=None)
        return latest.spec() if latest else None


# ----------------------------------------------------------------------------------------------
# raw API objects -> summaries
# ----------------------------------------------------------------------------------------------

Body = Mapping[str, Any]


def summarize_job(body: Body) -> JobState:
    meta, spec, status = _parts(body)
    conditions = {c.get("type"): c for c in status.get("conditions") or [] if c.get("status") == "True"}
    failure = conditions.get("Failed") or conditions.get("FailureTarget")
    return JobState(
        name=meta.get("name", ""),
        uid=meta.get("uid", ""),
        owner_uid=_controller_uid(meta),
        run=_int_label(meta, LABEL_RUN),
        attempt=_int_label(meta, LABEL_ATTEMPT),
        suspended=bool(spec.get("suspend")),
        complete="Complete" in conditions,
        failed=failure is not None,
        failure_message=_failure_text(failure) if failure else None,
        start_time=parse_time(status.get("startTime")),
        completion_time=parse_time(status.get("completionTime")),
        deleting=bool(meta.get("deletionTimestamp")),
    )


def summarize_pod(body: Body) -> PodState:
    meta, _, status = _parts(body)
    conditions = {c.get("type"): c for c in status.get("conditions") or []}
    disruption = conditions.get("DisruptionTarget")
    if disruption and disruption.get("status") != "True":
        disruption = None
    container: Body = next((c for c in status.get("containerStatuses") or [] if c.get("name") == CONTAINER), {})
    state = container.get("state") or {}
    terminated = state.get("terminated") or _failed_init(status)
    return PodState(
        name=meta.get("name", ""),
        job_uid=_controller_uid(meta),
        run=_int_label(meta, LABEL_RUN),
        attempt=_int_label(meta, LABEL_ATTEMPT),
        index=_int_label(meta, COMPLETION_INDEX_LABEL),
        phase=status.get("phase") or "Pending",
        ready=(conditions.get("Ready") or {}).get("status") == "True",
        deleting=bool(meta.get("deletionTimestamp")),
        deletion_due=parse_time(meta.get("deletionTimestamp")),
        pod_ip=status.get("podIP"),
        usage=pod_usage(body),
        reason=status.get("reason"),
        message=status.get("message") or (disruption.get("message") if disruption else None),
        disruption=disruption.get("reason") if disruption else None,
        termination=_termination(terminated) if terminated else None,
        waiting=_waiting_text(conditions.get("PodScheduled"), state.get("waiting")),
    )


def _failed_init(status: Body) -> Body | None:
    """How an init container (the claim folders') ended when it failed, so the worker never started."""
    for init in status.get("initContainerStatuses") or []:
        terminated = (init.get("state") or {}).get("terminated")
        if terminated and terminated.get("exitCode"):
            return dict(terminated)
    return None


def _termination(terminated: Body) -> Termination:
    exit_code = int(terminated.get("exitCode", 0))
    message = (terminated.get("message") or "").strip() or None
    return Termination(
        exit_code=exit_code,
        reason=terminated.get("reason"),
        message=message,
        finished_at=parse_time(terminated.get("finishedAt")),
        final=parse_final_report(message) if exit_code == 0 else None,
    )


def summarize_config_map(body: Body) -> RunConfig:
    meta = body.get("metadata") or {}
    return RunConfig(
        name=meta.get("name", ""),
        owner_uid=_controller_uid(meta),
        run=_int_label(meta, LABEL_RUN),
        spec_json=(body.get("data") or {}).get(SPEC_KEY),
        deleting=bool(meta.get("deletionTimestamp")),
        attempt=_int_label(meta, LABEL_ATTEMPT),
    )


def summarize_child(body: Body) -> ChildRef:
    meta = body.get("metadata") or {}
    return ChildRef(
        kind=body.get("kind", ""),
        name=meta.get("name", ""),
        owner_uid=_controller_uid(meta),
        run=_int_label(meta, LABEL_RUN),
        attempt=_int_label(meta, LABEL_ATTEMPT),
        deleting=bool(meta.get("deletionTimestamp")),
    )


def parse_time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def _parts(body: Body) -> tuple[Body, Body, Body]:
    return body.get("metadata") or {}, body.get("spec") or {}, body.get("status") or {}


def _controller_uid(meta: Body) -> str | None:
    return next((r.get("uid") for r in meta.get("ownerReferences") or [] if r.get("controller")), None)


def _int_label(meta: Body, key: str) -> int | None:
    value = (meta.get("labels") or {}).get(key)
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _failure_text(condition: Body) -> str:
    return ": ".join(part for part in (condition.get("reason"), condition.get("message")) if part)


def _waiting_text(scheduled: Body | None, waiting: Body | None) -> str | None:
    if scheduled and scheduled.get("status") == "False" and scheduled.get("reason"):
        return _failure_text(scheduled)
    if waiting and waiting.get("reason"):
        return _failure_text(waiting)
    return None
