"""FineTuneJob spec: what to train, on what, where checkpoints and outputs go, and how runs behave.

`method` and `training` are the trainer's own option groups and `dataset` extends the trainer's
`DatasetOptions` (kubetune_trainer.config), so a field means the same thing in the CRD, in the rendered
trainer config and in the trainer. Cross-field rules live in validation.py as CEL.
"""

from __future__ import annotations

from typing import Annotated, Literal

from kubetune_trainer.config import (
    MAX_EVAL_SETS,
    DataChecks,
    DatasetOptions,
    EvalSetOptions,
    MethodConfig,
    SamplesOptions,
    TrainingConfig,
)
from pydantic import Field

from kubetune_operator.api.common import DEFAULTED_GROUP, ApiModel, EmbeddedObject, Quantity

SOURCE_FORMS = (
    "hf://<org>/<name> (Hugging Face Hub), pvc://<claim>/<path> (a PersistentVolumeClaim in the job's "
    "namespace, mounted read-only) or s3://<bucket>/<path> (copied to the checkpoint claim before training; see "
    "spec.storage.s3)"
)
DATASET_SOURCE_FORMS = (
    "hf://<org>/<name>[/<path>] (a Hugging Face Hub dataset repository, or one file or directory in it), "
    "pvc://<claim>/<path> (a PersistentVolumeClaim in the job's namespace, mounted read-only) or "
    "s3://<bucket>/<key or prefix> (one object, or every object under the prefix, copied to the checkpoint claim "
    "before training; see spec.storage.s3)"
)

# How often a run checkpoints when the spec names no frequency: time-based, so the work a failure can cost is
# bounded whatever a step takes (workers also checkpoint when they are stopped).
DEFAULT_CHECKPOINT_MINUTES = 30

LabelValue = Annotated[str, Field(max_length=63)]
AnnotationValue = Annotated[str, Field(max_length=4096)]


# ----------------------------------------------------------------------------------------------
# model and dataset
# ----------------------------------------------------------------------------------------------


class SecretKeyRef(ApiModel):
    """A key of a Secret in the FineTuneJob's namespace. Its value reaches the workers only as an
    environment variable from a secretKeyRef: never in a ConfigMap, the status, events or logs."""

    name: str = Field(max_length=253, description="Name of the Secret, in the FineTuneJob's namespace.")
    key: str = Field("token", max_length=253, description="Key inside the Secret that holds the credential.")


class SecretRef(ApiModel):
    """A Secret in the FineTuneJob's namespace, whose keys reach the workers only as environment variables from
    secretKeyRefs: never in a ConfigMap, the status, events or logs."""

    name: str = Field(max_length=253, description="Name of the Secret, in the FineTuneJob's namespace.")


class ModelSpec(ApiModel):
    """The base model to fine-tune."""

    source: str = Field(
        max_length=2048,
        description=(
            f"Where the base model comes from: {SOURCE_FORMS}. A pvc:// or s3:// path is a directory in "
            "Hugging Face format (config.json, tokenizer, safetensors weights)."
        ),
    )
    revision: str | None = Field(
        None,
        max_length=255,
        description=(
            "hf:// sources only: the branch, tag or commit to download. Omitted: the repository's default branch."
        ),
    )
    token_secret_ref: SecretKeyRef | None = Field(
        None,
        description=(
            "The Hugging Face access token for gated or private repositories, used for the hf:// model and the "
            "hf:// dataset sources (exported to the workers as HF_TOKEN). Only when some source is hf://."
        ),
    )
    trust_remote_code: bool = Field(
        False,
        description=(
            "Allow Python code shipped with the model repository to run inside the workers. Enable only for "
            "sources you trust."
        ),
    )


class DatasetSpec(DatasetOptions):
    """The training data, and the optional evaluation data."""

    source: str = Field(
        max_length=2048,
        description=(
            f"Training rows: {DATASET_SOURCE_FORMS}. A file (.jsonl, .json, .parquet) or a directory of such "
            "files. To retrain on new data, point this at the new version (e.g. pvc://datasets/support/v4.jsonl)."
        ),
    )
    eval_source: str | None = Field(
        None,
        max_length=2048,
        description=(
            f"Evaluation rows in the same format: {DATASET_SOURCE_FORMS}. Mutually exclusive with a non-zero evalSplit."
        ),
    )
    revision: str | None = Field(
        None,
        max_length=255,
        description=(
            "hf:// dataset sources only (source and evalSource): the branch, tag or commit of the dataset repository. "
            "Omitted: the default branch. A branch is resolved when each attempt starts: pin a tag or commit for "
            "reproducible runs."
        ),
    )


class S3Storage(ApiModel):
    """How the workers reach the S3 or S3-compatible store that s3:// sources name. Requests use path-style URLs
    (<endpoint>/<bucket>/<key>), which AWS S3, MinIO, Ceph RGW, Cloudflare R2 and Google Cloud Storage accept."""

    endpoint_url: str | None = Field(
        None,
        max_length=2048,
        description=(
            "Endpoint of an S3-compatible store: scheme, host and optional port, e.g. http://minio.minio.svc:9000 "
            "or https://<account>.r2.cloudflarestorage.com. Omitted: AWS S3 in the region."
        ),
    )
    region: str | None = Field(
        None,
        max_length=63,
        description=(
            "Region of the buckets, e.g. eu-west-1. Omitted: us-east-1. S3-compatible stores often ignore it or "
            "expect a fixed value (R2: auto)."
        ),
    )
    credentials_secret_ref: SecretRef | None = Field(
        None,
        description=(
            "A Secret with the keys AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN for "
            "temporary credentials), exported to the workers as environment variables of the same names. Omitted: "
            "the workers use the node's instance role, from the instance metadata service."
        ),
    )


class StorageSpec(ApiModel):
    """Access to the object storage that sources name."""

    s3: S3Storage | None = Field(
        None, description="The S3 or S3-compatible store of the s3:// sources. Only when some source is s3://."
    )


# ----------------------------------------------------------------------------------------------
# resources
# ----------------------------------------------------------------------------------------------


class Toleration(ApiModel):
    """A toleration of a node taint, as in a Pod spec."""

    key: str | None = Field(
        None, max_length=316, description="Taint key to tolerate. Omitted (with operator Exists): every taint."
    )
    operator: Literal["Equal", "Exists"] = Field(
        "Equal", description="Equal: the taint value must equal value. Exists: any value (value must be omitted)."
    )
    value: str | None = Field(None, max_length=63, description="Taint value to match when operator is Equal.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        None, description="Taint effect to match. Omitted: every effect."
    )
    toleration_seconds: int | None = Field(
        None,
        ge=0,
        description="NoExecute only: how long the pod stays bound after the taint appears. Omitted: forever.",
    )


class Affinity(ApiModel):
    """Scheduling constraints of the worker pods, as in a Pod spec's affinity (each part is passed on unchanged)."""

    node_affinity: EmbeddedObject | None = Field(
        None, description="A core/v1 NodeAffinity: which nodes the workers may or prefer to run on."
    )
    pod_affinity: EmbeddedObject | None = Field(
        None, description="A core/v1 PodAffinity: run workers near pods matching a selector."
    )
    pod_anti_affinity: EmbeddedObject | None = Field(
        None, description="A core/v1 PodAntiAffinity: keep workers away from pods matching a selector."
    )


class Resources(ApiModel):
    """Where and with what the workers run. One worker pod runs per node; it starts one training process per GPU
    (one process when gpusPerNode is 0)."""

    num_nodes: int = Field(1, ge=1, le=1024, description="Number of worker pods (nodes) training together.")
    gpus_per_node: int = Field(
        1,
        ge=0,
        le=16,
        description=(
            "GPUs (nvidia.com/gpu) requested by each worker pod. 0 trains on CPU (small models and tests only)."
        ),
    )
    gpu_product: str | None = Field(
        None,
        max_length=63,
        description=(
            "Run only on nodes whose nvidia.com/gpu.product label equals this, e.g. NVIDIA-H100-80GB-HBM3. "
            "Also selects the price per GPU-hour used for cost tracking."
        ),
    )
    cpu: Quantity | None = Field(
        None,
        description=(
            "CPU requested by each worker pod, e.g. 16 or 15500m. Omitted: the operator's default, if it has one."
        ),
    )
    memory: Quantity | None = Field(
        None,
        description=(
            "Memory requested by each worker pod, and its limit, e.g. 200Gi. Omitted: the operator's default, if "
            "it has one."
        ),
    )
    shm_size: Quantity | None = Field(
        None,
        description=(
            "Size limit of the memory-backed /dev/shm that data loaders and NCCL use, e.g. 16Gi; counts against "
            "the pod's memory. Omitted: the operator's default, if it has one, else bounded by the pod's memory limit."
        ),
    )
    node_selector: dict[str, LabelValue] = Field(
        default_factory=dict,
        max_length=32,
        description="Node labels the worker pods require, in addition to the one gpuProduct implies.",
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, max_length=32, description="Taints the worker pods tolerate."
    )
    affinity: Affinity | None = Field(None, description="Node and pod (anti-)affinity of the worker pods.")
    priority_class_name: str | None = Field(
        None,
        max_length=253,
        description="PriorityClass of the worker pods; a higher priority may preempt other workloads.",
    )
    queue_name: str | None = Field(
        None,
        max_length=63,
        description=(
            "Kueue LocalQueue to submit to. Kueue then admits the job's workers as one unit when quota allows; "
            "until then the job stays Pending."
        ),
    )
    image: str | None = Field(
        None,
        max_length=512,
        description=(
            "Container image of the workers. Omitted: the operator's image for the method (a PEFT image or a "
            "full fine-tuning image, set in the Helm values)."
        ),
    )
    pod_labels: dict[str, LabelValue] = Field(
        default_factory=dict,
        max_length=32,
        description="Extra labels on every worker pod (keys under kubetune.io/ are reserved for the operator).",
    )
    pod_annotations: dict[str, AnnotationValue] = Field(
        default_factory=dict,
        max_length=32,
        description="Extra annotations on every worker pod (keys under kubetune.io/ are reserved for the operator).",
    )


# ----------------------------------------------------------------------------------------------
# checkpoint and output
# ----------------------------------------------------------------------------------------------


class ClaimTemplateMetadata(ApiModel):
    """Labels and annotations of the PersistentVolumeClaim created from the template."""

    labels: dict[str, LabelValue] = Field(default_factory=dict, max_length=32, description="Labels of the claim.")
    annotations: dict[str, AnnotationValue] = Field(
        default_factory=dict, max_length=32, description="Annotations of the claim."
    )


class StorageRequest(ApiModel):
    """The requested capacity."""

    storage: Quantity = Field(description="Capacity of the volume, e.g. 500Gi.")


class ClaimResources(ApiModel):
    """Storage resources of the claim, as in a PersistentVolumeClaim spec."""

    requests: StorageRequest = Field(description="The capacity to request.")


class ClaimTemplateSpec(ApiModel):
    """The part of a PersistentVolumeClaim spec a checkpoint volume needs."""

    access_modes: list[Literal["ReadWriteOnce", "ReadWriteOncePod", "ReadWriteMany"]] = Field(
        min_length=1,
        max_length=3,
        description="How the volume can be mounted. Jobs with more than one node need ReadWriteMany.",
        json_schema_extra={"x-kubernetes-list-type": "set"},
    )
    storage_class_name: str | None = Field(
        None, max_length=253, description="StorageClass to provision from. Omitted: the cluster's default class."
    )
    resources: ClaimResources = Field(description="The capacity to request (resources.requests.storage).")


class VolumeClaimTemplate(ApiModel):
    """A PersistentVolumeClaim the FineTuneJob creates and owns."""

    metadata: ClaimTemplateMetadata | None = Field(None, description="Labels and annotations of the claim.")
    spec: ClaimTemplateSpec = Field(description="Access modes, storage class and size of the claim.")


class CheckpointSpec(ApiModel):
    """Where and how often training state is saved. Every attempt resumes from the run's latest valid checkpoint,
    kept under <claim>/<namespace>/<job>/<job uid>/runs/<run>/checkpoints."""

    claim_name: str | None = Field(
        None,
        max_length=253,
        description=(
            "An existing PersistentVolumeClaim in the job's namespace. The job does not own it: deleting the job "
            "keeps the checkpoints. Set exactly one of claimName and volumeClaimTemplate."
        ),
    )
    volume_claim_template: VolumeClaimTemplate | None = Field(
        None,
        description=(
            "A claim created for this job, named <job>-checkpoints. When the outputs go to it too (no "
            "output.claimName), it has no owner and is kept when the job is deleted, checkpoints and outputs with "
            "it: delete it once the outputs are safe. When output.claimName names another claim, the job owns it "
            "and deleting the job deletes it with the checkpoints. Set exactly one of claimName and "
            "volumeClaimTemplate."
        ),
    )
    every_steps: int | None = Field(
        None,
        ge=1,
        description=(
            f"Save every N optimizer steps. Omitted with everyMinutes too: every {DEFAULT_CHECKPOINT_MINUTES} minutes "
            "(workers also save when they are stopped)."
        ),
    )
    every_minutes: int | None = Field(
        None,
        ge=1,
        le=1440,
        description=(
            "Save when this many minutes passed since the last save. With everySteps too, whichever comes first. "
            f"Omitted with everySteps too: {DEFAULT_CHECKPOINT_MINUTES}."
        ),
    )
    keep_last: int = Field(
        3, ge=1, le=100, description="Valid checkpoints kept per run; older ones are deleted after each save."
    )


class OutputSpec(ApiModel):
    """Where the trained adapter or model is written: <claim>/<path>/<namespace>/<job>/<job uid>/runs/<run>/
    (status.output.path names it). Outputs outlive the job: they never go to a claim the job deletes."""

    claim_name: str | None = Field(
        None,
        max_length=253,
        description=(
            "PersistentVolumeClaim that receives the outputs. Omitted: the checkpoint claim (a claim from "
            "checkpoint.volumeClaimTemplate is then kept when the job is deleted)."
        ),
    )
    path: str | None = Field(
        None,
        max_length=1024,
        description="Relative directory inside the claim under which outputs are written. Omitted: the claim's root.",
    )
    merge_adapter: bool = Field(
        False,
        description=(
            "Also write the base model with the adapter merged in, ready to serve without PEFT. For lora, "
            "qlora, dora and ia3 only."
        ),
    )


# ----------------------------------------------------------------------------------------------
# run policy, budget, evaluation
# ----------------------------------------------------------------------------------------------


class RunPolicy(ApiModel):
    """How runs and attempts behave. A run trains one spec generation (or one kubetune.io/rerun token); an attempt
    is one execution of a run that resumes from the latest checkpoint."""

    max_restarts: int = Field(
        3,
        ge=0,
        le=100,
        description="Attempts after the first that a run may use after failures (OOM, node loss, preemption, stall).",
    )
    backoff_policy: Literal["Exponential", "Fixed"] = Field(
        "Exponential",
        description=(
            "Wait before the next attempt. Exponential: backoffSeconds doubled per restart, capped at "
            "maxBackoffSeconds. Fixed: always backoffSeconds."
        ),
    )
    backoff_seconds: int = Field(30, ge=0, le=3600, description="Wait before the first restart of a run.")
    max_backoff_seconds: int = Field(
        600, ge=0, le=86400, description="Longest wait between attempts with the Exponential policy."
    )
    active_deadline_seconds: int | None = Field(
        None,
        ge=1,
        description=(
            "Wall-clock limit of a run, all attempts together; passing it fails the run (reason DeadlineExceeded)."
        ),
    )
    stall_timeout_seconds: int = Field(
        1800,
        ge=1,
        le=604800,
        description=(
            "Restart from the latest checkpoint (reason Stalled) when training reports no new step for this long."
        ),
    )
    ttl_seconds_after_finished: int | None = Field(
        None,
        ge=0,
        description=(
            "Delete the run's workers, Services and ConfigMaps this long after the run finished. The FineTuneJob "
            "(with its status and run history) and the checkpoints and outputs on its claims stay."
        ),
    )
    suspend: bool = Field(
        False,
        description="Stop the workers (checkpointing first) and keep the job suspended until set back to false.",
    )
    on_spec_change: Literal["Restart", "Queue"] = Field(
        "Restart",
        description=(
            "What a spec change (a new generation) or a new kubetune.io/rerun annotation does to a run in flight. "
            "Restart: stop it and start a new run now. Queue: let it finish, then start the new run."
        ),
    )


class Budget(ApiModel):
    """Spending limits per run. When accrued or projected spend passes a limit, the run checkpoints and stops with
    reason BudgetExceeded."""

    max_cost_usd: float | None = Field(
        None,
        gt=0,
        alias="maxCostUSD",
        description=(
            "Most the run may cost, in US dollars (GPU-hours x the operator's price for the GPU product). The run "
            "also stops when its projected cost (spent + the time left at the current pace) passes this, once the "
            "current attempt has trained 50 steps: the first steps carry the warm-up and project too much."
        ),
    )
    max_gpu_hours: float | None = Field(None, gt=0, description="Most GPU-hours the run may use.")


class EvaluationSet(EvalSetOptions):
    """Rows measured before training (the base model) and at every evaluation, reported apart from the evaluation
    split. A set from another domain than the training data measures forgetting: its loss rising against the base
    model's means the fine-tune lost general ability."""

    source: str = Field(
        max_length=2048,
        description=(
            f"The set's rows, in the format of the training data unless format says otherwise: {DATASET_SOURCE_FORMS}."
            " An hf:// source uses spec.dataset.revision."
        ),
    )
    max_increase: float | None = Field(
        None,
        gt=0,
        le=100,
        description=(
            "The run fails (reason EvalGateFailed) and its output is not promoted when the set's final loss is "
            "more than this fraction above the base model's, e.g. 0.05: at most 5% worse than before training."
        ),
    )


class EvaluationSamples(SamplesOptions):
    """Prompts the base model and the fine-tuned one answer at the end of the run, greedily: samples.jsonl beside
    the adapter, shown side by side by `kubectl finetune samples NAME`."""

    source: str = Field(
        max_length=2048,
        description=(
            f"The prompts, one per row: {DATASET_SOURCE_FORMS}. Rows are {{prompt}} (with an optional completion, "
            "kept as the reference answer), {messages} or {conversations} (a last assistant turn is the reference), "
            "{instruction, input?, output?} or {text}; with a chat-style training format a prompt goes through "
            "the chat template as training renders it."
        ),
    )


class Evaluation(ApiModel):
    """How the run is evaluated, and the quality gates on the finished run."""

    max_eval_loss: float | None = Field(
        None,
        gt=0,
        description=(
            "The run fails (reason EvalGateFailed) and its output is not promoted when the final evaluation "
            "loss is above this. Needs evaluation data (dataset.evalSplit or dataset.evalSource)."
        ),
    )
    sets: list[EvaluationSet] = Field(
        default_factory=list,
        max_length=MAX_EVAL_SETS,
        description=(
            "Named evaluation sets, measured on the base model before training and at every evaluation (every "
            "training.evalEverySteps, and at the end): loss, perplexity and the change against the base model, in "
            "status.progress.evalSets, the metrics and the output manifest."
        ),
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    data_report: bool = Field(
        True,
        description=(
            "Before training, report on the data (data-report.json in the output, a summary in "
            "status.progress.dataReport): rows, tokens, length percentiles, truncated and skipped rows, exact and near "
            "duplicates, and evaluation rows that also appear in the training data. Rank 0 reads the data once more "
            "for it."
        ),
    )
    samples: EvaluationSamples | None = Field(
        None, description="Prompts the base and the fine-tuned model answer at the end of the run, side by side."
    )
    data_checks: DataChecks | None = Field(
        None, description="Reasons to stop before training (exit code 78, the rows named), judged on the data report."
    )


# ----------------------------------------------------------------------------------------------
# the spec
# ----------------------------------------------------------------------------------------------


class FineTuneJobSpec(ApiModel):
    """The fine-tuning to run. Editing the spec starts a new run (see runPolicy.onSpecChange)."""

    model: ModelSpec = Field(description="The base model to fine-tune.")
    dataset: DatasetSpec = Field(description="Training data, optional evaluation data, and how rows become sequences.")
    storage: StorageSpec | None = Field(None, description="How the workers reach the object storage of s3:// sources.")
    method: MethodConfig = Field(
        default_factory=MethodConfig,
        description="The fine-tuning method and its settings; only the group named by type may be given.",
        json_schema_extra=DEFAULTED_GROUP,
    )
    training: TrainingConfig = Field(
        default_factory=TrainingConfig,
        description="Optimisation hyperparameters.",
        json_schema_extra=DEFAULTED_GROUP,
    )
    resources: Resources = Field(
        default_factory=Resources,
        description="Nodes, GPUs, scheduling and pod settings of the workers.",
        json_schema_extra=DEFAULTED_GROUP,
    )
    checkpoint: CheckpointSpec = Field(description="Where and how often training state is saved.")
    output: OutputSpec = Field(
        default_factory=OutputSpec,
        description="Where the trained adapter or model is written.",
        json_schema_extra=DEFAULTED_GROUP,
    )
    run_policy: RunPolicy = Field(
        default_factory=RunPolicy,
        description="Restarts, backoff, deadlines, stall detection, suspension and what a spec change does.",
        json_schema_extra=DEFAULTED_GROUP,
    )
    budget: Budget | None = Field(None, description="Spending limits per run.")
    evaluation: Evaluation | None = Field(None, description="Evaluation sets, and quality gates on the finished run.")
