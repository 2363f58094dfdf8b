"""Raw API objects become the few facts the reconcile needs (what the watch caches keep)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from kubetune_operator.cost import PodUsage
from kubetune_operator.observed import (
    FinalMetrics,
    FinalReport,
    summarize_child,
    summarize_config_map,
    summarize_job,
    summarize_pod,
)

OWNER = [{"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob", "uid": "ftj-uid", "controller": True}]
LABELS = {"kubetune.io/job": "sft", "kubetune.io/run": "2", "kubetune.io/attempt": "3"}


def test_a_failed_job() -> None:
    job = summarize_job(
        {
            "metadata": {"name": "sft-r2-a3", "uid": "job-uid", "labels": LABELS, "ownerReferences": OWNER},
            "spec": {"suspend": False},
            "status": {
                "startTime": "2026-11-27T09:00:00Z",
                "conditions": [
                    {"type": "FailureTarget", "status": "True", "reason": "BackoffLimitExceeded", "message": "x"},
                    {"type": "Complete", "status": "False"},
                ],
            },
        }
    )
    assert (job.name, job.uid, job.owner_uid, job.run, job.attempt) == ("sft-r2-a3", "job-uid", "ftj-uid", 2, 3)
    assert (job.failed, job.complete, job.suspended, job.deleting) == (True, False, False, False)
    assert job.failure_message == "BackoffLimitExceeded: x"
    assert job.start_time == datetime(2026, 11, 27, 9, 0, 0, tzinfo=UTC)


def test_a_complete_job_held_by_kueue_before() -> None:
    job = summarize_job(
        {
            "metadata": {"name": "j", "uid": "u", "deletionTimestamp": "2026-11-27T09:10:00Z"},
            "spec": {"suspend": True},
            "status": {
                "conditions": [{"type": "Complete", "status": "True"}],
                "completionTime": "2026-11-27T09:09:00Z",
            },
        }
    )
    assert (job.complete, job.failed, job.suspended, job.deleting) == (True, False, True, True)
    assert job.completion_time == datetime(2026, 11, 27, 9, 9, 0, tzinfo=UTC)
    assert (job.run, job.owner_uid) == (None, None)


def test_a_preempted_pod() -> None:
    pod = summarize_pod(
        {
            "metadata": {
                "name": "sft-r2-a3-1-xyz",
                "labels": {**LABELS, "batch.kubernetes.io/job-completion-index": "1"},
                "ownerReferences": [{"kind": "Job", "uid": "job-uid", "controller": True}],
            },
            "spec": {
                "nodeName": "gpu-node-1",
                "containers": [{"name": "trainer", "resources": {"limits": {"nvidia.com/gpu": "8"}}}],
            },
            "status": {
                "phase": "Failed",
                "podIP": "10.244.0.7",
                "startTime": "2026-11-27T09:00:00Z",
                "conditions": [
                    {"type": "Ready", "status": "False"},
                    {
                        "type": "DisruptionTarget",
                        "status": "True",
                        "reason": "PreemptionByScheduler",
                        "message": "by p",
                    },
                ],
                "containerStatuses": [
                    {"name": "sidecar", "state": {"terminated": {"exitCode": 0}}},
                    {
                        "name": "trainer",
                        "state": {
                            "terminated": {
                                "exitCode": 143,
                                "reason": "Error",
                                "message": "stopped by SIGTERM; checkpoint saved at step 40\n",
                                "finishedAt": "2026-11-27T09:05:00Z",
                            }
                        },
                    },
                ],
            },
        }
    )
    assert (pod.job_uid, pod.run, pod.attempt, pod.index) == ("job-uid", 2, 3, 1)
    assert pod.pod_ip == "10.244.0.7"
    # it held 8 GPUs on its node from its start until its trainer container ended
    start, end = datetime(2026, 11, 27, 9, 0, 0, tzinfo=UTC), datetime(2026, 11, 27, 9, 5, 0, tzinfo=UTC)
    assert pod.usage == PodUsage(gpus=8, node_name="gpu-node-1", start=start, end=end)
    assert (pod.phase, pod.ready, pod.disruption, pod.message) == ("Failed", False, "PreemptionByScheduler", "by p")
    assert pod.termination is not None
    assert pod.termination.exit_code == 143
    assert pod.termination.message == "stopped by SIGTERM; checkpoint saved at step 40"
    assert pod.termination.finished_at == datetime(2026, 11, 27, 9, 5, 0, tzinfo=UTC)


def ended_rank0(exit_code: int, message: str) -> dict:
    return {
        "metadata": {"name": "sft-r2-a3-0-xyz", "labels": {**LABELS, "batch.kubernetes.io/job-completion-index": "0"}},
        "status": {
            "phase": "Succeeded" if exit_code == 0 else "Failed",
            "containerStatuses": [
                {"name": "trainer", "state": {"terminated": {"exitCode": exit_code, "message": message}}}
            ],
        },
    }


# What the trainer's launcher writes on success (kubetune_trainer.errors.final_message).
FINAL_MESSAGE = (
    '{"finalMetrics":{"steps":400,"trainLoss":1.12,"evalLoss":0.93,"evalPerplexity":2.53,"tokensTotal":1638400,'
    '"trainSeconds":812.5,"tokensPerSecond":2016.5,"epochs":2.0},"output":"/kubetune/output/runs/2"}\n'
)


def test_rank_0s_final_report_is_read_from_its_termination_message() -> None:
    pod = summarize_pod(ended_rank0(0, FINAL_MESSAGE))
    assert pod.termination is not None and pod.termination.final == FinalReport(
        final_metrics=FinalMetrics(
            steps=400,
            train_loss=1.12,
            eval_loss=0.93,
            eval_perplexity=2.53,
            tokens_total=1638400,
            tokens_per_second=2016.5,
            epochs=2.0,
        ),
        output="/kubetune/output/runs/2",
    )
    # null figures (a diverged loss) stay unknown
    pod = summarize_pod(ended_rank0(0, '{"finalMetrics":{"steps":3,"evalLoss":null}}'))
    assert pod.termination is not None and pod.termination.final == FinalReport(final_metrics=FinalMetrics(steps=3))


@pytest.mark.parametrize(
    ("exit_code", "message"),
    [
        (78, 'dataset /data/x.jsonl row 17: field "completion" is missing'),  # a failure keeps its reason
        (1, FINAL_MESSAGE),  # only a success carries final figures
        (0, ""),  # a trainer without a final report (older image, not rank 0)
        (0, "done"),
        (0, '{"finalMetrics":{"steps":"many"}}'),
        (0, '{"finalMetrics":{"steps":400'),  # cut short
    ],
)
def test_other_termination_messages_are_no_final_report(exit_code: int, message: str) -> None:
    pod = summarize_pod(ended_rank0(exit_code, message))
    assert pod.termination is not None and pod.termination.final is None
    assert pod.termination.message == (message.strip() or None)


def test_a_pod_that_cannot_start_says_why() -> None:
    unschedulable = summarize_pod(
        {
            "metadata": {"name": "p"},
            "status": {
                "phase": "Pending",
                "conditions": [
                    {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "0/3"}
                ],
            },
        }
    )
    assert unschedulable.waiting == "Unschedulable: 0/3"
    assert (unschedulable.index, unschedulable.termination, unschedulable.disruption) == (None, None, None)
    pulling = summarize_pod(
        {
            "metadata": {"name": "p"},
            "status": {
                "phase": "Pending",
                "conditions": [{"type": "PodScheduled", "status": "True"}],
                "containerStatuses": [{"name": "trainer", "state": {"waiting": {"reason": "ImagePullBackOff"}}}],
            },
        }
    )
    assert pulling.waiting == "ImagePullBackOff"


def test_config_maps_keep_the_runs_spec_and_other_children_their_names() -> None:
    cm = summarize_config_map(
        {"metadata": {"name": "sft-r2", "labels": LABELS, "ownerReferences": OWNER}, "data": {"spec.json": "{}"}}
    )
    assert (cm.name, cm.run, cm.owner_uid, cm.spec_json) == ("sft-r2", 2, "ftj-uid", "{}")
    meta = {"name": "sft-r2-a3", "labels": LABELS, "ownerReferences": OWNER}
    svc = summarize_child({"kind": "Service", "metadata": meta})
    assert (svc.kind, svc.name, svc.run, svc.attempt, svc.owner_uid) == ("Service", "sft-r2-a3", 2, 3, "ftj-uid")
    odd = summarize_child({"kind": "Service", "metadata": {"name": "x", "labels": {"kubetune.io/run": "two"}}})
    assert odd.run is None
