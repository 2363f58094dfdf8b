"""Small builders for the operator's unit tests: FineTuneJobs, observed children, a reconcile stepper."""

from __future__ import annotations

import copy
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from kubetune_operator.api import FineTuneJob
from kubetune_operator.cost import PodUsage
from kubetune_operator.observed import JobState, Observed, PodState, RunConfig, Termination
from kubetune_operator.reconcile import Plan, reconcile
from kubetune_operator.render import Owner, render_attempt_config
from kubetune_operator.settings import OperatorSettings

T0 = datetime(2026, 11, 27, 9, 0, 0, tzinfo=UTC)
UID = "11111111-2222-3333-4444-555555555555"
SETTINGS = OperatorSettings()


def spec(**overrides: Any) -> dict[str, Any]:
    """A valid spec; `overrides` replace top-level groups (merged one level deep)."""
    base: dict[str, Any] = {
        "model": {"source": "hf://Qwen/Qwen2.5-0.5B-Instruct", "tokenSecretRef": {"name": "hf", "key": "token"}},
        "dataset": {"source": "pvc://datasets/support/v3.jsonl", "format": "messages"},
        "resources": {"numNodes": 2, "gpusPerNode": 8, "gpuProduct": "NVIDIA-H100-80GB-HBM3"},
        "checkpoint": {"claimName": "ft-checkpoints", "everySteps": 100},
        "runPolicy": {"maxRestarts": 2, "backoffSeconds": 10, "maxBackoffSeconds": 60},
    }
    for key, value in overrides.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return base


def ftj(
    spec_: dict[str, Any] | None = None,
    *,
    name: str = "sft",
    namespace: str = "ml",
    generation: int = 1,
    annotations: dict[str, str] | None = None,
    status: dict[str, Any] | None = None,
) -> FineTuneJob:
    metadata: dict[str, Any] = {
        "name": name,
        "namespace": namespace,
        "uid": UID,
        "generation": generation,
        "resourceVersion": "1",
    }
    if annotations:
        metadata["annotations"] = annotations
    body: dict[str, Any] = {"metadata": metadata, "spec": spec_ or spec()}
    if status is not None:
        body["status"] = status
    return FineTuneJob.model_validate(body)


def edited(job: FineTuneJob, spec_: dict[str, Any] | None = None, **meta: Any) -> FineTuneJob:
    """The job after a user edit: a new spec bumps the generation; metadata fields are replaced."""
    body = job.model_dump(mode="json", by_alias=True, exclude_none=True)
    if spec_ is not None:
        body["spec"] = spec_
        body["metadata"]["generation"] += 1
    body["metadata"].update(copy.deepcopy(meta))
    return FineTuneJob.model_validate(body)


def owner(job: FineTuneJob) -> Owner:
    return Owner(job.metadata["name"], job.metadata["namespace"], job.metadata["uid"])


def job_state(
    name: str, run: int = 1, attempt: int = 1, *, uid: str = "job-uid", owner_uid: str = UID, **fields: Any
) -> JobState:
    base = JobState(
        name=name,
        uid=uid,
        owner_uid=owner_uid,
        run=run,
        attempt=attempt,
        suspended=False,
        complete=False,
        failed=False,
        failure_message=None,
        start_time=T0,
        completion_time=None,
        deleting=False,
    )
    return replace(base, **fields)


def pod(
    index: int,
    run: int = 1,
    attempt: int = 1,
    *,
    job_uid: str = "job-uid",
    phase: str = "Running",
    gpus: int = 8,
    **fields: Any,
) -> PodState:
    """A worker pod that started at T0 with `gpus` GPUs; a finished one held them until its termination."""
    termination = fields.get("termination")
    end = termination.finished_at if termination is not None and phase in ("Succeeded", "Failed") else None
    base = PodState(
        name=f"sft-r{run}-a{attempt}-{index}-abcde",
        job_uid=job_uid,
        run=run,
        attempt=attempt,
        index=index,
        phase=phase,
        ready=phase == "Running",
        deleting=False,
        deletion_due=None,
        pod_ip=f"10.244.0.{index + 1}",
        usage=PodUsage(gpus=gpus, node_name=f"gpu-node-{index}", start=T0, end=end),
        reason=None,
        message=None,
        disruption=None,
        termination=None,
        waiting=None,
    )
    return replace(base, **fields)


def exited(code: int, reason: str = "Error", message: str | None = None, at: datetime = T0) -> Termination:
    return Termination(exit_code=code, reason=reason, message=message, finished_at=at)


def config_map_of(job: FineTuneJob, run: int = 1, attempt: int = 1) -> RunConfig:
    """The ConfigMap of an attempt of the run, as the cache holds it (with the spec the run trains)."""
    manifest = render_attempt_config(owner(job), job.spec, run, attempt, job.metadata.get("generation", 1), SETTINGS)
    name, data = manifest["metadata"]["name"], manifest["data"]
    return RunConfig(name=name, owner_uid=UID, run=run, spec_json=data["spec.json"], attempt=attempt)


def step(
    job: FineTuneJob, observed: Observed | None = None, now: datetime = T0, settings: OperatorSettings = SETTINGS
) -> tuple[Plan, FineTuneJob]:
    """Reconcile once and return the plan and the job as it is after the plan's status write."""
    plan = reconcile(job, observed or Observed(), settings, now)
    body = job.model_dump(mode="json", by_alias=True, exclude_none=True)
    body["status"] = plan.status.model_dump(mode="json", by_alias=True, exclude_none=True)
    return plan, FineTuneJob.model_validate(body)


def later(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def kinds(plan: Plan) -> list[tuple[str, str]]:
    return [(m["kind"], m["metadata"]["name"]) for m in plan.create]


def reasons(plan: Plan) -> list[str]:
    return [e.reason for e in plan.events]


def condition(job: FineTuneJob, type_: str) -> tuple[str, str, str]:
    assert job.status is not None
    c = next(c for c in job.status.conditions if c.type == type_)
    return c.status, c.reason, c.message
