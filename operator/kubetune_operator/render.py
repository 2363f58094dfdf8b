"""Pure renderers: (FineTuneJob, run, attempt, settings) -> the Kubernetes objects that should exist. No I/O.

Per attempt: a ConfigMap with the trainer config (its identity names the attempt) and the spec the run trains,
so later attempts of the run render the same workers even after the FineTuneJob's spec moved on; a headless
Service and an Indexed batch/v1 Job whose pods run `kubetune-launch` (torchrun) with
rank 0 reachable at `<job>-0.<service>`. Per job: the checkpoint claim, when the spec asks for a
volumeClaimTemplate.
"""

from __future__ import annotations

import hashlib
import json
import shlex
from dataclasses import dataclass
from typing import Any

from kubetune_trainer.config import (
    CheckpointConfig,
    DataChecks,
    DatasetConfig,
    DatasetOptions,
    EvalSetConfig,
    EvaluationConfig,
    MetricsConfig,
    ModelConfig,
    OutputConfig,
    RunIdentity,
    S3Config,
    SamplesConfig,
    SamplesOptions,
    SourcesConfig,
    TrainerConfig,
)

from kubetune_operator.api import API_VERSION, KIND
from kubetune_operator.api.spec import DEFAULT_CHECKPOINT_MINUTES, FineTuneJobSpec, VolumeClaimTemplate
from kubetune_operator.cost import GPU_PRODUCT_LABEL, GPU_RESOURCE
from kubetune_operator.names import (
    KUEUE_QUEUE_LABEL,
    attempt_name,
    attempt_selector,
    claim_name,
    labels,
    master_address,
)
from kubetune_operator.settings import OperatorSettings
from kubetune_operator.storage import WorkerStorage, worker_storage

Manifest = dict[str, Any]

CONTAINER = "trainer"
CLAIM_DIRS_CONTAINER = "claim-dirs"  # the init container that makes the job's folders on its claims
CLAIMS_DIR = "/kubetune/claims"  # where it mounts the writable claims whole
CONFIG_DIR = "/etc/kubetune"
CONFIG_KEY = "config.json"
SPEC_KEY = "spec.json"
WORKER_UID = 1000
# The spec groups that define what is trained, for the trainer's identity: resources, storage, checkpoint,
# output and the governance fields change where and how a run trains, not what it learns.
TRAINED_GROUPS = {"model", "dataset", "method", "training"}


@dataclass(frozen=True)
class Owner:
    """The FineTuneJob whose children these are."""

    name: str
    namespace: str
    uid: str

    def reference(self) -> dict[str, Any]:
        # controller=true: the garbage collector deletes the child with the job; blockOwnerDeletion lets a
        # foreground deletion of the job wait for it.
        return {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }

    def metadata(self, name: str, child_labels: dict[str, str]) -> dict[str, Any]:
        return {
            "name": name,
            "namespace": self.namespace,
            "labels": child_labels,
            "ownerReferences": [self.reference()],
        }


# ----------------------------------------------------------------------------------------------
# the run: trainer config
# ----------------------------------------------------------------------------------------------


def spec_fingerprint(spec: FineTuneJobSpec) -> str:
    """A digest of what the spec trains (TRAINED_GROUPS, but for the model's access token): recorded with every
    checkpoint and output, so the trainer can tell a stranger's files. Defaults are left out, so a new optional API
    field does not change it."""
    trained = spec.model_dump(
        mode="json",
        by_alias=True,
        exclude_defaults=True,
        include=TRAINED_GROUPS,
        exclude={"model": {"token_secret_ref"}},
    )
    return hashlib.sha256(json.dumps(trained, sort_keys=True).encode()).hexdigest()[:32]


def checkpoint_frequency(spec: FineTuneJobSpec) -> tuple[int | None, int | None]:
    """(everySteps, everyMinutes) the trainer gets: the spec's, or DEFAULT_CHECKPOINT_MINUTES when it names none."""
    c = spec.checkpoint
    if c.every_steps is None and c.every_minutes is None:
        return None, DEFAULT_CHECKPOINT_MINUTES
    return c.every_steps, c.every_minutes


def trainer_config(
    owner: Owner, spec: FineTuneJobSpec, run: int, attempt: int, generation: int, settings: OperatorSettings
) -> TrainerConfig:
    storage = worker_storage(owner.namespace, owner.name, owner.uid, spec, run)
    dataset_options = spec.dataset.model_dump(include=set(DatasetOptions.model_fields))
    s3 = spec.storage.s3 if spec.storage else None
    every_steps, every_minutes = checkpoint_frequency(spec)
    return TrainerConfig(
        model=ModelConfig(
            source=storage.model_source,
            revision=spec.model.revision,
            trust_remote_code=spec.model.trust_remote_code,
        ),
        dataset=DatasetConfig(
            **dataset_options, path=storage.dataset_path, eval_path=storage.eval_path, revision=spec.dataset.revision
        ),
        method=spec.method,
        training=spec.training,
        checkpoint=CheckpointConfig(
            dir=storage.checkpoint_dir,
            every_steps=every_steps,
            every_minutes=every_minutes,
            keep_last=spec.checkpoint.keep_last,
        ),
        output=OutputConfig(dir=storage.output_dir, merge_adapter=spec.output.merge_adapter),
        sources=SourcesConfig(
            cache_dir=storage.sources_cache_dir,
            s3=S3Config(endpoint_url=s3.endpoint_url, region=s3.region) if s3 else S3Config(),
        ),
        metrics=MetricsConfig(port=settings.trainer_metrics_port),
        evaluation=_evaluation(spec, storage),
        identity=RunIdentity(
            namespace=owner.namespace,
            name=owner.name,
            uid=owner.uid,
            run=run,
            attempt=attempt,
            generation=generation,
            spec_fingerprint=spec_fingerprint(spec),
        ),
    )


def _evaluation(spec: FineTuneJobSpec, storage: WorkerStorage) -> EvaluationConfig:
    ev = spec.evaluation
    if ev is None:
        return EvaluationConfig()
    formats = {s.name: s.format for s in ev.sets}
    samples = None
    if ev.samples is not None and storage.samples_path is not None:
        options = ev.samples.model_dump(include=set(SamplesOptions.model_fields))
        samples = SamplesConfig(**options, path=storage.samples_path)
    return EvaluationConfig(
        sets=[EvalSetConfig(name=name, format=formats[name], path=path) for name, path in storage.eval_set_paths],
        samples=samples,
        data_report=ev.data_report,
        data_checks=ev.data_checks or DataChecks(),
    )


def render_attempt_config(
    owner: Owner, spec: FineTuneJobSpec, run: int, attempt: int, generation: int, settings: OperatorSettings
) -> Manifest:
    """The attempt's ConfigMap: the trainer config its workers mount, and the spec it trains (read back by
    `run_spec_from_json`: the run's later attempts train it too)."""
    config = trainer_config(owner, spec, run, attempt, generation, settings)
    name = attempt_name(owner.name, run, attempt)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": owner.metadata(name, labels(owner.name, "config", run, attempt)),
        "immutable": True,
        "data": {CONFIG_KEY: config.dump(), SPEC_KEY: spec.model_dump_json(by_alias=True, exclude_none=True)},
    }


def run_spec_from_json(raw: str | None) -> FineTuneJobSpec | None:
    """The spec a run was rendered from, as stored in an attempt's ConfigMap (None when absent or unreadable)."""
    if not raw:
        return None
    try:
        return FineTuneJobSpec.model_validate(json.loads(raw))
    except ValueError:
        return None


# ----------------------------------------------------------------------------------------------
# the attempt: headless Service and Indexed Job
# ----------------------------------------------------------------------------------------------


def render_service(owner: Owner, run: int, attempt: int, settings: OperatorSettings) -> Manifest:
    name = attempt_name(owner.name, run, attempt)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": owner.metadata(name, labels(owner.name, "rendezvous", run, attempt)),
        "spec": {
            "clusterIP": "None",
            # Workers must resolve rank 0 before it is Ready: readiness is the training itself.
            "publishNotReadyAddresses": True,
            "selector": attempt_selector(owner.name, run, attempt),
            "ports": [{"name": "rendezvous", "port": settings.master_port, "targetPort": settings.master_port}],
        },
    }


def render_job(owner: Owner, spec: FineTuneJobSpec, run: int, attempt: int, settings: OperatorSettings) -> Manifest:
    name = attempt_name(owner.name, run, attempt)
    res = spec.resources
    job_labels = labels(owner.name, "worker", run, attempt)
    if res.queue_name:
        job_labels[KUEUE_QUEUE_LABEL] = res.queue_name
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": owner.metadata(name, job_labels),
        "spec": {
            "completionMode": "Indexed",
            "completions": res.num_nodes,
            "parallelism": res.num_nodes,
            # Gang semantics: one failed worker fails the attempt; the operator decides about the next one.
            "backoffLimit": 0,
            # Under Kueue the Job waits suspended until Kueue admits all workers; the operator never unsuspends it.
            "suspend": bool(res.queue_name),
            "template": render_pod_template(owner, spec, run, attempt, settings),
        },
    }


def render_pod_template(
    owner: Owner, spec: FineTuneJobSpec, run: int, attempt: int, settings: OperatorSettings
) -> Manifest:
    res = spec.resources
    storage = worker_storage(owner.namespace, owner.name, owner.uid, spec, run)
    pod_labels = {**res.pod_labels, **labels(owner.name, "worker", run, attempt)}
    annotations = {**res.pod_annotations, "kubectl.kubernetes.io/default-container": CONTAINER}
    node_selector = dict(res.node_selector)
    if res.gpu_product:
        node_selector[GPU_PRODUCT_LABEL] = res.gpu_product
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "subdomain": attempt_name(owner.name, run, attempt),
        "automountServiceAccountToken": False,
        # Hundreds of per-attempt Services in a namespace would otherwise become thousands of env vars.
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": settings.termination_grace_period_seconds,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": WORKER_UID,
            "runAsGroup": WORKER_UID,
            "fsGroup": WORKER_UID,
            # Re-owning a multi-terabyte checkpoint volume on every attempt would take hours.
            "fsGroupChangePolicy": "OnRootMismatch",
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [worker := _container(owner, spec, run, attempt, storage, settings)],
        "volumes": _volumes(owner, run, attempt, storage, spec, settings),
    }
    claim_dirs = _claim_dirs_container(worker, storage)
    if claim_dirs:
        pod_spec["initContainers"] = [claim_dirs]
    if node_selector:
        pod_spec["nodeSelector"] = node_selector
    if res.tolerations:
        pod_spec["tolerations"] = [t.model_dump(by_alias=True, exclude_none=True) for t in res.tolerations]
    if res.affinity:
        affinity = res.affinity.model_dump(by_alias=True, exclude_none=True)
        if affinity:
            pod_spec["affinity"] = affinity
    if res.priority_class_name:
        pod_spec["priorityClassName"] = res.priority_class_name
    return {"metadata": {"labels": pod_labels, "annotations": annotations}, "spec": pod_spec}


def _container(
    owner: Owner, spec: FineTuneJobSpec, run: int, attempt: int, storage: WorkerStorage, settings: OperatorSettings
) -> Manifest:
    res = spec.resources
    env: list[dict[str, Any]] = [
        {"name": "KUBETUNE_CONFIG", "value": f"{CONFIG_DIR}/{CONFIG_KEY}"},
        {"name": "KUBETUNE_NNODES", "value": str(res.num_nodes)},
        {"name": "KUBETUNE_NPROC_PER_NODE", "value": str(max(1, res.gpus_per_node))},
        # Workers that asked for GPUs and cannot use them fail at once (exit 78) instead of training on the CPU.
        {"name": "KUBETUNE_GPUS_PER_NODE", "value": str(res.gpus_per_node)},
        {"name": "KUBETUNE_MASTER_ADDR", "value": master_address(owner.name, run, attempt)},
        {"name": "KUBETUNE_MASTER_PORT", "value": str(settings.master_port)},
        {"name": "KUBETUNE_RDZV_TIMEOUT_SECONDS", "value": str(settings.rdzv_timeout_seconds)},
        # The workers' time to checkpoint after SIGTERM: most of the grace period, the rest for torchrun to exit.
        {
            "name": "KUBETUNE_SHUTDOWN_TIMEOUT_SECONDS",
            "value": str(settings.termination_grace_period_seconds * 9 // 10),
        },
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        # The root filesystem is read-only; tools that write under $HOME get the /tmp emptyDir.
        {"name": "HOME", "value": "/tmp"},
    ]
    token = spec.model.token_secret_ref
    if token:
        env.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": token.name, "key": token.key}}})
    s3_secret = spec.storage.s3.credentials_secret_ref if spec.storage and spec.storage.s3 else None
    if s3_secret:
        # Each key under its own name, which the S3 client reads; a session token only comes with temporary keys.
        for key, optional in (
            ("AWS_ACCESS_KEY_ID", False),
            ("AWS_SECRET_ACCESS_KEY", False),
            ("AWS_SESSION_TOKEN", True),
        ):
            ref: dict[str, Any] = {"name": s3_secret.name, "key": key}
            if optional:
                ref["optional"] = True
            env.append({"name": key, "valueFrom": {"secretKeyRef": ref}})

    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    cpu = res.cpu if res.cpu is not None else settings.default_cpu
    memory = res.memory if res.memory is not None else settings.default_memory
    if cpu is not None:
        requests["cpu"] = str(cpu)
        # OpenMP (torch's CPU threads) otherwise starts one thread per core of the node in every training
        # process, whatever the pod's CPU share: processes sharing cores then run several times slower.
        cores = cpu_cores(cpu)
        if cores is not None:
            threads = max(1, int(cores // max(1, res.gpus_per_node)))
            env.append({"name": "OMP_NUM_THREADS", "value": str(threads)})
    if memory is not None:
        requests["memory"] = limits["memory"] = str(memory)
    if res.gpus_per_node:
        requests[GPU_RESOURCE] = limits[GPU_RESOURCE] = str(res.gpus_per_node)
    resources = {k: v for k, v in (("requests", requests), ("limits", limits)) if v}

    mounts: list[dict[str, Any]] = [
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    volume_of = {claim: _claim_volume(i) for i, (claim, _) in enumerate(storage.claims())}
    for m in storage.mounts:
        mount: dict[str, Any] = {"name": volume_of[m.claim], "mountPath": m.mount_path, "readOnly": m.read_only}
        if m.sub_path:
            mount["subPath"] = m.sub_path
        mounts.append(mount)

    return {
        "name": CONTAINER,
        "image": res.image or (settings.images.full if spec.method.type == "full" else settings.images.peft),
        "imagePullPolicy": settings.image_pull_policy,
        "command": ["kubetune-launch"],
        "env": env,
        "ports": [
            {"name": "metrics", "containerPort": settings.trainer_metrics_port},
            {"name": "rendezvous", "containerPort": settings.master_port},
        ],
        "resources": resources,
        "volumeMounts": mounts,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {
            "runAsNonRoot": True,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }


def _claim_dirs_container(worker: Manifest, storage: WorkerStorage) -> Manifest | None:
    """An init container that creates the job's folders on its writable claims as the workers' user, before they
    are mounted with subPath. Left to the kubelet, a missing subPath folder is made by root with mode 0755: on a
    volume that ignores fsGroup (hostPath, many NFS and other ReadWriteMany volumes) the workers (uid 1000) then
    cannot write their checkpoints or outputs. Such a volume needs its root writable by uid or gid 1000; the
    message says so when it is not."""
    volume_of = {claim: _claim_volume(i) for i, (claim, _) in enumerate(storage.claims())}
    writable = [m for m in storage.mounts if not m.read_only and m.sub_path]
    if not writable:
        return None
    script = [
        "fail() {",
        f'  echo "claim $1: the workers (uid {WORKER_UID}) cannot create $2 on it: $3. A volume that ignores fsGroup'
        f" (hostPath, many NFS and other ReadWriteMany volumes) needs its root writable by uid or gid {WORKER_UID}."
        '" >&2',
        "  exit 1",
        "}",
    ]
    for m in writable:
        path = shlex.quote(f"{CLAIMS_DIR}/{volume_of[m.claim]}/{m.sub_path}")
        script.append(f'err=$(mkdir -p -- {path} 2>&1) || fail {shlex.quote(m.claim)} {shlex.quote(m.sub_path)} "$err"')
    resources = {
        kind: {k: v for k, v in amounts.items() if k != GPU_RESOURCE}
        for kind, amounts in worker["resources"].items()
        if any(k != GPU_RESOURCE for k in amounts)
    }
    return {
        "name": CLAIM_DIRS_CONTAINER,
        "image": worker["image"],
        "imagePullPolicy": worker["imagePullPolicy"],
        "command": ["sh", "-c", "\n".join(script)],
        "resources": resources,
        "volumeMounts": [
            {"name": volume_of[claim], "mountPath": f"{CLAIMS_DIR}/{volume_of[claim]}"}
            for claim in dict.fromkeys(m.claim for m in writable)
        ],
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": worker["securityContext"],
    }


def cpu_cores(quantity: int | str) -> float | None:
    """A CPU quantity in cores (2, "2", "0.5", "1500m"); None for rarer forms such as "1k"."""
    text = str(quantity)
    try:
        return int(text[:-1]) / 1000 if text.endswith("m") else float(text)
    except ValueError:
        return None


def _volumes(
    owner: Owner, run: int, attempt: int, storage: WorkerStorage, spec: FineTuneJobSpec, settings: OperatorSettings
) -> list[Manifest]:
    shm: dict[str, Any] = {"medium": "Memory"}
    shm_size = spec.resources.shm_size if spec.resources.shm_size is not None else settings.default_shm_size
    if shm_size is not None:
        shm["sizeLimit"] = str(shm_size)
    volumes: list[Manifest] = [
        {
            "name": "config",
            "configMap": {"name": attempt_name(owner.name, run, attempt)},
        },
        {"name": "dshm", "emptyDir": shm},
        {"name": "tmp", "emptyDir": {}},
    ]
    for i, (claim, read_only) in enumerate(storage.claims()):
        volumes.append({"name": _claim_volume(i), "persistentVolumeClaim": {"claimName": claim, "readOnly": read_only}})
    return volumes


def _claim_volume(i: int) -> str:
    return f"claim-{i}"


# ----------------------------------------------------------------------------------------------
# the job: the checkpoint claim from a template
# ----------------------------------------------------------------------------------------------


def render_claim(owner: Owner, template: VolumeClaimTemplate, *, owned: bool) -> Manifest:
    """The claim of checkpoint.volumeClaimTemplate. `owned`: deleted with the job (only when it holds no output);
    otherwise it has no owner and outlives the job."""
    meta = template.metadata
    metadata = owner.metadata(
        claim_name(owner.name), {**(meta.labels if meta else {}), **labels(owner.name, "checkpoints")}
    )
    if not owned:
        del metadata["ownerReferences"]
    if meta and meta.annotations:
        metadata["annotations"] = dict(meta.annotations)
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": metadata,
        "spec": template.spec.model_dump(mode="json", by_alias=True, exclude_none=True),
    }
