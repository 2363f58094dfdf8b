"""FineTuneJob status, and the pure helpers the operator uses to maintain it.

The status follows kstatus: a top-level observedGeneration, the abnormal-true Reconciling and Stalled
conditions, a Ready summary, plus the job conditions Running, Succeeded, Failed and Suspended. `phase` is a
one-word summary derived from the conditions (compute_phase) for printer columns and humans.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Annotated, Literal, Protocol

from kubetune_trainer.config import MAX_EVAL_SETS
from pydantic import AfterValidator, Field

from kubetune_operator.api.common import ApiModel, Time

# Losses are kept to 4 decimals: the status is read by people (`kubectl get ftj` prints the number as stored),
# and digits past the fourth are noise from run to run anyway.
Loss = Annotated[float, AfterValidator(lambda value: round(value, 4))]  # and other figures of a loss: perplexity

Phase = Literal["Pending", "Running", "Succeeded", "Failed", "Suspended"]
ConditionStatus = Literal["True", "False", "Unknown"]
ConditionType = Literal[
    "Ready", "Reconciling", "Stalled", "Running", "Succeeded", "Failed", "Suspended", "CheckpointsIgnored"
]
RunResult = Literal["Succeeded", "Failed", "Cancelled"]
AttemptReason = Literal[
    "Completed",
    "Error",
    "OOMKilled",
    "Preempted",
    "Evicted",
    "NodeLost",
    "Stalled",
    "BudgetExceeded",
    "DeadlineExceeded",
    "SpecChanged",
    "Suspended",
]

# How many finished or running runs status.runs keeps (oldest dropped first).
MAX_RUN_HISTORY = 20
# Loss points kept in status.progress.history: enough for a readable curve, small enough for the object
# (rank 0 keeps up to 500; the operator thins them).
MAX_PROGRESS_HISTORY = 100
# The first attempt plus runPolicy.maxRestarts (at most 100) restarts.
MAX_ATTEMPTS = 101
# Checkpoints the status lists as ignored (the trainer reports at most 20; its logs have them all).
MAX_IGNORED_CHECKPOINTS = 20
# hf:// sources a run can pin: the model, the dataset and the eval dataset.
MAX_PINNED = 3

# metav1.Condition's own validation (k8s.io/apimachinery/pkg/apis/meta/v1/types.go).
CONDITION_TYPE_PATTERN = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])$"
)
REASON_PATTERN = r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"


class Condition(ApiModel):
    """One aspect of the job's state, in the shape of metav1.Condition."""

    type: str = Field(
        max_length=316,
        pattern=CONDITION_TYPE_PATTERN,
        description="Ready, Reconciling, Stalled, Running, Succeeded, Failed, Suspended or CheckpointsIgnored.",
    )
    status: ConditionStatus = Field(description="True, False or Unknown.")
    observed_generation: int | None = Field(
        None, ge=0, description="The metadata.generation the condition was set for; older means out of date."
    )
    last_transition_time: Time = Field(description="When status last changed.")
    reason: str = Field(
        min_length=1,
        max_length=1024,
        pattern=REASON_PATTERN,
        description="Why, as one CamelCase word (e.g. Training, BudgetExceeded).",
    )
    message: str = Field("", max_length=32768, description="Why, as a sentence for humans.")


class Workers(ApiModel):
    """The worker pods of the current attempt."""

    active: int = Field(0, ge=0, description="Pods that exist and have not finished.")
    ready: int = Field(0, ge=0, description="Pods running and ready.")
    succeeded: int = Field(0, ge=0, description="Pods that finished successfully.")
    failed: int = Field(0, ge=0, description="Pods that failed.")


class HistoryPoint(ApiModel):
    """One point of the loss curve."""

    step: int = Field(ge=0, description="Optimizer step.")
    loss: Loss | None = Field(None, description="Training loss at this step.")
    eval_loss: Loss | None = Field(None, description="Evaluation loss, where the run evaluated at this step.")
    eval_sets: dict[str, Loss] | None = Field(
        None,
        max_length=MAX_EVAL_SETS,
        description="Loss of each evaluation set (spec.evaluation.sets), where the run evaluated at this step.",
    )


class EvalSetResult(ApiModel):
    """One evaluation set's figures at the latest evaluation, against the base model's (step 0)."""

    name: str = Field(max_length=32, description="The set's name (spec.evaluation.sets[].name).")
    loss: Loss | None = Field(None, description="Mean loss over the set's target tokens.")
    perplexity: Loss | None = Field(None, ge=0, description="exp(loss).")
    base_loss: Loss | None = Field(None, description="The base model's loss on the set, before training.")
    change: Loss | None = Field(
        None,
        description=(
            "(loss - baseLoss) / baseLoss: 0.12 is 12% worse than the base model, -0.3 is 30% better. On a set "
            "from another domain than the training data, a rise measures forgetting."
        ),
    )


class DataReportSummary(ApiModel):
    """The data report of the training rows, measured before training (data-report.json in the output has every
    row it names)."""

    rows: int = Field(ge=0, description="Training rows.")
    tokens: int = Field(ge=0, description="Their tokens, after truncation to maxSeqLength.")
    length_p50: int = Field(ge=0, description="Median row length in tokens, before truncation.")
    length_p99: int = Field(ge=0, description="99th percentile of the row lengths in tokens.")
    length_max: int = Field(ge=0, description="Longest row in tokens.")
    truncated_rows: int = Field(ge=0, description="Rows longer than maxSeqLength: their ends are not trained on.")
    skipped_rows: int = Field(ge=0, description="Rows with no target token within maxSeqLength: not trained on.")
    exact_duplicate_rows: int = Field(ge=0, description="Copies of other rows (same text once normalised).")
    near_duplicate_rows: int = Field(ge=0, description="Rows nearly equal to others (MinHash, Jaccard >= 0.8).")
    evaluation_rows: int = Field(0, ge=0, description="Rows of the evaluation split, evalSource and sets.")
    leaked_rows: int = Field(0, ge=0, description="Evaluation rows that also appear in the training data.")


class SetupProgress(ApiModel):
    """What rank 0 does before its first step (downloading, tokenising, loading), and how far it got."""

    stage: str = Field(max_length=64, description="e.g. downloading, tokenising, loading model.")
    done: int | None = Field(None, ge=0, description="How much of the stage is done, in unit.")
    total: int | None = Field(None, ge=0, description="How much the stage has to do, in unit, when known.")
    unit: str | None = Field(None, max_length=16, description="bytes or rows.")


class PinnedSource(ApiModel):
    """An hf:// source and the commit every worker of the run reads, resolved when the run started."""

    role: str = Field(max_length=32, description="model, dataset or evalDataset.")
    source: str = Field(max_length=4096, description="The source as the spec gives it, e.g. hf://Qwen/Qwen2.5-7B.")
    revision: str | None = Field(None, max_length=256, description="The revision the spec asked for (branch or tag).")
    commit: str = Field(max_length=64, description="The commit that revision named when the run started.")


class Progress(ApiModel):
    """Training progress of the current run, as last reported by rank 0 (updated at most every ~30 s)."""

    step: int | None = Field(None, ge=0, description="Optimizer steps done.")
    total_steps: int | None = Field(None, ge=0, description="Optimizer steps the run will take.")
    percent: int | None = Field(None, ge=0, le=100, description="step / totalSteps, in percent (rounded down).")
    epoch: float | None = Field(None, ge=0, description="Passes over the training data done, fractional.")
    loss: Loss | None = Field(None, description="Latest training loss.")
    eval_loss: Loss | None = Field(None, description="Latest evaluation loss.")
    base_eval_loss: Loss | None = Field(None, description="The base model's evaluation loss, before training.")
    eval_sets: list[EvalSetResult] | None = Field(
        None,
        max_length=MAX_EVAL_SETS,
        description="Each evaluation set's figures at the latest evaluation, against the base model's.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    data_report: DataReportSummary | None = Field(
        None, description="The data report of the run's training data, measured before training."
    )
    tokens_per_second: float | None = Field(None, ge=0, description="Training throughput over all workers.")
    mfu: float | None = Field(None, ge=0, le=1, description="Model FLOPs utilisation, 0 to 1.")
    eta: str | None = Field(None, max_length=32, description="Estimated time left, for humans (e.g. 1h12m).")
    eta_seconds: int | None = Field(None, ge=0, description="Estimated time left, in seconds.")
    updated_at: Time | None = Field(None, description="When this progress was reported.")
    setup: SetupProgress | None = Field(
        None, description="While the current attempt sets up (before its first step): what it does and how far it got."
    )
    pinned: list[PinnedSource] = Field(
        default_factory=list,
        max_length=MAX_PINNED,
        description="The commits the run's hf:// model and datasets were resolved to (also in the run manifest).",
    )
    history: list[HistoryPoint] = Field(
        default_factory=list,
        max_length=MAX_PROGRESS_HISTORY,
        description=(
            f"The loss curve of the run so far, at most {MAX_PROGRESS_HISTORY} points spread over it, oldest first "
            "(every evaluation kept while they fit in half of them)."
        ),
    )


class IgnoredCheckpoint(ApiModel):
    """Files in the run's checkpoint directory that training neither resumes from nor rotates."""

    path: str = Field(max_length=4096, description="Where they are.")
    reason: str = Field(max_length=1024, description="Why they are not this training's, e.g. another job's uid.")


class CheckpointStatus(ApiModel):
    """The latest valid checkpoint of the current run."""

    latest: str | None = Field(
        None,
        max_length=4096,
        description="Where the checkpoint is, e.g. pvc://ft-checkpoints/default/support-bot/runs/2/checkpoints/step-1200.",
    )
    step: int | None = Field(None, ge=0, description="Optimizer step it was taken at.")
    saved_at: Time | None = Field(None, description="When it was saved.")
    ignored: list[IgnoredCheckpoint] = Field(
        default_factory=list,
        max_length=MAX_IGNORED_CHECKPOINTS,
        description=(
            "Checkpoints of another FineTuneJob object, run or spec (or from before checkpoints recorded their "
            "owner) found where this run keeps its own: left untouched, never resumed from (condition "
            "CheckpointsIgnored)."
        ),
    )


class CostStatus(ApiModel):
    """Spend of the current run: GPU time of its worker pods, over all its attempts, priced by their nodes."""

    gpu_hours: float | None = Field(None, ge=0, description="GPU-hours used by the run's worker pods.")
    usd: float | None = Field(None, ge=0, description="Accrued cost in US dollars.")
    projected_usd: float | None = Field(
        None,
        ge=0,
        alias="projectedUSD",
        description="Expected cost of the whole run in US dollars, at the current rate.",
    )


class OutputStatus(ApiModel):
    """The trained artefacts of the latest finished run."""

    path: str | None = Field(
        None, max_length=4096, description="Where the output is, e.g. pvc://ft-models/default/support-bot/runs/2."
    )
    promoted: bool | None = Field(
        None, description="True when the output passed the evaluation gate (or there is none) and is final."
    )


class RunRecord(ApiModel):
    """One run in the history."""

    run: int = Field(ge=1, description="Run number, counting from 1.")
    generation: int = Field(ge=1, description="The metadata.generation the run trained.")
    rerun_token: str | None = Field(
        None, max_length=256, description="The kubetune.io/rerun annotation value that started the run, if any."
    )
    spec_hash: str | None = Field(
        None,
        max_length=64,
        description=(
            "Fingerprint of the spec fields that define what the run trains (all but runPolicy, budget and "
            "evaluation); a different fingerprint starts a new run."
        ),
    )
    result: RunResult | None = Field(
        None, description="Succeeded, Failed or Cancelled (by a spec change or deletion); omitted while running."
    )
    reason: str | None = Field(
        None, max_length=1024, pattern=REASON_PATTERN, description="Why the run ended, as one CamelCase word."
    )
    start_time: Time | None = Field(None, description="When the run's first attempt started.")
    completion_time: Time | None = Field(None, description="When the run ended.")
    attempts: int | None = Field(None, ge=1, description="Attempts the run used.")
    final_loss: Loss | None = Field(None, description="Training loss at the end of the run.")
    final_eval_loss: Loss | None = Field(None, description="Evaluation loss at the end of the run.")
    final_eval_sets: list[EvalSetResult] | None = Field(
        None,
        max_length=MAX_EVAL_SETS,
        description="Each evaluation set's figures at the end of the run, against the base model's.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    output: str | None = Field(None, max_length=4096, description="Where the run's output is.")
    gpu_hours: float | None = Field(None, ge=0, description="GPU-hours the run used, once it ended.")
    cost_usd: float | None = Field(
        None, ge=0, alias="costUSD", description="What the run cost in US dollars, once it ended."
    )


class AttemptRecord(ApiModel):
    """One attempt of the current run."""

    attempt: int = Field(ge=1, description="Attempt number within the run, counting from 1.")
    start_time: Time | None = Field(None, description="When the attempt's workers were created.")
    completion_time: Time | None = Field(None, description="When the attempt ended.")
    reason: AttemptReason | None = Field(None, description="Why the attempt ended; omitted while it runs.")
    message: str | None = Field(None, max_length=32768, description="Details, e.g. which pod failed and how.")
    exit_code: int | None = Field(None, description="Exit code of the first failed worker container, if any.")
    gpu_hours: float | None = Field(
        None, ge=0, description="GPU-hours the attempt's workers used so far (final once they are gone)."
    )
    cost_usd: float | None = Field(
        None, ge=0, alias="costUSD", description="What the attempt's workers cost so far, in US dollars."
    )


class DroppedAttempts(ApiModel):
    """Attempts of the current run no longer listed in status.attempts, with what they used."""

    count: int = Field(ge=0, description="How many attempts were dropped from the list.")
    gpu_hours: float | None = Field(None, ge=0, description="GPU-hours their workers used.")
    cost_usd: float | None = Field(None, ge=0, alias="costUSD", description="What their workers cost, in US dollars.")


class FineTuneJobStatus(ApiModel):
    """The observed state of the job, written by the operator."""

    observed_generation: int | None = Field(
        None, ge=0, description="The metadata.generation the operator last acted on."
    )
    phase: Phase | None = Field(
        None, description="Pending, Running, Succeeded, Failed or Suspended: a summary of the conditions."
    )
    conditions: list[Condition] = Field(
        default_factory=list,
        max_length=16,
        description=(
            "Ready, Reconciling, Stalled, Running, Succeeded, Failed, Suspended and CheckpointsIgnored, one entry "
            "per type."
        ),
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    run: int | None = Field(None, ge=1, description="Number of the current (or last) run.")
    attempt: int | None = Field(None, ge=1, description="Attempt number of the current run.")
    start_time: Time | None = Field(None, description="When the current run started.")
    completion_time: Time | None = Field(None, description="When the current run ended.")
    workers: Workers | None = Field(
        None,
        description=(
            "The worker pods of the current attempt, as of the last status write (counts alone are rewritten at most "
            "every settings.figuresWriteIntervalSeconds)."
        ),
    )
    progress: Progress | None = Field(None, description="Training progress of the current run.")
    checkpoint: CheckpointStatus | None = Field(None, description="The latest valid checkpoint of the current run.")
    cost: CostStatus | None = Field(
        None,
        description=(
            "Spend of the current run as of the last status write: written with every other change, and at least "
            "every settings.figuresWriteIntervalSeconds while only it grows. The operator's metrics are exact."
        ),
    )
    output: OutputStatus | None = Field(None, description="The output of the latest finished run.")
    runs: list[RunRecord] = Field(
        default_factory=list,
        max_length=MAX_RUN_HISTORY,
        description=f"The last {MAX_RUN_HISTORY} runs, oldest first, the current one included.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["run"]},
    )
    attempts: list[AttemptRecord] = Field(
        default_factory=list,
        max_length=MAX_ATTEMPTS,
        description="The attempts of the current run, oldest first, with why each ended.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["attempt"]},
    )
    dropped_attempts: DroppedAttempts | None = Field(
        None,
        description=(
            f"Attempts of the current run dropped from attempts to keep it within {MAX_ATTEMPTS} (the oldest "
            "suspensions go first), and what they used: status.cost counts it."
        ),
    )


# ----------------------------------------------------------------------------------------------
# pure helpers
# ----------------------------------------------------------------------------------------------


def get_condition(conditions: Sequence[Condition], type_: str) -> Condition | None:
    return next((c for c in conditions if c.type == type_), None)


def is_true(conditions: Sequence[Condition], type_: str) -> bool:
    condition = get_condition(conditions, type_)
    return condition is not None and condition.status == "True"


def set_condition(
    conditions: Sequence[Condition],
    type_: ConditionType,
    status: ConditionStatus,
    reason: str,
    message: str,
    *,
    observed_generation: int | None,
    now: datetime,
) -> list[Condition]:
    """Return the conditions with `type_` set. Its lastTransitionTime moves only when its status changes, so
    re-asserting the same state every reconcile does not look like a transition."""
    old = get_condition(conditions, type_)
    changed = old is None or old.status != status
    new = Condition(
        type=type_,
        status=status,
        reason=reason,
        message=message,
        observed_generation=observed_generation,
        last_transition_time=now if changed or old is None else old.last_transition_time,
    )
    if old is None:
        return [*conditions, new]
    return [new if c.type == type_ else c for c in conditions]


def compute_phase(conditions: Sequence[Condition]) -> Phase:
    """Terminal results win over suspension, suspension over running; anything else is Pending."""
    phases: tuple[Phase, ...] = ("Succeeded", "Failed", "Suspended", "Running")
    return next((phase for phase in phases if is_true(conditions, phase)), "Pending")


def format_eta(seconds: float) -> str:
    """A short human duration with the two largest units: 45s, 5m30s, 1h12m, 2d3h."""
    total = max(0, round(seconds))
    parts = [(total // 86400, "d"), (total % 86400 // 3600, "h"), (total % 3600 // 60, "m"), (total % 60, "s")]
    first = next((i for i, (value, _) in enumerate(parts) if value), len(parts) - 1)
    return "".join(f"{value}{unit}" for value, unit in parts[first : first + 2] if value) or "0s"


class SetupLike(Protocol):
    stage: str
    done: int | None
    total: int | None
    unit: str | None


def setup_text(setup: SetupLike) -> str:
    """A setup stage for humans: "downloading 1.2 GiB of 3.4 GiB", "tokenising 12000 rows", "loading model"."""
    if setup.done is None:
        return setup.stage
    done = _amount(setup.done, setup.unit)
    return f"{setup.stage} {done} of {_amount(setup.total, setup.unit)}" if setup.total else f"{setup.stage} {done}"


def _amount(n: int, unit: str | None) -> str:
    if unit != "bytes":
        return f"{n} {unit}" if unit else str(n)
    if n < 1024:
        return f"{n} B"
    size = float(n)
    for suffix in ("KiB", "MiB", "GiB", "TiB"):
        size /= 1024
        if size < 1024 or suffix == "TiB":
            break
    return f"{size:.1f} {suffix}"


def progress_percent(step: int, total_steps: int) -> int:
    """Whole percent done, rounded down so 100 means finished; 0 when the total is not known yet."""
    if total_steps <= 0:
        return 0
    return max(0, min(100, step * 100 // total_steps))


def record_run(runs: Sequence[RunRecord], record: RunRecord) -> list[RunRecord]:
    """Insert or replace `record` (matched by run number) and keep the newest MAX_RUN_HISTORY runs."""
    kept = [r for r in runs if r.run != record.run]
    return sorted([*kept, record], key=lambda r: r.run)[-MAX_RUN_HISTORY:]
