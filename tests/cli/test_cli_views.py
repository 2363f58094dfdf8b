"""The CLI's pure text views: tables, describe, the watch line and the final result, on fixed objects."""

from __future__ import annotations

from datetime import timedelta

import cli_helpers as h
import yaml
from kubetune_operator.api import RERUN_ANNOTATION
from kubetune_operator.api.status import (
    AttemptRecord,
    CheckpointStatus,
    DataReportSummary,
    EvalSetResult,
    FineTuneJobStatus,
    IgnoredCheckpoint,
    RunRecord,
    SetupProgress,
)
from kubetune_operator.cli import views

TRAINING = h.training(120, loss=1.23456, eval_loss=1.31, tokens_per_second=48210.5, eta_seconds=4320, usd=102.5)


def test_list_table_like_kubectl_get_with_progress_cost_and_eta() -> None:
    jobs = [h.job("support-bot", status=TRAINING)]
    assert views.list_table(jobs, now=h.NOW, all_namespaces=False, wide=False).splitlines() == [
        "NAME          PHASE     PROGRESS        LOSS     ETA     COST      AGE",
        "support-bot   Running   120/400 (30%)   1.2346   1h12m   $102.50   2h",
    ]


def test_list_table_wide_over_all_namespaces() -> None:
    jobs = [
        h.job("support-bot", status=TRAINING),
        h.job("nightly", "research", status=h.succeeded()),
        h.job("fresh", "research", resources={"gpusPerNode": 0}),
    ]
    assert views.list_table(jobs, now=h.NOW + timedelta(minutes=5), all_namespaces=True, wide=True).splitlines() == [
        "NAMESPACE   NAME          PHASE       PROGRESS         LOSS     ETA     COST      AGE    EVAL LOSS   RUN   "
        "ATTEMPT   METHOD   GPUS    PROJECTED   MODEL",
        "default     support-bot   Running     120/400 (30%)    1.2346   1h12m   $102.50   2h5m   1.3100      1     "
        "1         lora     2x8     $341.67     hf://Qwen/Qwen2.5-7B-Instruct",
        # A finished job has no ETA; a job the operator has not seen yet has no status at all.
        "research    nightly       Succeeded   400/400 (100%)   0.8123   -       $195.20   2h5m   0.9001      1     "
        "1         lora     2x8     $195.20     hf://Qwen/Qwen2.5-7B-Instruct",
        "research    fresh         -           -                -        -       -         2h5m   -           -     "
        "-         lora     1xCPU   -           hf://Qwen/Qwen2.5-7B-Instruct",
    ]


def retrained(status: FineTuneJobStatus, earlier_usd: float) -> FineTuneJobStatus:
    """The status as run 2, after a run 1 that cost `earlier_usd` (cancelled by a spec change)."""
    earlier = RunRecord(run=1, generation=1, result="Cancelled", reason="SpecChanged", cost_usd=earlier_usd)
    current = status.runs[-1].model_copy(update={"run": 2, "generation": 2})
    return status.model_copy(update={"run": 2, "runs": [earlier, current]})


def test_cost_table_totals_per_namespace_and_overall() -> None:
    jobs = [h.job("support-bot", status=TRAINING), h.job("nightly", "research", status=retrained(h.succeeded(), 40))]
    jobs.append(h.job("fresh", "research"))
    assert views.cost_table(jobs, all_namespaces=True).splitlines() == [
        "NAMESPACE   NAME          PHASE       GPUS   GPU-HOURS   COST      PROJECTED   BUDGET    RUNS   ALL RUNS",
        "default     support-bot   Running     2x8    41.0        $102.50   $341.67     $250.00   1      $102.50",
        # the current run's figures, then what its two runs cost together
        "research    nightly       Succeeded   2x8    78.1        $195.20   $195.20     $250.00   2      $235.20",
        "research    fresh         -           2x8    -           -         -           $250.00   0      -",
        "",
        "NAMESPACE   JOBS   GPU-HOURS   COST      PROJECTED   ALL RUNS",
        "default     1      41.0        $102.50   $341.67     $102.50",
        "research    2      78.1        $195.20   $195.20     $235.20",
        "TOTAL       3      119.1       $297.70   $536.87     $337.70",
    ]
    # One namespace: no overall line repeating the namespace's.
    assert views.cost_table(jobs[:1], all_namespaces=False).splitlines()[-2:] == [
        "NAMESPACE   JOBS   GPU-HOURS   COST      PROJECTED   ALL RUNS",
        "default     1      41.0        $102.50   $341.67     $102.50",
    ]


def test_describe_after_a_restart_with_events() -> None:
    status = h.training(300, loss=0.95, eval_loss=1.02, tokens_per_second=51000, eta_seconds=900, usd=150, attempt=2)
    status.attempts[0] = AttemptRecord(
        attempt=1,
        start_time=h.T0,
        completion_time=h.T0 + timedelta(minutes=50),
        reason="OOMKilled",
        message="worker 1 (pod support-bot-r1-a1-1) was OOMKilled",
        exit_code=137,
    )
    status.attempts[1].start_time = h.T0 + timedelta(minutes=52)
    status.checkpoint = CheckpointStatus(latest="default/support-bot/runs/1/step-200", step=200, saved_at=h.T0)
    job = h.job("support-bot", status=status)
    events = [
        {
            "type": "Warning",
            "reason": "AttemptFailed",
            "message": "attempt 1 failed:\n OOMKilled",
            "lastTimestamp": "2026-11-27T09:50:00Z",
            "source": {"component": "kubetune-operator"},
        },
        {
            "type": "Normal",
            "reason": "RunStarted",
            "message": "run 1 started",
            "lastTimestamp": "2026-11-27T09:00:00Z",
            "source": {"component": "kubetune-operator"},
        },
        {
            "type": "Normal",
            "reason": "AttemptStarted",
            "message": "attempt 2 started",
            "eventTime": "2026-11-27T09:52:00.000000Z",
            "reportingComponent": "kubetune",
        },
    ]
    assert views.describe(job, events, now=h.NOW).splitlines() == [
        "Name:        support-bot",
        "Namespace:   default",
        "Created:     2026-11-27T09:00:00Z (2h ago)",
        "Phase:       Running (run 1, attempt 2)",
        "Model:       hf://Qwen/Qwen2.5-7B-Instruct @ main",
        "Dataset:     pvc://datasets/support/v3.jsonl, messages, eval split 0.05",
        "Method:      lora (r=16, alpha=32)",
        "Training:    2 epochs, lr 0.0002",
        "Resources:   2 nodes x 8 GPUs (NVIDIA-H100-80GB-HBM3) = 16 GPUs",
        "Checkpoints: claim ft-checkpoints, every 200 steps",
        "Budget:      $250.00 max",
        "Progress:    step 300/400 (75%), epoch 1.50, loss 0.9500, eval loss 1.0200, 51.0k tok/s, ETA 15m, "
        "updated 1h30m ago",
        "Workers:     2 active, 2 ready, 0 succeeded, 0 failed",
        "Checkpoint:  default/support-bot/runs/1/step-200 (step 200, saved 2h ago)",
        "Cost:        60.0 GPU-hours, $150.00 so far, $200.00 projected, 60% of the $250.00 budget",
        "Output:      pvc://ft-checkpoints/default/support-bot/uid-support-bot/runs/1 when run 1 finishes (kept when "
        "the job is deleted: claim ft-checkpoints is not the job's)",
        "Conditions:",
        "  TYPE        STATUS   REASON          AGE   MESSAGE",
        "  Running     True     Training        2h",
        "  Succeeded   False    NotApplicable   2h",
        "  Failed      False    NotApplicable   2h",
        "  Suspended   False    NotApplicable   2h",
        "Evaluation (latest, against the base model):",
        "  SET            LOSS     BASE LOSS   CHANGE   GATE",
        "  (eval split)   1.0200   -           -        -",
        "Runs:",
        "  RUN   GEN   RESULT    REASON   ATTEMPTS   STARTED   DURATION   LOSS   EVAL LOSS   OUTPUT",
        "  1     1     Running   -        -          2h ago    -          -      -           -",
        "Attempts of run 1:",
        "  ATTEMPT   STARTED    DURATION   REASON      EXIT   MESSAGE",
        "  1         2h ago     50m        OOMKilled   137    worker 1 (pod support-bot-r1-a1-1) was OOMKilled",
        "  2         1h8m ago   -          Running     -",
        "Events:",
        "  TYPE      REASON           AGE     FROM                MESSAGE",
        "  Normal    RunStarted       2h      kubetune-operator   run 1 started",
        "  Warning   AttemptFailed    1h10m   kubetune-operator   attempt 1 failed: OOMKilled",
        "  Normal    AttemptStarted   1h8m    kubetune            attempt 2 started",
    ]


def test_describe_shows_each_evaluation_set_against_the_base_model_and_its_gate() -> None:
    status = h.training(300, loss=0.95, eval_loss=1.02, tokens_per_second=51000, eta_seconds=900, usd=150)
    assert status.progress is not None
    status.progress.base_eval_loss = 1.7
    status.progress.eval_sets = [
        EvalSetResult(name="general-chat", loss=2.42, perplexity=11.25, base_loss=2.2, change=0.1),
        EvalSetResult(name="code", loss=1.1, perplexity=3.0, base_loss=1.25, change=-0.12),
    ]
    job = h.job("support-bot", status=status)
    job["spec"]["evaluation"] = {
        "maxEvalLoss": 1.2,
        "sets": [
            {"name": "general-chat", "source": "pvc://data/chat.jsonl", "maxIncrease": 0.05},
            {"name": "code", "source": "pvc://data/code.jsonl"},
            {"name": "math", "source": "pvc://data/math.jsonl"},
        ],
    }
    status.progress.data_report = DataReportSummary(
        rows=9500,
        tokens=2_400_000,
        length_p50=210,
        length_p99=1900,
        length_max=5100,
        truncated_rows=95,
        skipped_rows=1,
        exact_duplicate_rows=12,
        near_duplicate_rows=0,
        evaluation_rows=700,
        leaked_rows=2,
    )
    job = h.job("support-bot", status=status) | {"spec": job["spec"]}
    lines = views.describe(job, [], now=h.NOW).splitlines()
    assert (
        "Data:        9,500 rows, 2,400,000 tokens, length p50 210 / p99 1900 / max 5100, 95 (1.0%) truncated, "
        "1 (0.0%) skipped, 12 (0.1%) exact and 0 near duplicates, 2 of 700 evaluation rows leaked"
    ) in lines
    start = lines.index("Evaluation (latest, against the base model):")
    assert lines[start + 1 : start + 6] == [
        "  SET            LOSS     BASE LOSS   CHANGE   GATE",
        "  (eval split)   1.0200   1.7000      -40.0%   loss <= 1.2",
        "  general-chat   2.4200   2.2000      +10.0%   change <= +5%",
        "  code           1.1000   1.2500      -12.0%   -",
        "  math           -        -           -        -",
    ]


def test_describe_finished_job_and_one_the_operator_has_not_seen() -> None:
    text = views.describe(h.job("nightly", status=h.succeeded()), [], now=h.NOW)
    assert (
        "Output:      pvc://ft-checkpoints/default/support-bot/runs/1 (promoted, kept when the job is deleted: claim "
        "ft-checkpoints is not the job's)"
    ) in text.splitlines()
    assert (
        "  1     1     Succeeded   Succeeded   1          2h ago    1h5m       0.8123   0.9001      "
        "pvc://ft-checkpoints/default/support-bot/runs/1"
    ) in text.splitlines()
    fresh = views.describe(h.job("fresh"), [], now=h.NOW).splitlines()
    assert "Phase:       - (no status yet: is the operator running?)" in fresh
    assert fresh[-8:] == [
        "Conditions:",
        "  none yet (has the operator seen this job?)",
        "Runs:",
        "  none yet",
        "Attempts:",
        "  none yet",
        "Events:",
        "  none",
    ]


def test_describe_says_where_the_output_of_a_claim_template_is_and_that_it_outlives_the_job() -> None:
    template = {"spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "10Gi"}}}}
    checkpoint = {"volumeClaimTemplate": template}  # and no frequency: the default
    job = h.job("tmpl", status=h.succeeded())
    job["spec"]["checkpoint"] = checkpoint
    lines = views.describe(job, [], now=h.NOW).splitlines()
    assert (
        "Checkpoints: claim tmpl-checkpoints from volumeClaimTemplate (kept when the job is deleted: it holds the "
        "outputs), every 30 min (default)"
    ) in lines
    assert (
        "Output:      pvc://ft-checkpoints/default/support-bot/runs/1 (promoted, kept when the job is deleted: claim "
        "tmpl-checkpoints was created for it without an owner; delete the claim once the output is safe)"
    ) in lines
    job["spec"]["output"] = {"claimName": "ft-models"}
    lines = views.describe(job, [], now=h.NOW).splitlines()
    assert any(
        line.startswith("Checkpoints: claim tmpl-checkpoints from volumeClaimTemplate (deleted with the job)")
        for line in lines
    )


def test_describe_shows_the_setup_and_the_checkpoints_left_untouched() -> None:
    status = h.training(step=0, total=400).model_copy(deep=True)
    assert status.progress is not None
    status.progress.setup = SetupProgress(stage="downloading", done=3 << 29, total=3 << 30, unit="bytes")
    status.checkpoint = CheckpointStatus(ignored=[IgnoredCheckpoint(path="pvc://c/x", reason="another object")])
    lines = views.describe(h.job("setup", status=status), [], now=h.NOW).splitlines()
    progress = next(line for line in lines if line.startswith("Progress:"))
    assert progress.startswith("Progress:    setting up: downloading 1.5 GiB of 3.0 GiB, step 0/400")
    assert "Checkpoint:  1 not this training's, left untouched (condition CheckpointsIgnored)" in lines


def test_progress_line_fits_the_terminal_and_drops_details_before_the_bar() -> None:
    job = h.job("support-bot", status=TRAINING)
    assert views.progress_line(job, width=120) == (
        "Running [#########.....................] 120/400 30%  "
        "loss 1.2346  eval 1.3100  48.2k tok/s  ETA 1h12m  $102.50"
    )
    assert views.progress_line(job, width=80) == (
        "Running [###........] 120/400 30%  loss 1.2346  48.2k tok/s  ETA 1h12m  $102.50"
    )
    assert views.progress_line(job, width=50) == "Running [####............] 120/400 30%  ETA 1h12m"
    assert views.progress_line(job, width=20) == "Running 120/400 30%"
    for width in (120, 80, 50, 20):
        assert len(views.progress_line(job, width=width)) < width  # a full line would wrap and break the redraw


def test_plain_progress_line_changes_only_with_the_state() -> None:
    job = h.job("support-bot", status=TRAINING)
    assert views.progress_line(job) == (
        "Running  step 120/400 (30%)  loss 1.2346  eval 1.3100  48.2k tok/s  ETA 1h12m  $102.50"
    )
    later = h.job("support-bot", status=TRAINING.model_copy(update={"start_time": h.NOW}))
    assert views.progress_line(later) == views.progress_line(job)
    assert views.progress_line(h.job("new")) == "Pending (waiting for the operator)"
    restarted = h.training(40, eta_seconds=600, phase="Running", attempt=3)
    assert views.progress_line(h.job("x", status=restarted)) == "Running attempt 3  step 40/400 (10%)  ETA 10m"


def test_result_lines() -> None:
    assert views.result_line(h.job("nightly", status=h.succeeded())) == (
        "Succeeded: run 1 finished in 1h5m: loss 0.8123, eval loss 0.9001, 78.1 GPU-hours, $195.20; "
        "output pvc://ft-checkpoints/default/support-bot/runs/1"
    )
    over = h.failed("BudgetExceeded", "projected cost $320.80 exceeds the budget of $250.00", attempts=2)
    assert views.result_line(h.job("x", status=over)) == (
        "Failed: run 1 after 2 attempts (BudgetExceeded: projected cost $320.80 exceeds the budget of $250.00); "
        "loss 1.4000, 48.1 GPU-hours, $120.30"
    )


def test_a_result_counts_only_once_the_operator_handled_the_latest_request() -> None:
    done = h.job("nightly", status=h.succeeded())
    assert views.outcome(done) == "Succeeded"
    assert views.outcome(h.job("x", status=TRAINING)) is None
    rerun = {**done, "metadata": {**done["metadata"], "annotations": {RERUN_ANNOTATION: "t2"}}}
    assert views.outcome(rerun) is None
    assert views.progress_line(rerun).startswith("Succeeded (a new run was asked for: waiting for the operator)")
    edited = {**done, "metadata": {**done["metadata"], "generation": 2}}
    assert views.outcome(edited) is None
    failed = h.job("x", status=h.failed("Error", "worker 0 exited with 1"))
    assert views.outcome(failed) == "Failed"


def test_dump_hides_managed_fields() -> None:
    job = h.job("x")
    job["metadata"]["managedFields"] = [{"manager": "kubectl"}]
    listed = yaml.safe_load(views.dump({"apiVersion": "v1", "kind": "List", "items": [job]}, "yaml"))
    assert "managedFields" not in listed["items"][0]["metadata"]
    assert listed["items"][0]["spec"] == job["spec"]
    assert '"managedFields"' not in views.dump(job, "json")


def test_small_formats() -> None:
    assert [views.rate(v) for v in (512, 48210.5, 2.5e6, None)] == ["512 tok/s", "48.2k tok/s", "2.5M tok/s", "-"]
    assert [views.usd(v) for v in (0, 1234.5, None)] == ["$0.00", "$1,234.50", "-"]
    assert views.steps({"step": 7}) == "7"
    assert views.bar(0.5, 10) == "[#####.....]"
    assert views.bar(1.5, 4) == "[####]"
    assert views.age("not a time", h.NOW) == "-"
