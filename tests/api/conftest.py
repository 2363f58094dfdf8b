"""Fixtures for the FineTuneJob API tests: the committed CRD installed on the local control plane."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from kubetune_operator.api import CRD_NAME
from kubetune_operator.api.status import (
    AttemptRecord,
    CheckpointStatus,
    Condition,
    CostStatus,
    FineTuneJobStatus,
    OutputStatus,
    Progress,
    RunRecord,
    Workers,
)

REPO = Path(__file__).resolve().parents[2]
CRD_FILE = REPO / "crds" / f"{CRD_NAME}.yaml"


@pytest.fixture
def full_status() -> FineTuneJobStatus:
    """A status with every field set, as the operator would write it mid-run."""
    t0 = datetime(2026, 11, 27, 9, 0, 0, tzinfo=UTC)
    later = datetime(2026, 11, 27, 10, 30, 0, tzinfo=UTC)
    conditions = [
        Condition(
            type="Ready",
            status="False",
            reason="Training",
            message="Run 2 is training.",
            observed_generation=3,
            last_transition_time=t0,
        ),
        Condition(
            type="Reconciling",
            status="True",
            reason="Training",
            message="Run 2 attempt 2 is training.",
            observed_generation=3,
            last_transition_time=t0,
        ),
        Condition(
            type="Stalled",
            status="False",
            reason="Training",
            message="",
            observed_generation=3,
            last_transition_time=t0,
        ),
        Condition(
            type="Running",
            status="True",
            reason="AllWorkersRunning",
            message="2 of 2 workers ready.",
            observed_generation=3,
            last_transition_time=later,
        ),
        Condition(
            type="Succeeded",
            status="Unknown",
            reason="Training",
            message="",
            observed_generation=3,
            last_transition_time=t0,
        ),
        Condition(
            type="Failed", status="False", reason="Training", message="", observed_generation=3, last_transition_time=t0
        ),
        Condition(
            type="Suspended",
            status="False",
            reason="NotSuspended",
            message="",
            observed_generation=3,
            last_transition_time=t0,
        ),
    ]
    return FineTuneJobStatus(
        observed_generation=3,
        phase="Running",
        conditions=conditions,
        run=2,
        attempt=2,
        start_time=t0,
        workers=Workers(active=2, ready=2, succeeded=0, failed=0),
        progress=Progress(
            step=1200,
            total_steps=4000,
            percent=30,
            epoch=0.6,
            loss=1.2345,
            eval_loss=1.31,
            tokens_per_second=48210.5,
            mfu=0.41,
            eta="1h12m",
            eta_seconds=4320,
            updated_at=later,
        ),
        checkpoint=CheckpointStatus(latest="default/support-bot/runs/2/step-1200", step=1200, saved_at=later),
        cost=CostStatus(gpu_hours=41.3, usd=102.5, projected_usd=196.0),
        output=OutputStatus(path="pvc://ft-models/default/support-bot/runs/1", promoted=True),
        runs=[
            RunRecord(
                run=1,
                generation=1,
                result="Succeeded",
                reason="TrainingSucceeded",
                start_time=t0,
                completion_time=t0,
                attempts=1,
                final_loss=1.1,
                final_eval_loss=1.2,
                output="pvc://ft-models/default/support-bot/runs/1",
            ),
            RunRecord(run=2, generation=3, rerun_token="2026-11-27", start_time=t0),
        ],
        attempts=[
            AttemptRecord(
                attempt=1,
                start_time=t0,
                completion_time=later,
                reason="OOMKilled",
                message="worker 1 (pod support-bot-r2-a1-1) was OOMKilled",
                exit_code=137,
            ),
            AttemptRecord(attempt=2, start_time=later),
        ],
    )
