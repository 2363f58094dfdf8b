"""FineTuneJob objects and statuses for the CLI tests, built with the API models so every one is valid."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from kubetune_dev.cluster import LocalCluster
from kubetune_operator.api import API_VERSION, KIND, format_eta
from kubetune_operator.api.status import (
    AttemptRecord,
    CheckpointStatus,
    Condition,
    ConditionStatus,
    CostStatus,
    FineTuneJobStatus,
    OutputStatus,
    Phase,
    Progress,
    RunRecord,
    Workers,
)

REPO = Path(__file__).resolve().parents[2]
# The console script pip installed from pyproject.toml: exactly what `kubectl finetune` runs.
EXECUTABLE = Path(sys.executable).with_name("kubectl-finetune")
Cli = Callable[..., subprocess.CompletedProcess[str]]

T0 = datetime(2026, 11, 27, 9, 0, 0, tzinfo=UTC)
NOW = T0 + timedelta(hours=2)


def spec(**overrides: Any) -> dict[str, Any]:
    """A small valid spec: LoRA on 2 nodes x 8 H100s with a $250 budget."""
    base: dict[str, Any] = {
        "model": {"source": "hf://Qwen/Qwen2.5-7B-Instruct", "revision": "main"},
        "dataset": {"source": "pvc://datasets/support/v3.jsonl", "format": "messages", "evalSplit": 0.05},
        "method": {"type": "lora", "lora": {"r": 16, "alpha": 32}},
        "training": {"epochs": 2, "learningRate": 2e-4},
        "resources": {"numNodes": 2, "gpusPerNode": 8, "gpuProduct": "NVIDIA-H100-80GB-HBM3"},
        "checkpoint": {"claimName": "ft-checkpoints", "everySteps": 200},
        "budget": {"maxCostUSD": 250},
    }
    return {**base, **overrides}


def manifest(name: str, **overrides: Any) -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": name}, "spec": spec(**overrides)}


def condition(type_: str, status: ConditionStatus, reason: str, message: str = "", at: datetime = T0) -> Condition:
    return Condition(type=type_, status=status, reason=reason, message=message, last_transition_time=at)


def conditions(phase: Phase, reason: str, message: str = "") -> list[Condition]:
    """The job conditions for a phase: the phase's own True, the others False."""
    types = ("Running", "Succeeded", "Failed", "Suspended")
    return [
        condition(
            t,
            "True" if t == phase else "False",
            reason if t == phase else "NotApplicable",
            message if t == phase else "",
        )
        for t in types
    ]


def training(
    step: int,
    total: int = 400,
    *,
    loss: float | None = None,
    eval_loss: float | None = None,
    tokens_per_second: float | None = None,
    eta_seconds: int | None = None,
    usd: float | None = None,
    phase: Phase = "Running",
    attempt: int = 1,
) -> FineTuneJobStatus:
    """Run 1 in flight (or suspended) at `step` of `total`."""
    return FineTuneJobStatus(
        observed_generation=1,
        phase=phase,
        conditions=conditions(phase, "Training" if phase == "Running" else "SuspendedByUser"),
        run=1,
        attempt=attempt,
        start_time=T0,
        workers=Workers(active=2, ready=2),
        progress=Progress(
            step=step,
            total_steps=total,
            percent=step * 100 // total,
            epoch=round(2 * step / total, 2),
            loss=loss,
            eval_loss=eval_loss,
            tokens_per_second=tokens_per_second,
            eta=None if eta_seconds is None else format_eta(eta_seconds),
            eta_seconds=eta_seconds,
            updated_at=T0 + timedelta(minutes=30),
        ),
        cost=None
        if usd is None
        else CostStatus(gpu_hours=round(usd / 2.5, 1), usd=usd, projected_usd=round(usd * total / max(step, 1), 2)),
        runs=[RunRecord(run=1, generation=1, start_time=T0)],
        attempts=[AttemptRecord(attempt=a, start_time=T0) for a in range(1, attempt + 1)],
    )


def succeeded(loss: float = 0.8123, eval_loss: float = 0.9001, usd: float = 195.2) -> FineTuneJobStatus:
    end = T0 + timedelta(hours=1, minutes=5)
    output = "pvc://ft-checkpoints/default/support-bot/runs/1"
    return FineTuneJobStatus(
        observed_generation=1,
        phase="Succeeded",
        conditions=conditions("Succeeded", "TrainingSucceeded", "run 1 succeeded"),
        run=1,
        attempt=1,
        start_time=T0,
        completion_time=end,
        workers=Workers(succeeded=2),
        progress=Progress(
            step=400, total_steps=400, percent=100, loss=loss, eval_loss=eval_loss, eta="0s", eta_seconds=0
        ),
        checkpoint=CheckpointStatus(latest="default/support-bot/runs/1/step-400", step=400, saved_at=end),
        cost=CostStatus(gpu_hours=78.1, usd=usd, projected_usd=usd),
        output=OutputStatus(path=output, promoted=True),
        runs=[
            RunRecord(
                run=1,
                generation=1,
                result="Succeeded",
                reason="Succeeded",
                start_time=T0,
                completion_time=end,
                attempts=1,
                final_loss=loss,
                final_eval_loss=eval_loss,
                output=output,
            )
        ],
        attempts=[AttemptRecord(attempt=1, start_time=T0, completion_time=end, reason="Completed", exit_code=0)],
    )


def failed(reason: str, message: str, *, attempts: int = 1, usd: float = 120.3) -> FineTuneJobStatus:
    end = T0 + timedelta(minutes=40)
    return FineTuneJobStatus(
        observed_generation=1,
        phase="Failed",
        conditions=conditions("Failed", reason, message),
        run=1,
        attempt=attempts,
        start_time=T0,
        completion_time=end,
        progress=Progress(step=150, total_steps=400, percent=37, loss=1.4),
        cost=CostStatus(gpu_hours=48.1, usd=usd, projected_usd=320.8),
        runs=[
            RunRecord(
                run=1,
                generation=1,
                result="Failed",
                reason=reason,
                start_time=T0,
                completion_time=end,
                attempts=attempts,
            )
        ],
        attempts=[
            AttemptRecord(attempt=a, start_time=T0, completion_time=end, reason="Error", exit_code=1)
            for a in range(1, attempts + 1)
        ],
    )


def wire(status: FineTuneJobStatus) -> dict[str, Any]:
    """The status as the API server stores it."""
    return status.model_dump(mode="json", by_alias=True, exclude_none=True)


def job(
    name: str, namespace: str = "default", status: FineTuneJobStatus | None = None, **overrides: Any
) -> dict[str, Any]:
    """A FineTuneJob as the API server returns it, created at T0."""
    obj = manifest(name, **overrides)
    obj["metadata"].update(
        namespace=namespace, uid=f"uid-{name}", generation=1, creationTimestamp="2026-11-27T09:00:00Z"
    )
    if status is not None:
        obj["status"] = wire(status)
    return obj


# ----------------------------------------------------------------------------------------------
# against the cluster


def apply(cluster: LocalCluster, namespace: str, obj: dict[str, Any]) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(obj))


def set_status(cluster: LocalCluster, namespace: str, name: str, status: FineTuneJobStatus | dict[str, Any]) -> None:
    """Write the status through the status subresource, as the operator does."""
    body = wire(status) if isinstance(status, FineTuneJobStatus) else status
    patch = json.dumps({"status": body})
    cluster.kubectl("patch", "finetunejob", name, "-n", namespace, "--subresource=status", "--type=merge", "-p", patch)


def get(cluster: LocalCluster, namespace: str, *what: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(cluster.kubectl("get", "-n", namespace, *what, "-o", "json").stdout)
    return doc


# ----------------------------------------------------------------------------------------------
# results


def ok(result: subprocess.CompletedProcess[str]) -> str:
    """stdout of a run that must succeed without saying anything on stderr."""
    assert result.returncode == 0 and result.stderr == "", result
    return result.stdout


def error(result: subprocess.CompletedProcess[str]) -> str:
    """The single `error:` line of a run that must fail."""
    assert result.returncode == 1 and result.stdout == "", result
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result
    return lines[0].removeprefix("error: ")


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    return width, height
