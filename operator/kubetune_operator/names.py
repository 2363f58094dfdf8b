"""Deterministic names and labels of everything the operator creates for a FineTuneJob.

Names are pure functions of (job, run, attempt), so any replica, before or after a restart, computes the same
name for the same child: creating it twice is a 409, never a duplicate. Every child carries the
`kubetune.io/job` label (and run/attempt where they apply); the operator watches children by that label.

    <job>-r<run>              ConfigMap: the spec one run trains
    <job>-r<run>-a<attempt>   ConfigMap (trainer config), Job and headless Service of one attempt; pods get
                              hostname <that>-<index>
    <job>-checkpoints         PersistentVolumeClaim from checkpoint.volumeClaimTemplate (owned by the job when the
                              outputs go elsewhere; without an owner, kept, when it holds them)
"""

from __future__ import annotations

from kubetune_operator.api import GROUP

LABEL_JOB = f"{GROUP}/job"
LABEL_RUN = f"{GROUP}/run"
LABEL_ATTEMPT = f"{GROUP}/attempt"
MANAGED_BY = "kubetune-operator"
# What kopf watches (server-side) for Jobs, Pods, Services, ConfigMaps and claims: only the operator's own.
CHILD_SELECTOR = f"{LABEL_JOB},app.kubernetes.io/managed-by={MANAGED_BY}"

# The Job controller labels every pod of an Indexed Job with its completion index.
COMPLETION_INDEX_LABEL = "batch.kubernetes.io/job-completion-index"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"

DNS_LABEL_MAX = 63


def attempt_name(job: str, run: int, attempt: int) -> str:
    """Name of the attempt's Job and of its headless Service (the pods' subdomain)."""
    return f"{job}-r{run}-a{attempt}"


def claim_name(job: str) -> str:
    return f"{job}-checkpoints"


def worker_hostname(job: str, run: int, attempt: int, index: int) -> str:
    """The hostname the Job controller gives worker `index` (`<job name>-<index>`): a DNS label, <= 63 chars.

    The API caps FineTuneJob names at 40 characters, which leaves 14 digits for run and attempt together.
    """
    hostname = f"{attempt_name(job, run, attempt)}-{index}"
    if len(hostname) > DNS_LABEL_MAX:
        raise ValueError(f"worker hostname {hostname} is longer than {DNS_LABEL_MAX} characters")
    return hostname


def master_address(job: str, run: int, attempt: int) -> str:
    """Rank 0's stable DNS name: its hostname under the attempt's headless Service."""
    return f"{worker_hostname(job, run, attempt, 0)}.{attempt_name(job, run, attempt)}"


def labels(job: str, component: str, run: int | None = None, attempt: int | None = None) -> dict[str, str]:
    """The operator's labels of a child; they win over user-given pod labels."""
    out = {
        "app.kubernetes.io/name": "kubetune",
        "app.kubernetes.io/instance": job,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/part-of": "kubetune",
        "app.kubernetes.io/managed-by": MANAGED_BY,
        LABEL_JOB: job,
    }
    if run is not None:
        out[LABEL_RUN] = str(run)
    if attempt is not None:
        out[LABEL_ATTEMPT] = str(attempt)
    return out


def attempt_selector(job: str, run: int, attempt: int) -> dict[str, str]:
    """The pods of one attempt (the headless Service's selector)."""
    return {LABEL_JOB: job, LABEL_RUN: str(run), LABEL_ATTEMPT: str(attempt)}
