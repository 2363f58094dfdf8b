"""The pure reconcile: what the operator decides for each situation a FineTuneJob can be in.

Each test walks a job through reconciles with `step`, feeding what the cluster would show (Jobs, pods), and
checks the status written, the children created and deleted, the events and when to look again.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from ftj_builders import (
    SETTINGS,
    T0,
    UID,
    condition,
    config_map_of,
    edited,
    exited,
    ftj,
    job_state,
    kinds,
    later,
    pod,
    reasons,
    spec,
    step,
)
from kubetune_operator.api import FineTuneJob
from kubetune_operator.api.status import CheckpointStatus, FineTuneJobStatus
from kubetune_operator.observed import ChildRef, Observed, Rejection, RunConfig
from kubetune_operator.reconcile import (
    Deletion,
    backoff_seconds,
    reconcile,
    run_fingerprint,
)

RUNNING = Observed(jobs=(job_state("sft-r1-a1"),), pods=(pod(0), pod(1)))


def started(spec_: dict | None = None, **kwargs: object) -> FineTuneJob:
    """A job whose first attempt has been started (status written, children requested)."""
    _, job = step(ftj(spec_, **kwargs))  # type: ignore[arg-type]
    return job


def failed_attempt(job: FineTuneJob, attempt: int = 1, at: float = 60, **pod_fields: object) -> Observed:
    failed = pod(1, attempt=attempt, phase="Failed", **pod_fields)  # type: ignore[arg-type]
    return Observed(
        jobs=(job_state(f"sft-r1-a{attempt}", attempt=attempt, failed=True),),
        pods=(pod(0, attempt=attempt), failed),
    )


# ----------------------------------------------------------------------------------------------
# the happy path
# ----------------------------------------------------------------------------------------------


def test_a_new_job_starts_run_1_attempt_1_and_creates_its_children_in_order() -> None:
    plan, job = step(ftj())
    assert job.status is not None
    assert (job.status.run, job.status.attempt, job.status.phase) == (1, 1, "Pending")
    assert job.status.observed_generation == 1
    assert job.status.start_time == T0
    [run] = job.status.runs
    assert (run.run, run.generation, run.spec_hash, run.start_time) == (1, 1, run_fingerprint(job.spec), T0)
    assert kinds(plan) == [
        ("ConfigMap", "sft-r1-a1"),
        ("Service", "sft-r1-a1"),
        ("Job", "sft-r1-a1"),
    ]
    assert plan.delete == ()
    assert reasons(plan) == ["RunStarted"]  # which says the first attempt started too
    assert condition(job, "Reconciling")[0] == "True"
    assert condition(job, "Ready")[0] == "False"
    assert all(c.observed_generation == 1 for c in job.status.conditions)
    assert plan.requeue_after == SETTINGS.progress_poll_interval_seconds


def test_a_claim_template_is_created_before_anything_that_mounts_it() -> None:
    template = {"spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "10Gi"}}}}
    plan, _ = step(ftj(spec(checkpoint={"claimName": None, "volumeClaimTemplate": template})))
    assert kinds(plan)[0] == ("PersistentVolumeClaim", "sft-checkpoints")


def test_nothing_is_created_twice_or_while_the_caches_catch_up() -> None:
    job = started()
    everything = Observed(
        jobs=(job_state("sft-r1-a1"),),
        services=(ChildRef("Service", "sft-r1-a1", UID, 1, 1),),
        config_maps=(config_map_of(job), RunConfig("sft-r1-a1", UID, 1, None)),
    )
    plan, _ = step(job, everything)
    assert plan.create == () and plan.delete == ()
    just_created = frozenset(
        {("ConfigMap", "sft-r1"), ("ConfigMap", "sft-r1-a1"), ("Service", "sft-r1-a1"), ("Job", "sft-r1-a1")}
    )
    plan, _ = step(job, Observed(just_created=just_created))
    assert plan.create == ()
    # A child just deleted but still in the caches is not deleted again; one just created can be deleted.
    leftover = Observed(jobs=(job_state("sft-r0-a1", run=0), job_state("sft-r0-a2", run=0, attempt=2)))
    plan, _ = step(job, replace(leftover, just_deleted=frozenset({("Job", "sft-r0-a1")})))
    assert plan.delete == (Deletion("Job", "sft-r0-a2"),)
    plan, _ = step(job, replace(leftover, just_created=frozenset({("Job", "sft-r0-a1")})))
    assert set(plan.delete) == {Deletion("Job", "sft-r0-a1"), Deletion("Job", "sft-r0-a2")}


def test_all_workers_ready_is_running_with_an_event_once() -> None:
    job = started()
    plan, job = step(job, RUNNING, later(5))
    assert job.status is not None
    assert job.status.phase == "Running"
    assert condition(job, "Running") == ("True", "Training", "all 2 workers running")
    assert job.status.workers is not None and (job.status.workers.active, job.status.workers.ready) == (2, 2)
    assert reasons(plan) == []  # the condition's transition says it
    plan, _ = step(job, RUNNING, later(30))
    assert reasons(plan) == []


def test_waiting_workers_say_why() -> None:
    job = started()
    waiting = pod(1, phase="Pending", waiting="Unschedulable: 0/3 nodes are available: 3 Insufficient nvidia.com/gpu")
    _, job = step(job, Observed(jobs=(job_state("sft-r1-a1"),), pods=(pod(0), waiting)))
    status, reason, message = condition(job, "Reconciling")
    assert (status, reason) == ("True", "WorkersStarting")
    why = "Unschedulable: 0/3 nodes are available: 3 Insufficient nvidia.com/gpu"
    assert message == f"2 workers starting; worker 1 waits: {why}"


def test_workers_finishing_before_the_job_is_complete_are_still_running() -> None:
    job = started()
    _, job = step(job, RUNNING, later(5))
    finishing = Observed(jobs=(job_state("sft-r1-a1"),), pods=(pod(0, phase="Succeeded"), pod(1)))
    plan, job = step(job, finishing, later(50))
    assert job.status is not None and job.status.phase == "Running"
    assert condition(job, "Running") == ("True", "Finishing", "1 of 2 workers finished")
    assert reasons(plan) == []


def test_a_complete_job_succeeds_the_run_with_its_own_times() -> None:
    job = started()
    _, job = step(job, RUNNING, later(5))
    done = Observed(
        jobs=(job_state("sft-r1-a1", complete=True, completion_time=later(100)),),
        pods=(pod(0, phase="Succeeded"), pod(1, phase="Succeeded")),
        services=(ChildRef("Service", "sft-r1-a1", UID, 1, 1),),
        config_maps=(config_map_of(job),),
    )
    plan, job = step(job, done, later(102))
    assert job.status is not None
    assert job.status.phase == "Succeeded"
    assert (job.status.start_time, job.status.completion_time) == (T0, later(100))
    assert condition(job, "Ready")[:2] == ("True", "Succeeded")
    assert condition(job, "Reconciling")[0] == "False"
    assert condition(job, "Stalled")[0] == "False"
    [attempt] = job.status.attempts
    assert (attempt.reason, attempt.exit_code, attempt.completion_time) == ("Completed", 0, later(100))
    [run] = job.status.runs
    assert (run.result, run.completion_time, run.attempts) == ("Succeeded", later(100), 1)
    assert job.status.output is not None
    assert job.status.output.path == run.output == f"pvc://ft-checkpoints/ml/sft/{UID}/runs/1"
    assert job.status.output.promoted is True
    assert job.status.workers is not None and job.status.workers.succeeded == 2
    # The finished Job keeps its pods' logs; the rendezvous Service has no use any more.
    assert plan.delete == (Deletion("Service", "sft-r1-a1"),)
    assert reasons(plan) == ["Succeeded"]
    assert plan.requeue_after == SETTINGS.resync_seconds


# ----------------------------------------------------------------------------------------------
# failures, backoff, restarts
# ----------------------------------------------------------------------------------------------


def test_a_failed_worker_ends_the_attempt_and_the_next_resumes_after_a_backoff() -> None:
    job = started()
    oom = failed_attempt(job, termination=exited(137, "OOMKilled", at=later(60)))
    plan, job = step(job, oom, later(61))
    assert job.status is not None
    [first] = job.status.attempts
    assert (first.reason, first.exit_code, first.completion_time) == ("OOMKilled", 137, later(61))
    assert first.message == "worker 1 (pod sft-r1-a1-1-abcde) was OOMKilled (exit code 137)"
    assert Deletion("Job", "sft-r1-a1") in plan.delete
    assert plan.create == ()
    assert job.status.phase == "Pending"
    assert condition(job, "Reconciling")[1] == "BackingOff"
    assert plan.requeue_after == 10
    assert [(e.type, e.reason) for e in plan.events] == [("Warning", "OOMKilled")]
    assert "restart 1 of 2 in 10s" in plan.events[0].message

    plan, job = step(job, Observed(), later(65))
    assert job.status is not None and job.status.attempt == 1
    assert plan.create == () and plan.requeue_after == pytest.approx(6)

    plan, job = step(job, Observed(), later(71))
    assert job.status is not None
    assert (job.status.run, job.status.attempt) == (1, 2)
    assert kinds(plan) == [
        ("ConfigMap", "sft-r1-a2"),
        ("Service", "sft-r1-a2"),
        ("Job", "sft-r1-a2"),
    ]
    assert reasons(plan) == ["AttemptStarted"]
    assert [a.attempt for a in job.status.attempts] == [1, 2]
    assert job.status.runs[-1].start_time == T0


@pytest.mark.parametrize(
    ("policy", "failures", "expected"),
    [
        ({"backoffSeconds": 30, "maxBackoffSeconds": 600}, 1, 30),
        ({"backoffSeconds": 30, "maxBackoffSeconds": 600}, 3, 120),
        ({"backoffSeconds": 30, "maxBackoffSeconds": 100}, 5, 100),
        ({"backoffSeconds": 30, "backoffPolicy": "Fixed"}, 5, 30),
        ({"backoffSeconds": 0, "maxBackoffSeconds": 0}, 4, 0),
    ],
)
def test_backoff(policy: dict, failures: int, expected: int) -> None:
    assert backoff_seconds(ftj(spec(runPolicy=policy)).spec, failures) == expected


def test_max_restarts_exhausted_fails_the_run_with_the_reason() -> None:
    job = started(spec(runPolicy={"maxRestarts": 1, "backoffSeconds": 0, "maxBackoffSeconds": 0}))
    _, job = step(job, failed_attempt(job, termination=exited(137, "OOMKilled")), later(10))
    _, job = step(job, Observed(), later(11))
    assert job.status is not None and job.status.attempt == 2
    plan, job = step(job, failed_attempt(job, attempt=2, termination=exited(137, "OOMKilled")), later(20))
    assert job.status is not None
    assert job.status.phase == "Failed"
    assert [a.reason for a in job.status.attempts] == ["OOMKilled", "OOMKilled"]
    status, reason, message = condition(job, "Failed")
    assert (status, reason) == ("True", "OOMKilled")
    assert message.startswith("attempt 2: worker 1 (pod sft-r1-a2-1-abcde) was OOMKilled")
    assert message.endswith("no restarts left (runPolicy.maxRestarts=1)")
    assert condition(job, "Stalled")[:2] == ("True", "OOMKilled")
    assert condition(job, "Reconciling")[0] == "False"
    assert job.status.runs[-1].result == "Failed"
    assert Deletion("Job", "sft-r1-a2") in plan.delete
    assert [(e.type, e.reason) for e in plan.events] == [("Warning", "OOMKilled")]
    # Finished: the next look only checks for drift.
    plan, _ = step(job, Observed(), later(30))
    assert plan.create == () and plan.requeue_after == SETTINGS.resync_seconds


def test_exit_code_78_fails_at_once_with_the_trainers_message() -> None:
    job = started()
    why = "dataset /kubetune/sources/dataset/v3.jsonl row 17: missing key 'messages'"
    plan, job = step(job, failed_attempt(job, termination=exited(78, "Error", why)), later(30))
    assert job.status is not None
    assert job.status.phase == "Failed"
    assert condition(job, "Failed") == ("True", "PermanentError", why)
    assert len(job.status.attempts) == 1 and job.status.attempts[0].exit_code == 78
    assert Deletion("Job", "sft-r1-a1") in plan.delete


@pytest.mark.parametrize(
    ("pod_fields", "reason", "message"),
    [
        (
            {"disruption": "PreemptionByScheduler", "termination": exited(143)},
            "Preempted",
            "worker 1 (pod sft-r1-a1-1-abcde) was preempted (PreemptionByScheduler)",
        ),
        (
            {"disruption": "DeletionByTaintManager"},
            "NodeLost",
            "worker 1 (pod sft-r1-a1-1-abcde) was lost with its node (DeletionByTaintManager)",
        ),
        (
            {"reason": "Evicted", "message": "The node was low on resource: memory."},
            "Evicted",
            "worker 1 (pod sft-r1-a1-1-abcde) was evicted: The node was low on resource: memory.",
        ),
        (
            {"termination": exited(1, "Error", "CUDA error: an illegal memory access")},
            "Error",
            "worker 1 (pod sft-r1-a1-1-abcde) failed with exit code 1: CUDA error: an illegal memory access",
        ),
    ],
)
def test_failures_are_told_apart(pod_fields: dict, reason: str, message: str) -> None:
    job = started()
    _, job = step(job, failed_attempt(job, **pod_fields), later(30))
    assert job.status is not None
    [attempt] = job.status.attempts
    assert (attempt.reason, attempt.message) == (reason, message)


def test_the_cause_is_the_first_failure_not_the_workers_stopped_after_it() -> None:
    job = started()
    stopped = pod(0, phase="Failed", termination=exited(143, at=later(40)))
    cause = pod(1, phase="Failed", termination=exited(137, "OOMKilled", at=later(50)))
    _, job = step(job, Observed(jobs=(job_state("sft-r1-a1", failed=True),), pods=(stopped, cause)), later(60))
    assert job.status is not None and job.status.attempts[0].reason == "OOMKilled"


def test_a_worker_that_vanished_is_a_lost_node() -> None:
    job = started()
    why = "BackoffLimitExceeded: Job has reached the specified backoff limit"
    gone = Observed(jobs=(job_state("sft-r1-a1", failed=True, failure_message=why),), pods=(pod(0),))
    _, job = step(job, gone, later(30))
    assert job.status is not None
    [attempt] = job.status.attempts
    assert attempt.reason == "NodeLost"
    assert "BackoffLimitExceeded" in (attempt.message or "")


def test_kueue_holds_the_job_and_its_removed_pods_are_no_failure() -> None:
    job = started(spec(resources={"queueName": "team-ml"}))
    held = Observed(
        jobs=(job_state("sft-r1-a1", suspended=True),),
        pods=(pod(0, phase="Failed", termination=exited(143)),),
    )
    plan, job = step(job, held, later(30))
    assert job.status is not None
    assert job.status.phase == "Pending"
    assert condition(job, "Reconciling")[1:] == ("Queued", "waiting for Kueue to admit the workers (queue team-ml)")
    assert job.status.attempts[0].reason is None
    assert plan.delete == () and ("Job", "sft-r1-a1") not in kinds(plan)


def test_a_refused_child_fails_the_run_as_an_invalid_spec() -> None:
    job = started()
    refused = Observed(rejection=Rejection(1, "Job sft-r1-a1: spec.template.spec.affinity: Invalid value"))
    _, job = step(job, refused, later(1))
    assert job.status is not None
    assert job.status.phase == "Failed"
    assert condition(job, "Failed")[:2] == ("True", "InvalidSpec")


# ----------------------------------------------------------------------------------------------
# suspend and deadlines
# ----------------------------------------------------------------------------------------------


def test_suspend_stops_the_workers_and_resume_starts_the_next_attempt_uncounted() -> None:
    job = started()
    _, job = step(job, RUNNING, later(5))
    suspend = spec(runPolicy={"suspend": True, "maxRestarts": 0})
    job = edited(job, suspend)
    plan, job = step(job, RUNNING, later(10))
    assert job.status is not None
    assert job.status.phase == "Suspended"
    assert (job.status.attempts[0].reason, job.status.attempts[0].completion_time) == ("Suspended", later(10))
    assert Deletion("Job", "sft-r1-a1") in plan.delete
    assert condition(job, "Reconciling")[:2] == ("True", "Suspending")
    assert condition(job, "Suspended")[0] == "True"
    assert reasons(plan) == ["Suspended"]
    assert job.status.observed_generation == 2

    _, job = step(job, Observed(), later(20))
    assert condition(job, "Reconciling")[0] == "False"
    assert job.status is not None and job.status.phase == "Suspended"

    job = edited(job, spec(runPolicy={"suspend": False, "maxRestarts": 0}))
    plan, job = step(job, Observed(), later(30))
    assert job.status is not None
    # Suspension does not count: maxRestarts 0 still allows the resumed attempt. Same run.
    assert (job.status.run, job.status.attempt, job.status.phase) == (1, 2, "Pending")
    assert kinds(plan)[-1] == ("Job", "sft-r1-a2")
    assert reasons(plan) == ["Resumed"]


def test_a_job_created_suspended_starts_nothing() -> None:
    plan, job = step(ftj(spec(runPolicy={"suspend": True})))
    assert job.status is not None
    assert job.status.phase == "Suspended" and job.status.attempts == []
    assert plan.create == ()


def test_the_deadline_fails_the_run_and_is_rechecked_in_time() -> None:
    job = started(spec(runPolicy={"activeDeadlineSeconds": 100}))
    plan, job = step(job, RUNNING, later(40))
    assert plan.requeue_after == pytest.approx(20)  # the poll interval comes first
    plan, job = step(job, RUNNING, later(90))
    assert plan.requeue_after == pytest.approx(10)
    plan, job = step(job, RUNNING, later(100))
    assert job.status is not None
    assert job.status.phase == "Failed"
    assert condition(job, "Failed")[1:] == (
        "DeadlineExceeded",
        "the run exceeded runPolicy.activeDeadlineSeconds (100s)",
    )
    assert job.status.attempts[-1].reason == "DeadlineExceeded"
    assert Deletion("Job", "sft-r1-a1") in plan.delete


def test_the_deadline_counts_from_the_resume() -> None:
    job = started(spec(runPolicy={"activeDeadlineSeconds": 100}))
    job = edited(job, spec(runPolicy={"activeDeadlineSeconds": 100, "suspend": True}))
    _, job = step(job, Observed(), later(50))
    job = edited(job, spec(runPolicy={"activeDeadlineSeconds": 100, "suspend": False}))
    _, job = step(job, Observed(), later(500))
    resumed = Observed(jobs=(job_state("sft-r1-a2", attempt=2),), pods=(pod(0, attempt=2), pod(1, attempt=2)))
    plan, job = step(job, resumed, later(560))
    assert job.status is not None and job.status.phase == "Running"
    assert plan.requeue_after == pytest.approx(20)


# ----------------------------------------------------------------------------------------------
# runs: spec changes, reruns
# ----------------------------------------------------------------------------------------------


def test_a_spec_change_with_restart_replaces_the_run() -> None:
    job = started()
    _, job = step(job, RUNNING, later(5))
    job = edited(job, spec(dataset={"source": "pvc://datasets/support/v4.jsonl"}))
    plan, job = step(job, Observed(jobs=RUNNING.jobs, pods=RUNNING.pods, config_maps=(config_map_of(job),)), later(10))
    assert job.status is not None
    assert (job.status.run, job.status.attempt, job.status.observed_generation) == (2, 1, 2)
    old, new = job.status.runs
    assert (old.result, old.reason, old.completion_time) == ("Cancelled", "SpecChanged", later(10))
    assert (new.generation, new.result, new.start_time) == (2, None, later(10))
    assert [a.attempt for a in job.status.attempts] == [1]
    assert {Deletion("Job", "sft-r1-a1"), Deletion("ConfigMap", "sft-r1-a1")} <= set(plan.delete)
    assert kinds(plan) == [
        ("ConfigMap", "sft-r2-a1"),
        ("Service", "sft-r2-a1"),
        ("Job", "sft-r2-a1"),
    ]
    assert reasons(plan) == ["SpecChanged", "SpecChanged"]


def test_a_spec_change_with_queue_waits_for_the_run_and_restarts_it_with_its_own_spec() -> None:
    queue = {"onSpecChange": "Queue", "backoffSeconds": 0, "maxBackoffSeconds": 0, "maxRestarts": 2}
    job = started(spec(runPolicy=queue))
    stored = config_map_of(job)
    _, job = step(job, RUNNING, later(5))
    job = edited(job, spec(runPolicy=queue, resources={"numNodes": 4}))

    plan, job = step(job, replace(RUNNING, config_maps=(stored,)), later(10))
    assert job.status is not None
    assert (job.status.run, job.status.phase, job.status.observed_generation) == (1, "Running", 2)
    assert "generation 2 is queued and starts when run 1 finishes" in condition(job, "Running")[2]
    assert reasons(plan) == ["RunQueued"]
    assert plan.delete == () and kinds(plan) == [("Service", "sft-r1-a1")]

    # Run 1 fails and restarts: its next attempt is rendered from run 1's stored spec (2 nodes, not 4).
    failing = replace(failed_attempt(job, termination=exited(1)), config_maps=(stored,))
    _, job = step(job, failing, later(20))
    plan, job = step(job, Observed(config_maps=(stored,)), later(21))
    assert job.status is not None and (job.status.run, job.status.attempt) == (1, 2)
    new_job = next(m for m in plan.create if m["kind"] == "Job")
    assert new_job["spec"]["completions"] == 2

    complete = job_state("sft-r1-a2", attempt=2, complete=True, completion_time=later(50))
    done = Observed(jobs=(complete,), config_maps=(stored,))
    _, job = step(job, done, later(51))
    assert job.status is not None and job.status.runs[-1].result == "Succeeded"
    plan, job = step(job, done, later(52))
    assert job.status is not None and job.status.run == 2
    assert next(m for m in plan.create if m["kind"] == "Job")["spec"]["completions"] == 4


def test_policy_edits_do_not_start_a_new_run() -> None:
    job = started()
    for policy in ({"maxRestarts": 5}, {"stallTimeoutSeconds": 60}, {"ttlSecondsAfterFinished": 10}):
        job = edited(job, spec(runPolicy=policy, budget={"maxCostUSD": 10}, evaluation={"maxEvalLoss": 2.0}))
        plan, job = step(job, RUNNING, later(5))
        assert job.status is not None and job.status.run == 1
        assert plan.delete == ()


def test_defaults_added_to_the_api_later_do_not_look_like_a_change() -> None:
    job = ftj(spec())
    explicit = ftj(spec(method={"type": "lora"}, training={"learningRate": 2.0e-4}))
    assert run_fingerprint(job.spec) == run_fingerprint(explicit.spec)
    assert run_fingerprint(job.spec) != run_fingerprint(ftj(spec(training={"learningRate": 1e-4})).spec)


def test_a_new_rerun_token_starts_a_new_run_and_the_same_token_does_not() -> None:
    job = started(annotations={"kubetune.io/rerun": "2026-11-01"})
    assert job.status is not None and job.status.runs[0].rerun_token == "2026-11-01"
    _, job = step(job, RUNNING, later(5))
    _, job = step(edited(job, annotations={"kubetune.io/rerun": "2026-11-01"}), RUNNING, later(6))
    assert job.status is not None and job.status.run == 1
    _, job = step(edited(job, annotations={"kubetune.io/rerun": "2026-11-02"}), RUNNING, later(7))
    assert job.status is not None
    assert (job.status.run, job.status.runs[0].reason, job.status.runs[1].rerun_token) == (
        2,
        "RerunRequested",
        "2026-11-02",
    )
    assert job.status.observed_generation == 1


def test_a_finished_run_is_followed_by_a_new_one_on_change() -> None:
    job = started()
    done = Observed(jobs=(job_state("sft-r1-a1", complete=True, completion_time=later(50)),))
    _, job = step(job, done, later(51))
    job = edited(job, spec(training={"epochs": 3}))
    plan, job = step(job, done, later(60))
    assert job.status is not None
    assert [r.result for r in job.status.runs] == ["Succeeded", None]
    assert job.status.completion_time is None and job.status.output is not None
    assert Deletion("Job", "sft-r1-a1") in plan.delete
    assert reasons(plan) == ["SpecChanged"]


# ----------------------------------------------------------------------------------------------
# cleanup, leftovers, deletion, issue 6 inputs
# ----------------------------------------------------------------------------------------------


def test_ttl_after_finished_removes_the_workers_and_keeps_the_record() -> None:
    job = started(spec(runPolicy={"ttlSecondsAfterFinished": 60}))
    finished = Observed(
        jobs=(job_state("sft-r1-a1", complete=True, completion_time=later(100)),),
        config_maps=(config_map_of(job),),
    )
    plan, job = step(job, finished, later(101))
    assert plan.requeue_after == pytest.approx(59)
    plan, after = step(job, finished, later(160))
    assert set(plan.delete) == {Deletion("Job", "sft-r1-a1"), Deletion("ConfigMap", "sft-r1-a1")}
    assert reasons(plan) == ["CleanedUp"]
    assert after.status == job.status


def test_leftovers_of_earlier_runs_are_deleted_and_strangers_ignored() -> None:
    job = started()
    observed = Observed(
        jobs=(job_state("sft-r0-a9", run=0, attempt=9), job_state("sft-r1-a1", uid="x", owner_uid="someone-else")),
        services=(
            ChildRef("Service", "sft-r0-a9", UID, 0, 9),
            ChildRef("Service", "sft-r0-a8", UID, 0, 8, deleting=True),
        ),
    )
    plan, _ = step(job, observed, later(1))
    assert set(plan.delete) == {Deletion("Job", "sft-r0-a9"), Deletion("Service", "sft-r0-a9")}
    # The stranger's Job is not ours: ours is still to be created (the API server will say it exists).
    assert ("Job", "sft-r1-a1") in kinds(plan)


def test_an_owned_claim_is_never_deleted_by_the_operator() -> None:
    template = {"spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "10Gi"}}}}
    job = started(spec(checkpoint={"claimName": None, "volumeClaimTemplate": template}))
    job = edited(job, spec())  # the checkpoints move to a named claim: a new run
    plan, _ = step(job, Observed(claims=(ChildRef("PersistentVolumeClaim", "sft-checkpoints", UID),)), later(5))
    assert plan.delete == ()


def test_a_job_being_deleted_gets_no_plan() -> None:
    job = edited(started(), deletionTimestamp="2026-11-27T09:10:00Z")
    plan = reconcile(job, RUNNING, SETTINGS, later(5))
    assert plan.create == () and plan.delete == () and plan.events == ()
    assert plan.status == job.status


def test_many_suspensions_keep_the_attempt_list_within_the_api_bound() -> None:
    job = started(spec(runPolicy={"maxRestarts": 1}))
    for i in range(120):
        job = edited(job, spec(runPolicy={"maxRestarts": 1, "suspend": i % 2 == 0}))
        _, job = step(job, Observed(), later(i))
    assert job.status is not None
    assert len(job.status.attempts) <= 101
    assert job.status.attempt == 61
    FineTuneJobStatus.model_validate(job.status.model_dump())


# ----------------------------------------------------------------------------------------------
# attempt fencing: the next attempt never runs beside the workers of an earlier one
# ----------------------------------------------------------------------------------------------


def test_the_next_attempt_waits_until_the_previous_attempts_workers_have_stopped() -> None:
    job = started()
    _, job = step(job, failed_attempt(job, termination=exited(1, at=later(60))), later(61))
    # The backoff (10 s) is over, but worker 0 still checkpoints after its SIGTERM (its Job is being deleted).
    stopping = Observed(
        jobs=(job_state("sft-r1-a1", failed=True, deleting=True),),
        pods=(pod(0, deleting=True, deletion_due=later(91)), pod(1, phase="Failed", termination=exited(1))),
    )
    plan, job = step(job, stopping, later(75))
    assert job.status is not None and job.status.attempt == 1
    assert ("Job", "sft-r1-a2") not in kinds(plan) and plan.create == ()
    assert condition(job, "Reconciling")[1:] == (
        "WaitingForWorkers",
        "attempt 2 of run 1 starts when the workers of earlier attempts have stopped: 1 still terminating "
        "(pod sft-r1-a1-0-abcde on node gpu-node-0)",
    )
    assert reasons(plan) == []
    # Terminated (its containers exited) is stopped, even while the object is still there.
    terminated = replace(stopping, pods=(replace(stopping.pods[0], phase="Failed"), stopping.pods[1]))
    plan, job = step(job, terminated, later(80))
    assert job.status is not None and job.status.attempt == 2
    assert ("Job", "sft-r1-a2") in kinds(plan)


def test_a_worker_past_its_grace_period_is_waited_for_with_a_warning_saying_what_to_do() -> None:
    job = started()
    _, job = step(job, failed_attempt(job, termination=exited(1, at=later(60))), later(61))
    # Its Job is deleted in the foreground: it stays until its pods are gone.
    stuck = Observed(
        jobs=(job_state("sft-r1-a1", deleting=True),), pods=(pod(0, deleting=True, deletion_due=later(91)),)
    )
    plan, job = step(job, stuck, later(400))
    assert job.status is not None and job.status.attempt == 1
    status, reason, message = condition(job, "Reconciling")
    assert (status, reason) == ("True", "WorkersNotStopping")
    assert "5m9s past its grace period" in message
    assert "If gpu-node-0 is lost for good, delete its Node or taint it node.kubernetes.io/out-of-service" in message
    assert [(e.type, e.reason) for e in plan.events] == [("Warning", "WorkersNotStopping")]
    plan, job = step(job, stuck, later(430))
    assert plan.events == ()  # once
    # Kubernetes removed the pod (its node was declared gone): the next attempt starts.
    plan, job = step(job, Observed(), later(440))
    assert job.status is not None and job.status.attempt == 2


def test_resuming_a_suspended_run_waits_for_its_workers_to_stop() -> None:
    job = started()
    _, job = step(job, RUNNING, later(5))
    _, job = step(edited(job, spec(runPolicy={"suspend": True})), RUNNING, later(10))
    checkpointing = replace(
        RUNNING, pods=tuple(replace(p, deleting=True, deletion_due=later(40)) for p in RUNNING.pods)
    )
    job = edited(job, spec(runPolicy={"suspend": False}))
    plan, job = step(job, checkpointing, later(20))
    assert job.status is not None and job.status.attempt == 1 and plan.create == ()
    assert condition(job, "Reconciling")[1] == "WaitingForWorkers"
    plan, job = step(job, Observed(), later(30))
    assert job.status is not None and job.status.attempt == 2
    assert reasons(plan) == ["Resumed"]


def test_a_deadline_still_ends_a_run_that_waits_for_stuck_workers() -> None:
    job = started(spec(runPolicy={"activeDeadlineSeconds": 600, "backoffSeconds": 0, "maxBackoffSeconds": 0}))
    _, job = step(job, failed_attempt(job, termination=exited(1)), later(60))
    stuck = Observed(
        jobs=(job_state("sft-r1-a1", deleting=True),), pods=(pod(0, deleting=True, deletion_due=later(90)),)
    )
    _, job = step(job, stuck, later(599))
    assert job.status is not None and job.status.phase == "Pending"
    _, job = step(job, stuck, later(600))
    assert job.status is not None and job.status.phase == "Failed"
    assert condition(job, "Failed")[1] == "DeadlineExceeded"
    assert job.status.attempt == 1


# ----------------------------------------------------------------------------------------------
# outputs outlive their job
# ----------------------------------------------------------------------------------------------

TEMPLATE = {"spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "10Gi"}}}}


def test_a_templated_claim_that_receives_the_outputs_has_no_owner() -> None:
    plan, _ = step(ftj(spec(checkpoint={"claimName": None, "volumeClaimTemplate": TEMPLATE})))
    claim = plan.create[0]
    assert (claim["kind"], claim["metadata"]["name"]) == ("PersistentVolumeClaim", "sft-checkpoints")
    assert "ownerReferences" not in claim["metadata"]
    # With the outputs on another claim, the template's claim holds checkpoints only, and goes with the job.
    plan, _ = step(
        ftj(spec(checkpoint={"claimName": None, "volumeClaimTemplate": TEMPLATE}, output={"claimName": "ft-models"}))
    )
    assert plan.create[0]["metadata"]["ownerReferences"][0]["uid"] == UID


def test_an_owned_claim_that_holds_outputs_is_released_and_a_kept_one_is_used() -> None:
    job = started(spec(checkpoint={"claimName": None, "volumeClaimTemplate": TEMPLATE}))
    owned = ChildRef("PersistentVolumeClaim", "sft-checkpoints", UID)  # created by an operator before this rule
    plan, _ = step(job, Observed(claims=(owned,)), later(5))
    assert plan.release == ("sft-checkpoints",)
    assert ("PersistentVolumeClaim", "sft-checkpoints") not in kinds(plan)
    kept = ChildRef("PersistentVolumeClaim", "sft-checkpoints", None)
    plan, _ = step(job, Observed(claims=(kept,)), later(6))
    assert plan.release == () and ("PersistentVolumeClaim", "sft-checkpoints") not in kinds(plan)


# ----------------------------------------------------------------------------------------------
# paths carry the job's uid
# ----------------------------------------------------------------------------------------------


def test_a_run_that_checkpointed_before_paths_carried_the_uid_says_its_next_attempt_starts_afresh() -> None:
    job = started()
    status = job.status
    assert status is not None
    legacy = "pvc://ft-checkpoints/ml/sft/runs/1/checkpoints/step-300"
    old = status.model_copy(update={"checkpoint": CheckpointStatus(latest=legacy, step=300, saved_at=T0)})
    job = job.model_copy(update={"status": old})
    _, job = step(job, failed_attempt(job, termination=exited(1)), later(60))
    plan, job = step(job, Observed(), later(80))
    assert job.status is not None and job.status.attempt == 2 and job.status.checkpoint is not None
    assert (job.status.checkpoint.latest, job.status.checkpoint.step) == (None, None)
    [ignored] = job.status.checkpoint.ignored
    assert ignored.path == legacy and "before checkpoint paths carried the job's uid" in ignored.reason
    assert condition(job, "CheckpointsIgnored")[:2] == ("True", "NotThisTraining")
    assert [(e.type, e.reason) for e in plan.events] == [
        ("Warning", "CheckpointsIgnored"),
        ("Normal", "AttemptStarted"),
    ]
