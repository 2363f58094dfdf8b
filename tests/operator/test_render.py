"""The pure renderers: names, the Indexed Job and its pods, the headless Service, the run's and the attempt's
ConfigMaps and the templated claim, for the shapes of spec a user can write."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from ftj_builders import SETTINGS, UID, ftj, owner, spec
from kubetune_operator.api import FineTuneJobSpec
from kubetune_operator.names import attempt_name, master_address, worker_hostname
from kubetune_operator.render import (
    DEFAULT_CHECKPOINT_MINUTES,
    render_attempt_config,
    render_claim,
    render_job,
    render_service,
    run_spec_from_json,
    spec_fingerprint,
)
from kubetune_operator.settings import Images, OperatorSettings
from kubetune_trainer.config import TrainerConfig

REPO = Path(__file__).resolve().parents[2]


def trainer_config_of(spec_: dict[str, Any], run: int = 1, attempt: int = 1) -> TrainerConfig:
    job = ftj(spec_)
    cm = render_attempt_config(owner(job), job.spec, run, attempt, 1, SETTINGS)
    return TrainerConfig.model_validate_json(cm["data"]["config.json"])


def job_of(spec_: dict[str, Any], run: int = 1, attempt: int = 1, settings: OperatorSettings = SETTINGS) -> dict:
    job = ftj(spec_)
    return render_job(owner(job), job.spec, run, attempt, settings)


def pod_spec(manifest: dict) -> dict:
    return manifest["spec"]["template"]["spec"]


def container(manifest: dict) -> dict:
    [only] = pod_spec(manifest)["containers"]
    return only


def env(manifest: dict) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(manifest)["env"]}


def mounts(manifest: dict) -> dict[str, tuple[str, str | None, bool]]:
    """mountPath -> (claim, subPath, readOnly) for the claim mounts."""
    claims = {
        v["name"]: v["persistentVolumeClaim"]["claimName"]
        for v in pod_spec(manifest)["volumes"]
        if "persistentVolumeClaim" in v
    }
    return {
        m["mountPath"]: (claims[m["name"]], m.get("subPath"), m["readOnly"])
        for m in container(manifest)["volumeMounts"]
        if m["name"] in claims
    }


def test_names_are_deterministic_and_every_worker_hostname_is_a_dns_label() -> None:
    assert attempt_name("sft", 3, 2) == "sft-r3-a2"
    assert master_address("sft", 3, 2) == "sft-r3-a2-0.sft-r3-a2"
    longest = "a" * 40  # the API's limit on FineTuneJob names
    assert len(worker_hostname(longest, 999_999, 9_999_999, 1023)) <= 63
    with pytest.raises(ValueError, match="longer than 63"):
        worker_hostname(longest, 10**9, 10**9, 1023)


def test_the_job_is_an_indexed_gang_owned_by_the_finetunejob() -> None:
    job = job_of(spec())
    assert job["apiVersion"] == "batch/v1"
    assert job["metadata"]["name"] == "sft-r1-a1"
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == 2
    assert job["spec"]["backoffLimit"] == 0
    assert job["spec"]["suspend"] is False
    [ref] = job["metadata"]["ownerReferences"]
    assert ref == {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "name": "sft",
        "uid": UID,
        "controller": True,
        "blockOwnerDeletion": True,
    }
    for labels in (job["metadata"]["labels"], job["spec"]["template"]["metadata"]["labels"]):
        assert labels["kubetune.io/job"] == "sft"
        assert labels["kubetune.io/run"] == "1"
        assert labels["kubetune.io/attempt"] == "1"
        assert labels["app.kubernetes.io/managed-by"] == "kubetune-operator"
        assert labels["app.kubernetes.io/instance"] == "sft"
    pod = pod_spec(job)
    assert pod["restartPolicy"] == "Never"
    assert pod["subdomain"] == "sft-r1-a1"


def test_workers_run_the_launcher_with_the_torchrun_contract() -> None:
    job = job_of(spec(), run=2, attempt=3)
    assert container(job)["command"] == ["kubetune-launch"]
    assert env(job) == {
        "KUBETUNE_CONFIG": "/etc/kubetune/config.json",
        "KUBETUNE_NNODES": "2",
        "KUBETUNE_NPROC_PER_NODE": "8",
        "KUBETUNE_GPUS_PER_NODE": "8",
        "KUBETUNE_MASTER_ADDR": "sft-r2-a3-0.sft-r2-a3",
        "KUBETUNE_MASTER_PORT": "29500",
        "KUBETUNE_RDZV_TIMEOUT_SECONDS": "900",
        "KUBETUNE_SHUTDOWN_TIMEOUT_SECONDS": "540",
        "POD_IP": {"fieldRef": {"fieldPath": "status.podIP"}},
        "HOME": "/tmp",
        "HF_TOKEN": {"secretKeyRef": {"name": "hf", "key": "token"}},
    }
    ports = {p["name"]: p["containerPort"] for p in container(job)["ports"]}
    assert ports == {"metrics": 9400, "rendezvous": 29500}


def test_without_a_token_reference_there_is_no_token() -> None:
    no_token = spec(model={"source": "hf://Qwen/Qwen2.5-0.5B-Instruct", "tokenSecretRef": None})
    assert "HF_TOKEN" not in env(job_of(no_token))


S3_SOURCES = spec(
    model={"source": "s3://acme-models/qwen2.5-7b", "tokenSecretRef": {"name": "hf", "key": "token"}},
    dataset={
        "source": "s3://acme-data/support/v3/",
        "evalSource": "hf://acme/support-eval/test.jsonl",
        "revision": "v2",
    },
    storage={
        "s3": {
            "endpointUrl": "http://minio.minio.svc:9000",
            "region": "eu-west-1",
            "credentialsSecretRef": {"name": "minio-keys"},
        }
    },
)


def test_s3_keys_reach_the_workers_only_as_secret_key_refs() -> None:
    job = ftj(S3_SOURCES)
    manifest = render_job(owner(job), job.spec, 1, 1, SETTINGS)
    refs = {
        e["name"]: e["valueFrom"]["secretKeyRef"]
        for e in container(manifest)["env"]
        if "valueFrom" in e and "secretKeyRef" in e["valueFrom"]
    }
    assert refs == {
        "HF_TOKEN": {"name": "hf", "key": "token"},
        "AWS_ACCESS_KEY_ID": {"name": "minio-keys", "key": "AWS_ACCESS_KEY_ID"},
        "AWS_SECRET_ACCESS_KEY": {"name": "minio-keys", "key": "AWS_SECRET_ACCESS_KEY"},
        "AWS_SESSION_TOKEN": {"name": "minio-keys", "key": "AWS_SESSION_TOKEN", "optional": True},
    }
    assert not [e for e in container(manifest)["env"] if e["name"].startswith("AWS_") and "value" in e]
    # Remote sources mount nothing: the trainer downloads them into the job's cache on the checkpoint claim.
    assert mounts(manifest) == {"/kubetune/job": ("ft-checkpoints", "ml/sft", False)}


def test_remote_sources_reach_the_trainer_config_as_given_with_where_to_fetch_them() -> None:
    job = ftj(S3_SOURCES)
    cm = render_attempt_config(owner(job), job.spec, 1, 1, 1, SETTINGS)
    config = TrainerConfig.model_validate_json(cm["data"]["config.json"])
    assert config.model.source == "s3://acme-models/qwen2.5-7b"
    assert (config.dataset.path, config.dataset.eval_path) == (
        "s3://acme-data/support/v3/",
        "hf://acme/support-eval/test.jsonl",
    )
    assert config.dataset.revision == "v2"
    assert config.sources.cache_dir == "/kubetune/job/cache/sources"
    assert (config.sources.s3.endpoint_url, config.sources.s3.region) == ("http://minio.minio.svc:9000", "eu-west-1")
    # The ConfigMap names the Secret (in the stored spec) and never holds a key.
    assert "AWS_" not in json.dumps(cm["data"])


def test_without_a_credentials_secret_the_workers_use_the_nodes_role() -> None:
    no_secret = spec(
        model={"source": "s3://acme-models/qwen2.5-7b", "tokenSecretRef": None}, storage={"s3": {"region": "eu-west-1"}}
    )
    assert not [name for name in env(job_of(no_secret)) if name.startswith("AWS_")]
    config = trainer_config_of(no_secret)
    assert (config.sources.s3.endpoint_url, config.sources.s3.region) == (None, "eu-west-1")


def test_gpus_memory_and_cpu_become_requests_and_limits() -> None:
    job = job_of(spec(resources={"cpu": 16, "memory": "200Gi"}))
    assert container(job)["resources"] == {
        "requests": {"cpu": "16", "memory": "200Gi", "nvidia.com/gpu": "8"},
        # No CPU limit: throttling a data loader slows every GPU.
        "limits": {"memory": "200Gi", "nvidia.com/gpu": "8"},
    }


def test_a_cpu_only_job_requests_no_gpu_and_starts_one_process() -> None:
    job = job_of(spec(resources={"numNodes": 1, "gpusPerNode": 0, "gpuProduct": None}))
    assert "nvidia.com/gpu" not in json.dumps(container(job)["resources"])
    assert env(job)["KUBETUNE_NPROC_PER_NODE"] == "1"
    assert env(job)["KUBETUNE_GPUS_PER_NODE"] == "0"
    assert "nodeSelector" not in pod_spec(job)


def test_operator_defaults_fill_what_the_job_leaves_out() -> None:
    settings = OperatorSettings(default_cpu="8", default_memory="64Gi", default_shm_size="8Gi")
    job = job_of(spec(), settings=settings)
    assert container(job)["resources"]["requests"]["cpu"] == "8"
    assert container(job)["resources"]["limits"]["memory"] == "64Gi"
    shm = next(v for v in pod_spec(job)["volumes"] if v["name"] == "dshm")
    assert shm == {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}}
    own = job_of(spec(resources={"shmSize": "16Gi", "memory": "100Gi"}), settings=settings)
    assert next(v for v in pod_spec(own)["volumes"] if v["name"] == "dshm")["emptyDir"]["sizeLimit"] == "16Gi"


def test_scheduling_constraints_pass_through() -> None:
    zone = {"key": "zone", "operator": "In", "values": ["a"]}
    affinity = {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchExpressions": [zone]}]}}
    job = job_of(
        spec(
            resources={
                "nodeSelector": {"pool": "training"},
                "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
                "affinity": {"nodeAffinity": affinity},
                "priorityClassName": "training-high",
            }
        )
    )
    pod = pod_spec(job)
    assert pod["nodeSelector"] == {"pool": "training", "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["affinity"] == {"nodeAffinity": affinity}
    assert pod["priorityClassName"] == "training-high"


def test_pods_are_hardened() -> None:
    pod = pod_spec(job_of(spec()))
    assert pod["automountServiceAccountToken"] is False
    assert pod["enableServiceLinks"] is False
    assert pod["terminationGracePeriodSeconds"] == SETTINGS.termination_grace_period_seconds
    assert pod["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 1000,
        "runAsGroup": 1000,
        "fsGroup": 1000,
        "fsGroupChangePolicy": "OnRootMismatch",
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    c = pod["containers"][0]
    assert c["securityContext"] == {
        "runAsNonRoot": True,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert c["terminationMessagePolicy"] == "FallbackToLogsOnError"
    # A read-only root needs somewhere to write: /tmp and a memory-backed /dev/shm.
    paths = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert paths["/tmp"] == "tmp" and paths["/dev/shm"] == "dshm"
    assert {"name": "tmp", "emptyDir": {}} in pod["volumes"]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        pytest.param(
            {},
            {
                "/kubetune/job": ("ft-checkpoints", "ml/sft", False),
                "/kubetune/sources/dataset/v3.jsonl": ("datasets", "support/v3.jsonl", True),
            },
            id="checkpoint-claim-holds-outputs",
        ),
        pytest.param(
            {"output": {"claimName": "ft-models", "path": "team/bots"}},
            {
                "/kubetune/job": ("ft-checkpoints", "ml/sft", False),
                "/kubetune/output": ("ft-models", "team/bots/ml/sft", False),
                "/kubetune/sources/dataset/v3.jsonl": ("datasets", "support/v3.jsonl", True),
            },
            id="separate-output-claim",
        ),
        pytest.param(
            {
                "model": {"source": "pvc://models/qwen/7b/", "tokenSecretRef": None},
                "dataset": {"source": "pvc://datasets/support/", "evalSource": "pvc://datasets/eval.jsonl"},
                "checkpoint": {
                    "claimName": None,
                    "volumeClaimTemplate": {
                        "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "1Ti"}}}
                    },
                },
            },
            {
                "/kubetune/job": ("sft-checkpoints", "ml/sft", False),
                "/kubetune/sources/model/7b": ("models", "qwen/7b", True),
                "/kubetune/sources/dataset/support": ("datasets", "support", True),
                "/kubetune/sources/eval/eval.jsonl": ("datasets", "eval.jsonl", True),
            },
            id="template-claim-and-directory-sources",
        ),
    ],
)
def test_claims_are_mounted_under_the_jobs_own_paths(overrides: dict, expected: dict) -> None:
    assert mounts(job_of(spec(**overrides))) == expected


def test_one_volume_per_claim_writable_only_where_written() -> None:
    job = job_of(spec(dataset={"source": "pvc://ft-checkpoints/shared/data.jsonl"}, output={"path": "exports"}))
    claims = [v["persistentVolumeClaim"] for v in pod_spec(job)["volumes"] if "persistentVolumeClaim" in v]
    assert claims == [{"claimName": "ft-checkpoints", "readOnly": False}]
    assert mounts(job) == {
        "/kubetune/job": ("ft-checkpoints", "ml/sft", False),
        "/kubetune/output": ("ft-checkpoints", "exports/ml/sft", False),
        "/kubetune/sources/dataset/data.jsonl": ("ft-checkpoints", "shared/data.jsonl", True),
    }
    readonly = job_of(spec())
    claims = [v["persistentVolumeClaim"] for v in pod_spec(readonly)["volumes"] if "persistentVolumeClaim" in v]
    assert {"claimName": "datasets", "readOnly": True} in claims


def test_kueue_gets_a_suspended_job_with_the_queue_label() -> None:
    job = job_of(spec(resources={"queueName": "team-ml"}))
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-ml"
    assert job["spec"]["suspend"] is True


def test_user_pod_labels_and_annotations_are_kept_but_the_operators_win() -> None:
    job = job_of(
        spec(
            resources={
                "podLabels": {"team": "ml", "app.kubernetes.io/managed-by": "someone"},
                "podAnnotations": {"kwok.kubetune.io/run-for": "5s"},
            }
        )
    )
    meta = job["spec"]["template"]["metadata"]
    assert meta["labels"]["team"] == "ml"
    assert meta["labels"]["app.kubernetes.io/managed-by"] == "kubetune-operator"
    assert meta["annotations"]["kwok.kubetune.io/run-for"] == "5s"
    # kubectl logs/exec on a worker pick the trainer container without -c
    [container] = job["spec"]["template"]["spec"]["containers"]
    assert meta["annotations"]["kubectl.kubernetes.io/default-container"] == container["name"] == "trainer"


@pytest.mark.parametrize(
    ("method", "image", "expected"),
    [("lora", None, "peft:1"), ("full", None, "full:1"), ("lora", "mine:2", "mine:2")],
)
def test_the_image_follows_the_method_unless_the_job_names_one(method: str, image: str | None, expected: str) -> None:
    settings = OperatorSettings(images=Images(peft="peft:1", full="full:1"), image_pull_policy="Always")
    job = job_of(spec(method={"type": method}, resources={"image": image}), settings=settings)
    assert container(job)["image"] == expected
    assert container(job)["imagePullPolicy"] == "Always"


def test_the_attempts_config_map_holds_the_trainer_config_with_its_identity() -> None:
    job = ftj(spec(output={"claimName": "ft-models", "mergeAdapter": False}, training={"maxSteps": 50}))
    cm = render_attempt_config(owner(job), job.spec, 3, 2, 7, SETTINGS)
    assert cm["metadata"]["name"] == "sft-r3-a2"
    assert (cm["metadata"]["labels"]["kubetune.io/run"], cm["metadata"]["labels"]["kubetune.io/attempt"]) == ("3", "2")
    assert cm["immutable"] is True
    assert set(cm["data"]) == {"config.json", "spec.json"}
    config = TrainerConfig.model_validate_json(cm["data"]["config.json"])
    assert config.model.source == "hf://Qwen/Qwen2.5-0.5B-Instruct"
    assert config.sources.cache_dir == "/kubetune/job/cache/sources"
    assert config.dataset.path == "/kubetune/sources/dataset/v3.jsonl"
    assert config.dataset.format == "messages"
    # The run's directories carry the FineTuneJob's uid: a re-created job of the same name never meets them.
    assert config.checkpoint.dir == f"/kubetune/job/{UID}/runs/3/checkpoints"
    assert config.checkpoint.every_steps == 100
    assert config.output.dir == f"/kubetune/output/{UID}/runs/3"
    assert config.training.max_steps == 50
    assert config.metrics.port == 9400
    identity = config.identity
    assert (identity.namespace, identity.name, identity.uid, identity.run, identity.attempt) == ("ml", "sft", UID, 3, 2)
    assert (identity.generation, identity.spec_fingerprint) == (7, spec_fingerprint(job.spec))
    # The pods mount their attempt's config.
    pod_volumes = pod_spec(render_job(owner(job), job.spec, 3, 2, SETTINGS))["volumes"]
    assert next(v for v in pod_volumes if v["name"] == "config")["configMap"] == {"name": "sft-r3-a2"}


def test_an_attempts_config_map_holds_the_spec_its_run_trains() -> None:
    job = ftj(spec(training={"maxSteps": 50}))
    cm = render_attempt_config(owner(job), job.spec, 3, 2, 1, SETTINGS)
    assert cm["metadata"]["name"] == "sft-r3-a2"
    assert (cm["metadata"]["labels"]["kubetune.io/run"], cm["metadata"]["labels"]["kubetune.io/attempt"]) == ("3", "2")
    assert cm["immutable"] is True
    assert run_spec_from_json(cm["data"]["spec.json"]) == job.spec


def test_the_spec_fingerprint_follows_what_is_trained_only() -> None:
    base = ftj(spec()).spec
    same = [
        spec(resources={"numNodes": 4}),
        spec(runPolicy={"maxRestarts": 9}),
        spec(checkpoint={"everySteps": 7}),
        spec(output={"claimName": "elsewhere"}),
        spec(model={"tokenSecretRef": {"name": "other-token", "key": "token"}}),
        spec(training={"learningRate": 2.0e-4}),  # the default, written out
    ]
    for edited in same:
        assert spec_fingerprint(ftj(edited).spec) == spec_fingerprint(base), edited
    different = [
        spec(dataset={"source": "pvc://datasets/support/v4.jsonl"}),
        spec(model={"source": "hf://Qwen/Qwen2.5-1.5B-Instruct"}),
        spec(method={"type": "dora"}),
        spec(training={"learningRate": 1e-4}),
    ]
    for edited in different:
        assert spec_fingerprint(ftj(edited).spec) != spec_fingerprint(base), edited


@pytest.mark.parametrize(
    ("checkpoint", "every"),
    [
        ({"everySteps": None}, (None, DEFAULT_CHECKPOINT_MINUTES)),  # neither given: time-based by default
        ({"everySteps": 100}, (100, None)),
        ({"everySteps": None, "everyMinutes": 10}, (None, 10)),
        ({"everySteps": 50, "everyMinutes": 10}, (50, 10)),
    ],
)
def test_a_checkpoint_without_a_frequency_saves_every_30_minutes(checkpoint: dict, every: tuple) -> None:
    config = trainer_config_of(spec(checkpoint={"claimName": "ft-checkpoints", **checkpoint}))
    assert (config.checkpoint.every_steps, config.checkpoint.every_minutes) == every


def test_an_unreadable_stored_spec_reads_as_none() -> None:
    assert run_spec_from_json(None) is None
    assert run_spec_from_json("{not json") is None
    assert run_spec_from_json('{"model": {}}') is None
    assert isinstance(run_spec_from_json(FineTuneJobSpec.model_validate(spec()).model_dump_json()), FineTuneJobSpec)


def test_the_service_is_headless_and_selects_one_attempt() -> None:
    job = ftj(spec())
    svc = render_service(owner(job), 2, 5, SETTINGS)
    assert svc["metadata"]["name"] == "sft-r2-a5"
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["publishNotReadyAddresses"] is True
    assert svc["spec"]["selector"] == {"kubetune.io/job": "sft", "kubetune.io/run": "2", "kubetune.io/attempt": "5"}
    assert svc["metadata"]["ownerReferences"][0]["uid"] == UID


def test_the_claim_template_becomes_a_claim_owned_only_when_it_holds_no_output() -> None:
    template = {
        "metadata": {"labels": {"tier": "fast"}, "annotations": {"note": "x"}},
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "storageClassName": "ssd",
            "resources": {"requests": {"storage": "200Gi"}},
        },
    }
    job = ftj(spec(checkpoint={"claimName": None, "volumeClaimTemplate": template}))
    assert job.spec.checkpoint.volume_claim_template is not None
    claim = render_claim(owner(job), job.spec.checkpoint.volume_claim_template, owned=True)
    assert claim["metadata"]["name"] == "sft-checkpoints"
    assert claim["metadata"]["labels"]["tier"] == "fast"
    assert claim["metadata"]["labels"]["kubetune.io/job"] == "sft"
    assert claim["metadata"]["annotations"] == {"note": "x"}
    assert claim["metadata"]["ownerReferences"][0]["controller"] is True
    assert claim["spec"] == template["spec"]
    kept = render_claim(owner(job), job.spec.checkpoint.volume_claim_template, owned=False)
    assert "ownerReferences" not in kept["metadata"]
    assert kept["metadata"]["labels"]["kubetune.io/job"] == "sft"


EXAMPLES = sorted(REPO.glob("examples/*.yaml")) + sorted(REPO.glob("examples/gitops/finetunejob.yaml"))


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_every_example_renders(example: Path) -> None:
    doc = yaml.safe_load(example.read_text())
    job = ftj(doc["spec"], name=doc["metadata"]["name"])
    cm = render_attempt_config(owner(job), job.spec, 1, 1, 1, SETTINGS)
    TrainerConfig.model_validate_json(cm["data"]["config.json"])
    manifest = render_job(owner(job), job.spec, 1, 1, SETTINGS)
    assert manifest["spec"]["completions"] == job.spec.resources.num_nodes
    assert len(worker_hostname(job.metadata["name"], 1, 1, job.spec.resources.num_nodes - 1)) <= 63


def test_evaluation_sets_reach_the_trainer_from_any_dataset_source() -> None:
    sets = [
        {"name": "general-chat", "source": "pvc://datasets/general/chat.jsonl", "format": "messages"},
        {"name": "code", "source": "s3://eval-data/code/", "maxIncrease": 0.1},
        {"name": "math", "source": "hf://acme/math-eval/test.jsonl"},
    ]
    given = spec(evaluation={"sets": sets})
    assert mounts(job_of(given))["/kubetune/sources/sets/general-chat/chat.jsonl"] == (
        "datasets",
        "general/chat.jsonl",
        True,
    )
    cfg = trainer_config_of(given)
    assert [s.model_dump(exclude_none=True) for s in cfg.evaluation.sets] == [
        {"name": "general-chat", "format": "messages", "path": "/kubetune/sources/sets/general-chat/chat.jsonl"},
        {"name": "code", "path": "s3://eval-data/code/"},  # the trainer downloads it into the job's cache
        {"name": "math", "path": "hf://acme/math-eval/test.jsonl"},
    ]
