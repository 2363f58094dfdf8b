"""The catalogue of wrong FineTuneJobs: each is rejected by the real API server at apply time, with a message
that names the field and says what is allowed.

Each case is a JSON merge patch (RFC 7386: None deletes a key) on a valid minimal job, plus the fragments
its error must contain. All cases are applied in parallel once; each then asserts on its own result.
"""

from __future__ import annotations

import copy
import json
import subprocess
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pytest
from kubetune_dev.cluster import LocalCluster

pytestmark = pytest.mark.e2e

VALID: dict[str, Any] = {
    "apiVersion": "kubetune.io/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "job"},
    "spec": {
        "model": {"source": "hf://Qwen/Qwen2.5-0.5B-Instruct"},
        "dataset": {"source": "pvc://datasets/support/v3.jsonl"},
        "checkpoint": {"claimName": "ft-checkpoints", "everySteps": 100},
    },
}
TEMPLATE = {"spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "10Gi"}}}}


@dataclass(frozen=True)
class Case:
    id: str
    spec: dict[str, Any]
    expect: tuple[str, ...]
    name: str | None = None  # metadata.name, when the case is about the name


def merge(target: Any, patch: Any) -> Any:
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge(out.get(key), value)
    return out


CASES = [
    # -- structure, types, enums and bounds (OpenAPI schema) ------------------------------------
    Case("unknown-field", {"method": {"lora": {"rank": 8}}}, (".spec.method.lora.rank: field not declared in schema",)),
    Case(
        "affinity-typo",
        {"resources": {"affinity": {"nodeAfinity": {}}}},
        (".spec.resources.affinity.nodeAfinity: field not declared in schema",),
    ),
    Case("missing-model", {"model": None}, ("spec.model: Required value",)),
    Case("missing-dataset-source", {"dataset": {"source": None}}, ("spec.dataset.source: Required value",)),
    Case("missing-checkpoint", {"checkpoint": None}, ("spec.checkpoint: Required value",)),
    Case(
        "method-type",
        {"method": {"type": "lorax"}},
        ('spec.method.type: Unsupported value: "lorax"', '"lora", "qlora", "dora", "prefix", "prompt", "ia3", "full"'),
    ),
    Case("lora-r-zero", {"method": {"lora": {"r": 0}}}, ("spec.method.lora.r", "should be greater than or equal to 1")),
    Case(
        "lora-r-too-big",
        {"method": {"lora": {"r": 2048}}},
        ("spec.method.lora.r", "should be less than or equal to 1024"),
    ),
    Case(
        "lora-r-string",
        {"method": {"lora": {"r": "sixteen"}}},
        (".spec.method.lora.r: expected numeric (int or float), got string",),
    ),
    Case(
        "lora-dropout-one",
        {"method": {"lora": {"dropout": 1.0}}},
        ("spec.method.lora.dropout", "should be less than 1"),
    ),
    Case(
        "lora-no-target-modules",
        {"method": {"lora": {"targetModules": []}}},
        ("spec.method.lora.targetModules", "should have at least 1 items"),
    ),
    Case(
        "qlora-quant-type",
        {"method": {"type": "qlora", "qlora": {"quantType": "int4"}}},
        ('spec.method.qlora.quantType: Unsupported value: "int4"', '"nf4", "fp4"'),
    ),
    Case(
        "prompt-no-virtual-tokens",
        {"method": {"type": "prompt", "prompt": {"numVirtualTokens": 0}}},
        ("spec.method.prompt.numVirtualTokens", "should be greater than or equal to 1"),
    ),
    Case(
        "full-sharding",
        {"method": {"type": "full", "full": {"sharding": "zero3"}}},
        ('spec.method.full.sharding: Unsupported value: "zero3"', '"auto", "fsdp", "ddp"'),
    ),
    Case(
        "dataset-format",
        {"dataset": {"format": "csv"}},
        (
            'spec.dataset.format: Unsupported value: "csv"',
            '"text", "prompt_completion", "messages", "alpaca", "sharegpt"',
        ),
    ),
    Case(
        "eval-split-too-big",
        {"dataset": {"evalSplit": 0.6}},
        ("spec.dataset.evalSplit", "should be less than or equal to 0.5"),
    ),
    Case(
        "max-seq-length-too-small",
        {"dataset": {"maxSeqLength": 8}},
        ("spec.dataset.maxSeqLength", "should be greater than or equal to 16"),
    ),
    Case(
        "learning-rate-zero",
        {"training": {"learningRate": 0}},
        ("spec.training.learningRate", "should be greater than 0"),
    ),
    Case("epochs-zero", {"training": {"epochs": 0}}, ("spec.training.epochs", "should be greater than 0")),
    Case(
        "warmup-too-long",
        {"training": {"warmupRatio": 0.9}},
        ("spec.training.warmupRatio", "should be less than or equal to 0.5"),
    ),
    Case(
        "precision",
        {"training": {"precision": "int8"}},
        ('spec.training.precision: Unsupported value: "int8"', '"bf16", "fp16", "fp32"'),
    ),
    Case(
        "lr-scheduler",
        {"training": {"lrScheduler": "step"}},
        ('spec.training.lrScheduler: Unsupported value: "step"', '"cosine", "linear", "constant"'),
    ),
    Case(
        "num-nodes-zero",
        {"resources": {"numNodes": 0}},
        ("spec.resources.numNodes", "should be greater than or equal to 1"),
    ),
    Case(
        "gpus-per-node-too-many",
        {"resources": {"gpusPerNode": 17}},
        ("spec.resources.gpusPerNode", "should be less than or equal to 16"),
    ),
    Case(
        "toleration-effect",
        {"resources": {"tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoRun"}]}},
        (
            'spec.resources.tolerations[0].effect: Unsupported value: "NoRun"',
            '"NoSchedule", "PreferNoSchedule", "NoExecute"',
        ),
    ),
    Case(
        "keep-last-zero",
        {"checkpoint": {"keepLast": 0}},
        ("spec.checkpoint.keepLast", "should be greater than or equal to 1"),
    ),
    Case(
        "access-mode",
        {
            "checkpoint": {
                "claimName": None,
                "volumeClaimTemplate": merge(TEMPLATE, {"spec": {"accessModes": ["ReadOnlyMany"]}}),
            }
        },
        (
            'spec.checkpoint.volumeClaimTemplate.spec.accessModes[0]: Unsupported value: "ReadOnlyMany"',
            '"ReadWriteOnce", "ReadWriteOncePod", "ReadWriteMany"',
        ),
    ),
    Case(
        "access-mode-twice",
        {
            "checkpoint": {
                "claimName": None,
                "volumeClaimTemplate": merge(TEMPLATE, {"spec": {"accessModes": ["ReadWriteOnce", "ReadWriteOnce"]}}),
            }
        },
        ('.spec.checkpoint.volumeClaimTemplate.spec.accessModes: duplicate entries for key [="ReadWriteOnce"]',),
    ),
    Case(
        "template-without-size",
        {
            "checkpoint": {
                "claimName": None,
                "volumeClaimTemplate": {"spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {}}}},
            }
        },
        ("spec.checkpoint.volumeClaimTemplate.spec.resources.requests.storage: Required value",),
    ),
    Case(
        "max-restarts-too-many",
        {"runPolicy": {"maxRestarts": 101}},
        ("spec.runPolicy.maxRestarts", "should be less than or equal to 100"),
    ),
    Case(
        "backoff-policy",
        {"runPolicy": {"backoffPolicy": "Linear"}},
        ('spec.runPolicy.backoffPolicy: Unsupported value: "Linear"', '"Exponential", "Fixed"'),
    ),
    Case(
        "on-spec-change",
        {"runPolicy": {"onSpecChange": "Ignore"}},
        ('spec.runPolicy.onSpecChange: Unsupported value: "Ignore"', '"Restart", "Queue"'),
    ),
    Case(
        "stall-timeout-zero",
        {"runPolicy": {"stallTimeoutSeconds": 0}},
        ("spec.runPolicy.stallTimeoutSeconds", "should be greater than or equal to 1"),
    ),
    Case("budget-zero", {"budget": {"maxCostUSD": 0}}, ("spec.budget.maxCostUSD", "should be greater than 0")),
    # -- syntax of names, sources and quantities (CEL) ------------------------------------------
    Case("name-too-long", {}, ("metadata.name must be at most 40 characters",), name="a" * 41),
    Case("name-with-dot", {}, ("metadata.name must be at most 40 characters of a-z, 0-9 and '-'",), name="support.bot"),
    Case(
        "model-source-scheme",
        {"model": {"source": "gs://bucket/model"}},
        ("spec.model.source must be hf://<org>/<name>, pvc://<claim>/<path> or s3://<bucket>/<path>",),
    ),
    Case(
        "model-source-without-org", {"model": {"source": "hf://gpt2"}}, ("spec.model.source must be hf://<org>/<name>",)
    ),
    Case(
        "model-source-with-space",
        {"model": {"source": "pvc://models/my model"}},
        ("spec.model.source must be hf://<org>/<name>, pvc://<claim>/<path> or s3://<bucket>/<path> (no spaces)",),
    ),
    Case(
        "model-source-dot-dot",
        {"model": {"source": "pvc://models/../secrets"}},
        ("spec.model.source must not contain '..' path segments",),
    ),
    Case(
        "dataset-source-https",
        {"dataset": {"source": "https://example.com/data.jsonl"}},
        ("spec.dataset.source must be hf://<org>/<name>[/<path>], pvc://<claim>/<path> or s3://<bucket>/<path>",),
    ),
    Case(
        "eval-source-bad",
        {"dataset": {"evalSource": "/data/eval.jsonl"}},
        ("spec.dataset.evalSource must be hf://<org>/<name>[/<path>], pvc://<claim>/<path> or s3://<bucket>/<path>",),
    ),
    Case(
        "model-hf-source-with-path",
        {"model": {"source": "hf://Qwen/Qwen2.5-0.5B-Instruct/config.json"}},
        ("spec.model.source must be hf://<org>/<name>, pvc://<claim>/<path> or s3://<bucket>/<path>",),
    ),
    Case(
        "dataset-hf-source-without-name",
        {"dataset": {"source": "hf://acme"}},
        ("spec.dataset.source must be hf://<org>/<name>[/<path>]",),
    ),
    Case(
        "dataset-revision-syntax",
        {"dataset": {"source": "hf://acme/support", "revision": "v2 final"}},
        ("spec.dataset.revision must be a branch, tag or commit",),
    ),
    Case(
        "s3-endpoint-without-scheme",
        {
            "model": {"source": "s3://models/qwen", "tokenSecretRef": None},
            "storage": {"s3": {"endpointUrl": "minio:9000"}},
        },
        (
            "spec.storage.s3.endpointUrl must be an http:// or https:// URL with a host and an optional port and no "
            "path",
        ),
    ),
    Case(
        "s3-endpoint-with-path",
        {
            "model": {"source": "s3://models/qwen"},
            "storage": {"s3": {"endpointUrl": "https://minio.example.com/s3"}},
        },
        ("spec.storage.s3.endpointUrl must be an http:// or https:// URL",),
    ),
    Case(
        "s3-region-syntax",
        {"model": {"source": "s3://models/qwen"}, "storage": {"s3": {"region": "eu west 1"}}},
        ("spec.storage.s3.region must be a region name",),
    ),
    Case(
        "s3-credentials-secret-name",
        {"model": {"source": "s3://models/qwen"}, "storage": {"s3": {"credentialsSecretRef": {"name": "S3_Keys"}}}},
        ("spec.storage.s3.credentialsSecretRef.name must be a lowercase RFC 1123 name",),
    ),
    Case(
        "s3-credentials-secret-key",
        {
            "model": {"source": "s3://models/qwen"},
            "storage": {"s3": {"credentialsSecretRef": {"name": "s3", "key": "AWS_ACCESS_KEY_ID"}}},
        },
        (".spec.storage.s3.credentialsSecretRef.key: field not declared in schema",),
    ),
    Case(
        "token-secret-name",
        {"model": {"tokenSecretRef": {"name": "HF_Token"}}},
        ("spec.model.tokenSecretRef.name must be a lowercase RFC 1123 name",),
    ),
    Case(
        "token-secret-key",
        {"model": {"tokenSecretRef": {"name": "hf", "key": "my key"}}},
        ("spec.model.tokenSecretRef.key must be a Secret key: letters, digits, '-', '_' and '.'",),
    ),
    Case("revision-syntax", {"model": {"revision": "-main"}}, ("spec.model.revision must be a branch, tag or commit",)),
    Case(
        "cpu-not-quantity",
        {"resources": {"cpu": "8 cores"}},
        ("spec.resources.cpu must be a positive Kubernetes quantity such as 16, 500m, 64Gi or 1Ti",),
    ),
    Case(
        "memory-decimal-bytes",
        {"resources": {"memory": "64GB"}},
        ("spec.resources.memory must be a positive Kubernetes quantity",),
    ),
    Case(
        "shm-negative",
        {"resources": {"shmSize": "-1Gi"}},
        ("spec.resources.shmSize must be a positive Kubernetes quantity",),
    ),
    Case(
        "storage-not-quantity",
        {
            "checkpoint": {
                "claimName": None,
                "volumeClaimTemplate": merge(TEMPLATE, {"spec": {"resources": {"requests": {"storage": "lots"}}}}),
            }
        },
        ("spec.checkpoint.volumeClaimTemplate.spec.resources.requests.storage must be a positive Kubernetes quantity",),
    ),
    Case(
        "gpu-product-syntax",
        {"resources": {"gpuProduct": "NVIDIA H100"}},
        ("spec.resources.gpuProduct must be a label value",),
    ),
    Case(
        "queue-name",
        {"resources": {"queueName": "Team_ML"}},
        ("spec.resources.queueName must be the name of a Kueue LocalQueue",),
    ),
    Case(
        "priority-class-name",
        {"resources": {"priorityClassName": "High"}},
        ("spec.resources.priorityClassName must be a lowercase RFC 1123 name",),
    ),
    Case(
        "image-with-space",
        {"resources": {"image": "ghcr.io/acme/trainer: v1"}},
        ("spec.resources.image must be an image reference without spaces",),
    ),
    Case(
        "node-selector-value",
        {"resources": {"nodeSelector": {"pool": "gpu pool"}}},
        ("spec.resources.nodeSelector values must be a label value",),
    ),
    Case(
        "pod-label-key",
        {"resources": {"podLabels": {"team name": "ml"}}},
        ("spec.resources.podLabels keys must be label keys",),
    ),
    Case(
        "pod-label-value",
        {"resources": {"podLabels": {"team": "-ml"}}},
        ("spec.resources.podLabels values must be a label value",),
    ),
    Case(
        "pod-label-reserved",
        {"resources": {"podLabels": {"kubetune.io/run": "1"}}},
        ("spec.resources.podLabels must not use keys under kubetune.io/",),
    ),
    Case(
        "pod-label-kueue",
        {"resources": {"podLabels": {"kueue.x-k8s.io/queue-name": "team"}}},
        ("spec.resources.podLabels must not set kueue.x-k8s.io/queue-name: use spec.resources.queueName",),
    ),
    Case(
        "pod-annotation-reserved",
        {"resources": {"podAnnotations": {"kubetune.io/attempt": "1"}}},
        ("spec.resources.podAnnotations must not use keys under kubetune.io/",),
    ),
    Case(
        "output-claim-name",
        {"output": {"claimName": "Models"}},
        ("spec.output.claimName must be a lowercase RFC 1123 name",),
    ),
    Case("output-path-absolute", {"output": {"path": "/models"}}, ("spec.output.path must be a relative path",)),
    Case("output-path-dot-dot", {"output": {"path": "team/../other"}}, ("spec.output.path must be a relative path",)),
    # -- consistency between fields (CEL) -------------------------------------------------------
    Case(
        "model-revision-on-pvc",
        {"model": {"source": "pvc://models/qwen", "revision": "main"}},
        ("spec.model.revision: Forbidden: spec.model.revision applies only to hf:// sources",),
    ),
    Case(
        "model-token-without-hf-source",
        {"model": {"source": "s3://models/qwen", "tokenSecretRef": {"name": "hf"}}},
        (
            "spec.model.tokenSecretRef: Forbidden: spec.model.tokenSecretRef applies only when a source "
            "(spec.model.source, spec.dataset.source, spec.dataset.evalSource, spec.evaluation.sets[].source or "
            "spec.evaluation.samples.source) is hf://",
        ),
    ),
    Case(
        "dataset-revision-without-hf-source",
        {"dataset": {"revision": "main"}},
        (
            "spec.dataset.revision: Forbidden: spec.dataset.revision applies only when spec.dataset.source, "
            "spec.dataset.evalSource or an evaluation source (sets, samples) is hf://",
        ),
    ),
    Case(
        "s3-storage-without-s3-source",
        {"storage": {"s3": {"region": "eu-west-1"}}},
        (
            "spec.storage.s3: Forbidden: spec.storage.s3 applies only when a source (spec.model.source, "
            "spec.dataset.source, spec.dataset.evalSource, spec.evaluation.sets[].source or "
            "spec.evaluation.samples.source) is s3://",
        ),
    ),
    Case(
        "eval-split-and-eval-source",
        {"dataset": {"evalSplit": 0.1, "evalSource": "pvc://datasets/eval.jsonl"}},
        (
            "spec.dataset.evalSource: Forbidden",
            "spec.dataset.evalSource and spec.dataset.evalSplit are mutually exclusive",
        ),
    ),
    Case(
        "lora-settings-for-prompt",
        {"method": {"type": "prompt", "lora": {"r": 8}}},
        ("spec.method.lora: Forbidden: spec.method.lora applies only when spec.method.type is lora, qlora or dora",),
    ),
    Case(
        "qlora-settings-for-lora",
        {"method": {"type": "lora", "qlora": {"quantType": "nf4"}}},
        ("spec.method.qlora: Forbidden: spec.method.qlora applies only when spec.method.type is qlora",),
    ),
    Case(
        "ia3-settings-for-dora",
        {"method": {"type": "dora", "ia3": {}}},
        ("spec.method.ia3: Forbidden: spec.method.ia3 applies only when spec.method.type is ia3",),
    ),
    Case(
        "full-settings-for-lora",
        {"method": {"full": {"sharding": "fsdp"}}},
        ("spec.method.full: Forbidden: spec.method.full applies only when spec.method.type is full",),
    ),
    Case(
        "prefix-init-text",
        {"method": {"type": "prefix", "prefix": {"initText": "Answer:"}}},
        ("spec.method.prefix.initText: Forbidden", "only prompt tuning can initialise its virtual tokens from text"),
    ),
    Case(
        "prompt-tokens-fill-sequence",
        {"method": {"type": "prompt", "prompt": {"numVirtualTokens": 64}}, "dataset": {"maxSeqLength": 64}},
        ("spec.method.prompt.numVirtualTokens", "must be less than spec.dataset.maxSeqLength"),
    ),
    Case(
        "qlora-on-cpu",
        {"method": {"type": "qlora"}, "resources": {"gpusPerNode": 0}},
        ("spec.resources.gpusPerNode", "must be at least 1 when spec.method.type is qlora"),
    ),
    Case(
        "fp16-on-cpu",
        {"training": {"precision": "fp16"}, "resources": {"gpusPerNode": 0}},
        ("spec.training.precision", "fp16 needs GPUs", "use bf16 or fp32 for CPU-only training"),
    ),
    Case(
        "gpu-product-on-cpu",
        {"resources": {"gpusPerNode": 0, "gpuProduct": "NVIDIA-H100-80GB-HBM3"}},
        ("spec.resources.gpuProduct: Forbidden", "needs spec.resources.gpusPerNode >= 1"),
    ),
    Case(
        "shm-above-memory",
        {"resources": {"memory": "8Gi", "shmSize": "16Gi"}},
        ("spec.resources.shmSize", "must not exceed spec.resources.memory"),
    ),
    Case(
        "eval-steps-without-eval-data",
        {"training": {"evalEverySteps": 50}},
        (
            "spec.training.evalEverySteps",
            "needs evaluation data: set spec.dataset.evalSplit above 0 or spec.dataset.evalSource",
        ),
    ),
    Case(
        "eval-set-name-syntax",
        {"evaluation": {"sets": [{"name": "General_Chat", "source": "pvc://datasets/chat.jsonl"}]}},
        (
            "spec.evaluation.sets[0].name",
            "spec.evaluation.sets[].name must be at most 32 of a-z, 0-9 and '-', starting and ending with a letter "
            "or digit",
        ),
    ),
    Case(
        "eval-set-name-too-long",
        {"evaluation": {"sets": [{"name": "a" * 33, "source": "pvc://datasets/chat.jsonl"}]}},
        ("spec.evaluation.sets[0].name", "may not be more than 32"),
    ),
    Case(
        "eval-set-source-syntax",
        {"evaluation": {"sets": [{"name": "chat", "source": "/data/chat.jsonl"}]}},
        (
            "spec.evaluation.sets[0].source",
            "spec.evaluation.sets[].source must be hf://<org>/<name>[/<path>], pvc://<claim>/<path> or "
            "s3://<bucket>/<path>",
        ),
    ),
    Case(
        "eval-set-names-unique",
        {
            "evaluation": {
                "sets": [
                    {"name": "chat", "source": "pvc://datasets/a.jsonl"},
                    {"name": "chat", "source": "pvc://datasets/b.jsonl"},
                ]
            }
        },
        ('.spec.evaluation.sets: duplicate entries for key [name="chat"]',),
    ),
    Case(
        "eval-set-max-increase-positive",
        {"evaluation": {"sets": [{"name": "chat", "source": "pvc://datasets/a.jsonl", "maxIncrease": 0}]}},
        ("spec.evaluation.sets[0].maxIncrease", "should be greater than 0"),
    ),
    Case(
        "eval-set-format",
        {"evaluation": {"sets": [{"name": "chat", "source": "pvc://datasets/a.jsonl", "format": "csv"}]}},
        ("spec.evaluation.sets[0].format", "Unsupported value"),
    ),
    Case(
        "eval-sets-at-most-8",
        {"evaluation": {"sets": [{"name": f"s{i}", "source": "pvc://datasets/a.jsonl"} for i in range(9)]}},
        ("spec.evaluation.sets", "must have at most 8 items"),
    ),
    Case(
        "samples-source-syntax",
        {"evaluation": {"samples": {"source": "prompts.jsonl"}}},
        ("spec.evaluation.samples.source must be hf://<org>/<name>[/<path>], pvc://<claim>/<path> or s3://",),
    ),
    Case(
        "samples-max-new-tokens",
        {"evaluation": {"samples": {"source": "pvc://datasets/prompts.jsonl", "maxNewTokens": 0}}},
        ("spec.evaluation.samples.maxNewTokens", "should be greater than or equal to 1"),
    ),
    Case(
        "data-checks-fraction",
        {"evaluation": {"dataChecks": {"maxTruncatedFraction": 1.5}}},
        ("spec.evaluation.dataChecks.maxTruncatedFraction", "should be less than or equal to 1"),
    ),
    Case(
        "eval-gate-without-eval-data",
        {"evaluation": {"maxEvalLoss": 1.5}},
        ("spec.evaluation.maxEvalLoss", "needs evaluation data"),
    ),
    Case(
        "merge-adapter-for-full",
        {"method": {"type": "full"}, "output": {"mergeAdapter": True}},
        ("spec.output.mergeAdapter", "is only for lora, qlora, dora and ia3"),
    ),
    Case(
        "merge-adapter-for-prompt",
        {"method": {"type": "prompt"}, "output": {"mergeAdapter": True}},
        ("spec.output.mergeAdapter", "prefix/prompt tuning has no weights to merge"),
    ),
    Case(
        "checkpoint-claim-and-template",
        {"checkpoint": {"volumeClaimTemplate": TEMPLATE}},
        ("spec.checkpoint must set exactly one of claimName", "and volumeClaimTemplate"),
    ),
    Case(
        "checkpoint-no-volume",
        {"checkpoint": {"claimName": None}},
        ("spec.checkpoint must set exactly one of claimName",),
    ),
    Case(
        "multi-node-read-write-once",
        {"resources": {"numNodes": 2}, "checkpoint": {"claimName": None, "volumeClaimTemplate": TEMPLATE}},
        (
            "spec.checkpoint.volumeClaimTemplate.spec.accessModes",
            "must include ReadWriteMany when spec.resources.numNodes is more than 1",
        ),
    ),
    Case(
        "toleration-without-key",
        {"resources": {"tolerations": [{"operator": "Equal", "value": "x"}]}},
        ("spec.resources.tolerations[0].operator", "a toleration without a key must use operator Exists"),
    ),
    Case(
        "toleration-exists-with-value",
        {"resources": {"tolerations": [{"key": "gpu", "operator": "Exists", "value": "x"}]}},
        ("spec.resources.tolerations[0].value: Forbidden", "must be omitted when operator is Exists"),
    ),
    Case(
        "toleration-seconds-no-execute-only",
        {"resources": {"tolerations": [{"key": "gpu", "effect": "NoSchedule", "tolerationSeconds": 60}]}},
        ("spec.resources.tolerations[0].tolerationSeconds: Forbidden", "applies only to effect NoExecute"),
    ),
    Case(
        "backoff-cap-below-start",
        {"runPolicy": {"backoffSeconds": 120, "maxBackoffSeconds": 60}},
        ("spec.runPolicy.maxBackoffSeconds", "must be at least spec.runPolicy.backoffSeconds"),
    ),
]


def _apply(cluster: LocalCluster, namespace: str, case: Case) -> subprocess.CompletedProcess[str]:
    manifest = merge(VALID, {"metadata": {"name": case.name or case.id, "namespace": namespace}, "spec": case.spec})
    return cluster.kubectl("apply", "--server-side", "-f", "-", input=json.dumps(manifest), check=False)


@pytest.fixture(scope="module")
def results(crd_cluster: LocalCluster) -> dict[str, subprocess.CompletedProcess[str]]:
    namespace = f"api-rejections-{uuid.uuid4().hex[:8]}"
    crd_cluster.kubectl("create", "namespace", namespace)
    try:
        # The valid base must be accepted, or every rejection below would prove nothing.
        crd_cluster.kubectl(
            "apply", "--server-side", "-f", "-", input=json.dumps(merge(VALID, {"metadata": {"namespace": namespace}}))
        )
        with ThreadPoolExecutor(max_workers=16) as pool:
            done = pool.map(lambda case: (case.id, _apply(crd_cluster, namespace, case)), CASES)
            return dict(done)
    finally:
        crd_cluster.kubectl("delete", "namespace", namespace, "--wait=false", check=False)


def test_catalogue_is_large_and_unique() -> None:
    assert len(CASES) >= 40
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_wrong_manifest_is_rejected_with_a_clear_message(
    case: Case, results: dict[str, subprocess.CompletedProcess[str]]
) -> None:
    result = results[case.id]
    assert result.returncode != 0, f"accepted: {result.stdout}"
    message = " ".join(result.stderr.split())  # kubectl may wrap long messages
    for fragment in case.expect:
        assert fragment in message
