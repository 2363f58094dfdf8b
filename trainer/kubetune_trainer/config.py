"""The trainer's configuration: what one training run needs, as a JSON document.

The operator renders this document into a ConfigMap; the trainer reads it with `TrainerConfig.load`.
The option groups shared with the FineTuneJob API (`DatasetOptions`, `MethodConfig`, `TrainingConfig`)
are defined once here and reused by the operator's API models, so a field means the same thing in the
CRD, in the rendered config and in the trainer.

Pure pydantic: importing this module must never import torch.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.alias_generators import to_camel

from .errors import PermanentError

DatasetFormat = Literal["text", "prompt_completion", "messages", "alpaca", "sharegpt"]
MethodType = Literal["lora", "qlora", "dora", "prefix", "prompt", "ia3", "full"]
PEFT_METHODS: tuple[MethodType, ...] = ("lora", "qlora", "dora", "prefix", "prompt", "ia3")
LORA_FAMILY: tuple[MethodType, ...] = ("lora", "qlora", "dora")
Precision = Literal["bf16", "fp16", "fp32"]
Scheduler = Literal["cosine", "linear", "constant"]
Sharding = Literal["auto", "fsdp", "ddp"]
PEFT_SHARDING_DESCRIPTION = (
    "How the method spreads over GPUs. auto: FSDP2 (the frozen base sharded over every GPU of the job) when the base "
    "takes more than half of one GPU's memory, otherwise DDP (a whole base on every GPU: no all-gathers). fsdp or "
    "ddp: that one."
)


class Model(BaseModel):
    """Base for every config model: camelCase on the wire, unknown keys rejected."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


# ----------------------------------------------------------------------------------------------
# Option groups shared with the FineTuneJob API
# ----------------------------------------------------------------------------------------------


class DatasetOptions(Model):
    format: DatasetFormat = Field(
        "text",
        description=(
            "Row format. text: {text}. prompt_completion: {prompt, completion}. messages: "
            "{messages: [{role, content}]} rendered with the tokenizer's chat template. alpaca: "
            "{instruction, input?, output}. sharegpt: {conversations: [{from, value}]}. The loss is "
            "computed only on completion / assistant tokens where the format marks them."
        ),
    )
    eval_split: float = Field(
        0.0,
        ge=0.0,
        le=0.5,
        description=(
            "Fraction of rows held out for evaluation (0 to 0.5). Ignored when an eval source is given. "
            "The split is deterministic for a given seed."
        ),
    )
    max_seq_length: int = Field(
        2048,
        ge=16,
        le=1048576,
        description="Longest sequence in tokens; longer samples are truncated (and counted in the logs).",
    )
    packing: bool = Field(
        True,
        description=(
            "Pack several samples into one sequence of up to maxSeqLength tokens with exact per-sample "
            "attention boundaries (no cross-sample attention). Removes padding waste."
        ),
    )
    shuffle: bool = Field(True, description="Shuffle training samples every epoch (seeded).")


EVAL_SET_NAME_RE = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
MAX_EVAL_SETS = 8


class EvalSetOptions(Model):
    """An evaluation set: rows measured (loss and perplexity) before training and at every evaluation."""

    name: str = Field(
        min_length=1,
        max_length=32,
        description=(
            "Name of the set: at most 32 of a-z, 0-9 and '-', starting and ending with a letter or digit. It labels "
            "the set's figures in the status, the metrics and the output manifest."
        ),
    )
    format: DatasetFormat | None = Field(
        None, description="Row format of the set (as dataset.format). Omitted: the training data's format."
    )

    # The CRD checks the syntax with a CEL rule that says what is allowed; this is the same check for the trainer.
    @field_validator("name")
    @classmethod
    def _name_syntax(cls, name: str) -> str:
        if not re.match(EVAL_SET_NAME_RE, name):
            raise ValueError(
                f"evaluation set name {name!r}: use a-z, 0-9 and '-', starting and ending with a letter or digit"
            )
        return name


class LoraSettings(Model):
    r: int = Field(16, ge=1, le=1024, description="LoRA rank: the inner dimension of the low-rank update.")
    alpha: int = Field(32, ge=1, le=4096, description="LoRA scaling numerator; the update is scaled by alpha/r.")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout applied to the LoRA input.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["all-linear"],
        min_length=1,
        description=(
            'Module names to adapt, e.g. [q_proj, k_proj, v_proj, o_proj]; "all-linear" adapts every linear '
            "layer except the output head."
        ),
    )
    rslora: bool = Field(False, description="Rank-stabilised LoRA: scale by alpha/sqrt(r) instead of alpha/r.")
    sharding: Sharding = Field("auto", description=PEFT_SHARDING_DESCRIPTION)


class QuantizationSettings(Model):
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type used by bitsandbytes.")
    double_quant: bool = Field(True, description="Quantise the quantisation constants too (saves ~0.4 bit/param).")
    compute_dtype: Literal["bf16", "fp16"] = Field("bf16", description="Data type of the matmuls after dequantisation.")


class VirtualTokenSettings(Model):
    num_virtual_tokens: int = Field(
        20, ge=1, le=1024, description="Number of trainable virtual tokens prepended to every sequence."
    )
    init_text: str | None = Field(
        None,
        description="Prompt tuning only: initialise the virtual tokens from this text instead of randomly.",
    )


class Ia3Settings(Model):
    target_modules: list[str] = Field(
        default_factory=lambda: ["k_proj", "v_proj", "down_proj"],
        min_length=1,
        description="Modules whose activations IA3 rescales.",
    )
    feedforward_modules: list[str] = Field(
        default_factory=lambda: ["down_proj"],
        description="The subset of targetModules that are feed-forward layers (their input is rescaled).",
    )
    sharding: Sharding = Field("auto", description=PEFT_SHARDING_DESCRIPTION)


class FullSettings(Model):
    sharding: Sharding = Field(
        "auto",
        description=(
            "How full fine-tuning spreads over GPUs. auto: FSDP2 (parameters, gradients and optimizer state "
            "sharded) when more than one process trains, otherwise plain single-process training. ddp: "
            "replicate the model on every GPU (only when it fits)."
        ),
    )


class MethodConfig(Model):
    type: MethodType = Field(
        "lora",
        description=(
            "Fine-tuning method. lora, dora (weight-decomposed LoRA), qlora (LoRA on a 4-bit base, GPU only), "
            "prefix and prompt (virtual tokens), ia3 (learned activation scaling), full (every weight)."
        ),
    )
    lora: LoraSettings = Field(default_factory=LoraSettings, description="Settings for lora, dora and qlora.")
    qlora: QuantizationSettings = Field(
        default_factory=QuantizationSettings, description="Quantisation of the frozen base model for qlora."
    )
    prefix: VirtualTokenSettings = Field(
        default_factory=VirtualTokenSettings, description="Settings for prefix tuning."
    )
    prompt: VirtualTokenSettings = Field(
        default_factory=VirtualTokenSettings, description="Settings for prompt tuning."
    )
    ia3: Ia3Settings = Field(default_factory=Ia3Settings, description="Settings for ia3.")
    full: FullSettings = Field(default_factory=FullSettings, description="Settings for full fine-tuning.")

    @property
    def is_peft(self) -> bool:
        return self.type in PEFT_METHODS

    @property
    def sharding(self) -> Sharding | None:
        """The method's sharding setting; None for prefix and prompt tuning (always DDP)."""
        if self.type in LORA_FAMILY:
            return self.lora.sharding
        if self.type == "ia3":
            return self.ia3.sharding
        if self.type == "full":
            return self.full.sharding
        return None


class TrainingConfig(Model):
    epochs: float | None = Field(
        None,
        gt=0,
        le=1000,
        description="Passes over the training data. Give epochs or maxSteps; when both are given maxSteps wins.",
    )
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps to train for; overrides epochs when given.")
    learning_rate: float = Field(2.0e-4, gt=0, le=1.0, description="Peak learning rate.")
    lr_scheduler: Scheduler = Field("cosine", description="Learning-rate schedule after warmup.")
    warmup_ratio: float = Field(
        0.03, ge=0.0, le=0.5, description="Fraction of total steps spent warming the learning rate up from 0."
    )
    batch_size_per_device: int = Field(
        4,
        ge=1,
        le=4096,
        description="Sequences per process per micro-batch (with packing: packed sequences of maxSeqLength).",
    )
    gradient_accumulation_steps: int = Field(
        1, ge=1, le=1024, description="Micro-batches accumulated into one optimizer step."
    )
    weight_decay: float = Field(
        0.0, ge=0.0, le=1.0, description="AdamW weight decay (not applied to biases and norms)."
    )
    max_grad_norm: float = Field(1.0, ge=0.0, description="Gradient clipping norm; 0 disables clipping.")
    precision: Precision = Field(
        "bf16",
        description=(
            "Compute precision. bf16 and fp16 run under autocast and keep trained weights in fp32 (a PEFT method's "
            "frozen base is stored in the compute dtype); fp32 trains in full precision."
        ),
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass: less memory, about 20% slower."
    )
    compile: bool = Field(False, description="Compile each decoder block with torch.compile.")
    fused_kernels: bool | None = Field(
        None,
        description=(
            "Compiled RMSNorm and SiLU-gate kernels for Llama-family layers. Unset: on for models of 100M "
            "parameters or more when the device has a compiler and compile is off."
        ),
    )
    seed: int = Field(42, ge=0, le=2**32 - 1, description="Seed for initialisation, data order and dropout.")
    log_every_steps: int = Field(10, ge=1, description="Log and publish metrics every N optimizer steps.")
    eval_every_steps: int | None = Field(
        None, ge=1, description="Evaluate on the eval split every N steps (always once at the end)."
    )

    @model_validator(mode="after")
    def _length_given(self) -> TrainingConfig:
        if self.epochs is None and self.max_steps is None:
            self.epochs = 1.0
        return self


# ----------------------------------------------------------------------------------------------
# Trainer-only parts: resolved local paths and the run's identity
# ----------------------------------------------------------------------------------------------


class ModelConfig(Model):
    source: str = Field(
        description=(
            "A local directory (what a PVC mount gives), an hf://<org>/<name> model repository (with the token from "
            "the HF_TOKEN environment variable) or an s3://<bucket>/<prefix> directory; remote ones are downloaded "
            "once into sources.cacheDir by rank 0, at the commit (or ETags) resolved when the run starts."
        )
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) for hf:// sources.")
    gguf_file: str | None = Field(None, description="GGUF file inside the source directory to load and dequantise.")
    trust_remote_code: bool = Field(False, description="Allow model code from the source to run.")


DATASET_SOURCE_FORMS = (
    "a local file or directory, hf://<org>/<name>[/<path>] (a Hugging Face dataset repository, or a file or "
    "directory in it) or s3://<bucket>/<key or prefix>"
)


class DatasetConfig(DatasetOptions):
    path: str = Field(description=f"Training rows: {DATASET_SOURCE_FORMS}.")
    eval_path: str | None = Field(None, description=f"Evaluation rows: {DATASET_SOURCE_FORMS}.")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) for hf:// dataset sources.")


class DataChecks(Model):
    """Reasons to stop before training (exit 78, the rows named), judged on the data report."""

    max_truncated_fraction: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description=(
            "Stop when more than this fraction of the training rows is longer than dataset.maxSeqLength (their "
            "ends would be cut off), e.g. 0.01."
        ),
    )
    max_duplicate_fraction: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description=(
            "Stop when more than this fraction of the training rows are exact or near duplicates of others "
            "(copies beyond the first of each group)."
        ),
    )
    fail_on_leakage: bool = Field(
        False,
        description=(
            "Stop when a row of the evaluation data (the held-out split, dataset.evalSource or an evaluation set) "
            "also appears in the training data, exactly or nearly: its evaluation would measure memory."
        ),
    )


class SamplesOptions(Model):
    """Sample answers of the base and the fine-tuned model, side by side."""

    max_new_tokens: int = Field(128, ge=1, le=4096, description="Longest answer, in tokens (greedy decoding).")
    max_prompts: int = Field(32, ge=1, le=256, description="Prompts answered: the first rows of the source.")


class SamplesConfig(SamplesOptions):
    path: str = Field(description=f"The prompts: {DATASET_SOURCE_FORMS}.")


class EvalSetConfig(EvalSetOptions):
    path: str = Field(description=f"The set's rows: {DATASET_SOURCE_FORMS}.")


class EvaluationConfig(Model):
    sets: list[EvalSetConfig] = Field(
        default_factory=list,
        max_length=MAX_EVAL_SETS,
        description="Named evaluation sets (e.g. out-of-distribution data that measures forgetting).",
    )

    data_report: bool = Field(True, description="Write the data report before training.")
    samples: SamplesConfig | None = Field(None, description="Answer these prompts with the base and tuned model.")
    data_checks: DataChecks = Field(default_factory=DataChecks, description="Reasons to stop before training.")

    @model_validator(mode="after")
    def _unique_names(self) -> EvaluationConfig:
        names = [s.name for s in self.sets]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"evaluation set names must be unique: {', '.join(twice)} given more than once")
        return self

    def sources(self) -> list[tuple[str, str]]:
        """(role, path) of every source this group reads, for the download of remote ones."""
        sets = [(f"evaluation set {s.name}", s.path) for s in self.sets]
        return sets + ([("samples", self.samples.path)] if self.samples else [])

    def localised(self, local: dict[str, str]) -> EvaluationConfig:
        """This group with the sources found in `local` (role -> local copy) replaced by their copies."""
        sets = [s.model_copy(update={"path": local.get(f"evaluation set {s.name}", s.path)}) for s in self.sets]
        samples = (
            self.samples.model_copy(update={"path": local.get("samples", self.samples.path)}) if self.samples else None
        )
        return self.model_copy(update={"sets": sets, "samples": samples})


class CheckpointConfig(Model):
    dir: str = Field(description="Directory that holds this run's checkpoints.")
    every_steps: int | None = Field(200, ge=1, description="Save every N optimizer steps.")
    every_minutes: float | None = Field(
        None, gt=0, description="Save when this many minutes passed since the last save."
    )
    keep_last: int = Field(3, ge=1, le=100, description="Valid checkpoints kept; older ones are deleted after a save.")


class OutputConfig(Model):
    dir: str = Field(description="Directory that receives the final adapter or model, tokenizer and manifest.")
    merge_adapter: bool = Field(False, description="Also write the base model with the adapter merged in.")


class S3Config(Model):
    """How to reach the store of s3:// sources. Credentials come from the environment (AWS_ACCESS_KEY_ID,
    AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN) or, without them, from the node's instance role."""

    endpoint_url: str | None = Field(
        None, description="Endpoint of an S3-compatible store (e.g. http://minio.minio.svc:9000). Omitted: AWS S3."
    )
    region: str | None = Field(None, description="Region of the buckets. Omitted: AWS_REGION, else us-east-1.")


class SourcesConfig(Model):
    cache_dir: str | None = Field(
        None,
        description=(
            "Where s3:// and hf:// sources are downloaded: a directory every worker of the job sees (the "
            "operator puts it on the checkpoint claim), so one download serves every node and every later attempt. "
            "Omitted: ~/.cache/kubetune/sources."
        ),
    )
    s3: S3Config = Field(default_factory=S3Config, description="How to reach the store of s3:// sources.")


class MetricsConfig(Model):
    port: int = Field(9400, ge=0, le=65535, description="Port of rank 0's /metrics and /progress; 0 disables.")


class RunIdentity(Model):
    """Who this training is: recorded in every checkpoint and output, so that no training resumes from, rotates
    or overwrites another's files (another object of the same name, another run, an older attempt)."""

    namespace: str = ""
    name: str = ""
    uid: str = Field("", description="metadata.uid of the FineTuneJob: tells apart objects of the same name.")
    run: int = 1
    attempt: int = Field(1, ge=1, description="Execution of the run; a later attempt fences out older ones.")
    generation: int | None = None
    spec_fingerprint: str = Field(
        "", description="Digest of the spec that defines what is trained (model, data, method, training)."
    )

    def owner(self, *, attempt: bool) -> dict[str, str | int]:
        """Whose files: the identity as checkpoints (with the attempt that wrote them) and outputs record it."""
        fields = {"namespace", "name", "uid", "run", "spec_fingerprint"} | ({"attempt"} if attempt else set())
        return self.model_dump(by_alias=True, include=fields)


class TrainerConfig(Model):
    model: ModelConfig
    dataset: DatasetConfig
    method: MethodConfig = Field(default_factory=MethodConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    checkpoint: CheckpointConfig
    output: OutputConfig
    sources: SourcesConfig = Field(default_factory=SourcesConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    identity: RunIdentity = Field(default_factory=RunIdentity)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)

    @classmethod
    def load(cls, path: str | Path) -> TrainerConfig:
        return cls.model_validate(json.loads(Path(path).read_text()))

    def dump(self) -> str:
        return self.model_dump_json(by_alias=True, indent=2)


def load_config(path: str) -> TrainerConfig:
    """Load and validate a config file; any problem is a PermanentError with a one-line reason."""
    try:
        return TrainerConfig.load(path)
    except FileNotFoundError:
        raise PermanentError(f"config {path}: no such file") from None
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(root)"
        more = f" (and {e.error_count() - 1} more errors)" if e.error_count() > 1 else ""
        raise PermanentError(f"config {path}: {where}: {first['msg']}{more}") from None
    except ValueError as e:  # JSON syntax
        raise PermanentError(f"config {path}: not valid JSON ({e})") from None
