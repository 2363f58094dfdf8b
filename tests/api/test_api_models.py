"""Unit tests of the API models, the status helpers and the examples (parsed, not applied)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml
from kubetune_operator.api import (
    MAX_RUN_HISTORY,
    Condition,
    FineTuneJob,
    FineTuneJobStatus,
    RunRecord,
    compute_phase,
    format_eta,
    get_condition,
    is_true,
    progress_percent,
    record_run,
    set_condition,
)
from kubetune_trainer.config import DatasetOptions, MethodConfig, TrainingConfig
from pydantic import ValidationError

REPO = Path(__file__).resolve().parents[2]
JOB_EXAMPLES = [*sorted((REPO / "examples").glob("*.yaml")), REPO / "examples" / "gitops" / "finetunejob.yaml"]
T0 = datetime(2026, 11, 27, 9, 0, 0, tzinfo=UTC)


def condition(type_: str, status: str) -> Condition:
    return Condition.model_validate({"type": type_, "status": status, "reason": "Test", "lastTransitionTime": T0})


# -- conditions ----------------------------------------------------------------------------------


def test_set_condition_appends_a_new_type_with_the_current_time() -> None:
    conditions = set_condition([], "Running", "True", "Started", "go", observed_generation=2, now=T0)
    assert conditions == [
        Condition(
            type="Running",
            status="True",
            reason="Started",
            message="go",
            observed_generation=2,
            last_transition_time=T0,
        )
    ]


def test_set_condition_keeps_the_transition_time_while_the_status_holds() -> None:
    first = set_condition([], "Ready", "False", "Pending", "waiting", observed_generation=1, now=T0)
    later = T0 + timedelta(minutes=5)
    second = set_condition(first, "Ready", "False", "Training", "step 10", observed_generation=2, now=later)
    (ready,) = second
    assert ready.last_transition_time == T0
    assert (ready.reason, ready.message, ready.observed_generation) == ("Training", "step 10", 2)


def test_set_condition_moves_the_transition_time_when_the_status_changes() -> None:
    first = set_condition([], "Ready", "False", "Training", "", observed_generation=1, now=T0)
    later = T0 + timedelta(hours=1)
    (ready,) = set_condition(first, "Ready", "True", "Succeeded", "done", observed_generation=1, now=later)
    assert ready.last_transition_time == later


def test_set_condition_replaces_in_place_and_leaves_others_alone() -> None:
    conditions = [condition("Ready", "False"), condition("Running", "True"), condition("Failed", "False")]
    updated = set_condition(conditions, "Running", "False", "Finished", "", observed_generation=1, now=T0)
    assert [c.type for c in updated] == ["Ready", "Running", "Failed"]
    assert updated[0] is conditions[0] and updated[2] is conditions[2]
    assert conditions[1].status == "True"  # the input is not modified


def test_get_condition_and_is_true() -> None:
    conditions = [condition("Ready", "True"), condition("Stalled", "Unknown")]
    assert get_condition(conditions, "Ready") is conditions[0]
    assert get_condition(conditions, "Failed") is None
    assert is_true(conditions, "Ready")
    assert not is_true(conditions, "Stalled")
    assert not is_true(conditions, "Failed")


@pytest.mark.parametrize(
    ("true_types", "phase"),
    [
        ((), "Pending"),
        (("Reconciling",), "Pending"),
        (("Running",), "Running"),
        (("Suspended",), "Suspended"),
        (("Running", "Suspended"), "Suspended"),
        (("Succeeded", "Ready"), "Succeeded"),
        (("Failed", "Stalled"), "Failed"),
        (("Failed", "Suspended"), "Failed"),
    ],
)
def test_compute_phase(true_types: tuple[str, ...], phase: str) -> None:
    all_types = ("Ready", "Reconciling", "Stalled", "Running", "Succeeded", "Failed", "Suspended")
    conditions = [condition(t, "True" if t in true_types else "False") for t in all_types]
    assert compute_phase(conditions) == phase


def test_condition_fields_follow_metav1() -> None:
    with pytest.raises(ValidationError, match="reason"):
        Condition(type="Ready", status="True", reason="not one word", last_transition_time=T0)
    with pytest.raises(ValidationError, match="status"):
        Condition.model_validate({"type": "Ready", "status": "Yes", "reason": "R", "lastTransitionTime": T0})


# -- progress, ETA, run history ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (-5, "0s"),
        (45, "45s"),
        (59.6, "1m"),
        (60, "1m"),
        (330, "5m30s"),
        (3600, "1h"),
        (4320, "1h12m"),
        (4359, "1h12m"),
        (86400 + 59, "1d"),
        (2 * 86400 + 3 * 3600 + 600, "2d3h"),
    ],
)
def test_format_eta(seconds: float, text: str) -> None:
    assert format_eta(seconds) == text


@pytest.mark.parametrize(
    ("step", "total", "percent"), [(0, 0, 0), (10, 0, 0), (0, 200, 0), (50, 200, 25), (199, 200, 99), (250, 200, 100)]
)
def test_progress_percent(step: int, total: int, percent: int) -> None:
    assert progress_percent(step, total) == percent


def test_record_run_replaces_by_number_and_keeps_a_bounded_history() -> None:
    runs: list[RunRecord] = []
    for n in range(1, MAX_RUN_HISTORY + 6):
        runs = record_run(runs, RunRecord(run=n, generation=n))
    assert [r.run for r in runs] == list(range(6, MAX_RUN_HISTORY + 6))
    finished = RunRecord(run=MAX_RUN_HISTORY + 5, generation=1, result="Succeeded")
    runs = record_run(runs, finished)
    assert len(runs) == MAX_RUN_HISTORY and runs[-1] == finished


# -- wire format -------------------------------------------------------------------------------


def test_status_round_trips_through_json_in_kubernetes_form(full_status: FineTuneJobStatus) -> None:
    wire = full_status.model_dump(mode="json", by_alias=True, exclude_none=True)
    assert wire["conditions"][0]["lastTransitionTime"] == "2026-11-27T09:00:00Z"
    assert wire["cost"] == {"gpuHours": 41.3, "usd": 102.5, "projectedUSD": 196.0}
    assert wire["progress"]["tokensPerSecond"] == 48210.5
    assert FineTuneJobStatus.model_validate(wire) == full_status


def test_times_must_carry_a_time_zone() -> None:
    with pytest.raises(ValidationError, match="timezone"):
        Condition(type="Ready", status="True", reason="R", last_transition_time=datetime(2026, 1, 1))


def test_spec_reuses_the_trainer_option_groups() -> None:
    # One definition per field: the API's groups are the trainer's classes, not copies.
    fields = FineTuneJob.model_fields["spec"].annotation.model_fields  # type: ignore[union-attr]
    assert fields["method"].annotation is MethodConfig
    assert fields["training"].annotation is TrainingConfig
    assert issubclass(fields["dataset"].annotation, DatasetOptions)  # type: ignore[arg-type]


# -- examples ------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", JOB_EXAMPLES, ids=[p.relative_to(REPO / "examples").as_posix() for p in JOB_EXAMPLES])
def test_example_parses_and_is_commented(path: Path) -> None:
    text = path.read_text()
    job = FineTuneJob.model_validate(yaml.safe_load(text))
    assert job.api_version == "kubetune.io/v1alpha1" and job.kind == "FineTuneJob"
    assert text.startswith("#"), "every example opens with a comment saying what it shows"


def test_examples_cover_every_method_and_the_required_shapes() -> None:
    jobs = {p.stem: FineTuneJob.model_validate(yaml.safe_load(p.read_text())) for p in JOB_EXAMPLES}
    assert {"lora", "qlora", "dora", "prompt", "full"} <= {j.spec.method.type for j in jobs.values()}
    full = jobs["full-2x8"].spec.resources
    assert (full.num_nodes, full.gpus_per_node) == (2, 8)
    assert jobs["kueue-queued"].spec.resources.queue_name
    single = jobs["lora-single-gpu"].spec.resources
    assert (single.num_nodes, single.gpus_per_node) == (1, 1)


def test_gitops_folder_wires_kustomize_and_argo_cd() -> None:
    gitops = REPO / "examples" / "gitops"
    kustomization = yaml.safe_load((gitops / "kustomization.yaml").read_text())
    assert kustomization["resources"] == ["finetunejob.yaml"]
    app = yaml.safe_load((gitops / "argocd-application.yaml").read_text())
    assert (app["apiVersion"], app["kind"]) == ("argoproj.io/v1alpha1", "Application")
    assert app["spec"]["source"]["path"] == "examples/gitops"
    assert app["spec"]["destination"]["namespace"] == kustomization["namespace"]
    job = yaml.safe_load((gitops / "finetunejob.yaml").read_text())
    assert job["spec"]["dataset"]["source"] == "pvc://datasets/support/v3.jsonl"
