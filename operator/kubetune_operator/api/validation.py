"""Every CEL rule of the FineTuneJob CRD, by schema path: the checks a JSON schema cannot express.

Bounds, enums and required fields come from the pydantic models; the rules here cover string syntax (with
a message that says what is allowed, where a regex pattern would only print itself) and cross-field
consistency. The generator (crd.py) attaches each rule as `x-kubernetes-validations` at its path.

Path syntax: dotted property names from the object root; `[]` steps into list items, `{}` into map values.
Messages name the field from `spec.` on, because a rule on an object reports the object's path.
Regexes are RE2; `[.]` stands for a literal dot to keep backslashes out of the YAML.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from kubetune_trainer.config import EVAL_SET_NAME_RE

# ----------------------------------------------------------------------------------------------
# syntax
# ----------------------------------------------------------------------------------------------

DNS_LABEL = "[a-z0-9]([-a-z0-9]*[a-z0-9])?"
DNS_SUBDOMAIN = f"{DNS_LABEL}([.]{DNS_LABEL})*"
LABEL_VALUE_RE = "^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
LABEL_KEY_RE = f"^({DNS_SUBDOMAIN}/)?[A-Za-z0-9]([-A-Za-z0-9_.]{{0,61}}[A-Za-z0-9])?$"
HF_RE = "^hf://[A-Za-z0-9][-A-Za-z0-9_.]*/[A-Za-z0-9][-A-Za-z0-9_.]*$"
HF_PATH_RE = "^hf://[A-Za-z0-9][-A-Za-z0-9_.]*/[A-Za-z0-9][-A-Za-z0-9_.]*(/[^/[:space:]]+)*/?$"  # datasets
PVC_RE = f"^pvc://{DNS_SUBDOMAIN}(/[^/[:space:]]+)*/?$"
S3_RE = "^s3://[a-z0-9][-a-z0-9.]{1,61}[a-z0-9](/[^[:space:]]*)?$"
DOT_DOT_SEGMENT_RE = "/[.][.](/|$)"
RELATIVE_PATH_RE = "^[A-Za-z0-9_][-A-Za-z0-9_.]*(/[A-Za-z0-9_][-A-Za-z0-9_.]*)*$"
REVISION_RE = "^[A-Za-z0-9][-A-Za-z0-9_./]*$"
ENDPOINT_RE = "^https?://[^/?#[:space:]]+/?$"
REGION_RE = "^[A-Za-z0-9][-A-Za-z0-9_]*$"
# The evaluation sets' sources, and every source of a spec, for the rules that depend on the schemes in use.
SET_SOURCES = (
    "(has(self.evaluation) && has(self.evaluation.sets) ? self.evaluation.sets.map(s, s.source) : []) + "
    "(has(self.evaluation) && has(self.evaluation.samples) ? [self.evaluation.samples.source] : [])"
)
DATASET_SOURCES = (
    f"([self.dataset.source] + (has(self.dataset.evalSource) ? [self.dataset.evalSource] : []) + {SET_SOURCES})"
)
SOURCES = f"([self.model.source] + {DATASET_SOURCES})"
HAS_SETS = "(has(self.evaluation) && has(self.evaluation.sets) && size(self.evaluation.sets) > 0)"

SOURCE_HELP = "hf://<org>/<name>, pvc://<claim>/<path> or s3://<bucket>/<path>"
DATASET_SOURCE_HELP = "hf://<org>/<name>[/<path>], pvc://<claim>/<path> or s3://<bucket>/<path>"
NAME_HELP = "a lowercase RFC 1123 name: a-z, 0-9, '-' and '.', starting and ending with a letter or digit"
QUANTITY_HELP = "a positive Kubernetes quantity such as 16, 500m, 64Gi or 1Ti"
LORA_FAMILY = "['lora', 'qlora', 'dora']"

Reason = Literal["FieldValueInvalid", "FieldValueForbidden", "FieldValueRequired", "FieldValueDuplicate"]


@dataclass(frozen=True)
class Rule:
    rule: str
    message: str
    # Where the error is reported, relative to the rule's object (e.g. ".evalSource"); omitted: the object.
    field_path: str | None = None
    reason: Reason | None = None

    def to_schema(self) -> dict[str, str]:
        out = {"rule": self.rule, "message": self.message}
        if self.field_path:
            out["fieldPath"] = self.field_path
        if self.reason:
            out["reason"] = self.reason
        return out


def _name(field: str) -> Rule:
    return Rule(f"self.matches('^{DNS_SUBDOMAIN}$')", f"{field} must be {NAME_HELP}")


def _label_value(field: str) -> Rule:
    return Rule(
        f"self.matches('{LABEL_VALUE_RE}')",
        f"{field} must be a label value: at most 63 of a-z, A-Z, 0-9, '-', '_' and '.', "
        "starting and ending with a letter or digit",
    )


def _label_keys(field: str) -> Rule:
    return Rule(
        f"self.all(k, k.matches('{LABEL_KEY_RE}'))",
        f"{field} keys must be label keys: an optional DNS prefix and '/', then a name of at most 63 of "
        "a-z, A-Z, 0-9, '-', '_' and '.' starting and ending with a letter or digit",
    )


def _no_reserved_keys(field: str) -> Rule:
    return Rule(
        "self.all(k, !k.startsWith('kubetune.io/'))",
        f"{field} must not use keys under kubetune.io/: the operator sets those",
    )


def _quantity(field: str) -> Rule:
    return Rule(
        "isQuantity(string(self)) && quantity(string(self)).isGreaterThan(quantity('0'))",
        f"{field} must be {QUANTITY_HELP}",
    )


def _source(field: str, hf_re: str = HF_RE, forms: str = SOURCE_HELP) -> tuple[Rule, ...]:
    return (
        Rule(
            f"self.matches('{hf_re}') || self.matches('{PVC_RE}') || self.matches('{S3_RE}')",
            f"{field} must be {forms} (no spaces)",
        ),
        Rule(f"!self.matches('{DOT_DOT_SEGMENT_RE}')", f"{field} must not contain '..' path segments"),
    )


def _revision(field: str) -> Rule:
    return Rule(
        f"self.matches('{REVISION_RE}')",
        f"{field} must be a branch, tag or commit: letters, digits, '-', '_', '.' and '/'",
    )


def _dataset_source(field: str) -> tuple[Rule, ...]:
    return _source(field, HF_PATH_RE, DATASET_SOURCE_HELP)


def _only_for(group: str, types: str, allowed: str) -> Rule:
    return Rule(
        f"!has(self.{group}) || self.type in {types}",
        f"spec.method.{group} applies only when spec.method.type is {allowed}; remove it or change the type",
        field_path=f".{group}",
        reason="FieldValueForbidden",
    )


def _needs_eval_data(condition: str, field: str, field_path: str, sets: bool = False) -> Rule:
    """A field that needs the evaluation split (or, with `sets`, any evaluation data: a named set will do)."""
    alternatives = f" || {HAS_SETS}" if sets else ""
    wanted = "spec.dataset.evalSplit above 0 or spec.dataset.evalSource"
    return Rule(
        f"!({condition}) || self.dataset.evalSplit > 0.0 || has(self.dataset.evalSource){alternatives}",
        f"{field} needs evaluation data: set {wanted}{' or spec.evaluation.sets' if sets else ''}",
        field_path=field_path,
    )


RULES: dict[str, tuple[Rule, ...]] = {
    "": (
        Rule(
            "size(self.metadata.name) <= 40 && self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')",
            "metadata.name must be at most 40 characters of a-z, 0-9 and '-', starting with a letter and ending "
            "with a letter or digit: it prefixes the names of the job's Service, Jobs and pods",
        ),
    ),
    # -- cross-group rules ---------------------------------------------------------------------
    "spec": (
        Rule(
            "self.method.type != 'qlora' || self.resources.gpusPerNode >= 1",
            "spec.resources.gpusPerNode must be at least 1 when spec.method.type is qlora: 4-bit quantisation "
            "(bitsandbytes) needs a CUDA GPU",
            field_path=".resources.gpusPerNode",
        ),
        Rule(
            "self.training.precision != 'fp16' || self.resources.gpusPerNode >= 1",
            "spec.training.precision fp16 needs GPUs (spec.resources.gpusPerNode >= 1); use bf16 or fp32 for "
            "CPU-only training",
            field_path=".training.precision",
        ),
        Rule(
            "self.method.type != 'prompt' || !has(self.method.prompt) "
            "|| self.method.prompt.numVirtualTokens < self.dataset.maxSeqLength",
            "spec.method.prompt.numVirtualTokens must be less than spec.dataset.maxSeqLength: the virtual "
            "tokens take room in every sequence",
            field_path=".method.prompt.numVirtualTokens",
        ),
        Rule(
            "self.method.type != 'prefix' || !has(self.method.prefix) "
            "|| self.method.prefix.numVirtualTokens < self.dataset.maxSeqLength",
            "spec.method.prefix.numVirtualTokens must be less than spec.dataset.maxSeqLength: the virtual "
            "tokens take room in every sequence",
            field_path=".method.prefix.numVirtualTokens",
        ),
        _needs_eval_data(
            "has(self.training.evalEverySteps)", "spec.training.evalEverySteps", ".training.evalEverySteps", sets=True
        ),
        _needs_eval_data(
            "has(self.evaluation) && has(self.evaluation.maxEvalLoss)",
            "spec.evaluation.maxEvalLoss",
            ".evaluation.maxEvalLoss",
        ),
        Rule(
            "!self.output.mergeAdapter || self.method.type in ['lora', 'qlora', 'dora', 'ia3']",
            "spec.output.mergeAdapter is only for lora, qlora, dora and ia3: full fine-tuning already writes the "
            "whole model, and prefix/prompt tuning has no weights to merge",
            field_path=".output.mergeAdapter",
        ),
        Rule(
            "self.resources.numNodes == 1 || !has(self.checkpoint.volumeClaimTemplate) "
            "|| 'ReadWriteMany' in self.checkpoint.volumeClaimTemplate.spec.accessModes",
            "spec.checkpoint.volumeClaimTemplate.spec.accessModes must include ReadWriteMany when "
            "spec.resources.numNodes is more than 1: every node mounts the checkpoint volume",
            field_path=".checkpoint.volumeClaimTemplate.spec.accessModes",
        ),
        # The Hugging Face token serves the hf:// model and hf:// datasets alike.
        Rule(
            f"!has(self.model.tokenSecretRef) || {SOURCES}.exists(s, s.startsWith('hf://'))",
            "spec.model.tokenSecretRef applies only when a source (spec.model.source, spec.dataset.source, "
            "spec.dataset.evalSource, spec.evaluation.sets[].source or spec.evaluation.samples.source) is hf:// "
            "(it is the Hugging Face access token)",
            field_path=".model.tokenSecretRef",
            reason="FieldValueForbidden",
        ),
        Rule(
            f"!has(self.storage) || !has(self.storage.s3) || {SOURCES}.exists(s, s.startsWith('s3://'))",
            "spec.storage.s3 applies only when a source (spec.model.source, spec.dataset.source, "
            "spec.dataset.evalSource, spec.evaluation.sets[].source or spec.evaluation.samples.source) is s3://",
            field_path=".storage.s3",
            reason="FieldValueForbidden",
        ),
        Rule(
            f"!has(self.dataset.revision) || {DATASET_SOURCES}.exists(s, s.startsWith('hf://'))",
            "spec.dataset.revision applies only when spec.dataset.source, spec.dataset.evalSource or an "
            "evaluation source (sets, samples) is hf:// (a branch, tag or commit of the dataset repository)",
            field_path=".dataset.revision",
            reason="FieldValueForbidden",
        ),
    ),
    # -- model and dataset ---------------------------------------------------------------------
    "spec.model": (
        Rule(
            "!has(self.revision) || self.source.startsWith('hf://')",
            "spec.model.revision applies only to hf:// sources (a branch, tag or commit on the Hugging Face Hub)",
            field_path=".revision",
            reason="FieldValueForbidden",
        ),
    ),
    "spec.model.source": _source("spec.model.source"),
    "spec.model.revision": (_revision("spec.model.revision"),),
    "spec.model.tokenSecretRef.name": (_name("spec.model.tokenSecretRef.name"),),
    "spec.model.tokenSecretRef.key": (
        Rule(
            "self.matches('^[-._a-zA-Z0-9]+$')",
            "spec.model.tokenSecretRef.key must be a Secret key: letters, digits, '-', '_' and '.'",
        ),
    ),
    "spec.dataset": (
        Rule(
            "!has(self.evalSource) || self.evalSplit == 0.0",
            "spec.dataset.evalSource and spec.dataset.evalSplit are mutually exclusive: hold out a fraction of "
            "the training rows (evalSplit) or give separate evaluation rows (evalSource), not both",
            field_path=".evalSource",
            reason="FieldValueForbidden",
        ),
    ),
    "spec.dataset.source": _dataset_source("spec.dataset.source"),
    "spec.dataset.evalSource": _dataset_source("spec.dataset.evalSource"),
    "spec.dataset.revision": (_revision("spec.dataset.revision"),),
    "spec.storage.s3.endpointUrl": (
        Rule(
            f"self.matches('{ENDPOINT_RE}')",
            "spec.storage.s3.endpointUrl must be an http:// or https:// URL with a host and an optional port and "
            "no path, e.g. https://minio.example.com:9000",
        ),
    ),
    "spec.storage.s3.region": (
        Rule(
            f"self.matches('{REGION_RE}')",
            "spec.storage.s3.region must be a region name: letters, digits, '-' and '_', e.g. eu-west-1",
        ),
    ),
    "spec.storage.s3.credentialsSecretRef.name": (_name("spec.storage.s3.credentialsSecretRef.name"),),
    # -- method: only the settings group of the chosen method may be given ---------------------
    "spec.method": (
        _only_for("lora", LORA_FAMILY, "lora, qlora or dora"),
        _only_for("qlora", "['qlora']", "qlora"),
        _only_for("prefix", "['prefix']", "prefix"),
        _only_for("prompt", "['prompt']", "prompt"),
        _only_for("ia3", "['ia3']", "ia3"),
        _only_for("full", "['full']", "full"),
    ),
    "spec.method.prefix": (
        Rule(
            "!has(self.initText)",
            "spec.method.prefix.initText is not supported: only prompt tuning can initialise its virtual "
            "tokens from text",
            field_path=".initText",
            reason="FieldValueForbidden",
        ),
    ),
    # -- resources -----------------------------------------------------------------------------
    "spec.resources": (
        Rule(
            "!has(self.gpuProduct) || self.gpusPerNode >= 1",
            "spec.resources.gpuProduct needs spec.resources.gpusPerNode >= 1 (a CPU-only job has no GPU to choose)",
            field_path=".gpuProduct",
            reason="FieldValueForbidden",
        ),
        Rule(
            "!has(self.shmSize) || !has(self.memory) || !isQuantity(string(self.shmSize)) "
            "|| !isQuantity(string(self.memory)) "
            "|| quantity(string(self.shmSize)).compareTo(quantity(string(self.memory))) <= 0",
            "spec.resources.shmSize must not exceed spec.resources.memory: /dev/shm is memory of the pod",
            field_path=".shmSize",
        ),
    ),
    "spec.resources.gpuProduct": (_label_value("spec.resources.gpuProduct"),),
    "spec.resources.cpu": (_quantity("spec.resources.cpu"),),
    "spec.resources.memory": (_quantity("spec.resources.memory"),),
    "spec.resources.shmSize": (_quantity("spec.resources.shmSize"),),
    "spec.resources.nodeSelector": (_label_keys("spec.resources.nodeSelector"),),
    "spec.resources.nodeSelector{}": (_label_value("spec.resources.nodeSelector values"),),
    "spec.resources.tolerations[]": (
        Rule(
            "has(self.key) || self.operator == 'Exists'",
            "spec.resources.tolerations[]: a toleration without a key must use operator Exists (it tolerates "
            "every taint)",
            field_path=".operator",
        ),
        Rule(
            "self.operator != 'Exists' || !has(self.value)",
            "spec.resources.tolerations[].value must be omitted when operator is Exists",
            field_path=".value",
            reason="FieldValueForbidden",
        ),
        Rule(
            "!has(self.tolerationSeconds) || (has(self.effect) && self.effect == 'NoExecute')",
            "spec.resources.tolerations[].tolerationSeconds applies only to effect NoExecute",
            field_path=".tolerationSeconds",
            reason="FieldValueForbidden",
        ),
    ),
    "spec.resources.tolerations[].key": (
        Rule(
            f"self.matches('{LABEL_KEY_RE}')",
            "spec.resources.tolerations[].key must be a label key, e.g. nvidia.com/gpu",
        ),
    ),
    "spec.resources.priorityClassName": (_name("spec.resources.priorityClassName"),),
    "spec.resources.queueName": (
        Rule(
            f"self.matches('^{DNS_LABEL}$')",
            "spec.resources.queueName must be the name of a Kueue LocalQueue: at most 63 of a-z, 0-9 and '-', "
            "starting and ending with a letter or digit",
        ),
    ),
    "spec.resources.image": (
        Rule("self.matches('^[^[:space:]]+$')", "spec.resources.image must be an image reference without spaces"),
    ),
    "spec.resources.podLabels": (
        _label_keys("spec.resources.podLabels"),
        _no_reserved_keys("spec.resources.podLabels"),
        Rule(
            "!('kueue.x-k8s.io/queue-name' in self)",
            "spec.resources.podLabels must not set kueue.x-k8s.io/queue-name: use spec.resources.queueName",
            reason="FieldValueForbidden",
        ),
    ),
    "spec.resources.podLabels{}": (_label_value("spec.resources.podLabels values"),),
    "spec.resources.podAnnotations": (_no_reserved_keys("spec.resources.podAnnotations"),),
    # -- checkpoint and output -----------------------------------------------------------------
    "spec.checkpoint": (
        Rule(
            "has(self.claimName) != has(self.volumeClaimTemplate)",
            "spec.checkpoint must set exactly one of claimName (an existing PersistentVolumeClaim, kept when the "
            "job is deleted) and volumeClaimTemplate (a claim the job creates)",
        ),
    ),
    "spec.checkpoint.claimName": (_name("spec.checkpoint.claimName"),),
    "spec.checkpoint.volumeClaimTemplate.spec.storageClassName": (
        _name("spec.checkpoint.volumeClaimTemplate.spec.storageClassName"),
    ),
    "spec.checkpoint.volumeClaimTemplate.spec.resources.requests.storage": (
        _quantity("spec.checkpoint.volumeClaimTemplate.spec.resources.requests.storage"),
    ),
    "spec.checkpoint.volumeClaimTemplate.metadata.labels": (
        _label_keys("spec.checkpoint.volumeClaimTemplate.metadata.labels"),
    ),
    "spec.checkpoint.volumeClaimTemplate.metadata.labels{}": (
        _label_value("spec.checkpoint.volumeClaimTemplate.metadata.labels values"),
    ),
    "spec.output.claimName": (_name("spec.output.claimName"),),
    "spec.output.path": (
        Rule(
            f"self.matches('{RELATIVE_PATH_RE}')",
            "spec.output.path must be a relative path: segments of letters, digits, '-', '_' and '.' separated "
            "by '/', none starting with '.' (no leading '/', no '..')",
        ),
    ),
    # -- evaluation ------------------------------------------------------------------------------
    "spec.evaluation.sets[].name": (
        Rule(
            f"self.matches('{EVAL_SET_NAME_RE}')",
            "spec.evaluation.sets[].name must be at most 32 of a-z, 0-9 and '-', starting and ending with a letter "
            "or digit: it labels the set's figures in the status and the metrics",
        ),
    ),
    "spec.evaluation.sets[].source": _dataset_source("spec.evaluation.sets[].source"),
    "spec.evaluation.samples.source": _dataset_source("spec.evaluation.samples.source"),
    # -- run policy ------------------------------------------------------------------------------
    "spec.runPolicy": (
        Rule(
            # has(): the API server also checks this rule against the group's `default: {}`.
            "!has(self.maxBackoffSeconds) || !has(self.backoffSeconds) "
            "|| self.maxBackoffSeconds >= self.backoffSeconds",
            "spec.runPolicy.maxBackoffSeconds must be at least spec.runPolicy.backoffSeconds",
            field_path=".maxBackoffSeconds",
        ),
    ),
}
