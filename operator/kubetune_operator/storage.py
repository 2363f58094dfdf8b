"""Where a run's data lives on the claims and where the worker sees it (DESIGN section 5).

    <checkpoint claim>/<namespace>/<job>/                      mounted at /kubetune/job (subPath)
        <uid>/runs/<run>/checkpoints/step-...                checkpoints of run <run> of this FineTuneJob object
        <uid>/runs/<run>/                                    outputs, when the output claim is the checkpoint claim
        cache/sources/                                       s3:// and hf:// sources (the trainer's download cache)
    <output claim>/<output path>/<namespace>/<job>/<uid>/   mounted at /kubetune/output (when it differs)
        runs/<run>/                                          outputs
    pvc://<claim>/<path> sources                             mounted read-only at /kubetune/sources/<role>/<name>
                                                             (role: model, dataset, eval, sets/<set name>, samples)

<uid> is the FineTuneJob's metadata.uid: a job deleted and applied again under the same name (kubectl replace,
an Argo CD or Flux re-create) is a new object with a new uid, so it never resumes from, rotates or overwrites the
old object's checkpoints or outputs, which stay where they are. Output paths stay predictable: the status
(status.output.path, status.runs[].output) names each one, and the uid is `kubectl get ftj <job> -o
jsonpath='{.metadata.uid}'`. The download caches are keyed by source, not by object, and are shared.

Files written before paths carried the uid (<namespace>/<job>/runs/<run>/) are neither moved nor resumed from:
a run in flight across that upgrade starts its checkpoints afresh, and its status lists the old checkpoint as
ignored (status.checkpoint.ignored, condition CheckpointsIgnored).

Every mount uses a subPath, so a worker sees only its own job's directory and the source paths it was given.
hf:// and s3:// sources are passed to the trainer unchanged: it downloads them into cache/, which every node of
the job sees, so one download serves all workers and later attempts.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass

from kubetune_operator.api.spec import FineTuneJobSpec
from kubetune_operator.names import claim_name

JOB_DIR = "/kubetune/job"
OUTPUT_DIR = "/kubetune/output"
SOURCES_DIR = "/kubetune/sources"
PVC_SCHEME = "pvc://"


@dataclass(frozen=True)
class ClaimMount:
    claim: str
    sub_path: str
    mount_path: str
    read_only: bool


@dataclass(frozen=True)
class WorkerStorage:
    mounts: tuple[ClaimMount, ...]
    checkpoint_dir: str
    output_dir: str
    output_uri: str
    sources_cache_dir: str
    model_source: str
    dataset_path: str
    eval_path: str | None
    # (name, path) of each evaluation set, as the worker sees it
    eval_set_paths: tuple[tuple[str, str], ...] = ()
    samples_path: str | None = None

    def claims(self) -> list[tuple[str, bool]]:
        """Each claim once, in order of first use, with whether every mount of it is read-only."""
        order: dict[str, bool] = {}
        for m in self.mounts:
            order[m.claim] = order.get(m.claim, True) and m.read_only
        return list(order.items())


def checkpoint_claim(job: str, spec: FineTuneJobSpec) -> str:
    return spec.checkpoint.claim_name or claim_name(job)


def output_claim(job: str, spec: FineTuneJobSpec) -> str:
    return spec.output.claim_name or checkpoint_claim(job, spec)


def outputs_on_checkpoint_claim(job: str, spec: FineTuneJobSpec) -> bool:
    return output_claim(job, spec) == checkpoint_claim(job, spec)


def run_dir(uid: str, run: int) -> str:
    """A run's directory, relative to the job's directory on a claim."""
    return f"{uid}/runs/{run}"


def checkpoint_uri(namespace: str, job: str, spec: FineTuneJobSpec) -> str:
    """The job's directory on the checkpoint claim (mounted at JOB_DIR), as a URI."""
    return f"{PVC_SCHEME}{checkpoint_claim(job, spec)}/{_join(namespace, job)}"


def output_uri(namespace: str, job: str, uid: str, spec: FineTuneJobSpec, run: int) -> str:
    path = _join(spec.output.path, namespace, job, run_dir(uid, run))
    return f"{PVC_SCHEME}{output_claim(job, spec)}/{path}"


def worker_storage(namespace: str, job: str, uid: str, spec: FineTuneJobSpec, run: int) -> WorkerStorage:
    ckpt_claim = checkpoint_claim(job, spec)
    mounts = [ClaimMount(ckpt_claim, _join(namespace, job), JOB_DIR, read_only=False)]
    runs = run_dir(uid, run)

    out_claim = output_claim(job, spec)
    if out_claim == ckpt_claim and not spec.output.path:
        output_dir = f"{JOB_DIR}/{runs}"
    else:
        mounts.append(ClaimMount(out_claim, _join(spec.output.path, namespace, job), OUTPUT_DIR, read_only=False))
        output_dir = f"{OUTPUT_DIR}/{runs}"

    def source(role: str, uri: str) -> str:
        if not uri.startswith(PVC_SCHEME):
            return uri
        claim, _, path = uri[len(PVC_SCHEME) :].partition("/")
        path = path.strip("/")
        mount_path = f"{SOURCES_DIR}/{role}/{posixpath.basename(path) or claim}"
        mounts.append(ClaimMount(claim, path, mount_path, read_only=True))
        return mount_path

    model = source("model", spec.model.source)
    dataset = source("dataset", spec.dataset.source)
    eval_path = source("eval", spec.dataset.eval_source) if spec.dataset.eval_source else None
    sets = spec.evaluation.sets if spec.evaluation else []
    eval_set_paths = tuple((s.name, source(f"sets/{s.name}", s.source)) for s in sets)
    samples = spec.evaluation.samples if spec.evaluation else None
    samples_path = source("samples", samples.source) if samples else None
    return WorkerStorage(
        mounts=tuple(mounts),
        checkpoint_dir=f"{JOB_DIR}/{runs}/checkpoints",
        output_dir=output_dir,
        output_uri=output_uri(namespace, job, uid, spec, run),
        sources_cache_dir=f"{JOB_DIR}/cache/sources",
        model_source=model,
        dataset_path=dataset,
        eval_path=eval_path,
        eval_set_paths=eval_set_paths,
        samples_path=samples_path,
    )


def _join(*parts: str | None) -> str:
    return "/".join(p.strip("/") for p in parts if p)
