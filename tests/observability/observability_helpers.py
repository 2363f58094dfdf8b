"""Builders for the observability tests: pods as the API server returns them, and FineTuneJobs from the examples."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml
from kubetune_operator.api import FineTuneJob

REPO = Path(__file__).resolve().parents[2]
T0 = datetime(2026, 11, 27, 9, 0, 0, tzinfo=UTC)
H100 = "NVIDIA-H100-80GB-HBM3"


def rfc3339(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def pod(
    *,
    gpus: int = 8,
    node: str | None = "gpu-node-0",
    started: datetime | None = T0,
    finished: datetime | None = None,
    phase: str | None = None,
    init_gpus: int | None = None,
) -> dict[str, Any]:
    """A worker pod: `started` is status.startTime, `finished` the container's terminated.finishedAt."""
    spec: dict[str, Any] = {
        "containers": [{"name": "worker", "resources": {"limits": {"nvidia.com/gpu": str(gpus)}}} if gpus else {}]
    }
    if node:
        spec["nodeName"] = node
    if init_gpus is not None:
        spec["initContainers"] = [{"name": "init", "resources": {"requests": {"nvidia.com/gpu": init_gpus}}}]
    status: dict[str, Any] = {"phase": phase or ("Pending" if started is None else "Running")}
    if started is not None:
        status["startTime"] = rfc3339(started)
        state: dict[str, Any] = {"running": {"startedAt": rfc3339(started)}}
        if finished is not None:
            status["phase"] = phase or "Succeeded"
            state = {"terminated": {"exitCode": 0, "startedAt": rfc3339(started), "finishedAt": rfc3339(finished)}}
        status["containerStatuses"] = [{"name": "worker", "state": state}]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "w"}, "spec": spec, "status": status}


def example_job(
    file: str, namespace: str, name: str | None = None, status: dict[str, Any] | None = None
) -> FineTuneJob:
    doc = yaml.safe_load((REPO / "examples" / file).read_text())
    doc["metadata"]["namespace"] = namespace
    if name:
        doc["metadata"]["name"] = name
    if status is not None:
        doc["status"] = status
    return FineTuneJob.model_validate(doc)


def condition(type_: str, status: str, reason: str, at: datetime = T0) -> dict[str, Any]:
    return {"type": type_, "status": status, "reason": reason, "message": "", "lastTransitionTime": rfc3339(at)}


def ago(now: datetime, **delta: float) -> str:
    return rfc3339(now - timedelta(**delta))
